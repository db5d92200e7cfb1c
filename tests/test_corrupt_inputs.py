"""Every kind of input file, truncated or with one flipped byte, is refused with a clear error.

Each case writes a real file the way the project writes it (the bundled raw file, a client
and a synthetic .npz, the manifest JSON, a checkpoint, a model record, dvc.lock), damages
it, and loads it the way the pipeline does. A damaged file must either be refused by its
loader with an error that names the file and the fix, or, where the damage leaves a file
its parser still accepts (a flipped digit in JSON, a flipped weight in a model), by the
run-level check that compares it with what the run recorded (the manifest and model
digests in the training summary, the md5 the medmnist release is known by).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedmic_pipeline.audit.data_sections import read_dvc_lock
from fedmic_pipeline.core.checkpoint import CheckpointError, build_checkpoint, deserialize_checkpoint, serialize_checkpoint
from fedmic_pipeline.core.models import build_model, model_record
from fedmic_pipeline.core.protocol import DataSpec
from fedmic_pipeline.datasets import TorchModelDataset
from fedmic_pipeline.datasets.atomic_file_datasets import AtomicJSONDataset
from fedmic_pipeline.datasets.corrupt import CorruptFileError
from fedmic_pipeline.datasets.npz_dataset import load_npz, save_npz_deterministic
from fedmic_pipeline.ingestion.medmnist_source import RawDataChecksumError, dataset_spec, file_md5, verify_md5
from fedmic_pipeline.run_records import manifest_sha256, model_digest

from fixtures_pipelines import PROJECT_ROOT

DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "flipped byte": lambda data: data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0x01]) + data[len(data) // 2 + 1 :],
}
CASES: list[tuple[str, str]] = []


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"train_images": rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), "train_labels": rng.integers(0, 2, 40)}


def _write_npz(path: Path) -> Callable[[], object]:
    save_npz_deterministic(path, _arrays())
    return lambda: load_npz(path)


def _flip_a_weight(data: bytes) -> bytes:
    """``data`` (a torch.save zip) with one byte flipped inside its largest tensor: the middle
    of the file may be alignment padding, which the reader ignores and nobody should care about."""
    import io
    import struct
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    name_len, extra_len = struct.unpack("<HH", data[largest.header_offset + 26 : largest.header_offset + 30])
    position = largest.header_offset + 30 + name_len + extra_len + largest.file_size // 2
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


def _refused(load: Callable[[], object], error: type[Exception], *needles: str) -> None:
    with pytest.raises(error) as info:
        load()
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize(
    ("folder", "fix"),
    [("05_model_input/clients", "data_partition"), ("05_model_input/synthetic", "synthetic_generation")],
)
def test_a_damaged_partition_or_synthetic_npz_names_the_file_and_the_stage(tmp_path, folder, fix, damage) -> None:
    path = tmp_path / "data" / folder / "client_00.npz"
    load = _write_npz(path)
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    _refused(load, CorruptFileError, str(path), "truncated or was altered", f"--pipelines {fix}", "dvc checkout")
    CASES.append((folder, damage))


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_raw_file_fails_its_md5(tmp_path, damage) -> None:
    path = tmp_path / "pneumoniamnist.npz"
    shutil.copy(PROJECT_ROOT / "data/01_raw/pneumoniamnist.npz", path)
    spec = dataset_spec("pneumoniamnist")
    verify_md5(path, spec, file_md5(path))  # the bundled file is the official one
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    _refused(lambda: verify_md5(path, spec, file_md5(path)), RawDataChecksumError, str(path), spec.md5)
    CASES.append(("raw npz", damage))


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_manifest_is_refused_or_no_longer_the_recorded_one(tmp_path, damage) -> None:
    path = tmp_path / "partition_manifest.json"
    manifest = {"num_clients": 10, "sha256": {"client_00": {"train_images": "ab" * 32}}, "seed": 42}
    dataset = AtomicJSONDataset(filepath=str(path))
    dataset.save(manifest)
    recorded = manifest_sha256(manifest)
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    try:
        loaded = AtomicJSONDataset(filepath=str(path)).load()
    except CorruptFileError as error:
        assert str(path) in str(error) and "JSON" in str(error)
    else:  # still JSON: the run's recorded manifest hash no longer matches (evaluation refuses)
        assert manifest_sha256(loaded) != recorded
    CASES.append(("manifest json", damage))


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_refused_by_its_seal(damage) -> None:
    checkpoint = build_checkpoint(
        fingerprint={"seed": 0}, rounds_completed=1, num_rounds=2, algorithm_name="fedavg", payload={},
        server_state={"w": np.zeros(64)}, client_states={}, history=[{"round": 0}], elapsed_s=1.0,
    )  # fmt: skip
    data = serialize_checkpoint(checkpoint)
    assert deserialize_checkpoint(data)["rounds_completed"] == 1
    with pytest.raises(CheckpointError, match="delete it and start afresh|Delete it and start afresh"):
        deserialize_checkpoint(DAMAGES[damage](data))
    CASES.append(("checkpoint", damage))


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_model_file_is_refused_or_fails_its_digest(tmp_path, damage) -> None:
    path = tmp_path / "data/06_models/global.pt"
    path.parent.mkdir(parents=True)
    record = model_record(build_model("student_cnn", DataSpec(1, 2, 8), seed=0, widths=(4, 4, 4), feature_dim=8))
    TorchModelDataset(filepath=str(path)).save(record)
    recorded = model_digest(record)
    data = path.read_bytes()
    path.write_bytes(_flip_a_weight(data) if damage == "flipped byte" else DAMAGES[damage](data))
    try:
        loaded = TorchModelDataset(filepath=str(path)).load()
    except CorruptFileError as error:
        assert str(path) in str(error) and "federated_training" in str(error)
    else:  # the zip does not checksum stored tensors: the training summary's digest catches it
        assert model_digest(loaded) != recorded
    CASES.append(("model file", damage))


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_dvc_lock_is_refused_or_no_longer_the_committed_one(tmp_path, damage) -> None:
    path = tmp_path / "dvc.lock"
    shutil.copy(PROJECT_ROOT / "dvc.lock", path)
    original = read_dvc_lock(path)
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    try:
        damaged = read_dvc_lock(path)
    except CorruptFileError as error:
        assert str(path) in str(error) and "git checkout dvc.lock" in str(error)
    else:  # a digit changed inside a hash: the audit of a `dvc repro` run reports that output as changed
        assert damaged != original
    CASES.append(("dvc.lock", damage))


def test_zz_every_kind_of_input_was_tried() -> None:
    """Runs last in the module (pytest keeps file order): the figure for the issue note."""
    kinds = {kind for kind, _ in CASES}
    print(f"\ncorrupt-input cases: {len(CASES)} over {len(kinds)} kinds of file: {sorted(kinds)}")
    if len(CASES) == 7 * len(DAMAGES):  # the whole module ran (not a -k selection)
        assert len(kinds) == 7
