"""What every benchmark command does around its runs: quiet logs, then a table printed and
written as Markdown and JSON, so each result is both read on screen and kept beside the data."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any


def run_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with what every training benchmark takes: rounds, join ratio, torch threads
    (one by default, so figures are comparable on a shared machine) and the project root."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--join-ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", type=Path, default=Path.cwd())
    return parser


def configure_logging() -> None:
    """INFO for the benchmark's own progress lines; the core's per-round lines stay quiet."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedmic_pipeline.core").setLevel(logging.WARNING)


def publish(text: str, rows: Any, directory: Path, stem: str) -> None:
    """Print ``text`` and write ``<directory>/<stem>.md`` and ``.json`` (the raw rows)."""
    print(text)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.md").write_text(text)
    (directory / f"{stem}.json").write_text(json.dumps(rows, indent=2))
