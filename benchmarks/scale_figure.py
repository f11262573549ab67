"""One figure of wall time against group size from several ``benchmarks/scale.py`` runs.

    python benchmarks/scale_figure.py benchmarks/results/scale*/scale.json --out benchmarks/results/scale-figure

For every (case, method) it keeps the latest finished run (by the JSON's ``started``) and draws
seconds against voxels × K per method (``plots.scaling_figure``). A run that did not return (a
``failed`` entry) is listed, not drawn. Writes ``scale.png`` and ``scale_figure.json``: the command,
commit and machine of this figure, and per point its case, method, seconds and the JSON, command,
commit and start time of the run it came from. The runs are not from one sitting: compare methods
within one run (the JSONs), and read the figure for how each method's time grows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: provenance
from provenance import record  # noqa: E402


def latest_runs(paths) -> tuple[list, list]:
    """``(points, unfinished)``: per (case, method) the latest finished run of the given scale JSONs
    (each a dict of the run's fields plus ``source``, ``source_command``, ``source_commit``,
    ``source_started``), and the (case, method) pairs whose only runs failed."""
    best, failed = {}, {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        for run in report.get("runs", []):
            key = (run["case"], run["method"])
            entry = {**run, "source": str(path), "source_command": report.get("command"),
                     "source_commit": report.get("commit"), "source_started": report.get("started", "")}
            if "failed" in run:
                failed[key] = entry
            elif key not in best or entry["source_started"] > best[key]["source_started"]:
                best[key] = entry
    unfinished = [failed[k] for k in sorted(failed) if k not in best]
    return [best[k] for k in sorted(best)], unfinished


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="scale.json files written by benchmarks/scale.py")
    p.add_argument("--out", required=True, help="folder for scale.png and scale_figure.json")
    args = p.parse_args(argv)
    missing = [r for r in args.runs if not Path(r).is_file()]
    if missing:
        p.error(f"no such scale JSON: {missing[0]}")
    from groupmorph_pyro.files import write_json
    from groupmorph_pyro.plots import scaling_figure

    points, unfinished = latest_runs(args.runs)
    if not points:
        p.error("the JSONs hold no finished run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scaling_figure(out / "scale.png", points, title="per-case registration, 2 CPU threads: latest run of each case")
    keep = ("case", "method", "timepoints", "voxels", "seconds", "landmark_mm_after", "landmark_median_after",
            "source", "source_command", "source_commit", "source_started")
    report = {**record("scale_figure.py", argv or sys.argv[1:]), "points": [{k: r.get(k) for k in keep} for r in points],
              "unfinished": [{k: r.get(k) for k in ("case", "method", "failed", "source")} for r in unfinished]}
    write_json(out / "scale_figure.json", report)
    for r in points:
        print(f"{r['case']:>24} {r['method']:>10} {r['voxels'] * r['timepoints'] / 1e6:9.2f} M {r['seconds']:8.1f} s  "
              f"({r['source']})")
    for r in unfinished:
        print(f"{r['case']:>24} {r['method']:>10} unfinished: {r['failed']} ({r['source']})")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
