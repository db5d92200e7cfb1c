"""The audit report as one self-contained HTML page (no network, no external files).

Rendered from the JSON report alone, plus the figures it lists, embedded as base64 PNGs:
an auditor can open, archive or e-mail one file and see everything, and what the page
shows is exactly what the JSON holds.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATE = "audit_report.html.j2"


def _num(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ci(pair: Any, digits: int = 3) -> str:
    if not pair or len(pair) != 2 or pair[0] is None or pair[1] is None:
        return ""
    return f"[{_num(pair[0], digits)}, {_num(pair[1], digits)}]"


def _plain(value: Any) -> str:
    """A parameter as written in YAML: 0.05, 1e-05, true, none."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _mapping(value: Any) -> str:
    """{'train': 4708, 'val': 524} -> 'train 4,708 · val 524' (nested values as written)."""
    if not isinstance(value, Mapping):
        return _num(value)
    return " · ".join(f"{k} {_num(v) if not isinstance(v, Mapping) else '(' + _mapping(v) + ')'}" for k, v in value.items()) or "—"


def _mb(value: Any) -> str:
    return "—" if value is None else f"{float(value) / 1e6:,.2f} MB"


def _short(value: Any, n: int = 12) -> str:
    text = "—" if value is None else str(value)
    return text if len(text) <= n + 3 else text[:n] + "…"


def _embed(figures: Mapping[str, Any], project_root: Path) -> dict[str, list[dict[str, Any]]]:
    """Each listed PNG as a data URI; a figure changed since the JSON was written is marked."""
    out: dict[str, list[dict[str, Any]]] = {}
    for section, entries in (figures or {}).items():
        rows = []
        for entry in entries or []:
            path = project_root / entry["path"]
            if not entry.get("present") or not path.is_file():
                rows.append({**entry, "data_uri": None})
                continue
            data = path.read_bytes()
            changed = hashlib.sha256(data).hexdigest() != entry.get("sha256")
            rows.append({**entry, "changed_since_report": changed, "data_uri": "data:image/png;base64," + base64.b64encode(data).decode()})
        out[section] = rows
    return out


def render_html(report: Mapping[str, Any], project_root: Path | None = None, strict: bool = False) -> str:
    """The HTML page of `report`. `strict` makes a template reference to a missing key an
    error (tests use it); a production run renders what it can instead of losing the page."""
    import jinja2

    if not (TEMPLATES / TEMPLATE).is_file():
        raise FileNotFoundError(
            f"The audit template {TEMPLATES / TEMPLATE} is missing: reinstall the project (`make install`), "
            "or add audit/templates/*.j2 to the package data when building a wheel."
        )
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined if strict else jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update({"num": _num, "ci": _ci, "mb": _mb, "short": _short, "plain": _plain, "mapping": _mapping})
    root = Path(project_root or report.get("report", {}).get("project_root") or Path.cwd())
    html = env.get_template(TEMPLATE).render(r=report, figures=_embed(report.get("figures") or {}, root))
    logger.info("Audit HTML: %.0f kB", len(html) / 1e3)
    return html
