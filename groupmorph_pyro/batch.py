"""Batch registration of every series of a manifest into one resumable output folder.

Layout: ``<out>/<series>/`` holds what ``groupmorph register`` writes for one group
(:class:`~groupmorph_pyro.outputs.FolderWriter`, which writes each field as it is computed and
``summary.json`` last, so that file marks a finished series), ``<out>/batch.csv`` one row per series
of the split (rewritten atomically after each one) and ``<out>/batch.log`` one line per series. A
rerun skips the finished series and redoes any that was interrupted. This loop serves
``register --manifest`` and (through ``on_series``) ``evaluate --manifest``.

A cohort spread over a cluster runs one process per shard (:func:`parse_shard`: ``I/N``, or the
index of a SLURM array task or a Kubernetes indexed Job): each registers its share
(:func:`shard_entries`) into the same folder and lists it in ``batch-<I>-of-<N>.csv``;
:func:`merge_shards` then writes ``batch.csv``.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tqdm.auto import tqdm

from .checks import InputError
from .config import Config
from .data import SeriesEntry, entry_landmarks, split_entries
from .files import atomic_write_text, write_json
from .outputs import FolderWriter, check_outputs, output_paths
from .registration import register
from .results import RegistrationResult
from .memory import check_files
from .volumes import load_group

__all__ = ["register_manifest", "SeriesRun", "BATCH_COLUMNS", "parse_shard", "shard_entries", "merge_shards", "index_path", "PLAN"]

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
                      on_series: Callable[[SeriesRun], None] | None = None, itk: bool = True,
                      shard: tuple[int, int] | None = None, force: bool = False) -> list[dict]:
    """Register every series of ``split`` in ``manifest`` (or, with ``shard``, this shard's share of
    them); finished series are skipped.

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
        shard: ``(index, count)`` (:func:`parse_shard`): register the series :func:`shard_entries`
            gives this shard, listing them in ``batch-<index>-of-<count>.csv`` instead of
            ``batch.csv``; the split's series and the count are recorded in ``batch-plan.json``, and a
            folder sharded another way is refused. :func:`merge_shards` writes ``batch.csv`` once every
            shard is done.
        force: skip the memory check (per case, from zero: every series to register is checked from its
            headers before the first, :func:`~groupmorph_pyro.memory.check_memory`).
    Returns:
        one row per series (:data:`BATCH_COLUMNS`); ``status`` is ``"registered"`` or ``"skipped"``
        (already finished by an earlier run). Each series also gets a line in the log next to the
        CSV (``batch.log`` or ``batch-<index>-of-<count>.log``).
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
    index = index_path(out_dir, shard)
    if shard is not None:
        _claim_shard(out_dir, split, names, *shard)
        entries = shard_entries(entries, *shard)
    log = index.with_suffix(".log")
    todo = {e.name for e in entries if not (out_dir / e.name / "summary.json").is_file()}
    if guide is None and not force:
        for e in entries:
            if e.name in todo:
                check_files(e.images, config, samples, what=f"series {e.name}")
    rows = []
    bar = tqdm(total=len(todo), desc="register", unit="series", disable=not progress)  # elapsed and time left
    for e in entries:
        folder = out_dir / e.name
        if e.name not in todo:
            rows.append(_row(e.name, "skipped", json.loads((folder / "summary.json").read_text()), folder))
            _log(log, rows[-1], len(rows), len(entries))
            if on_series is not None:
                on_series(SeriesRun(e, folder, None, None, None, None))
            continue
        bar.set_postfix(series=e.name)
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
        _log(log, rows[-1], len(rows), len(entries))
        bar.update(1)
        if on_series is not None:
            on_series(SeriesRun(e, folder, images, affine, landmarks, result))
    bar.close()
    _write_index(index, rows)
    return rows


def parse_shard(text: str, environ=None) -> tuple[int, int]:
    """``--shard`` as ``(index, count)``, index 0-based.

    * ``"I/N"``: shard I of N (0 <= I < N);
    * ``"auto"``: a SLURM job array's task: ``SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN`` (0 when
      unset) of ``SLURM_ARRAY_TASK_COUNT`` (``#SBATCH --array=0-<N−1>`` or ``1-<N>``, step 1);
    * ``"auto/N"``: of N shards, the index from Kubernetes' ``JOB_COMPLETION_INDEX`` (an indexed Job
      with ``completions: N``) or else ``SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN``.

    ``environ``: the variables (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    head, _, tail = str(text).partition("/")

    def integer(name: str, value) -> int:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise InputError(f"--shard {text}: {name} must be an integer, got {value!r}") from None

    if head == "auto":
        if tail:
            count = integer("N", tail)
            if "JOB_COMPLETION_INDEX" in env:
                index = integer("JOB_COMPLETION_INDEX", env["JOB_COMPLETION_INDEX"])
            elif "SLURM_ARRAY_TASK_ID" in env:
                index = integer("SLURM_ARRAY_TASK_ID", env["SLURM_ARRAY_TASK_ID"]) - integer(
                    "SLURM_ARRAY_TASK_MIN", env.get("SLURM_ARRAY_TASK_MIN", 0))
            else:
                raise InputError(f"--shard {text}: neither JOB_COMPLETION_INDEX (Kubernetes indexed Job) nor "
                                 "SLURM_ARRAY_TASK_ID (SLURM job array) is set")
        else:
            missing = [v for v in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT") if v not in env]
            if missing:
                raise InputError(f"--shard auto: {' and '.join(missing)} not set (not a SLURM array task; "
                                 "Kubernetes indexed Jobs: --shard auto/N with N = completions)")
            index = integer("SLURM_ARRAY_TASK_ID", env["SLURM_ARRAY_TASK_ID"]) - integer(
                "SLURM_ARRAY_TASK_MIN", env.get("SLURM_ARRAY_TASK_MIN", 0))
            count = integer("SLURM_ARRAY_TASK_COUNT", env["SLURM_ARRAY_TASK_COUNT"])
    else:
        if not tail:
            raise InputError(f"--shard: expected I/N (0 <= I < N), auto or auto/N, got {text!r}")
        index, count = integer("I", head), integer("N", tail)
    if count < 1 or not 0 <= index < count:
        raise InputError(f"--shard {text}: expected a shard index 0 <= I < N with N >= 1, got I={index}, N={count} "
                         "(SLURM: a job array with step 1, e.g. --array=0-{N-1})")
    return index, count


def shard_entries(entries: list, index: int, count: int) -> list:
    """Shard ``index`` of ``count``'s series: every ``count``-th of the split in manifest order from
    position ``index`` (the same manifest gives every shard the same share; series appended to the
    manifest keep the others' shares)."""
    if count < 1 or not 0 <= index < count:
        raise InputError(f"shard: expected 0 <= index < count, got index={index}, count={count}")
    return list(entries)[index::count]


PLAN = "batch-plan.json"
"""The sharded run's plan in the output folder: ``{"split", "shards", "series"}`` (every series of the split, in order)."""


def index_path(out_dir, shard: tuple[int, int] | None = None) -> Path:
    """The CSV a manifest run lists its series in: ``batch.csv``, or shard ``(I, N)``'s ``batch-I-of-N.csv``."""
    return Path(out_dir) / ("batch.csv" if shard is None else f"batch-{shard[0]}-of-{shard[1]}.csv")


def _claim_shard(out_dir: Path, split: str, names: list, index: int, count: int) -> None:
    """Record the plan, or check it against the one there."""
    plan = {"split": split, "shards": int(count), "series": list(names)}
    path = out_dir / PLAN
    if path.is_file():
        there = json.loads(path.read_text())
        if there != plan:
            what = (f"{there.get('shards')} shards" if there.get("shards") != count
                    else f"split {there.get('split')!r} with series {there.get('series')}")
            raise InputError(f"{out_dir}: sharded as {what}, this run asks for {count} shards of split {split!r} "
                             f"with {len(names)} series: use the same manifest and N, or another --out")
    else:
        write_json(path, plan)


def merge_shards(out_dir) -> list[dict]:
    """Write ``batch.csv`` of a sharded run: every shard's rows in the manifest's order, the file one
    process would have written (timings apart). Refuses, naming the shards and series left, while
    any shard is unfinished. Returns the rows."""
    out_dir = Path(out_dir)
    path = out_dir / PLAN
    if not path.is_file():
        raise InputError(f"{out_dir}: no sharded run to merge (no {PLAN}: register --manifest ... --shard I/N writes it)")
    plan = json.loads(path.read_text())
    count, series = int(plan["shards"]), list(plan["series"])
    rows, left = {}, []
    for index in range(count):
        csv_path = index_path(out_dir, (index, count))
        got = {r["series"]: r for r in csv.DictReader(io.StringIO(csv_path.read_text()))} if csv_path.is_file() else {}
        missing = [s for s in series[index::count] if s not in got or not (out_dir / s / "summary.json").is_file()]
        if missing:
            left.append(f"shard {index}/{count}: {len(missing)} series left ({', '.join(missing[:3])}"
                        f"{', ...' if len(missing) > 3 else ''})")
        rows.update(got)
    if left:
        raise InputError(f"{out_dir}: cannot merge yet: {'; '.join(left)}")
    ordered = [{c: rows[s][c] for c in BATCH_COLUMNS} for s in series]
    _write_index(index_path(out_dir), ordered)
    return ordered


def _log(path: Path, row: dict, done: int, total: int) -> None:
    """One line per series in the log next to the CSV (appended)."""
    fmt = lambda v: "-" if v in (None, "") else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = (f"{stamp} [{done}/{total}] {row['series']}: {row['status']}, {fmt(row['seconds'])} s, "
            f"NMI {fmt(row['nmi_before'])} -> {fmt(row['nmi_after'])}, folding {fmt(row['folding_percent_all'])} %, "
            f"landmarks {fmt(row['landmark_mm_before'])} -> {fmt(row['landmark_mm_after'])} mm\n")
    with open(path, "a") as fh:
        fh.write(line)
