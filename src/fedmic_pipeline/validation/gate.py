"""Data gates on Great Expectations 1.x: validate pandas tables, keep a JSON report, fail loudly.

A gate is one or more tables, each checked by its own suite in one ephemeral GX context.
The report is plain JSON with no timestamps or random ids, so DVC sees the same file for
the same data. Data Docs (HTML) are rebuilt per gate under `<docs_dir>/<gate>/` and swapped
in whole, so the site always shows the latest run and never a mix of two.

Expectations are given as plain dicts `{"type", "kwargs", "description"}`, so suites are
readable data and callers do not import GX (a ~5 s import) themselves.
"""

from __future__ import annotations

import html
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

_LIST_KWARG_LIMIT = 20  # longer value lists (e.g. thousands of test hashes) are summarised in the report
_RESULT_KEYS = (
    "observed_value",
    "element_count",
    "missing_count",
    "unexpected_count",
    "unexpected_percent",
    "partial_unexpected_list",
    "partial_unexpected_index_list",
)


class DataGateError(RuntimeError):
    """Data did not meet its expectations; the message lists every failed one."""


@dataclass(frozen=True)
class TableCheck:
    """One table and the expectations it must meet.

    `index_columns` name the columns that identify a failing row in the report (e.g.
    split and index), so a failure points at the offending images, not just at a count.
    """

    suite: str
    data: pd.DataFrame
    expectations: Sequence[Mapping[str, Any]]
    index_columns: Sequence[str] = field(default_factory=tuple)


def validate_table(
    df: pd.DataFrame,
    suite_name: str,
    expectations: Sequence[Mapping[str, Any]],
    docs_dir: str | os.PathLike[str] | None = None,
    index_columns: Sequence[str] = (),
) -> dict[str, Any]:
    """Validate one table; the report's `suite` is `suite_name`."""
    return validate_tables(suite_name, [TableCheck(suite_name, df, expectations, tuple(index_columns))], docs_dir)


def validate_tables(
    gate: str,
    checks: Sequence[TableCheck],
    docs_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Validate several tables as one gate and return one JSON-serialisable report."""
    import great_expectations as gx  # noqa: PLC0415 - slow import
    from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: PLC0415
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration  # noqa: PLC0415

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas(name=f"{gate}_tables")

    suites: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for check in checks:
        missing = [name for name in check.index_columns if name not in check.data.columns]
        if missing:
            raise ValueError(f"Gate '{gate}': index columns {missing} are not columns of table '{check.suite}'.")
        suite = context.suites.add(gx.ExpectationSuite(name=check.suite))
        for spec in check.expectations:
            suite.add_expectation(
                ExpectationConfiguration(
                    type=spec["type"], kwargs=dict(spec["kwargs"]), description=spec.get("description")
                ).to_domain_obj()
            )
        batch_definition = source.add_dataframe_asset(name=check.suite).add_batch_definition_whole_dataframe("all")
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=check.suite, data=batch_definition, suite=suite)
        )
        result_format: dict[str, Any] = {"result_format": "SUMMARY"}
        if check.index_columns:
            result_format["unexpected_index_column_names"] = list(check.index_columns)
        outcome = definition.run(batch_parameters={"dataframe": check.data}, result_format=result_format).to_json_dict()
        # GX groups results by domain; put them back in suite order so reports diff cleanly.
        position = {expectation.id: i for i, expectation in enumerate(suite.expectations)}
        ordered = sorted(outcome["results"], key=lambda raw: position[raw["expectation_config"]["id"]])
        suite_results = [_result_entry(check.suite, raw) for raw in ordered]
        results.extend(suite_results)
        suites.append(
            {
                "suite": check.suite,
                "success": all(entry["success"] for entry in suite_results),
                "rows": len(check.data),
                "statistics": _statistics(suite_results),
            }
        )

    report: dict[str, Any] = {
        "suite": gate,
        "success": all(entry["success"] for entry in results),
        "statistics": _statistics(results),
        "suites": suites,
        "results": results,
        "great_expectations_version": gx.__version__,
        "data_docs": None,
    }
    if docs_dir is not None:
        report["data_docs"] = _build_data_docs(context, Path(docs_dir), gate)
    logger.log(
        logging.INFO if report["success"] else logging.WARNING,
        "Data gate '%s': %d/%d expectations met%s",
        gate,
        report["statistics"]["successful_expectations"],
        report["statistics"]["evaluated_expectations"],
        f"; Data Docs: {report['data_docs']}" if report["data_docs"] else "",
    )
    return report


def _statistics(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    evaluated = len(results)
    successful = sum(1 for entry in results if entry["success"])
    return {
        "evaluated_expectations": evaluated,
        "successful_expectations": successful,
        "unsuccessful_expectations": evaluated - successful,
        "success_percent": 100.0 * successful / evaluated if evaluated else 100.0,
    }


def _summarise_kwarg(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and len(value) > _LIST_KWARG_LIMIT:
        return {"n_values": len(value), "first_values": list(value[:_LIST_KWARG_LIMIT])}
    return value


def _result_entry(suite: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    config = raw["expectation_config"]
    kwargs = {key: _summarise_kwarg(value) for key, value in config["kwargs"].items() if key != "batch_id"}
    result = raw.get("result") or {}
    entry: dict[str, Any] = {
        "suite": suite,
        "type": config["type"],
        "description": config.get("description"),
        "kwargs": kwargs,
        "success": bool(raw["success"]),
    }
    entry.update({key: result[key] for key in _RESULT_KEYS if key in result})
    exception = raw.get("exception_info") or {}
    if exception.get("raised_exception"):
        entry["success"] = False
        entry["exception"] = exception.get("exception_message")
    return entry


def _build_data_docs(context: Any, docs_dir: Path, gate: str) -> str:
    """Build this gate's site in a temporary folder, then swap it in whole."""
    target = docs_dir / gate
    docs_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{gate}.", dir=docs_dir))
    try:
        for name in list(context.list_data_docs_sites()):
            context.delete_data_docs_site(name)
        context.add_data_docs_site(
            "fedmic",
            {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(staging.resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        context.build_data_docs(site_names=["fedmic"])
        retired = docs_dir / f".{gate}.retired"
        shutil.rmtree(retired, ignore_errors=True)
        if target.exists():
            target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _write_docs_index(docs_dir)
    return (target / "index.html").as_posix()


def _write_docs_index(docs_dir: Path) -> None:
    """A top page linking every gate's site, so one file opens all of them."""
    gates = sorted(p.name for p in docs_dir.iterdir() if p.is_dir() and (p / "index.html").is_file())
    items = "\n".join(f'<li><a href="{html.escape(g)}/index.html">{html.escape(g)}</a></li>' for g in gates)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>fedmic data gates</title></head>"
        f"<body><h1>Data gates (Great Expectations Data Docs)</h1><ul>\n{items}\n</ul></body></html>\n"
    )
    tmp = docs_dir / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, docs_dir / "index.html")


def _short(value: Any) -> Any:
    if isinstance(value, Mapping) and "n_values" in value:
        return f"<{value['n_values']} values>"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"[{', '.join(map(str, value[:8]))}, ... ({len(value)} values)]"
    return value


def describe_failures(report: Mapping[str, Any]) -> list[str]:
    """One readable line per failed expectation."""
    lines = []
    for entry in report.get("results", []):
        if entry.get("success"):
            continue
        args = ", ".join(f"{key}={_short(value)}" for key, value in entry.get("kwargs", {}).items())
        line = f"[{entry.get('suite')}] {entry.get('type')}({args})"
        if entry.get("description"):
            line += f": {entry['description']}"
        if entry.get("exception"):
            line += f" -> could not be evaluated: {entry['exception']}"
        elif "unexpected_count" in entry:
            line += f" -> {entry['unexpected_count']} of {entry.get('element_count')} rows unexpected"
            if entry.get("partial_unexpected_index_list"):
                line += f", e.g. {entry['partial_unexpected_index_list'][:5]}"
            elif entry.get("partial_unexpected_list"):
                line += f", e.g. {entry['partial_unexpected_list'][:5]}"
        elif "observed_value" in entry:
            line += f" -> observed {entry['observed_value']}"
        lines.append(line)
    return lines


def enforce_gate(report: Mapping[str, Any], hint: str | None = None) -> None:
    """Raise DataGateError unless every expectation in `report` succeeded."""
    if report.get("success"):
        return
    failures = describe_failures(report)
    if not failures:  # a report marked failed without failed entries is itself broken
        failures = ["(the report is marked failed but lists no failed expectation)"]
    stats = report.get("statistics", {})
    message = (
        f"Data gate '{report.get('suite')}' failed: {stats.get('unsuccessful_expectations', len(failures))} of "
        f"{stats.get('evaluated_expectations', '?')} expectations not met:\n  - "
        + "\n  - ".join(failures)
    )
    if report.get("data_docs"):
        message += f"\nData Docs: {report['data_docs']}"
    if hint:
        message += f"\n{hint}"
    raise DataGateError(message)
