"""Classical augmentation of real images: the control arm of the FedSSG ablation.

To show that synthetic samples help through coverage and not through "more data", the
ablation gives each hospital the same number of extra samples as its synthetic set, made
instead by augmenting its own real images. For every synthetic sample of class c the
hospital draws one of its real images of class c (any of its images when it has none of
class c, keeping that image's own label: augmentation cannot invent a class the hospital
never saw, which is exactly the gap synthesis fills) and applies a random shift of up to
`max_shift` pixels, a horizontal flip with probability 1/2, and brightness and contrast
jitter. Everything is vectorised and seeded.
"""

from __future__ import annotations

import numpy as np
import torch


def _draw_sources(labels: np.ndarray, wanted: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of real images to augment, one per wanted label (same class when possible)."""
    sources = np.empty(len(wanted), dtype=np.int64)
    for cls in np.unique(wanted):
        slots = np.flatnonzero(wanted == cls)
        pool = np.flatnonzero(labels == cls)
        if pool.size == 0:
            pool = np.arange(len(labels))
        sources[slots] = rng.choice(pool, size=slots.size, replace=True)
    return sources


def augment_like(
    images: np.ndarray,
    labels: np.ndarray,
    wanted_labels: np.ndarray,
    seed: int,
    max_shift: int = 2,
    brightness: float = 0.1,
    contrast: float = 0.1,
) -> dict[str, np.ndarray]:
    """As many augmented real samples as `wanted_labels` (uint8, the input's layout).

    Returns `images`, `labels` (the source images' labels) and `is_synthetic` (all False:
    these are real images, transformed).
    """
    wanted = np.asarray(wanted_labels, dtype=np.int64).reshape(-1)
    if wanted.size == 0:
        return {"images": images[:0].copy(), "labels": labels[:0].astype(np.int64), "is_synthetic": np.zeros(0, dtype=bool)}
    if len(labels) == 0:
        raise ValueError("Cannot augment a client with no real training images.")
    rng = np.random.default_rng(seed)
    sources = _draw_sources(np.asarray(labels), wanted, rng)
    gray = images.ndim == 3
    x = torch.from_numpy(images[sources].astype(np.float32) / 255.0)
    x = x.unsqueeze(1) if gray else x.permute(0, 3, 1, 2)
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.from_numpy(rng.integers(0, 2 * max_shift + 1, size=n))
    dx = torch.from_numpy(rng.integers(0, 2 * max_shift + 1, size=n))
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * max_shift)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    shifted = shifted.gather(3, cols)
    flip = torch.from_numpy(rng.random(n) < 0.5)
    shifted[flip] = shifted[flip].flip(-1)
    gain = torch.from_numpy(rng.uniform(1 - contrast, 1 + contrast, n).astype(np.float32))[:, None, None, None]
    offset = torch.from_numpy(rng.uniform(-brightness, brightness, n).astype(np.float32))[:, None, None, None]
    mean = shifted.mean(dim=(1, 2, 3), keepdim=True)
    out = ((shifted - mean) * gain + mean + offset).clamp(0, 1)
    out = out.squeeze(1) if gray else out.permute(0, 2, 3, 1)
    return {
        "images": (out.numpy() * 255.0).round().astype(np.uint8),
        "labels": np.asarray(labels)[sources].astype(np.int64),
        "is_synthetic": np.zeros(n, dtype=bool),
    }
