"""The documentation covers what the package has: every module in the API reference, every config
setting in the configuration page, README within its size and free of dates and commit hashes.
(The strict Sphinx build itself runs in .ci/run.)"""
import dataclasses
import re
from pathlib import Path

import pytest

import groupmorph_pyro
from groupmorph_pyro.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_api_reference_lists_every_module():
    text = (DOCS / "api.md").read_text()
    listed = set(re.findall(r"^\.\. automodule:: groupmorph_pyro\.(\w+)$", text, flags=re.M))
    modules = {m for layer in groupmorph_pyro.LAYERS for m in layer}
    assert listed == modules, f"docs/api.md: missing {sorted(modules - listed)}, extra {sorted(listed - modules)}"


def test_configuration_page_documents_every_setting():
    text = (DOCS / "user-guide" / "configs.md").read_text()
    documented = set(re.findall(r"^\| `((?:model|register|train|data|runtime)\.\w+)` \|", text, flags=re.M))
    cfg = Config()
    settings = {f"{section.name}.{f.name}" for section in dataclasses.fields(cfg)
                for f in dataclasses.fields(getattr(cfg, section.name))}
    assert documented == settings, (f"docs/user-guide/configs.md: undocumented {sorted(settings - documented)}, "
                                    f"not settings {sorted(documented - settings)}")


@pytest.mark.parametrize("path", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md"))])
def test_prose_has_no_dates_or_commit_hashes(path):
    text = (ROOT / path).read_text()
    dates = re.findall(r"\b20\d\d-\d\d-\d\d\b", text)
    if path != "docs/benchmarks.md":  # result folders there are named by date
        assert not dates, f"{path}: dates {dates}: describe what is; history goes in CHANGELOG.md"
    hashes = re.findall(r"`[0-9a-f]{7,40}`", text)
    assert not hashes, f"{path}: commit hashes {hashes}: the benchmark JSON records the commit"


def test_readme_is_short_and_keeps_its_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "pip install torch==2.13.0 && .venv/bin/pip install -e '.[test]' && .venv/bin/groupmorph demo" in text
    assert ".venv/bin/python -m pytest -q" in text


@pytest.mark.parametrize("folder", ["groupmorph_pyro", "configs", "benchmarks"])
def test_code_and_configs_describe_what_is_without_dates(folder):
    """Comments, docstrings and config comments say what a setting does; when it changed is CHANGELOG.md's."""
    found = []
    for path in sorted((ROOT / folder).rglob("*.*")):
        if path.suffix in (".py", ".yaml", ".md") and "results" not in path.relative_to(ROOT).parts:
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\b20\d\d-\d\d-\d\d\b", line):
                    found.append(f"{path.relative_to(ROOT)}:{number}")
    assert not found, f"dates in {found}"
