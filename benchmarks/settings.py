"""Config settings given on a benchmark's command line as ``section.key=value``."""
from __future__ import annotations

import copy

import yaml

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.config import Config


def key_values(items) -> dict:
    """``["key=value", ...]`` -> ``{key: YAML value}``; an item without ``=`` or a key is refused
    (:class:`InputError` naming it). The values are typed and checked where a config is built."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"expected KEY=VALUE, got {item!r}")
        values[key] = yaml.safe_load(value)
    return values


def with_settings(cfg: Config, settings, source: str = "benchmark settings") -> Config:
    """A copy of ``cfg`` with ``section.key=value`` settings (values in YAML: ``0.3``, ``false``,
    ``{lambda_v: 0.001}``), checked like a config file's (``source`` names them in errors)."""
    d = copy.deepcopy(cfg.to_dict())
    for item in settings:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in d:
            raise InputError(f"expected section.key=value (e.g. register.steps=240), got {item!r}")
        d[section][name] = yaml.safe_load(value)
    return Config.from_dict(d, source=source)
