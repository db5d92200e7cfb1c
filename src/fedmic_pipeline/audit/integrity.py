"""Re-hash the data the audited run used, against what was recorded when it ran.

The references are what the run itself recorded: its tags (`data.md5:<path>` for every file
it read, `partition.manifest_sha256`, `dataset.md5`), the partition and synthetic manifests'
per-array sha256 and dataset_info's md5. dvc.lock is a reference only for a run that
`dvc repro` made (tag `dvc.stage`): after a plain `kedro run` the committed lock describes
other data, and comparing against it would report every regenerated file as changed. Each check carries the role of what it hashed: a changed
input of the run is a FAIL (the results no longer belong to the data on disk), a changed
output or an unused set only a WARN. Raising on a FAIL is left to the pipeline's
`enforce_integrity` node, after the report is saved.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmic_pipeline.audit.data_sections import data_category
from fedmic_pipeline.hashing import dvc_dir_md5, file_digest, npz_member_hashes
from fedmic_pipeline.audit.inputs import AuditContext, AuditInputs
from fedmic_pipeline.audit.report_values import FAIL, MISSING, PASS, SKIPPED, WARN
from fedmic_pipeline.tracking.lineage import content_hash

INPUT, OUTPUT, UNUSED = "input", "output", "not used"
_RUN_OUTPUT_PREFIXES = ("data/06_", "data/07_", "data/08_reporting/evaluation", "data/08_reporting/audit", "data/08_reporting/compare")


def _check(category: str, subject: str, reference: str, expected: Any, actual: Any, status: str,
           detail: str = "", role: str = INPUT) -> dict[str, Any]:  # fmt: skip
    """One integrity check. `role`: input (data or evidence the run depended on: a change is
    tampering), output (what the run or a later stage produced: a change is a warning, e.g.
    regenerated without `dvc repro`), not used (e.g. synthetic sets of a real-only run)."""
    return {"category": category, "subject": subject, "reference": reference, "expected": expected, "actual": actual,
            "status": status, "detail": detail, "role": role, "used_by_run": role != UNUSED}  # fmt: skip


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def _npz_checks(
    category: str, directory: Path, expected: Mapping[str, Mapping[str, str]], reference: str, role: str,
    root: Path, flag_extra: bool = True,
) -> list[dict[str, Any]]:
    """Each .npz file's arrays against a manifest's sha256; files the manifest lacks are flagged too."""
    bad_status = FAIL if role == INPUT else WARN
    checks = []
    for client, members in sorted(expected.items()):
        path = directory / f"{client}.npz"
        subject = _rel(path, root)
        if not path.is_file():
            checks.append(_check(category, subject, reference, "present", "missing", MISSING, "file is gone", role))
            continue
        actual, error = npz_member_hashes(path)
        if error:
            checks.append(_check(category, subject, reference, f"readable .npz with {len(members)} arrays", f"unreadable: {error}",
                                 bad_status, "the file is not a valid .npz any more", role))  # fmt: skip
            continue
        bad = [(name, sha, actual.get(name, "missing")) for name, sha in sorted(members.items()) if actual.get(name) != sha]
        bad += [(name, "absent", actual[name]) for name in sorted(set(actual) - set(members))]
        for name, want, got in bad:
            shown = f"{name}.npy {got}" if str(got).startswith(("unreadable", "missing")) else f"{name}.npy sha256 {got}"
            checks.append(_check(category, subject, reference, f"{name}.npy sha256 {want}", shown, bad_status,
                                 f"array '{name}' differs from the manifest", role))  # fmt: skip
        if not bad:
            checks.append(_check(category, subject, reference, f"{len(members)} arrays as recorded", "identical", PASS, "", role))
    if flag_extra and directory.is_dir():
        for extra in sorted(p for p in directory.glob("*.npz") if p.stem not in expected):
            checks.append(_check(category, _rel(extra, root), reference, "no such file", "present", bad_status,
                                 "a file the manifest does not list: training would load it as one more client", role))  # fmt: skip
    return checks


def _output_stages(stages: Mapping[str, Any]) -> set[str]:
    """Stages that train or consume the run (their outputs may legitimately be newer than a lock).

    A stage writing models, model outputs or evaluation/audit/compare reports, and every
    stage that depends on one of those; the rest (ingest, partition, synthesize) made the
    run's inputs.
    """
    def outs(stage: str) -> list[str]:
        return [str(o.get("path", "")) for o in (stages[stage].get("outs") or [])]

    downstream = {s for s in stages if any(p.startswith(_RUN_OUTPUT_PREFIXES) for p in outs(s))}
    changed = True
    while changed:
        produced = {p for s in downstream for p in outs(s)}
        more = {s for s in stages if s not in downstream and any(str(d.get("path")) in produced for d in (stages[s].get("deps") or []))}
        downstream |= more
        changed = bool(more)
    return downstream


def _role(path: str, stage: str, output_stages: set[str], synthetic_used: bool) -> str:
    if data_category(path) == "synthetic_sets" and not synthetic_used:
        return UNUSED
    return OUTPUT if stage in output_stages else INPUT


def _dvc_checks(lock: Mapping[str, Any] | None, project_root: Path, dvc_cache: Path, synthetic_used: bool) -> list[dict[str, Any]]:
    """Every dvc.lock output on disk against its recorded md5 (directories file by file when the
    DVC cache still has the directory's listing)."""
    stages = (lock or {}).get("stages") or {}
    output_stages = _output_stages(stages)
    checks = []
    for stage, record in stages.items():
        for out in record.get("outs", []) or []:
            if "md5" not in out:
                continue
            rel, want = out["path"], out["md5"]
            path = project_root / rel
            role = _role(rel, stage, output_stages, synthetic_used)
            bad_status = FAIL if role == INPUT else WARN
            reference = f"dvc.lock ({stage} stage)"
            why = ("differs from the version dvc.lock records: modified after the stage ran, or regenerated without "
                   "`dvc repro`/`dvc commit`")  # fmt: skip
            if not path.exists():
                checks.append(_check("dvc", rel, reference, want, "missing", MISSING,
                                     "recorded by dvc.lock but absent (`dvc checkout` restores cached outputs)", role))  # fmt: skip
                continue
            if str(want).endswith(".dir"):
                got, listing = dvc_dir_md5(path)
                if got == want:
                    checks.append(_check("dvc", rel, reference, want, got, PASS, f"{len(listing)} files", role))
                    continue
                recorded = _dvc_dir_listing(dvc_cache, want)
                if recorded is None:
                    checks.append(_check("dvc", rel, reference, want, got, bad_status,
                                         f"directory {why} (the DVC cache has no listing that would name the files)", role))  # fmt: skip
                    continue
                for name in sorted(set(recorded) | set(listing)):
                    if recorded.get(name) != listing.get(name):
                        checks.append(_check("dvc", f"{rel}/{name}", reference, recorded.get(name, "absent"),
                                             listing.get(name, "missing"), bad_status, f"file {why}", role))  # fmt: skip
            else:
                got = file_digest(path)
                ok = got == want
                checks.append(_check("dvc", rel, reference, want, got, PASS if ok else bad_status, "" if ok else f"file {why}", role))
    return checks


def _dvc_dir_listing(cache: Path, dir_md5: str) -> dict[str, str] | None:
    """relpath -> md5 of a directory output, from the `.dir` object DVC keeps in its cache."""
    digest = dir_md5.removesuffix(".dir")
    for candidate in (cache / "files" / "md5" / digest[:2] / f"{digest[2:]}.dir", cache / digest[:2] / f"{digest[2:]}.dir"):
        if candidate.is_file():
            with contextlib.suppress(Exception):
                return {entry["relpath"]: entry["md5"] for entry in json.loads(candidate.read_text())}
    return None


def _lock_since_run(lock: Mapping[str, Any] | None, run_tags: Mapping[str, str], synthetic_used: bool) -> list[dict[str, Any]]:
    """dvc.lock now against the copy the run recorded in its `dvc.*` tags. Inputs only: a
    stage's own outputs are always one version behind in the tags of the run that produced them."""
    stages = (lock or {}).get("stages") or {}
    output_stages = _output_stages(stages)
    current = {f"{s}:{o['path']}": o["md5"] for s, r in stages.items() for o in (r.get("outs") or []) if "md5" in o}
    checks, same = [], 0
    for key, value in sorted(run_tags.items()):
        if not key.startswith("dvc.") or ":" not in key:
            continue
        stage, out_path = key[len("dvc."):].split(":", 1)
        role = _role(out_path, stage, output_stages, synthetic_used)
        if role == OUTPUT:
            continue
        now = current.get(f"{stage}:{out_path}", "absent from dvc.lock")
        if now == value:
            same += 1
            continue
        checks.append(_check("dvc", out_path, f"dvc.lock when the run trained (run tag {key})", value, now,
                             FAIL if role == INPUT else WARN,
                             "dvc.lock now records another version of this input than when the run trained: "
                             "the data was regenerated or edited since", role))  # fmt: skip
    if same:
        checks.append(_check("dvc", "dvc.lock", "the run's dvc.* tags (dvc.lock when the run trained)",
                             f"{same + len(checks)} input entries as recorded", f"{same} identical", PASS if not checks else FAIL,
                             "" if not checks else "see the rows above"))  # fmt: skip
    return checks


def _inputs_since_run(run_tags: Mapping[str, str], project_root: Path) -> list[dict[str, Any]]:
    """Every file the run read, hashed now, against the md5 the run recorded (`data.md5:*` tags)."""
    checks = []
    for key, recorded in sorted(run_tags.items()):
        if not key.startswith("data.md5:"):
            continue
        path = key[len("data.md5:"):]
        reference = f"run tag {key} (hashed when the run trained)"
        if not (project_root / path).exists():
            checks.append(_check("run inputs", path, reference, recorded, "missing", MISSING, "an input of the run is gone"))
            continue
        now = file_digest(project_root / path)
        checks.append(_check("run inputs", path, reference, recorded, now, PASS if now == recorded else FAIL,
                             "" if now == recorded else "the run trained on other data than is here now"))  # fmt: skip
    return checks


def _made_by_dvc_repro(run_tags: Mapping[str, str]) -> bool:
    return run_tags.get("dvc.stage", "none") not in ("", "none")


def verify_integrity(inputs: AuditInputs, context: AuditContext) -> dict[str, Any]:
    """Re-hash the data the run used against what was recorded when it ran."""
    project_root, paths, lock = context.project_root, context.paths, context.lock
    run_tags, run_tags_source, synthetic_used = context.run_tags, context.run_tags_source, context.synthetic_used
    dataset_info, partition_manifest, synthetic_manifest = inputs.dataset_info, inputs.partition_manifest, inputs.synthetic_manifest
    checks: list[dict[str, Any]] = []
    # 1. the local run record (mlflow_run.json) against the tracking store's copy
    if run_tags_source == "mlflow":
        differing = sorted(k for k in context.local_tags if run_tags.get(k) != context.local_tags[k])
        checks.append(_check("run record", "mlflow_run.json (tags)", "MLflow run tags", "same as the tracking store",
                             "identical" if not differing else f"differs in {differing}", FAIL if differing else PASS,
                             "" if not differing else "the local run record was edited after the run"))  # fmt: skip
    # 2. the partition manifest against the hash the run recorded
    manifest_path = paths.get("partition_manifest", "data/05_model_input/partition_manifest.json")
    want = run_tags.get("partition.manifest_sha256")
    got = content_hash(partition_manifest)
    checks.append(_check("partition", manifest_path, f"run tag partition.manifest_sha256 ({run_tags_source})", want or "not recorded", got,
                         SKIPPED if not want else (PASS if want == got else FAIL),
                         "" if not want or want == got else "the partition manifest is not the one the run trained on"))  # fmt: skip
    # 3. the raw file: dataset_info's md5 against the run's tag, and the file against it
    want = run_tags.get("dataset.md5")
    checks.append(_check("raw", "dataset_info.json (md5 field)", f"run tag dataset.md5 ({run_tags_source})", want or "not recorded",
                         dataset_info.get("md5"), SKIPPED if not want else (PASS if want == dataset_info.get("md5") else FAIL)))  # fmt: skip
    raw_file = dataset_info.get("file")
    if raw_file:
        raw_path = project_root / raw_file
        if raw_path.is_file():
            got = file_digest(raw_path)
            ok = got == dataset_info.get("md5")
            checks.append(_check("raw", raw_file, "dataset_info.json md5 (verified against medmnist.INFO at ingestion)",
                                 dataset_info.get("md5"), got, PASS if ok else FAIL, "" if ok else "the raw file changed since ingestion"))  # fmt: skip
        else:
            checks.append(_check("raw", raw_file, "dataset_info.json md5", dataset_info.get("md5"), "missing", MISSING, "raw file is gone"))
    # 4. every client partition file, array by array, against the manifest
    clients_dir = project_root / paths.get("clients", "data/05_model_input/clients")
    checks += _npz_checks("partition", clients_dir, partition_manifest.get("sha256") or {}, "partition_manifest.json sha256", INPUT, project_root)
    # 5. the global test set
    test_path = project_root / paths.get("global_test", "data/05_model_input/global_test.npz")
    checks += _npz_checks("partition", test_path.parent, {test_path.stem: partition_manifest.get("global_test_sha256") or {}},
                          "partition_manifest.json global_test_sha256", INPUT, project_root, flag_extra=False)  # fmt: skip
    # 6. synthetic sets, when a manifest exists (tampering matters only when the run used them)
    if synthetic_manifest is not None:
        synthetic_dir = project_root / paths.get("synthetic_clients", "data/05_model_input/synthetic")
        checks += _npz_checks("synthetic", synthetic_dir, synthetic_manifest.get("sha256") or {}, "synthetic_manifest.json sha256",
                              INPUT if synthetic_used else UNUSED, project_root)  # fmt: skip
    # 7. every file the run read, against the hashes it recorded
    checks += _inputs_since_run(run_tags, project_root)
    # 8. dvc.lock, only for a run `dvc repro` made: everything it versions, and whether it moved since
    if _made_by_dvc_repro(run_tags):
        checks += _dvc_checks(lock, project_root, project_root / paths.get("dvc_cache", ".dvc/cache"), synthetic_used)
        checks += _lock_since_run(lock, run_tags, synthetic_used)
    elif lock is not None:
        checks.append(_check("dvc", "dvc.lock", "the run's dvc.stage tag", "a run made by `dvc repro`",
                             f"made by `kedro run` (dvc.stage = {run_tags.get('dvc.stage', 'not recorded')})", SKIPPED,
                             "dvc.lock describes the data of the last `dvc repro`, not this run's; the run's own input "
                             "hashes are checked above", role=UNUSED))  # fmt: skip
    return summarise_checks(checks)


def summarise_checks(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """FAIL when an input of the run changed; WARN when something is missing or an output differs."""
    failed = [c for c in checks if c["status"] == FAIL]
    missing = [c for c in checks if c["status"] == MISSING and c["used_by_run"]]
    warned = [c for c in checks if c["status"] == WARN]
    unbound = [c for c in checks if c["status"] == SKIPPED and c["role"] == INPUT]
    status = FAIL if failed else (WARN if missing or warned or unbound else PASS)
    counts: dict[str, int] = {}
    for c in checks:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    return {
        "status": status,
        "changed_files": sorted({c["subject"] for c in failed}),
        "missing_files": sorted({c["subject"] for c in missing}),
        "changed_outputs_or_unused": sorted({c["subject"] for c in warned}),
        "failures": failed,
        "warnings": warned,
        "unverifiable": unbound,
        "counts": counts,
        "checks": checks,
    }


def model_files(directory: Path, root: Path) -> list[dict[str, Any]]:
    """The trained weights' sha256, recorded beside the checks (they are outputs, not checked against a reference)."""
    if not directory.is_dir():
        return []
    return [{"path": _rel(p, root), "bytes": p.stat().st_size, "sha256": file_digest(p, "sha256")} for p in sorted(directory.glob("*.pt"))]
