"""Expensive results reused across runs when nothing they depend on has changed.

Why: `make run` (and a researcher's second `kedro run`) repeats stages whose inputs did not
change; the synthetic stage alone trains a federated generator and two evaluation CNNs.
DVC skips an unchanged stage under `make repro`, but a plain `kedro run` has no such memory.
This cache gives it one, at the granularity of a result (a trained generator, a fitted
quality ruler, a quality report), so that changing one parameter recomputes only what
reads it: a new sampling temperature re-scores the generator with the ruler already fitted.

A key is the SHA-256 of everything the result depends on: the input arrays' bytes (with
dtype and shape), the parameters that change the result, the torch version, the thread
count (CPU float sums differ between 1 and 2 threads) and the source of this package (any
code change invalidates every entry: conservative, never stale). A miss computes and stores;
a hit returns what the miss stored, bit for bit. Entries are written to a temporary file and
renamed, so an interrupted run never leaves a half-written entry that reads as valid; an
entry that cannot be read is logged, ignored and overwritten.

Files are read with ``torch.load(weights_only=True)``: tensors and plain values only, no
code runs on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_PACKAGE_ROOT = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 over every ``.py`` file of this package (relative path and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_ROOT.rglob("*.py")):
        digest.update(path.relative_to(_PACKAGE_ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Canonical, type-tagged bytes of ``value`` (arrays by dtype, shape and content)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        digest.update(f"A{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"M%d" % len(value))
        for key in sorted(value, key=str):
            _feed(digest, str(key))
            _feed(digest, value[key])
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        digest.update(b"L%d" % len(value))
        for item in value:
            _feed(digest, item)
    else:
        digest.update(b"J" + json.dumps(value, sort_keys=True).encode() + b";")


def content_key(kind: str, *parts: Any) -> str:
    """The key of a result of ``kind`` computed from ``parts`` in this code and torch build."""
    digest = hashlib.sha256()
    for part in (kind, code_fingerprint(), torch.__version__, torch.get_num_threads(), *parts):
        _feed(digest, part)
    return digest.hexdigest()


class ResultCache:
    """A directory of results by (kind, key); ``directory=None`` is a cache that never hits."""

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self.directory = None if directory is None else Path(directory)

    def _path(self, kind: str, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{kind}-{key[:40]}.pt"

    def get(self, kind: str, key: str) -> Any | None:
        """The stored result, or None (no entry, no cache, or an unreadable entry)."""
        if self.directory is None:
            return None
        path = self._path(kind, key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file is a miss, never an error
            logger.warning("result cache: ignoring unreadable %s (%s); it will be recomputed", path, exc)
            return None
        if not isinstance(entry, dict) or entry.get("key") != key:
            logger.warning("result cache: %s holds another key; it will be recomputed", path)
            return None
        logger.info("result cache: reusing %s %s (delete %s to recompute)", kind, key[:12], path)
        return entry["value"]

    def put(self, kind: str, key: str, value: Any) -> None:
        """Store ``value`` atomically (temporary file, then rename)."""
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(kind, key)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.directory)
        os.close(handle)
        try:
            torch.save({"key": key, "value": value}, temporary)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
