"""Cohorts over a cluster: the shipped SLURM array script and Kubernetes indexed Job run as separate
local processes (with the scheduler's variables set), merged, and compared with one process; the
shard arithmetic, the plan's guard, merge's refusal while a shard is unfinished, and the log."""
import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from groupmorph_pyro.batch import PLAN, merge_shards, parse_shard, register_manifest, shard_entries
from groupmorph_pyro.checks import InputError
from groupmorph_pyro.cli import main
from groupmorph_pyro.config import load_config
from groupmorph_pyro.evaluation import evaluate_manifest
from test_batch import _manifest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "examples" / "cluster"
NAMES = ("a", "b", "c", "d", "e")
FAST = {"register": {"steps": 20, "coarse_steps": 10, "lr": 0.3, "scale_reset": False}}  # refines at 20³ (test_io_cli.SHORT_FIT)


def _env(**variables):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's groupmorph
    env.update({k: str(v) for k, v in variables.items()})
    return env


def _run_all(commands, cwd):
    """Start every (argv, env) at once, as a scheduler would, and wait for all."""
    procs = [subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for argv, env in commands]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    return outs


def _rows(path):
    rows = list(csv.DictReader(open(path)))
    return [{k: (Path(v).name if k == "folder" else v) for k, v in r.items() if k != "seconds"} for r in rows]


def _fields(folder):
    return {p.relative_to(folder).as_posix(): np.asarray(nib.load(p).dataobj)
            for p in sorted(folder.glob("*/*.nii.gz"))}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Five series and their one-process registration (the reference)."""
    root = tmp_path_factory.mktemp("cohort")
    manifest = _manifest(root, names=NAMES)
    (root / "fast.yaml").write_text(yaml.safe_dump(FAST))
    cfg = load_config(root / "fast.yaml")
    register_manifest(manifest, root / "one", cfg, progress=False, itk=False)
    return root, manifest


def test_slurm_array_script_equals_one_process(cohort):
    """register_array.sbatch run as its 3 array tasks (SLURM_ARRAY_TASK_ID 0..2), then the merge
    command of submit.sh: the same fields and the same batch.csv rows as one process."""
    root, manifest = cohort
    script = (CLUSTER / "register_array.sbatch").read_text()
    tasks = re.search(r"^#SBATCH --array=0-(\d+)$", script, flags=re.M)
    count = int(tasks.group(1)) + 1
    assert count == 3 and "--shard auto" in script
    out = root / "slurm"
    extra = ["--config", str(root / "fast.yaml"), "--no-itk", "--no-report"]
    commands = [(["bash", str(CLUSTER / "register_array.sbatch"), str(manifest), str(out), *extra],
                 _env(SLURM_ARRAY_TASK_ID=i, SLURM_ARRAY_TASK_COUNT=count, SLURM_ARRAY_TASK_MIN=0))
                for i in range(count)]
    _run_all(commands, root)
    assert not (out / "batch.csv").exists()
    merge = re.search(r'--wrap "(groupmorph merge \$out)"', (CLUSTER / "submit.sh").read_text()).group(1)
    _run_all([(shlex.split(merge.replace("$out", str(out))), _env())], root)
    assert _rows(out / "batch.csv") == _rows(root / "one" / "batch.csv")
    assert [r["status"] for r in _rows(out / "batch.csv")] == ["registered"] * len(NAMES)
    one, sharded = _fields(root / "one"), _fields(out)
    assert sorted(one) == sorted(sharded) and len(one) == 4 * 3 * len(NAMES)
    for name in one:
        np.testing.assert_allclose(sharded[name], one[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.abs(one["a/displacement_1.nii.gz"]).max() > 0.1  # it registered
    shares = [len(list(csv.DictReader(open(out / f"batch-{i}-of-3.csv")))) for i in range(3)]
    assert shares == [2, 2, 1]
    log = (out / "batch-0-of-3.log").read_text().splitlines()
    assert len(log) == 2 and re.search(r"\[1/2\] a: registered, [\d.]+ s, NMI [\d.]+ -> [\d.]+, folding", log[0])
    # evaluate --manifest on the merged folder: every series scored from its files, none registered again
    stamp = (out / "c" / "warped_0.nii.gz").stat().st_mtime_ns
    rows = evaluate_manifest(manifest, out, load_config(root / "fast.yaml"))
    assert [r["series"] for r in rows] == list(NAMES) and all(r["landmark_mm_after"] > 0 for r in rows)
    assert (out / "c" / "warped_0.nii.gz").stat().st_mtime_ns == stamp


def test_kubernetes_indexed_job_equals_one_process(cohort):
    """register-job.yaml's container command run as its 3 completion indices (JOB_COMPLETION_INDEX)
    in the working directory holding the manifest, then merged: the one-process batch.csv rows."""
    root, manifest = cohort
    job = yaml.safe_load((CLUSTER / "register-job.yaml").read_text())
    spec = job["spec"]
    container = spec["template"]["spec"]["containers"][0]
    command = list(container["command"])
    shard = command[command.index("--shard") + 1]
    assert spec["completionMode"] == "Indexed" and shard == f"auto/{spec['completions']}"
    work = root / "k8s"
    work.mkdir()
    (work / "manifest.yaml").write_text(manifest.read_text().replace("data/", f"{root}/data/"))
    extra = ["--config", str(root / "fast.yaml"), "--no-itk", "--no-report"]
    _run_all([([*command, *extra], _env(JOB_COMPLETION_INDEX=i)) for i in range(spec["completions"])], work)
    out = work / command[command.index("--out") + 1]
    assert main(["merge", str(out)]) == 0
    assert _rows(out / "batch.csv") == _rows(root / "one" / "batch.csv")


def test_merge_refuses_while_a_shard_is_unfinished(cohort, capsys):
    root, manifest = cohort
    out = root / "partial"
    cfg = load_config(root / "fast.yaml")
    register_manifest(manifest, out, cfg, progress=False, itk=False, shard=(0, 2))
    with pytest.raises(InputError, match=r"cannot merge yet: shard 1/2: 2 series left \(b, d\)"):
        merge_shards(out)
    assert main(["merge", str(out)]) == 2
    assert "shard 1/2: 2 series left" in capsys.readouterr().err
    register_manifest(manifest, out, cfg, progress=False, itk=False, shard=(1, 2))
    (out / "d" / "summary.json").unlink()  # an interrupted series is unfinished too
    with pytest.raises(InputError, match=r"shard 1/2: 1 series left \(d\)"):
        merge_shards(out)
    register_manifest(manifest, out, cfg, progress=False, itk=False, shard=(1, 2))
    rows = merge_shards(out)
    assert [r["series"] for r in rows] == list(NAMES)
    assert [r["status"] for r in rows] == ["registered", "skipped", "registered", "registered", "registered"]
    # --merge on a shard: merges when every shard is done
    assert main(["register", "--manifest", str(manifest), "--out", str(out), "--shard", "0/2", "--merge",
                 "--config", str(root / "fast.yaml"), "--quiet", "--no-itk"]) == 0
    assert "merged 5 series" in capsys.readouterr().out


def test_a_folder_sharded_another_way_is_refused(cohort):
    root, manifest = cohort
    out = root / "plan"
    cfg = load_config(root / "fast.yaml")
    out.mkdir()
    (out / PLAN).write_text(json.dumps({"split": "test", "shards": 3, "series": list(NAMES)}))
    with pytest.raises(InputError, match="sharded as 3 shards, this run asks for 2 shards"):
        register_manifest(manifest, out, cfg, progress=False, shard=(0, 2))
    assert sorted(p.name for p in out.iterdir()) == [PLAN]
    with pytest.raises(InputError, match="no sharded run to merge"):
        merge_shards(root / "one")


@pytest.mark.parametrize("text,environ,expected", [
    ("0/3", {}, (0, 3)),
    ("2/3", {"SLURM_ARRAY_TASK_ID": "0"}, (2, 3)),
    ("auto", {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "5"}, (4, 5)),
    ("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}, (2, 3)),
    ("auto/4", {"JOB_COMPLETION_INDEX": "3"}, (3, 4)),
    ("auto/4", {"SLURM_ARRAY_TASK_ID": "1"}, (1, 4)),
])
def test_parse_shard(text, environ, expected):
    assert parse_shard(text, environ) == expected


@pytest.mark.parametrize("text,environ,match", [
    ("3/3", {}, r"0 <= I < N .* got I=3, N=3"),
    ("x/3", {}, "I must be an integer, got 'x'"),
    ("2", {}, "expected I/N"),
    ("0/0", {}, "N >= 1"),
    ("auto", {}, "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT not set"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3"}, "got I=4, N=3"),
    ("auto/3", {}, "neither JOB_COMPLETION_INDEX"),
    ("auto/3", {"JOB_COMPLETION_INDEX": "a"}, "JOB_COMPLETION_INDEX must be an integer"),
])
def test_parse_shard_errors(text, environ, match):
    with pytest.raises(InputError, match=match):
        parse_shard(text, environ)


def test_shard_entries_cover_the_split_once_in_balanced_shares():
    entries = list(range(11))
    shares = [shard_entries(entries, i, 4) for i in range(4)]
    assert sorted(sum(shares, [])) == entries and [len(s) for s in shares] == [3, 3, 3, 2]
    assert shard_entries(entries + [11, 12], 1, 4)[:3] == shares[1]  # appended series keep the others' shares
    with pytest.raises(InputError, match="0 <= index < count"):
        shard_entries(entries, 4, 4)


def test_shard_and_merge_command_line_errors(tmp_path, capsys):
    assert main(["register", "a.nii", "b.nii", "--out", str(tmp_path / "o"), "--shard", "0/2"]) == 2
    assert "--shard/--merge: only with --manifest" in capsys.readouterr().err
    assert main(["register", "--manifest", "m.yaml", "--out", str(tmp_path / "o"), "--merge"]) == 2
    assert "--merge: only with --shard" in capsys.readouterr().err
    assert main(["merge", str(tmp_path)]) == 2
    assert "no sharded run to merge" in capsys.readouterr().err
