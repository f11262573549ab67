"""Every code block of README.md and docs/ is exercised, so a renamed function, option or config
fails here instead of leaving the docs wrong.

- ``python`` blocks run, on small inputs: a few variables (``images``, ``affine``, ``config``) and,
  for blocks that read a registration folder (``reg/``), one made by ``groupmorph register`` in the
  working directory.
- ``bash`` blocks: every ``groupmorph`` command line (and ``torchrun -m groupmorph_pyro.cli``) is
  parsed by the CLI's own parser, every ``python benchmarks/<script>.py`` line by that script's
  parser (stopped before any work), each ``--config configs/...`` is loaded, and each
  ``pip install -e '.[extra]'`` names an extra of setup.cfg. A command of any other kind fails the
  test until it is taught here.
- ``yaml`` blocks: a manifest is read by :func:`groupmorph_pyro.data.load_manifest`.
"""
from __future__ import annotations

import argparse
import configparser
import importlib.util
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from groupmorph_pyro.cli import build_parser, main
from groupmorph_pyro.config import Config, load_config
from groupmorph_pyro.data import write_landmarks
from groupmorph_pyro.synthetic import breathing_phantom
from groupmorph_pyro.volumes import save_nifti

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", flags=re.M | re.S)


def blocks(language: str) -> list:
    """``(id, text)`` of every fenced block in ``language`` on the pages."""
    found = []
    for page in PAGES:
        for n, (lang, text) in enumerate(FENCE.findall(page.read_text())):
            if lang == language:
                found.append((f"{page.relative_to(ROOT)}#{n}", text))
    return found


def command_lines(text: str) -> list[str]:
    """The commands of a shell block: continuations joined, comments dropped, ``&&`` chains split,
    ``VAR='...'`` assignments substituted into later lines (``eval`` then word-splits them again)."""
    variables, commands = {}, []
    for line in text.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line:
            continue
        assignment = re.fullmatch(r"(\w+)=(.*)", line)
        if assignment:
            variables[assignment[1]] = shlex.split(assignment[2])[0]
            continue
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        commands += [part.strip() for part in line.split("&&")]
    return commands


class _Parsed(Exception):
    """Raised by the patched parser: the arguments parsed, nothing ran."""


def _script_arguments(script: Path, argv: list[str], monkeypatch) -> argparse.Namespace:
    """``argv`` parsed by ``benchmarks/<script>``'s own parser, stopped right after parsing."""
    spec = importlib.util.spec_from_file_location(f"doc_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed) as parsed:
        module.main(argv)
    return parsed.value.args[0]


def _extras() -> set:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return set(cfg["options.extras_require"])


def check_command(command: str, monkeypatch) -> None:
    """Fail unless ``command`` is one this project's docs may show and it parses (see module doc)."""
    words = shlex.split(command)
    if words[0] == "eval":
        words = shlex.split(" ".join(words[1:]))
    program = words[0]
    if program.endswith("groupmorph") or words[:3] == ["torchrun", "--nproc_per_node", "4"]:
        args = words[1:] if program.endswith("groupmorph") else words[words.index("groupmorph_pyro.cli") + 1:]
        build_parser().parse_args(args)  # a renamed option or command exits 2 here
        for flag, value in zip(args, args[1:]):
            if flag == "--config":
                load_config(ROOT / value)
    elif program in ("python", "python3") and words[1].startswith("benchmarks/"):
        _script_arguments(ROOT / words[1], words[2:], monkeypatch)
    elif words[:3] == ["python3", "-m", "venv"]:
        pass
    elif program.endswith("pip") and words[1] == "install":
        for spec in words[2:]:
            extras = re.fullmatch(r"\.\[(.+)\]", spec)
            if extras:
                assert set(extras[1].split(",")) <= _extras(), (command, _extras())
            elif spec != "-e":
                assert spec == "torch==2.13.0", f"pin torch in commands newcomers copy: {command}"
    elif words[:3] == [".venv/bin/python", "-m", "pytest"] or program.endswith("sphinx-build"):
        pass
    else:
        pytest.fail(f"a documented command this test does not know: {command!r}")


@pytest.mark.parametrize("name, text", blocks("bash"), ids=[b[0] for b in blocks("bash")])
def test_shell_blocks_name_real_commands_options_and_configs(name, text, monkeypatch):
    commands = command_lines(text)
    assert commands, f"{name}: no command"
    for command in commands:
        try:
            check_command(command, monkeypatch)
        except SystemExit as exc:  # argparse's error
            pytest.fail(f"{name}: {command!r} does not parse (exit {exc.code})")


@pytest.mark.parametrize("name, text", blocks("yaml"), ids=[b[0] for b in blocks("yaml")])
def test_yaml_blocks_are_manifests_the_reader_accepts(name, text, tmp_path):
    from groupmorph_pyro.data import load_manifest

    g = breathing_phantom((24, 24, 24), 3, seed=0, num_landmarks=4)
    for entry in __import__("yaml").safe_load(text)["series"]:
        for k, (image, landmarks) in enumerate(zip(entry["images"], entry["landmarks"])):
            (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
            save_nifti(tmp_path / image, g.images[k], np.eye(4))
            write_landmarks(tmp_path / landmarks, g.landmarks[k])
    (tmp_path / "manifest.yaml").write_text(text)
    entries = load_manifest(tmp_path / "manifest.yaml")
    assert [e.name for e in entries] == ["case1"] and len(entries[0].images) == 3


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A folder holding t0..t3.nii.gz and reg/, the output of ``groupmorph register --samples 3``."""
    folder = tmp_path_factory.mktemp("docs")
    g = breathing_phantom((24, 24, 24), 4, seed=2, num_landmarks=5)
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    for k in range(4):
        save_nifti(folder / f"t{k}.nii.gz", g.images[k], affine)
        write_landmarks(folder / f"l{k}.txt", g.landmarks[k])
    (folder / "short.yaml").write_text("register: {steps: 5, coarse_steps: 5}\n")
    assert main(["register", *[str(folder / f"t{k}.nii.gz") for k in range(4)], "--out", str(folder / "reg"),
                 "--samples", "3", "--landmarks", *[str(folder / f"l{k}.txt") for k in range(4)],
                 "--config", str(folder / "short.yaml"), "--quiet"]) == 0
    return folder


def _small_inputs() -> dict:
    """The names the python blocks take as given: a K = 6 phantom of 20³ and a config of few steps."""
    g = breathing_phantom((20, 20, 20), 6, seed=3, num_landmarks=4)
    config = Config()
    config.register.steps = config.register.coarse_steps = 3
    return {"images": g.images, "affine": g.affine, "config": config}


@pytest.mark.parametrize("name, text", blocks("python"), ids=[b[0] for b in blocks("python")])
def test_python_blocks_run(name, text, registered, monkeypatch):
    from groupmorph_pyro.priors import PRIORS

    monkeypatch.chdir(registered)
    before = set(PRIORS)
    try:
        exec(compile(text, name, "exec"), _small_inputs())
    finally:
        for added in set(PRIORS) - before:  # a block that registers a prior leaves the registry as it was
            PRIORS._entries.pop(added)


def test_a_renamed_option_in_a_block_fails(monkeypatch):
    """The check above is not vacuous: the README's commands with one option misspelt fail."""
    text = dict(blocks("bash"))["README.md#2"].replace("--samples 20", "--num-samples 20")
    with pytest.raises(SystemExit):
        for command in command_lines(text):
            check_command(command, monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="does not know"):
        check_command("groupmorf register t0.nii.gz", monkeypatch)
