"""Figures (matplotlib, Agg backend: no display needed). Only this module imports matplotlib."""
from __future__ import annotations

import numpy as np

from .files import atomic_write

__all__ = ["uncertainty_figure", "comparison_figure", "learning_curve_figure", "scaling_figure", "foreground_mask",
           "gray_png", "colour_png", "scatter_png", "slices_figure", "curves_figure"]


def _middle_slice(vol: np.ndarray, axis: int = 2) -> np.ndarray:
    return np.take(vol, vol.shape[axis] // 2, axis=axis).T  # rows = second array axis, for display


def foreground_mask(image: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Voxels brighter than the 1st percentile plus ``fraction`` of the 1–99 percentile range: the
    body, not the air around it (same shape as ``image``, bool). A constant image is all foreground."""
    lo, hi = np.percentile(image, [1.0, 99.0])
    if hi <= lo:
        return np.ones(image.shape, bool)
    return image > lo + fraction * (hi - lo)


def uncertainty_figure(path, image: np.ndarray, std_mm: np.ndarray, jacobian: np.ndarray, title: str = "",
                       identity: bool = False) -> None:
    """Save a PNG with the middle slice (last array axis) of the warped image, the displacement
    standard deviation (mm) inside the body (:func:`foreground_mask` of the image; the air around it,
    where nothing constrains the motion, is left blank) and ``det J``, each with a colorbar. Arrays
    are ``(D, H, W)``.
    ``identity``: the fixed timepoint (φ = Id in every sample), whose sd and det J panels would be
    constant; they are replaced by a note. Written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4), constrained_layout=True)
    body = np.where(foreground_mask(image), std_mm, np.nan)
    panels = [
        (image, "warped image (input intensity)", "gray", None),
        (body, "posterior sd of displacement (mm), body only", "magma", None),
        (jacobian, "det J of the posterior mean (≤ 0: folding)", "RdBu_r", (0.0, 2.0)),
    ]
    for i, (ax, (vol, label, cmap, lim)) in enumerate(zip(axes, panels)):
        ax.axis("off")
        if identity and i > 0:
            ax.text(0.5, 0.5, "fixed timepoint (identity):\nno displacement, det J = 1", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        im = ax.imshow(_middle_slice(vol), cmap=cmap, origin="lower",
                       vmin=None if lim is None else lim[0], vmax=None if lim is None else lim[1])
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    slice_note = f"slice {image.shape[2] // 2} of {image.shape[2]} along the last array axis"
    fig.suptitle(f"{title} — {slice_note}" if title else slice_note)
    _save(fig, path, plt)


def comparison_figure(path, results: dict, title: str = "") -> None:
    """Paper Fig. 4 style: per method, the middle slice of (mean aligned timepoint − first aligned
    timepoint) and of ``det J`` of the last timepoint. ``results``: ``{method: (warped (K, D, H, W),
    jacobian (K, D, H, W))}``. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.4), constrained_layout=True, squeeze=False)
    diffs = {m: w.mean(0) - w[0] for m, (w, _) in results.items()}
    lim = max(float(np.abs(d).max()) for d in diffs.values()) or 1.0
    for col, (method, (warped, jac)) in enumerate(results.items()):
        im = axes[0, col].imshow(_middle_slice(diffs[method]), cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
        axes[0, col].set_title(f"{method}\nmean − first", fontsize=8)
        im2 = axes[1, col].imshow(_middle_slice(jac[-1]), cmap="RdBu_r", vmin=0.0, vmax=2.0, origin="lower")
        axes[1, col].set_title("det J (last timepoint)", fontsize=8)
        for ax in axes[:, col]:
            ax.axis("off")
    fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.8)
    fig.colorbar(im2, ax=axes[1, :].tolist(), shrink=0.8)
    if title:
        fig.suptitle(title)
    _save(fig, path, plt)


def learning_curve_figure(path, iterations, values, references: dict | None = None, ylabel: str = "",
                          title: str = "") -> None:
    """A held-out curve against training iteration with horizontal reference lines
    (``references``: ``{label: value}``, e.g. identity, per-case, Elastix). Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    ax.plot(list(iterations), list(values), marker="o", markersize=3, label="amortised network (one pass)")
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    for i, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, color=f"C{i + 1}", linestyle=styles[i % len(styles)], label=f"{label} ({value:.2f})")
    ax.set_xlabel("training iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, path, plt)


def _save(fig, path, plt) -> None:
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def scaling_figure(path, runs: list, title: str = "per-case registration cost, 2 CPU threads") -> None:
    """Wall seconds of each method against the group's voxels × K, log–log, one line per method
    (``runs``: dicts with ``method``, ``voxels``, ``timepoints``, ``seconds``, as
    ``benchmarks/scale.py`` writes them). Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    for i, method in enumerate(dict.fromkeys(r["method"] for r in runs)):
        points = sorted((r["voxels"] * r["timepoints"], r["seconds"]) for r in runs if r["method"] == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=f"C{i}", label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("voxels × timepoints")
    ax.set_ylabel("wall seconds (whole group)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    _save(fig, path, plt)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig, plt, dpi: int = 100) -> bytes:
    import io

    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


def gray_png(image: np.ndarray, vmin: float, vmax: float) -> bytes:
    """A 2D array as an 8-bit grey PNG, one pixel per entry, row 0 at the top; values clipped to [vmin, vmax]."""
    import io

    from PIL import Image

    scaled = (np.clip(np.nan_to_num(image, nan=vmin), vmin, vmax) - vmin) / max(vmax - vmin, 1e-12)
    buf = io.BytesIO()
    Image.fromarray(np.round(255 * scaled).astype(np.uint8), mode="L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def colour_png(image: np.ndarray, cmap: str, vmin: float, vmax: float, label: str) -> bytes:
    """A 2D array in colour map ``cmap`` over [vmin, vmax] with a labelled colour bar (NaN: black), as PNG
    about one pixel per entry."""
    plt = _pyplot()
    h, w = image.shape
    fig = plt.figure(figsize=(w / 100 + 1.3, max(h / 100, 1.2) + 0.2))
    ax = fig.add_axes([0.0, 0.05, w / 100 / (w / 100 + 1.3), 0.9])
    ax.set_facecolor("black")
    im = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="equal")
    ax.axis("off")
    cax = fig.add_axes([w / 100 / (w / 100 + 1.3) + 0.03, 0.1, 0.04, 0.8])
    bar = fig.colorbar(im, cax=cax)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return _png(fig, plt)


def scatter_png(x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, title: str = "") -> bytes:
    """A scatter plot of ``y`` against ``x`` as PNG (about 420×320 px)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.2), constrained_layout=True)
    ax.scatter(x, y, s=8, alpha=0.6)
    _small_axis(ax, xlabel, ylabel, title, title_size=8)
    return _png(fig, plt)


def _small_axis(ax, xlabel: str, ylabel: str = "", title: str = "", title_size: int = 9) -> None:
    """Labels at 8 pt, ticks at 7 pt, a light grid and the title (when given) of a small panel."""
    ax.set_xlabel(xlabel, fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=title_size)


def slices_figure(path, volume: np.ndarray, cmap: str, label: str, title: str = "", vmin: float | None = None,
                  vmax: float | None = None, limit: float | None = None) -> None:
    """Three orthogonal middle slices of a ``(D, H, W)`` volume with one colour bar ``label``, as PNG
    (written atomically). ``limit``: a symmetric range ``[−limit, limit]`` (instead of vmin, vmax);
    NaN voxels are black."""
    plt = _pyplot()
    if limit is not None:
        vmin, vmax = -float(limit), float(limit)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), constrained_layout=True)
    for axis, ax in enumerate(axes):
        ax.set_facecolor("black")
        im = ax.imshow(_middle_slice(volume, axis), cmap=cmap, vmin=vmin, vmax=vmax, origin="lower")
        ax.set_title(f"slice {volume.shape[axis] // 2} of {volume.shape[axis]} along array axis {axis}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label=label)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path, plt)


def curves_figure(path, panels: dict, xlabel: str, title: str = "", legend: tuple | None = None,
                  bands: dict | None = None) -> None:
    """One panel per entry of ``panels`` (name -> ``(T, n)`` values over T steps, one line per column;
    ``legend`` names the columns), side by side with a shared x axis 0..T−1, as PNG (written atomically).
    ``bands``: name -> ``(low, high)``, each ``(T, n)``, shaded around the lines of that panel."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.6, 3.2), constrained_layout=True,
                             squeeze=False)
    for ax, (name, values) in zip(axes[0], panels.items()):
        values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
        lines = ax.plot(np.arange(len(values)), values, marker="o" if legend else None, markersize=3,
                        linewidth=1.2 if legend else 0.6, alpha=1.0 if legend else 0.5)
        if bands and name in bands:
            low, high = (np.asarray(b, dtype=np.float64).reshape(values.shape) for b in bands[name])
            for i, line in enumerate(lines):
                ax.fill_between(np.arange(len(values)), low[:, i], high[:, i], color=line.get_color(), alpha=0.15,
                                linewidth=0)
        if legend:
            for line, text in zip(lines, legend):
                line.set_label(text)
            ax.legend(fontsize=7)
        _small_axis(ax, xlabel, title=name)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path, plt)
