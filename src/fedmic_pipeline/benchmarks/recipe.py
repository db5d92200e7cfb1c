"""The learning-recipe ablation: each choice of `conf/base` switched off, side by side.

    python -m fedmic_pipeline.benchmarks.recipe --method fedavg --rounds 20
    python -m fedmic_pipeline.benchmarks.recipe --method fedmic --variants recipe old_defaults

Runs one method on the partition in `data/05_model_input` (run `kedro run --pipelines
data_ingestion,data_partition` first) once per variant, all with the same seed, and
prints one row per variant: the global model selected on validation and its last round
on the official test set, the personalized models on the local test splits, constant
predictors, and the validation curve. Writes `data/08_reporting/recipe/<method>.md` and
`.json`. One torch thread by default, so the figures are comparable on a shared machine.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedmic_pipeline import federation
from fedmic_pipeline import model_evaluation
from fedmic_pipeline.benchmarks.cli import configure_logging, publish, run_arguments

logger = logging.getLogger(__name__)

#: Overrides of `algorithm_params.common` (or the method's own block) per variant.
VARIANTS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "no_logit_adjustment": {"loss": "ce"},
    "no_bn_recalibration": {"bn_recalibrate": False},
    "constant_lr": {"lr_schedule": "constant"},
    "no_momentum": {"momentum": 0.0},
    "group_norm": {"model_options": {"norm": "group"}},
    "teacher_stem_stride_2": {"teacher_options": {"stem_stride": 2}},
    "old_defaults": {
        "momentum": 0.0, "lr_schedule": "constant", "loss": "ce", "bn_recalibrate": False, "max_adaptive_weight": 100.0,
    },  # fmt: skip
}
_DISTILLATION_ONLY = ("max_adaptive_weight", "teacher_options")
HEADLINE = (
    ("global.balanced_accuracy", "global bal. acc"),
    ("global.macro_auc", "global AUC"),
    ("global_last.balanced_accuracy", "last round bal. acc"),
    ("global.pooled_local_test.accuracy", "pooled local-test acc"),
    ("personalized.mean.balanced_accuracy", "personalized bal. acc"),
    ("personalized.num_constant_sites", "constant sites"),
    ("selection.global_round", "selected round"),
)


def load_saved_partition(data_dir: Path) -> tuple[dict, dict, dict, dict]:
    """(client arrays, global test set, manifest, dataset_info) as `make run` left them in ``data_dir``."""
    clients = {path.stem: dict(np.load(path)) for path in sorted((data_dir / "05_model_input/clients").glob("client_*.npz"))}
    if not clients:
        raise SystemExit(f"No client files in {data_dir / '05_model_input/clients'}: run `kedro run --pipelines data_ingestion,data_partition`.")
    global_test = dict(np.load(data_dir / "05_model_input/global_test.npz"))
    manifest = json.loads((data_dir / "05_model_input/partition_manifest.json").read_text())
    info = json.loads((data_dir / "03_primary/dataset_info.json").read_text())
    return clients, global_test, manifest, info


def _params_for(method: str, base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    params = {key: dict(value or {}) for key, value in base.items()}
    common = {k: v for k, v in overrides.items() if k not in _DISTILLATION_ONLY}
    params["common"].update(common)
    if method in ("fedmic", "fedkd"):
        params[method].update({k: v for k, v in overrides.items() if k in _DISTILLATION_ONLY})
    return params


def run(method: str, variants: list[str], rounds: int, join_ratio: float, seed: int, threads: int, root: Path) -> list[dict]:
    conf = yaml.safe_load((root / "conf/base/parameters_federated_training.yml").read_text())
    clients, global_test, manifest, info = load_saved_partition(root / "data")
    training = {**conf["training"], "num_rounds": rounds, "join_ratio": join_ratio, "seed": seed, "num_threads": threads}
    evaluation = {**conf["evaluation"], "n_bootstrap": 0}
    rows = []
    for name in variants:
        started = time.perf_counter()
        params = _params_for(method, conf["algorithm_params"], VARIANTS[name])
        report, summary, result = federation.run_and_evaluate(
            method, params, info, clients, global_test, manifest.get("held_out_device"), training, evaluation
        )
        headline = model_evaluation.headline_metrics(report, summary)
        curve = [r["global_val_balanced_accuracy"] for r in result.history]
        rows.append({"variant": name, **{k: headline.get(k) for k, _ in HEADLINE}, "val_curve": curve,
                     "wall_s": time.perf_counter() - started})  # fmt: skip
        logger.info("%s %s: %s", method, name, {k: rows[-1][k] for k, _ in HEADLINE})
    return rows


def markdown(method: str, rows: list[dict], rounds: int, join_ratio: float, seed: int) -> str:
    head = ["variant", *[h for _, h in HEADLINE], "validation curve (global bal. acc per round)", "wall (s)"]
    lines = [
        f"# Learning recipe ablation: {method}, {rounds} rounds, join ratio {join_ratio}, seed {seed}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [row["variant"]]
        for key, _ in HEADLINE:
            value = row[key]
            cells.append("n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value)))
        curve = " ".join("-" if v is None else f"{v:.2f}" for v in row["val_curve"])
        cells += [curve, f"{row['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = run_arguments(__doc__)
    parser.add_argument("--method", default="fedavg")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    configure_logging()
    rows = run(args.method, args.variants, args.rounds, args.join_ratio, args.seed, args.threads, args.root)
    text = markdown(args.method, rows, args.rounds, args.join_ratio, args.seed)
    publish(text, rows, args.root / "data/08_reporting/recipe", args.method)


if __name__ == "__main__":
    main()
