"""Content hashes, computed the same way wherever they are recorded and checked.

Lineage and integrity compare files with hashes recorded at run time (the run's MLflow
tags, dvc.lock, the manifests), so each digest here reproduces its recorder: md5 of a file
or of a directory's listing as DVC 3 writes it in dvc.lock, and sha256 of
each array's .npy bytes as the partition and synthetic manifests hold it.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path


def file_digest(path: Path, algorithm: str = "md5") -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False) if algorithm == "md5" else hashlib.new(algorithm)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_dir_md5(path: Path) -> tuple[str, dict[str, str]]:
    """DVC 3's hash of a directory output (its '.dir' md5, as dvc.lock records it) and the
    listing behind it, computed by DVC's own tree object rather than re-implemented."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    listing = {
        file.relative_to(path).as_posix(): file_digest(file)
        for file in sorted(path.rglob("*"))
        if file.is_file()
    }
    tree = Tree()
    for rel, md5 in listing.items():
        tree.add(tuple(rel.split("/")), Meta(size=(path / rel).stat().st_size), HashInfo("md5", md5))
    tree.digest()
    return str(tree.hash_info.value), listing


def npz_member_hashes(path: Path) -> tuple[dict[str, str], str | None]:
    """sha256 of each array's .npy bytes inside an .npz (what the manifests record), or the read error."""
    hashes: dict[str, str] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                try:
                    hashes[name] = hashlib.sha256(archive.read(info)).hexdigest()
                except Exception as error:  # noqa: BLE001 - a corrupt member is evidence, not a crash
                    hashes[name] = f"unreadable ({type(error).__name__}: {error})"
    except Exception as error:  # noqa: BLE001
        return hashes, f"{type(error).__name__}: {error}"
    return hashes, None
