"""Drawing one MedMNIST image in a figure cell, the same way in every image grid."""

from __future__ import annotations

import numpy as np

__all__ = ["show_image"]


def show_image(ax, img: np.ndarray) -> None:
    """One uint8 image on ``ax``: grayscale (H, W) or (H, W, 1) in gray, RGB as it is."""
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
