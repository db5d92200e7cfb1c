"""What client-level differential privacy costs: FedAvg and FedMIC without DP and at epsilon 8, 4, 1.

    python -m fedmic_pipeline.benchmarks.privacy_utility                       # 20 rounds, join 0.5, seed 42
    python -m fedmic_pipeline.benchmarks.privacy_utility --methods fedavg --epsilons 8 --rounds 10
    python -m fedmic_pipeline.benchmarks.privacy_utility --method-rounds fedmic=10   # FedMIC is ~4x slower

Runs each method with the default recipe (``conf/base/parameters_federated_training.yml``)
on the partition in ``<root>/data/05_model_input`` (``kedro run --pipelines
data_ingestion,data_partition`` makes it), once without DP and once per target epsilon
(the noise multiplier calibrated for the run's rounds and sampling rate, ``core/privacy.py``),
all with the same seed, and, for FedMIC, once more with the noise on the clients at the
first epsilon, which is where the SVD meets the noise. Prints one row per run: the global
model (selected on validation) and the personalized models on their test sets, epsilon and
delta spent, the noise multiplier, and the bytes uploaded; writes the table to ``--output``
(default ``docs/results/privacy.md``) and the raw rows to ``data/08_reporting/privacy/``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fedmic_pipeline import federation, model_evaluation
from fedmic_pipeline.benchmarks.cli import configure_logging, publish, run_arguments
from fedmic_pipeline.benchmarks.recipe import load_saved_partition

logger = logging.getLogger(__name__)

HEADLINE = (
    ("global.balanced_accuracy", "global bal. acc"),
    ("global.macro_auc", "global AUC"),
    ("personalized.mean.balanced_accuracy", "personalized bal. acc"),
    ("global.constant_predictor", "global constant"),
)


def settings(
    epsilons: list[float], method: str, clip_norm: float, noise_multipliers: list[float] = ()
) -> list[tuple[str, dict[str, Any] | None]]:
    """(label, dp block or None) for each run of ``method``."""
    runs: list[tuple[str, dict[str, Any] | None]] = [("no DP", None)]
    runs += [(f"server, eps {eps:g}", {"target_epsilon": eps, "clip_norm": clip_norm, "placement": "server"}) for eps in epsilons]
    runs += [(f"server, sigma {sigma:g}", {"noise_multiplier": sigma, "clip_norm": clip_norm, "placement": "server"})
             for sigma in noise_multipliers]  # fmt: skip
    if method in ("fedmic", "fedkd") and epsilons:
        eps = epsilons[0]
        runs.append((f"client, eps {eps:g}", {"target_epsilon": eps, "clip_norm": clip_norm, "placement": "client"}))
    return runs


def _with_dp(algorithm_params: Mapping[str, Any], method: str, dp: Mapping[str, Any] | None, norm: str | None = None) -> dict[str, Any]:
    params = {key: dict(value or {}) for key, value in algorithm_params.items()}
    if norm is not None:
        params["common"]["model_options"] = {**dict(params["common"].get("model_options") or {}), "norm": norm}
    if dp is not None:
        params[method]["dp"] = dict(dp)
    return params


def run(
    methods: list[str], epsilons: list[float], clip_norm: float, rounds: Mapping[str, int], join_ratio: float, seed: int,
    threads: int, root: Path, noise_multipliers: list[float] = (), norm: str | None = None,
) -> list[dict]:
    """One row per (method, setting); ``rounds``: each method's number of rounds; ``norm``:
    the shared model's normalization instead of the recipe's (BatchNorm)."""
    conf = yaml.safe_load((root / "conf/base/parameters_federated_training.yml").read_text())
    clients, global_test, manifest, info = load_saved_partition(root / "data")
    evaluation = {**conf["evaluation"], "n_bootstrap": 0}
    rows = []
    for method in methods:
        training = {**conf["training"], "num_rounds": rounds[method], "join_ratio": join_ratio, "seed": seed,
                    "num_threads": threads, "checkpoint_every": 0, "progress": "none"}  # fmt: skip
        for label, dp in settings(epsilons, method, clip_norm, noise_multipliers):
            started = time.perf_counter()
            params = _with_dp(conf["algorithm_params"], method, dp, norm)
            report, summary, result = federation.run_and_evaluate(
                method, params, info, clients, global_test, manifest.get("held_out_device"), training, evaluation
            )
            headline = model_evaluation.headline_metrics(report, summary)
            spent = result.server_state.get("privacy") or {}
            clipped = [m.get("dp/clipped") for r in result.history for m in r["client_metrics"] if "dp/clipped" in m]
            rows.append({
                "method": method if norm is None else f"{method} ({norm} norm)", "setting": label, **{k: headline.get(k) for k, _ in HEADLINE},
                "epsilon": spent.get("epsilon"), "delta": spent.get("delta"), "noise_multiplier": spent.get("noise_multiplier"),
                "sample_rate": spent.get("sample_rate"), "clip_fraction": sum(clipped) / len(clipped) if clipped else None,
                "bytes_up_total": result.totals()["bytes_up_total"], "rounds": rounds[method], "seed": seed,
                "wall_s": time.perf_counter() - started,
            })  # fmt: skip
            logger.info("%s %s: %s", method, label, {k: rows[-1][k] for k in ("global.balanced_accuracy", "epsilon", "bytes_up_total")})
    return rows


def _cell(value: Any, digits: int = 3, flag: bool = False) -> str:
    if value is None:
        return "n/a"
    if flag or isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def markdown(rows: list[dict], join_ratio: float, seed: int, clip_norm: float) -> str:
    head = ["method", "rounds", "DP (placement, target)", "noise multiplier", "epsilon spent", "delta", *[h for _, h in HEADLINE],
            "clipped updates", "MB uploaded", "upload vs no DP", "wall (s)"]  # fmt: skip
    lines = [
        f"# Client-level DP: utility, budget and bytes (join ratio {join_ratio}, seed {seed}, clip norm {clip_norm})",
        "",
        "Default recipe and partition (PneumoniaMNIST, 10 hospitals, Dirichlet 0.3); one seed. "
        "`python -m fedmic_pipeline.benchmarks.privacy_utility` reprints it.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    baseline = {row["method"]: row["bytes_up_total"] for row in rows if row["setting"] == "no DP"}
    for row in rows:
        base = baseline.get(row["method"])
        cells = [
            row["method"], str(row["rounds"]), row["setting"], _cell(row["noise_multiplier"], 2), _cell(row["epsilon"], 2),
            "n/a" if row["delta"] is None else f"{row['delta']:g}",
            *[_cell(row[key], flag=key.endswith("constant_predictor")) for key, _ in HEADLINE],
            "n/a" if row["clip_fraction"] is None else f"{100 * row['clip_fraction']:.0f} %",
            f"{row['bytes_up_total'] / 1e6:.2f}", f"x{row['bytes_up_total'] / base:.2f}" if base else "n/a", f"{row['wall_s']:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = run_arguments(__doc__)
    parser.add_argument("--methods", nargs="+", default=["fedavg", "fedmic"])
    parser.add_argument("--epsilons", nargs="*", type=float, default=[8.0, 4.0, 1.0])
    parser.add_argument("--clip-norm", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--noise-multipliers", nargs="*", type=float, default=[], help="extra runs at these fixed multipliers")
    parser.add_argument("--norm", choices=["batch", "group"], default=None, help="the shared model's normalization (default: the recipe's)")
    parser.add_argument("--method-rounds", nargs="*", default=[], metavar="METHOD=N", help="rounds of one method (others: --rounds)")
    parser.add_argument("--output", type=Path, default=Path("docs/results/privacy.md"))
    args = parser.parse_args(argv)
    rounds = {method: args.rounds for method in args.methods}
    for item in args.method_rounds:
        method, _, count = item.partition("=")
        if method not in rounds or not count.isdigit() or int(count) < 1:
            parser.error(f"--method-rounds takes METHOD=N with METHOD one of {', '.join(args.methods)} and N >= 1, got {item!r}.")
        rounds[method] = int(count)
    configure_logging()
    rows = run(args.methods, args.epsilons, args.clip_norm, rounds, args.join_ratio, args.seed, args.threads, args.root,
               args.noise_multipliers, args.norm)  # fmt: skip
    text = markdown(rows, args.join_ratio, args.seed, args.clip_norm)
    publish(text, json.loads(json.dumps(rows, default=str)), args.root / "data/08_reporting/privacy", "privacy_utility")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
