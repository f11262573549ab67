"""A visual QC report of a registration output folder: one self-contained HTML page.

``groupmorph report REG_DIR`` (and ``groupmorph register`` unless ``--no-report``) writes
``REG_DIR/report.html``. Every image is a PNG inlined as a data URI and the page's script is inline,
so the file opens from disk with no network access. For the group it shows a table per timepoint
(NMI against the reference before and after, folding, det J range, SDlogJ, mean displacement and,
with posterior samples, the displacement sd inside the body), QC flags with their thresholds
(:data:`THRESHOLDS`) and the settings and package version that made the registration. For each
timepoint it shows three orthogonal mosaics (:data:`MOSAIC_SLICES` slices per axis, each at most
:data:`MOSAIC_PIXELS` pixels on its longer side, whatever the grid) of the image and of the
reference image, before and after registration, with a flicker control; a checkerboard of the
registered image and the reference; det J; with samples the displacement sd; with landmark
posteriors an error table and a scatter of each landmark's error against its posterior sd.

The reference is the fixed timepoint in all-to-one mode and the mean image in all-moving mode.
"Before" images are the registration's input files (``summary.json["inputs"]``) resampled onto the
group's grid; without them the report shows the registered images alone and says so.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checks import InputError
from .files import atomic_write_text
from .likelihoods import nmi
from .outputs import read_summary
from .plots import colour_png, foreground_mask, gray_png, scatter_png
from .preprocess import percentile_normalize
from .results import package_version
from .volumes import affine_spacing, load_group, load_volume, read_world_displacement

__all__ = ["THRESHOLDS", "MOSAIC_SLICES", "MOSAIC_PIXELS", "NMI_VOXELS", "slice_positions", "mosaic", "checkerboard",
           "jacobian_stats", "landmark_errors", "qc_flags", "body_mask", "write_report"]

THRESHOLDS = {
    "folding_percent": 0.0,  # a flag when more than this % of voxels have det J <= 0
    "jacobian_min": 0.2,  # ... when det J falls below this anywhere (local volume shrunk 5x)
    "jacobian_max": 5.0,  # ... or rises above this anywhere (local volume grown 5x)
    "nmi_drop": 0.001,  # ... when a timepoint's NMI against the reference falls by more than this
    "sd_p95_voxels": 1.0,  # ... when the 95th percentile of the displacement sd in the body exceeds this many voxels (mm: × the largest voxel size)
}
"""The QC flags' thresholds, stated on the page."""
MOSAIC_SLICES = 4
"""Slices per axis in each mosaic (at 20, 40, 60 and 80 % of the axis)."""
MOSAIC_PIXELS = 80
"""Longest side of one slice of a mosaic, pixels (slices are resampled to their physical aspect)."""
NMI_VOXELS = 2 ** 21
"""The report's NMI reads at most this many voxels per image (a regular sub-grid of the group's)."""
BINS = 32


def slice_positions(size: int, count: int = MOSAIC_SLICES) -> list[int]:
    """``count`` slice indices evenly inside an axis of ``size`` voxels: at ``(i + 1) / (count + 1)``
    of its length (rounded down), never the border slices."""
    if size < 1 or count < 1:
        raise InputError(f"slice_positions: expected size >= 1 and count >= 1, got {size} and {count}")
    return [min(size - 1, int((i + 1) * size / (count + 1))) for i in range(count)]


def _resize(slice2d: np.ndarray, extent_mm: tuple, pixels: int) -> np.ndarray:
    """A 2D slice resampled (bilinear, antialiased) so its pixels are square in mm and its longer side is ``pixels``."""
    scale = pixels / max(extent_mm)
    shape = tuple(max(1, int(round(e * scale))) for e in extent_mm)
    t = torch.as_tensor(np.ascontiguousarray(slice2d), dtype=torch.float32)[None, None]
    nan = torch.isnan(t)
    out = torch.nn.functional.interpolate(torch.nan_to_num(t), size=shape, mode="bilinear", align_corners=False,
                                          antialias=True)[0, 0]
    if nan.any():  # masked voxels stay masked
        hole = torch.nn.functional.interpolate(nan.float(), size=shape, mode="nearest")[0, 0] > 0
        out[hole] = float("nan")
    return out.numpy()


def mosaic(volume: np.ndarray, spacing=(1.0, 1.0, 1.0), count: int = MOSAIC_SLICES, pixels: int = MOSAIC_PIXELS,
           fill: float = np.nan) -> np.ndarray:
    """Three rows of ``count`` slices of a ``(D, H, W)`` volume, one row per array axis (slices at
    :func:`slice_positions`), each resampled to square mm pixels with its longer side ``pixels`` and
    shown with its first remaining axis across and its second up (``.T`` flipped); cells padded with
    ``fill``. Returns a 2D array of ``3 * cell height`` by ``count * cell width``."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(f"mosaic: expected a (D, H, W) volume, got shape {volume.shape}")
    spacing = tuple(float(s) for s in spacing)
    rows = []
    for axis in range(3):
        rest = [a for a in range(3) if a != axis]
        extent = (volume.shape[rest[1]] * spacing[rest[1]], volume.shape[rest[0]] * spacing[rest[0]])
        rows.append([_resize(volume[(slice(None),) * axis + (i,)].T[::-1], extent, pixels)  # a view, not a copy
                     for i in slice_positions(volume.shape[axis], count)])
    h = max(s.shape[0] for row in rows for s in row)
    w = max(s.shape[1] for row in rows for s in row)
    out = np.full((3 * h, count * w), fill, dtype=np.float32)
    for r, row in enumerate(rows):
        for c, s in enumerate(row):
            top, left = r * h + (h - s.shape[0]) // 2, c * w + (w - s.shape[1]) // 2
            out[top:top + s.shape[0], left:left + s.shape[1]] = s
    return out


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """``a`` and ``b`` (same shape) interleaved in a checkerboard of ``tiles`` squares along each axis."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"checkerboard: expected two arrays of one shape, got {a.shape} and {b.shape}")
    index = np.indices(a.shape)
    parity = sum((i * tiles) // max(n, 1) for i, n in zip(index, a.shape)) % 2
    return np.where(parity == 0, a, b)


def jacobian_stats(jacobian: np.ndarray, body: np.ndarray | None = None) -> dict:
    """``{"folding_percent", "min", "max", "sdlogj"}`` of a det J volume: the % of voxels with
    det J <= 0 and the range over the whole grid; SDlogJ, the standard deviation of log det J over the
    body (``body``, bool, default everywhere) where det J > 0 (None if there is no such voxel)."""
    jac = np.asarray(jacobian, dtype=np.float64)
    body = np.ones(jac.shape, bool) if body is None else np.asarray(body, bool)
    if body.shape != jac.shape:
        raise InputError(f"jacobian_stats: body mask {body.shape} differs from det J {jac.shape}")
    positive = jac[body & (jac > 0)]
    return {"folding_percent": float(100.0 * (jac <= 0).mean()), "min": float(jac.min()), "max": float(jac.max()),
            "sdlogj": float(np.log(positive).std()) if positive.size else None}


def landmark_errors(mean_mm: np.ndarray, cov_mm2: np.ndarray, fixed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Each landmark's error and posterior sd from ``landmarks_posterior.json``: every timepoint's
    landmarks mapped into the common frame, ``mean_mm (K, L, 3)``, ``cov_mm2 (K, L, 3, 3)``. The error
    of landmark l of timepoint k is its distance (mm) from the same landmark of the fixed timepoint
    (all-to-one) or from the mean over timepoints (all-moving); its sd is ``sqrt(trace(cov) / 3)`` (mm).
    Returns ``(error (K, L), sd (K, L))``."""
    mean, cov = np.asarray(mean_mm, np.float64), np.asarray(cov_mm2, np.float64)
    if mean.ndim != 3 or mean.shape[2] != 3 or cov.shape != mean.shape + (3,):
        raise InputError(f"landmark_errors: expected mean (K, L, 3) and cov (K, L, 3, 3), got {mean.shape} and {cov.shape}")
    target = mean[fixed] if fixed is not None else mean.mean(0)
    return np.linalg.norm(mean - target, axis=-1), np.sqrt(np.clip(np.trace(cov, axis1=-2, axis2=-1), 0, None) / 3)


def qc_flags(rows: list[dict], voxel_mm: float, thresholds: dict = THRESHOLDS) -> list[str]:
    """The QC flags of a report's per-timepoint rows (keys as :func:`write_report` makes them), each a
    sentence naming the timepoint, the value and the threshold (:data:`THRESHOLDS`)."""
    flags = []
    for r in rows:
        k = r["timepoint"]
        if r["folding_percent"] > thresholds["folding_percent"]:
            flags.append(f"timepoint {k}: folding, {r['folding_percent']:.4f} % of voxels have det J ≤ 0 "
                         f"(threshold {thresholds['folding_percent']} %)")
        if r["jacobian_min"] < thresholds["jacobian_min"] or r["jacobian_max"] > thresholds["jacobian_max"]:
            flags.append(f"timepoint {k}: extreme det J, range {r['jacobian_min']:.3f} to {r['jacobian_max']:.3f} "
                         f"(thresholds {thresholds['jacobian_min']} and {thresholds['jacobian_max']})")
        if r["nmi_before"] is not None and r["nmi_after"] < r["nmi_before"] - thresholds["nmi_drop"]:
            flags.append(f"timepoint {k}: NMI against the reference fell, {r['nmi_before']:.4f} → {r['nmi_after']:.4f} "
                         f"(threshold: a drop of {thresholds['nmi_drop']})")
        limit = thresholds["sd_p95_voxels"] * voxel_mm
        if r.get("sd_p95_mm") is not None and r["sd_p95_mm"] > limit:
            flags.append(f"timepoint {k}: uncertainty hot spots, 95th percentile of the displacement sd in the body "
                         f"{r['sd_p95_mm']:.2f} mm (threshold {thresholds['sd_p95_voxels']} voxel = {limit:.2f} mm)")
    return flags


@dataclass
class _Folder:
    """What the report reads of a registration folder (arrays are read one timepoint at a time)."""

    path: Path
    summary: dict
    k: int
    affine: np.ndarray
    shape: tuple

    @property
    def fixed(self) -> int | None:
        """The fixed timepoint (all-to-one mode), else None."""
        fixed = self.summary.get("fixed") if self.summary.get("mode") == "all-to-one" else None
        return None if fixed is None else int(fixed)

    def volume(self, name: str, i: int) -> np.ndarray | None:
        path = self.path / f"{name}_{i}.nii.gz"
        return load_volume(path).data if path.is_file() else None

    def displacement_mm(self, i: int) -> np.ndarray:
        """``|φ_i − Id|`` in mm, ``(D, H, W)``, from the stored world-mm field."""
        return np.linalg.norm(read_world_displacement(self.path / f"displacement_{i}.nii.gz", np.float32), axis=-1)


def body_mask(image: np.ndarray) -> np.ndarray:
    """The body of a reference image: :func:`~groupmorph_pyro.plots.foreground_mask` opened by one voxel
    (a 3×3×3 cross), which removes the isolated noise voxels of the air around it; the unopened mask
    where opening leaves nothing."""
    from scipy import ndimage

    mask = foreground_mask(image)
    opened = ndimage.binary_opening(mask)
    return opened if opened.any() else mask


def _read_folder(reg_dir) -> _Folder:
    folder = Path(reg_dir)
    summary = read_summary(folder)
    k = 0
    while all((folder / f"{n}_{k}.nii.gz").is_file() for n in ("warped", "jacobian", "displacement")):
        k += 1
    if k < 2:
        raise InputError(f"{folder}: not a registration output folder (expected warped_<k>, jacobian_<k> and "
                         f"displacement_<k>.nii.gz for k = 0, 1, ...; found {k} complete timepoints)")
    first = load_volume(folder / "warped_0.nii.gz")
    return _Folder(folder, summary, k, first.affine, first.data.shape)


def _inputs(folder: _Folder) -> tuple[np.ndarray | None, str]:
    """The registration's inputs on its grid, or None and why not."""
    paths = folder.summary.get("inputs") or []
    if len(paths) != folder.k:
        return None, "the registration recorded no input files (summary.json has no \"inputs\")"
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        return None, f"the input files are gone: {missing}"
    images, affine, _ = load_group(paths, resample=True)
    if images.shape[1:] != folder.shape or not np.allclose(affine, folder.affine, atol=1e-3):
        return None, "the input files are not on the registration's grid"
    return images, ""


def _sub_grid(shape) -> tuple:
    step = max(1, int(np.ceil((np.prod(shape) / NMI_VOXELS) ** (1 / 3))))
    return tuple(slice(None, None, step) for _ in shape)


def _nmi(a: np.ndarray, b: np.ndarray) -> float:
    """NMI of two volumes on the grid's sub-grid (:data:`NMI_VOXELS`), each normalised to [0, 1]."""
    grid = _sub_grid(a.shape)
    ta = torch.as_tensor(percentile_normalize(np.ascontiguousarray(a[grid]))).float()[None]
    tb = torch.as_tensor(percentile_normalize(np.ascontiguousarray(b[grid]))).float()[None]
    return float(nmi(ta, tb, BINS, histogram="bspline")[0])


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _window(volume: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(volume[_sub_grid(volume.shape)], [1.0, 99.0])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _unit(volume: np.ndarray) -> np.ndarray:
    """A volume mapped to [0, 1] by its display window (:func:`_window`)."""
    lo, hi = _window(volume)
    return np.clip((volume - lo) / (hi - lo), 0.0, 1.0)


def _gray_mosaic(volume: np.ndarray, spacing) -> str:
    lo, hi = _window(volume)
    return _data_uri(gray_png(mosaic(volume, spacing, fill=lo), lo, hi))


def _timepoint(folder: _Folder, i: int, reference: dict, before: np.ndarray | None, spacing) -> tuple:
    """The table row and the panels of timepoint ``i``; with posterior samples the panels hold the sd
    mosaic as an array (``"sd"``) and the sd's 99th percentile (``"sd_p99"``), coloured later on the
    group's common scale (:func:`_colour_sd`)."""
    warped, jac = folder.volume("warped", i), folder.volume("jacobian", i)
    body = reference["body"]
    stats = jacobian_stats(jac, body)
    disp = folder.displacement_mm(i)
    identity = folder.fixed == i
    row = {"timepoint": i, "role": "fixed" if identity else "", "nmi_before": None if before is None or identity
           else _nmi(before, reference["before"]),
           "nmi_after": None if identity else _nmi(warped, reference["after"]),
           "folding_percent": stats["folding_percent"], "jacobian_min": stats["min"], "jacobian_max": stats["max"],
           "sdlogj": stats["sdlogj"], "displacement_mean_mm": float(disp[body].mean()) if body.any() else 0.0}
    panels = {"after": _gray_mosaic(warped, spacing), "reference_after": reference["after_uri"]}
    if before is not None:
        panels["before"], panels["reference_before"] = _gray_mosaic(before, spacing), reference["before_uri"]
    board = checkerboard(_unit(warped), reference["after_unit"])
    panels["checkerboard"] = _data_uri(gray_png(mosaic(board, spacing, fill=0.0), 0.0, 1.0))
    panels["jacobian"] = _data_uri(colour_png(mosaic(jac, spacing), "RdBu_r", 0.0, 2.0, "det J (1: volume kept; ≤ 0: folding)"))
    sd = folder.volume("displacement_std_mm", i)
    if sd is not None:
        inside = sd[body] if body.any() else sd.ravel()
        row["sd_mean_mm"], row["sd_p95_mm"] = float(inside.mean()), float(np.percentile(inside, 95))
        panels["sd"], panels["sd_p99"] = mosaic(np.where(body, sd, np.nan), spacing), float(np.percentile(sd, 99))
    return row, panels


def _colour_sd(panels: list) -> None:
    """Each timepoint's sd mosaic (an array from :func:`_timepoint`) as a PNG on one colour scale for
    the group: 0 to the largest 99th percentile of the timepoints' sd (1 mm when that is 0)."""
    sd_max = max((p.pop("sd_p99") for p in panels if "sd_p99" in p), default=None) or 1.0
    for p in panels:
        if "sd" in p:
            p["sd"] = _data_uri(colour_png(p["sd"], "magma", 0.0, sd_max, "posterior sd of displacement (mm), body only"))


def _reference(folder: _Folder, inputs: np.ndarray | None, spacing) -> dict:
    """The reference image before and after registration: the fixed timepoint (all-to-one) or the mean image."""
    fixed = folder.fixed
    if fixed is not None:
        after = folder.volume("warped", fixed)
        before = inputs[fixed] if inputs is not None else None
    else:
        after = np.mean([folder.volume("warped", i) for i in range(folder.k)], axis=0)
        before = inputs.mean(0) if inputs is not None else None
    ref = {"after": after, "before": before, "after_uri": _gray_mosaic(after, spacing), "body": body_mask(after),
           "after_unit": _unit(after),
           "name": f"timepoint {fixed} (fixed)" if fixed is not None else "the mean image"}
    ref["before_uri"] = _gray_mosaic(before, spacing) if before is not None else None
    return ref


def _landmark_section(folder: _Folder) -> dict | None:
    path = folder.path / "landmarks_posterior.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    fixed = folder.fixed
    error, sd = landmark_errors(np.asarray(data["mean_mm"]), np.asarray(data["cov_mm2"]), fixed)
    rows = [{"timepoint": k, "mean": float(error[k].mean()), "median": float(np.median(error[k])),
             "max": float(error[k].max()), "sd": float(sd[k].mean())} for k in range(error.shape[0]) if k != fixed]
    keep = np.array([k != fixed for k in range(error.shape[0])])
    e, s = error[keep].ravel(), sd[keep].ravel()
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    rho = float(np.corrcoef(rank(e), rank(s))[0, 1]) if e.size > 2 and e.std() > 0 and s.std() > 0 else None
    plot = _data_uri(scatter_png(s, e, "posterior sd of the landmark (mm)", "landmark error (mm)",
                                 "each landmark of each timepoint" + (f"; Spearman ρ = {rho:.2f}" if rho is not None else "")))
    return {"rows": rows, "scatter": plot, "spearman": rho, "reference": "the fixed timepoint's" if fixed is not None
            else "the mean over timepoints of"}


def write_report(reg_dir, out=None) -> Path:
    """Write the QC page of a ``groupmorph register`` output folder (see the module docstring) to
    ``out`` (default ``REG_DIR/report.html``), atomically. Fails with one line, writing nothing, when
    ``reg_dir`` is not a registration folder or ``out`` is one of its other files. Returns the path."""
    folder = _read_folder(reg_dir)
    out = folder.path / "report.html" if out is None else Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"--out: expected an .html file, got {out}")
    if out.resolve().parent == folder.path.resolve() and out.name != "report.html" and out.exists():
        raise InputError(f"--out: {out} is a file of the registration folder; choose another name")
    spacing = affine_spacing(folder.affine)
    inputs, why = _inputs(folder)
    reference = _reference(folder, inputs, spacing)
    rows, panels = [], []
    for i in range(folder.k):
        row, panel = _timepoint(folder, i, reference, None if inputs is None else inputs[i], spacing)
        rows.append(row)
        panels.append(panel)
    _colour_sd(panels)
    flags = qc_flags(rows, max(spacing))
    page = _render(folder, rows, panels, flags, reference, why, _landmark_section(folder), spacing)
    atomic_write_text(out, page)
    return out


def _render(folder, rows, panels, flags, reference, why, landmarks, spacing) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["num"] = lambda v, digits=3: "–" if v is None else f"{v:.{digits}f}"
    s = folder.summary
    settings = {"mode": s.get("mode"), "fixed timepoint": s.get("fixed"), "diffeomorphic": s.get("diffeomorphic"),
                "amortised (checkpoint)": s.get("checkpoint") or "no: per-case from zero",
                "per-case steps": s.get("per_case_steps"), "latent grid": s.get("latent_grid"),
                "control factor": s.get("control_factor"), "posterior samples": s.get("samples"),
                "seconds": s.get("seconds"), "device": s.get("device"), "grid": list(folder.shape),
                "voxel size (mm)": [round(v, 4) for v in spacing],
                "made by": s.get("package_version", "groupmorph_pyro (version not recorded)"),
                "report by": package_version()}
    model = json.dumps(s.get("model", {}), sort_keys=True)
    return env.from_string(_TEMPLATE).render(
        title=f"groupmorph QC: {folder.path.resolve().name}", rows=rows, panels=panels,
        flags=flags, thresholds=THRESHOLDS, reference=reference["name"], why=why, landmarks=landmarks,
        settings=settings, model=model, k=folder.k, slices=MOSAIC_SLICES, bins=BINS, views=_views(panels))


def _views(panels: list) -> dict:
    """The images the flicker control shows besides each timepoint's registered one (its ``<img>``'s
    own src): ``before-<k>``, ``reference-after``, ``reference-before`` (data URIs), each once."""
    views = {"reference-after": panels[0]["reference_after"]}
    if panels[0].get("reference_before"):
        views["reference-before"] = panels[0]["reference_before"]
    for k, p in enumerate(panels):  # after-<k>: the page's script takes it from the image's src
        if p.get("before"):
            views[f"before-{k}"] = p["before"]
    return views


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .5em;font-size:.9em;text-align:right}
th{background:#f3f3f3}.flag{color:#a00}.ok{color:#070}.tp{border-top:2px solid #888;margin-top:1.5em;padding-top:.5em}
.panels{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}figure{margin:0}figcaption{font-size:.85em;color:#555}
img{image-rendering:pixelated;max-width:100%}button{margin-right:.5em}code{font-size:.85em}
</style></head><body>
<h1>{{ title }}</h1>
<p>Reference image: {{ reference }}. Mosaics: rows are the three array axes, {{ slices }} slices each
(at 20–80 % of the axis). {% if why %}<b>No "before" views:</b> {{ why }}.{% endif %}</p>
<h2>QC flags</h2>
{% if flags %}<ul>{% for f in flags %}<li class="flag">{{ f }}</li>{% endfor %}</ul>
{% else %}<p class="ok">No flag raised.</p>{% endif %}
<p>Thresholds: folding above {{ thresholds.folding_percent }} % of voxels; det J below {{ thresholds.jacobian_min }} or
above {{ thresholds.jacobian_max }} anywhere; NMI against the reference falling by more than {{ thresholds.nmi_drop }};
95th percentile of the displacement sd in the body above {{ thresholds.sd_p95_voxels }} voxel.</p>
<h2>Timepoints</h2>
<table id="summary"><tr><th>timepoint</th><th>NMI before</th><th>NMI after</th><th>det J ≤ 0 (%)</th><th>min det J</th>
<th>max det J</th><th>SDlogJ</th><th>mean displacement (mm)</th><th>sd mean (mm)</th><th>sd p95 (mm)</th></tr>
{% for r in rows %}<tr><td>{{ r.timepoint }} {{ r.role }}</td><td>{{ r.nmi_before|num(4) }}</td><td>{{ r.nmi_after|num(4) }}</td>
<td>{{ r.folding_percent|num(4) }}</td><td>{{ r.jacobian_min|num }}</td><td>{{ r.jacobian_max|num }}</td><td>{{ r.sdlogj|num }}</td>
<td>{{ r.displacement_mean_mm|num(2) }}</td><td>{{ r.get("sd_mean_mm")|num(2) }}</td><td>{{ r.get("sd_p95_mm")|num(2) }}</td></tr>
{% endfor %}</table>
<p>NMI: each timepoint against the reference ({{ bins }} bins, cubic B-spline window); det J, SDlogJ (over the body, det J &gt; 0)
and the mean displacement of the posterior mean; sd: the posterior sd of the displacement inside the body.</p>
{% if landmarks %}<h2>Landmarks</h2>
<p>Error: each landmark's distance in the common frame from {{ landmarks.reference }} position (posterior means);
sd: sqrt(trace(covariance) / 3) of its posterior.</p>
<table id="landmarks"><tr><th>timepoint</th><th>mean error (mm)</th><th>median (mm)</th><th>max (mm)</th><th>mean sd (mm)</th></tr>
{% for r in landmarks.rows %}<tr><td>{{ r.timepoint }}</td><td>{{ r.mean|num(2) }}</td><td>{{ r.median|num(2) }}</td>
<td>{{ r.max|num(2) }}</td><td>{{ r.sd|num(2) }}</td></tr>{% endfor %}</table>
<img class="scatter" alt="landmark error against posterior sd" src="{{ landmarks.scatter }}">{% endif %}
{% for p in panels %}<section class="tp" id="timepoint-{{ loop.index0 }}"><h2>Timepoint {{ loop.index0 }}</h2>
<div class="panels"><figure>
<div><button class="flicker" data-target="view-{{ loop.index0 }}">flicker: image / reference</button>
<label><input type="checkbox" class="auto" data-target="view-{{ loop.index0 }}"> automatic</label>
{% if p.get("before") %}<label><input type="radio" name="stage-{{ loop.index0 }}" value="before" data-target="view-{{ loop.index0 }}"> before</label>{% endif %}
<label><input type="radio" name="stage-{{ loop.index0 }}" value="after" data-target="view-{{ loop.index0 }}" checked> after</label></div>
<img id="view-{{ loop.index0 }}" class="view" alt="timepoint {{ loop.index0 }}" src="{{ p.after }}"
 data-after="after-{{ loop.index0 }}" data-reference_after="reference-after"
 {% if p.get("before") %}data-before="before-{{ loop.index0 }}" data-reference_before="reference-before"{% endif %}
 data-stage="after" data-showing="image">
<figcaption id="caption-{{ loop.index0 }}">timepoint {{ loop.index0 }}, after registration</figcaption></figure>
<figure><img alt="checkerboard" src="{{ p.checkerboard }}"><figcaption>checkerboard: registered image and reference</figcaption></figure>
<figure><img alt="det J" src="{{ p.jacobian }}"><figcaption>det J of the posterior mean</figcaption></figure>
{% if p.get("sd") %}<figure><img alt="displacement sd" src="{{ p.sd }}"><figcaption>posterior sd of the displacement (mm), body only</figcaption></figure>{% endif %}
</div></section>{% endfor %}
<h2>Settings</h2><table id="settings">{% for key, value in settings.items() %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>{% endfor %}</table>
<p>model: <code>{{ model }}</code></p>
<p id="size"></p>
<script type="application/json" id="views">{{ views|tojson }}</script>
<script>
var views=JSON.parse(document.getElementById("views").textContent);
document.querySelectorAll("img.view").forEach(function(img){views[img.dataset.after]=img.src;});
function show(img){
  var s=img.dataset.stage, ref=img.dataset.showing==="reference";
  img.src=views[img.dataset[(ref?"reference_":"")+s]];
  document.getElementById("caption-"+img.id.slice(5)).textContent=
    (ref?"reference":"timepoint "+img.id.slice(5))+", "+(s==="before"?"before":"after")+" registration";
}
function flick(img){img.dataset.showing=img.dataset.showing==="image"?"reference":"image";show(img);}
document.querySelectorAll("button.flicker").forEach(function(b){
  b.addEventListener("click",function(){flick(document.getElementById(b.dataset.target));});});
document.querySelectorAll("input[type=radio]").forEach(function(r){
  r.addEventListener("change",function(){var img=document.getElementById(r.dataset.target);img.dataset.stage=r.value;show(img);});});
document.querySelectorAll("input.auto").forEach(function(c){var timer=null;
  c.addEventListener("change",function(){var img=document.getElementById(c.dataset.target);
    if(c.checked){timer=setInterval(function(){flick(img);},700);}else{clearInterval(timer);}});});
document.getElementById("size").textContent="page size: "+(document.documentElement.outerHTML.length/1e6).toFixed(2)+" MB";
</script></body></html>
"""
