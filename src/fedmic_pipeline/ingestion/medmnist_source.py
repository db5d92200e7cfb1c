"""One MedMNIST 2D release file: which one, where it lies, whether it is intact, its arrays.

Everything about a dataset (file name, md5, url, classes, official split sizes) comes from
the installed `medmnist` package, so the pipeline follows the release that package names
instead of a copy of its tables. `medmnist` is imported lazily: it takes ~5 s and creates
`~/.medmnist` on import.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
RERUN_HINT = "`make run` (or `kedro run --pipelines data_ingestion`)"
_ZENODO_HINT = "the MedMNIST v2 Zenodo record (https://zenodo.org/records/10519652)"


class MedMNISTSourceError(RuntimeError):
    """Base class: the raw MedMNIST input cannot be used as configured."""


class UnsupportedDatasetError(MedMNISTSourceError):
    """The configured flag or size is not a single-label 2D MedMNIST dataset."""


class RawDataMissingError(MedMNISTSourceError):
    """The release file is not on disk and could not be downloaded."""


class RawDataChecksumError(MedMNISTSourceError):
    """The release file on disk is not the one `medmnist` describes."""


class RawDataFormatError(MedMNISTSourceError):
    """The file opens, but its arrays are not MedMNIST-shaped."""


@dataclass(frozen=True)
class DatasetSpec:
    """What `medmnist.INFO` says about one dataset at one image size."""

    flag: str
    size: int
    python_class: str
    task: str
    n_channels: int
    label_names: dict[str, str]
    official_split_sizes: dict[str, int]
    md5: str
    url: str
    license: str

    @property
    def filename(self) -> str:
        """medmnist's own naming rule (dataset.py): `<flag>.npz` at 28, `<flag>_<size>.npz` above."""
        return f"{self.flag}.npz" if self.size == 28 else f"{self.flag}_{self.size}.npz"

    @property
    def n_classes(self) -> int:
        return len(self.label_names)


def _medmnist() -> ModuleType:
    import medmnist  # noqa: PLC0415 - slow import, only when a dataset is really needed

    return medmnist


def _size_suffix(size: int) -> str:
    return "" if size == 28 else f"_{size}"


def dataset_spec(flag: str, size: int | str = 28) -> DatasetSpec:
    """Resolve a flag and size against the installed medmnist, rejecting what the pipeline cannot train on."""
    medmnist = _medmnist()
    from medmnist.dataset import MedMNIST2D, MedMNIST3D  # noqa: PLC0415

    name = str(flag).strip().lower()
    info_table: dict[str, dict[str, Any]] = medmnist.INFO
    flags_2d = sorted(k for k, v in info_table.items() if issubclass(getattr(medmnist, v["python_class"]), MedMNIST2D))
    if name not in info_table:
        raise UnsupportedDatasetError(
            f"Unknown MedMNIST dataset '{flag}' (medmnist {medmnist.__version__}). "
            f"Set `dataset.name` in conf/base/parameters_data_ingestion.yml to one of the 2D flags: {', '.join(flags_2d)}."
        )
    info = info_table[name]
    if issubclass(getattr(medmnist, info["python_class"]), MedMNIST3D):
        raise UnsupportedDatasetError(
            f"'{name}' is a 3D MedMNIST dataset (volumes of 28x28x28); this pipeline trains 2D image "
            f"classifiers. Set `dataset.name` to one of the 2D flags: {', '.join(flags_2d)}."
        )
    if "multi-label" in info["task"]:
        raise UnsupportedDatasetError(
            f"'{name}' is a {info['task']} dataset ({len(info['label'])} labels per image); this pipeline "
            f"trains single-label classifiers. Set `dataset.name` to another 2D flag: "
            f"{', '.join(f for f in flags_2d if 'multi-label' not in info_table[f]['task'])}."
        )
    sizes = list(MedMNIST2D.available_sizes)
    try:
        size_int = int(size)
    except (TypeError, ValueError):
        size_int = -1
    if size_int not in sizes:
        raise UnsupportedDatasetError(
            f"Image size {size!r} is not released for '{name}'; set `dataset.size` to one of {sizes}."
        )
    suffix = _size_suffix(size_int)
    return DatasetSpec(
        flag=name,
        size=size_int,
        python_class=info["python_class"],
        task=info["task"],
        n_channels=int(info["n_channels"]),
        label_names={str(k): str(v) for k, v in info["label"].items()},
        official_split_sizes={split: int(info["n_samples"][split]) for split in SPLITS},
        md5=str(info[f"MD5{suffix}"]),
        url=str(info[f"url{suffix}"]),
        license=str(info.get("license", "")),
    )


def raw_file_path(raw_dir: str | Path, spec: DatasetSpec) -> Path:
    return Path(raw_dir) / spec.filename


def _missing_message(path: Path, spec: DatasetSpec, reason: str) -> str:
    return (
        f"MedMNIST file not found: {path} ({spec.flag}, {spec.size}x{spec.size}); {reason}\n"
        f"Fix: on a machine with internet, download {spec.url} (from {_ZENODO_HINT}), check that its md5 is "
        f"{spec.md5}, place it at {path.resolve()} (exactly this name), then run again: {RERUN_HINT}."
    )


def ensure_raw_file(raw_dir: str | Path, spec: DatasetSpec, download: bool) -> Path:
    """Return the release file's path, fetching it with medmnist's own downloader when allowed."""
    path = raw_file_path(raw_dir, spec)
    if path.is_file():
        return path
    if not download:
        raise RawDataMissingError(
            _missing_message(path, spec, "downloading is switched off (`dataset.download: false`).")
        )
    medmnist = _medmnist()
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("%s is missing; trying medmnist's download from %s", path, spec.url)
    try:
        getattr(medmnist, spec.python_class)(split="train", download=True, root=str(path.parent), size=spec.size)
    except RuntimeError as exc:
        # torchvision writes straight to the target; a failed transfer must not look like a release file.
        path.unlink(missing_ok=True)
        first_line = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise RawDataMissingError(
            _missing_message(path, spec, f"medmnist's download failed (no internet?): {first_line}")
        ) from exc
    if not path.is_file():  # pragma: no cover - medmnist raises when it cannot produce the file
        raise RawDataMissingError(_missing_message(path, spec, "medmnist's download produced no file."))
    logger.info("Downloaded %s (md5 checked by medmnist)", path)
    return path


def file_md5(path: str | Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_md5(path: Path, spec: DatasetSpec, actual_md5: str) -> None:
    """Refuse a file whose bytes differ from the release medmnist names (corrupt, truncated or edited)."""
    if actual_md5 != spec.md5:
        raise RawDataChecksumError(
            f"Checksum mismatch for {path}: md5 is {actual_md5}, but medmnist expects {spec.md5} for "
            f"{spec.flag} at {spec.size}x{spec.size}. The file is corrupt, truncated or not the official release.\n"
            f"Fix: delete it and download it again from {spec.url} (or delete it and keep `dataset.download: true`), "
            f"then run again: {RERUN_HINT}. If you changed the file on purpose, turn the check off with "
            f"`ingestion.verify_md5: false` (e.g. `kedro run --pipelines data_ingestion --params ingestion.verify_md5=false`)."
        )


def load_arrays(path: str | Path, spec: DatasetSpec) -> dict[str, np.ndarray]:
    """Read the six split arrays: images uint8 (N,H,W) or (N,H,W,C), labels int64 (N,).

    np.load instead of medmnist's classes: those assert the official split sizes on `len()`,
    which the data gate reports far more readably (and which small test releases cannot meet).
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RawDataFormatError(
            f"{path} is not a readable .npz archive ({exc}). Fix: replace it with the release file from "
            f"{spec.url}, then run again: {RERUN_HINT}."
        ) from exc
    with archive:
        expected = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
        missing = [key for key in expected if key not in archive.files]
        if missing:
            raise RawDataFormatError(
                f"{path} lacks the arrays {missing} (it has {sorted(archive.files)}); a MedMNIST release holds "
                f"{expected}. Fix: replace it with the release file from {spec.url}."
            )
        arrays: dict[str, np.ndarray] = {}
        for split in SPLITS:
            images = np.ascontiguousarray(archive[f"{split}_images"])
            raw_labels = np.asarray(archive[f"{split}_labels"])
            arrays[f"{split}_images"] = _check_images(path, split, images)
            arrays[f"{split}_labels"] = _check_labels(path, split, raw_labels, len(images))
    return arrays


def _check_images(path: str | Path, split: str, images: np.ndarray) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise RawDataFormatError(
            f"{path}: {split}_images has dtype {images.dtype} and shape {images.shape}; MedMNIST 2D images are "
            f"uint8 (N,H,W) for grayscale or (N,H,W,C) for colour. Fix: use the official release file."
        )
    return images


def _check_labels(path: str | Path, split: str, labels: np.ndarray, n_images: int) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != n_images:
        raise RawDataFormatError(
            f"{path}: {split}_labels has dtype {labels.dtype} and shape {labels.shape} for {n_images} images; "
            f"expected one integer class id per image, shape (N, 1). Fix: use the official release file."
        )
    return labels.astype(np.int64)


def pixel_sha1(images: np.ndarray) -> list[str]:
    """SHA-1 of each image's raw pixel bytes (C order): the identity used to find exact duplicates.

    Computed on the original uint8 pixels, before any device rendering, so a test image that
    reappears in training is found whatever happens to it later.
    """
    return [hashlib.sha1(np.ascontiguousarray(image).tobytes(), usedforsecurity=False).hexdigest() for image in images]
