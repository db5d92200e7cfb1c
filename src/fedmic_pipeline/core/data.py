"""Client tensors resident on the compute device, seeded batches, device and AMP choice.

Why no DataLoader: a MedMNIST client holds a few hundred 28x28 images (well under 1 MB as
float32), so the whole split is converted ONCE to a float32 NCHW tensor on the device and
every batch is a slice of it by a seeded permutation. That removes worker processes,
per-sample Python calls, collation and host-to-device copies from the training loop,
which on a shared 2-core CPU is the difference between the model and the loader being
the bottleneck.

Determinism: batch order comes from a CPU ``torch.Generator`` that the caller seeds from
(run seed, round, client id) via ``make_generator``; nothing reads the global RNG.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from .protocol import ClientData, ConfigurationError

__all__ = [
    "POOLED_CLIENT_ID",
    "amp_dtype",
    "batch_indices",
    "derive_seed",
    "iterate_batches",
    "make_generator",
    "move_client",
    "pool_clients",
    "resolve_amp",
    "resolve_device",
    "round_generator",
    "to_client_data",
    "to_tensors",
]

#: The client id of the single pooled "client" of the centralized reference.
POOLED_CLIENT_ID = -1
_SPLITS = ("train", "val", "test")


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, e.g. (run seed, round, client id, purpose tag).

    Uses numpy's SeedSequence, so nearby keys give unrelated streams and negative ids
    (the pooled client is -1) are accepted.
    """
    words = [int(k) & 0xFFFFFFFF for k in keys] + [int(k) >> 32 & 0xFFFFFFFF for k in keys]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def make_generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded by ``derive_seed(*keys)``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(*keys))
    return gen


#: Purpose tags, so that streams drawn from the same (seed, round, client) never coincide.
TRAIN_BATCHES = 1
CLIENT_SAMPLING = 2


def round_generator(seed: int, round_idx: int, client_id: int, purpose: int = TRAIN_BATCHES) -> torch.Generator:
    """The generator of ``client_id``'s batch order in round ``round_idx`` of run ``seed``.

    Every algorithm draws its local batches from this, so a client's batches depend only
    on (seed, round, client) and never on which other clients were sampled before it.
    """
    return make_generator(seed, round_idx, client_id, purpose)


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' -> CUDA when available else CPU; 'cpu'; 'cuda' or 'cuda:N' (must exist)."""
    if isinstance(name, torch.device):
        name = str(name)
    key = str(name).strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigurationError(f"device '{name}' was requested but CUDA is not available; use device: auto or cpu.")
        dev = torch.device(key)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigurationError(f"device '{name}' does not exist ({torch.cuda.device_count()} CUDA devices).")
        return dev
    raise ConfigurationError(f"Unknown device '{name}'; use 'auto', 'cpu' or 'cuda[:N]'.")


def resolve_amp(mode: str, device: torch.device) -> bool:
    """Whether to train under autocast: 'auto' (CUDA only), 'on' (CUDA required) or 'off'.

    AMP is never used on the CPU: CPU autocast (bf16) is slower than fp32 for these small
    convolutions and would make CPU runs differ from the exactness tests.
    """
    key = str(mode).strip().lower()
    if key not in ("auto", "on", "off"):
        raise ConfigurationError(f"amp must be 'auto', 'on' or 'off', got '{mode}'.")
    if key == "off":
        return False
    if device.type != "cuda":
        if key == "on":
            raise ConfigurationError("amp: on needs a CUDA device; use amp: auto or off on the CPU.")
        return False
    return True


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU supports it (no loss scaling needed), else fp16 (with a GradScaler)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _images_to_tensor(images: np.ndarray, name: str, device: torch.device) -> torch.Tensor:
    arr = np.asarray(images)
    if arr.ndim == 3:  # (N, H, W) grayscale
        arr = arr[:, None, :, :]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):  # (N, H, W, C)
        arr = np.transpose(arr, (0, 3, 1, 2))
    elif not (arr.ndim == 4 and arr.shape[1] in (1, 3)):
        raise ConfigurationError(f"'{name}' must be (N,H,W), (N,H,W,C) or (N,C,H,W) with C in (1,3), got {arr.shape}.")
    if arr.dtype == np.uint8:
        tensor = torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=torch.float32).div_(255.0)
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.size and (float(arr.min()) < 0.0 or float(arr.max()) > 1.0):
            raise ConfigurationError(f"'{name}' is floating point but not in [0, 1]; pass uint8 images or scale them.")
        tensor = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(device)
    else:
        raise ConfigurationError(f"'{name}' has dtype {arr.dtype}; expected uint8 (0-255) or float in [0, 1].")
    return tensor.contiguous()


def _labels_to_tensor(labels: np.ndarray, name: str, n: int, device: torch.device) -> torch.Tensor:
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:  # MedMNIST stores labels as (N, 1)
        arr = arr[:, 0]
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ConfigurationError(f"'{name}' must hold {n} labels (shape (N,) or (N,1)), got {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigurationError(f"'{name}' must be integer class indices, got dtype {arr.dtype}.")
    if arr.size and arr.min() < 0:
        raise ConfigurationError(f"'{name}' has negative labels.")
    return torch.from_numpy(arr.astype(np.int64)).to(device)


def to_tensors(images: np.ndarray, labels: np.ndarray, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) numpy -> (float32 NCHW in [0,1], int64 (N,)) tensors on ``device``."""
    dev = torch.device(device)
    x = _images_to_tensor(images, "images", dev)
    return x, _labels_to_tensor(labels, "labels", x.shape[0], dev)


def to_client_data(arrays: Mapping[str, np.ndarray], client_id: int, device: torch.device | str = "cpu") -> ClientData:
    """Convert one client's NpzDataset arrays into a ClientData resident on ``device``.

    Expected keys: ``{train,val,test}_images`` (uint8 (N,H,W) or (N,H,W,3), or floats in
    [0,1]) and ``{train,val,test}_labels`` (integers, (N,) or (N,1)). Optional:
    ``train_is_synthetic`` (bool per train row), ``device_id`` or ``device`` (the
    hospital's imaging device, a scalar, as the partition writes it) or, failing that, ``train_devices`` (one id per train row; the most
    frequent one is used, since a hospital has one device in this project's design).
    """
    missing = [f"{s}_{k}" for s in _SPLITS for k in ("images", "labels") if f"{s}_{k}" not in arrays]
    if missing:
        raise ConfigurationError(f"Client {client_id}: arrays lack {missing}; present keys: {sorted(arrays)}.")
    dev = torch.device(device)
    tensors: dict[str, torch.Tensor] = {}
    for split in _SPLITS:
        x = _images_to_tensor(arrays[f"{split}_images"], f"client {client_id} {split}_images", dev)
        y = _labels_to_tensor(arrays[f"{split}_labels"], f"client {client_id} {split}_labels", x.shape[0], dev)
        tensors[f"{split}_x"], tensors[f"{split}_y"] = x, y
    shapes = {tuple(tensors[f"{s}_x"].shape[1:]) for s in _SPLITS if tensors[f"{s}_x"].shape[0] > 0}
    if len(shapes) > 1:
        raise ConfigurationError(f"Client {client_id}: train/val/test images differ in shape: {sorted(shapes)}.")
    synthetic = None
    if "train_is_synthetic" in arrays:
        flags = np.asarray(arrays["train_is_synthetic"]).astype(bool).reshape(-1)
        if flags.shape[0] != tensors["train_y"].shape[0]:
            raise ConfigurationError(
                f"Client {client_id}: train_is_synthetic has {flags.shape[0]} rows, train has {tensors['train_y'].shape[0]}."
            )
        synthetic = torch.from_numpy(flags).to(dev)
    device_id = 0
    scalar_key = next((key for key in ("device_id", "device") if key in arrays), None)
    if scalar_key is not None:
        device_id = int(np.asarray(arrays[scalar_key]).reshape(-1)[0])
    elif "train_devices" in arrays and np.asarray(arrays["train_devices"]).size:
        values, counts = np.unique(np.asarray(arrays["train_devices"]).reshape(-1), return_counts=True)
        device_id = int(values[np.argmax(counts)])
    return ClientData(client_id=int(client_id), device_id=device_id, train_is_synthetic=synthetic, **tensors)


def move_client(data: ClientData, device: torch.device) -> ClientData:
    """The same client with every tensor on ``device`` (no copy when already there)."""
    synthetic = None if data.train_is_synthetic is None else data.train_is_synthetic.to(device)
    return ClientData(
        client_id=data.client_id,
        train_x=data.train_x.to(device),
        train_y=data.train_y.to(device),
        val_x=data.val_x.to(device),
        val_y=data.val_y.to(device),
        test_x=data.test_x.to(device),
        test_y=data.test_y.to(device),
        device_id=data.device_id,
        train_is_synthetic=synthetic,
    )


def pool_clients(clients: Sequence[ClientData], client_id: int = POOLED_CLIENT_ID) -> ClientData:
    """Concatenate all clients' splits into one data centre (the centralized reference).

    Rows keep the clients' order; the synthetic flags are kept (all False where a client
    had none); ``device_id`` is -1 because a pooled set mixes devices.
    """
    if not clients:
        raise ConfigurationError("Cannot pool an empty list of clients.")

    def cat(attr: str) -> torch.Tensor:
        return torch.cat([getattr(c, attr) for c in clients], dim=0)

    synthetic = None
    if any(c.train_is_synthetic is not None for c in clients):
        synthetic = torch.cat(
            [
                c.train_is_synthetic
                if c.train_is_synthetic is not None
                else torch.zeros(c.num_train, dtype=torch.bool, device=c.train_y.device)
                for c in clients
            ]
        )
    return ClientData(
        client_id=client_id,
        train_x=cat("train_x"),
        train_y=cat("train_y"),
        val_x=cat("val_x"),
        val_y=cat("val_y"),
        test_x=cat("test_x"),
        test_y=cat("test_y"),
        device_id=-1,
        train_is_synthetic=synthetic,
    )


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator, drop_last: bool = False, device: torch.device | None = None
) -> list[torch.Tensor]:
    """One epoch of batches: a seeded permutation of range(n) cut into ``batch_size`` slices.

    The permutation is drawn on the CPU generator (reproducible across devices) and moved
    to ``device`` once, so per-batch indexing happens where the data lives.
    """
    if n < 0 or batch_size < 1:
        raise ConfigurationError(f"batch_indices needs n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}.")
    perm = torch.randperm(n, generator=generator)
    if device is not None:
        perm = perm.to(device)
    stop = n - n % batch_size if drop_last else n
    return list(torch.split(perm[:stop], batch_size)) if stop > 0 else []


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    drop_last: bool = False,
    min_batch: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x[idx], y[idx]) for one shuffled epoch over resident tensors.

    ``min_batch`` drops a trailing batch smaller than it (training passes 2: BatchNorm's
    batch statistics of a single sample are degenerate, and PyTorch refuses them for 1-D
    features) unless it would leave the epoch empty.
    """
    batches = batch_indices(int(y.shape[0]), batch_size, generator, drop_last=drop_last, device=x.device)
    if len(batches) > 1 and batches[-1].numel() < min_batch:
        batches = batches[:-1]
    for idx in batches:
        yield x.index_select(0, idx), y.index_select(0, idx)
