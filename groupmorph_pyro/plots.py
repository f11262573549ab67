"""Figures (matplotlib, Agg backend: no display needed). Only this module imports matplotlib."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["uncertainty_figure"]


def _middle_slice(vol: np.ndarray, axis: int = 2) -> np.ndarray:
    return np.take(vol, vol.shape[axis] // 2, axis=axis).T  # rows = second array axis, for display


def uncertainty_figure(path, image: np.ndarray, std_mm: np.ndarray, jacobian: np.ndarray, title: str = "") -> None:
    """Save a PNG with the middle slice (last axis) of the warped image, the displacement standard
    deviation (mm) and ``det J``, each with a colorbar. Arrays are ``(D, H, W)``. Written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4), constrained_layout=True)
    panels = [
        (image, "warped image", "gray", None),
        (std_mm, "displacement sd (mm)", "magma", None),
        (jacobian, "det J (≤ 0: folding)", "RdBu_r", (0.0, 2.0)),
    ]
    for ax, (vol, label, cmap, lim) in zip(axes, panels):
        im = ax.imshow(_middle_slice(vol), cmap=cmap, origin="lower",
                       vmin=None if lim is None else lim[0], vmax=None if lim is None else lim[1])
        ax.set_title(label)
        ax.axis("off")
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
