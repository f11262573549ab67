"""Batch registration of every series of a manifest into one resumable output folder.

Layout: ``<out>/<series>/`` holds what ``groupmorph register`` writes for one group
(:class:`~groupmorph_pyro.outputs.FolderWriter`, which writes each field as it is computed; ``summary.json`` last, so it
marks a finished series), and ``<out>/batch.csv`` one row per series of the split (rewritten
atomically after each one). A rerun skips the finished series and redoes any that was interrupted.
This loop serves ``register --manifest`` and (through ``on_series``) ``evaluate --manifest``.
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tqdm.auto import tqdm

from .checks import InputError
from .config import Config
from .data import SeriesEntry, entry_landmarks, split_entries
from .files import atomic_write_text
from .outputs import FolderWriter, check_outputs, output_paths
from .registration import register
from .results import RegistrationResult
from .volumes import load_group

__all__ = ["register_manifest", "SeriesRun", "BATCH_COLUMNS"]

BATCH_COLUMNS = ["series", "status", "seconds", "nmi_before", "nmi_after", "folding_percent_all",
                 "landmark_mm_before", "landmark_mm_after", "folder"]


def _row(name: str, status: str, summary: dict, folder: Path) -> dict:
    lm = summary.get("landmarks") or {}
    return {"series": name, "status": status, "seconds": summary.get("seconds"),
            "nmi_before": summary.get("nmi_before"), "nmi_after": summary.get("nmi_after"),
            "folding_percent_all": summary.get("folding_percent_all"),
            "landmark_mm_before": (lm.get("identity") or {}).get("mean_mm"),
            "landmark_mm_after": (lm.get("registered") or {}).get("mean_mm"), "folder": str(folder)}


def _write_index(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=BATCH_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


@dataclass
class SeriesRun:
    """One series of a manifest loop, handed to ``on_series``: its manifest ``entry``, output
    ``folder``, ``images`` ``(K, D, H, W)`` and ``affine`` as read, its ``landmarks`` ``(K, L, 3)``
    voxels (or None), and the ``result`` (its summary, posterior mean and sd; the full-resolution
    fields were written to ``folder`` as they were computed and are not held: read them there),
    None when an earlier run finished the series and it was skipped."""

    entry: SeriesEntry
    folder: Path
    images: np.ndarray | None
    affine: np.ndarray | None
    landmarks: np.ndarray | None
    result: RegistrationResult | None


def register_manifest(manifest, out_dir, config: Config | None = None, guide=None, split: str = "test",
                      fixed: int | None = None, finetune_steps: int | None = None, device="cpu",
                      samples: int = 0, seed: int = 0, progress: bool = True,
                      on_series: Callable[[SeriesRun], None] | None = None, itk: bool = True) -> list[dict]:
    """Register every series of ``split`` in ``manifest``; finished series are skipped.

    Every check that needs no registration runs before the first series (unique names, K against
    the network, outputs that would overwrite inputs).

    Args:
        manifest: CSV/YAML manifest (:func:`~groupmorph_pyro.data.load_manifest`).
        out_dir: output folder (``<out_dir>/<series>/`` per series, ``<out_dir>/batch.csv``).
        config, guide: as for :func:`~groupmorph_pyro.registration.register` (``guide`` = trained
            network; its config's K must match every series).
        fixed, finetune_steps, device, samples, seed: passed to ``register`` for each series.
        on_series: called with a :class:`SeriesRun` after each series (registered or skipped).
        itk: also write the ITK-convention fields (:func:`~groupmorph_pyro.outputs.write_registration`).
    Returns:
        one row per series (:data:`BATCH_COLUMNS`); ``status`` is ``"registered"`` or ``"skipped"``
        (already finished by an earlier run).
    """
    out_dir = Path(out_dir)
    config = config or Config()
    entries = split_entries(manifest, split)
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{manifest}: series names must be unique (they name the output folders), got duplicates {dupes}")
    if guide is not None:
        k = config.model.num_timepoints
        wrong = [(e.name, len(e.images)) for e in entries if len(e.images) != k]
        if wrong:
            raise InputError(f"{manifest}: the network was trained for K={k} timepoints, got series {wrong}")
    for e in entries:
        check_outputs(output_paths(out_dir / e.name, len(e.images), itk) + [out_dir / "batch.csv"], e.images)
    rows, index = [], out_dir / "batch.csv"
    bar = tqdm(entries, desc="register", unit="series", disable=not progress)
    for e in bar:
        folder = out_dir / e.name
        bar.set_postfix(series=e.name)
        if (folder / "summary.json").is_file():
            rows.append(_row(e.name, "skipped", json.loads((folder / "summary.json").read_text()), folder))
            if on_series is not None:
                on_series(SeriesRun(e, folder, None, None, None, None))
            continue
        images, affine, _ = load_group(e.images)
        cfg = config if guide is not None else config.with_timepoints(images.shape[0])
        landmarks = entry_landmarks(e, images.shape[1:])
        start = time.perf_counter()
        with FolderWriter(folder, affine, len(e.images), e.images, itk) as writer:
            result = register(images, cfg, guide, fixed=fixed, finetune_steps=finetune_steps, device=device, seed=seed,
                              samples=samples, landmarks=landmarks, affine=affine, sink=writer)
            result.summary.update(series=e.name, wall_seconds=time.perf_counter() - start)
            writer.finish(result)
        rows.append(_row(e.name, "registered", result.summary, folder))
        _write_index(index, rows)
        if on_series is not None:
            on_series(SeriesRun(e, folder, images, affine, landmarks, result))
    _write_index(index, rows)
    return rows
