"""Checks every plug-in of a registry passes, whatever its kind (filter, retrieval backend, dataset
source ...); the registry contract tests (``tests/stages/<stage>/test_*_contract.py``) run them
for every registered name.

Each plug-in also has its own test module, ``tests/stages/<stage>/<folder>/test_<name>.py``, which
gives the contract test what it needs to build that plug-in (a ``contract_*`` function).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from types import ModuleType
from typing import Any

import pytest

from raugment.config import Config, load_config
from raugment.core.config import ConfigError, to_dict
from raugment.core.registry import Registry
from tests import REPO

STAGES = frozenset(p.name for p in (REPO / "raugment" / "stages").iterdir() if (p / "stage.py").is_file())


def plugin_test_module(test_package: str, name: str) -> ModuleType:
    """The plug-in's own test module ``<test_package>.test_<name>``; a clear failure if it is missing."""
    module = f"{test_package}.test_{name}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        pytest.fail(f"plug-in {name!r} has no test module: add {module.replace('.', '/')}.py")


def check_module_and_docs(registry: Registry, package: str, name: str, base: type) -> type:
    """Registered under its module's name, documented, of the contract's class, ``needs`` stages."""
    cls = registry.get(name)
    assert registry.module_of(name) == f"{package}.{name}", "register a plug-in under its module's name"
    module = importlib.import_module(f"{package}.{name}")
    assert (module.__doc__ or "").strip(), f"{module.__name__} has no docstring"
    assert (cls.__dict__.get("__doc__") or "").strip(), f"{cls.__qualname__} has no docstring of its own"
    assert issubclass(cls, base)
    assert isinstance(cls.needs, tuple) and set(cls.needs) <= STAGES, f"needs {cls.needs} names no stage"
    return cls


def check_settings_keys(registry: Registry, section: str, name: str) -> None:
    """Every key the plug-in declares is in the composed section, listed and settable with --set."""
    settings = registry.get(name).settings
    if settings is None:
        return
    assert dataclasses.is_dataclass(settings)
    composed = getattr(Config(), section)
    assert isinstance(composed, settings)
    defaults = to_dict(composed)
    with pytest.raises(ConfigError) as unknown:
        load_config(None, [f"{section}.no_such_key=1"])
    for f in dataclasses.fields(settings):
        assert f.name in defaults
        assert f.name in str(unknown.value)          # listed among the section's known keys
        value = json.dumps(defaults[f.name])        # JSON is YAML: mappings, null, quoted strings
        loaded = load_config(None, [f"{section}.{f.name}={value}"])
        assert to_dict(getattr(loaded, section))[f.name] == defaults[f.name]


def check_no_key_collision(registry: Registry, section_cls: type) -> None:
    """The composed section holds its own keys plus each plug-in's, every name once."""
    base = getattr(section_cls, "__section_base__", section_cls)
    names = [f.name for f in dataclasses.fields(base)]
    names += [f.name for s in registry.settings() for f in dataclasses.fields(s)]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(section_cls))


def generic_checks(registry: Registry, package: str, section: str, section_cls: type, base: type,
                   name: str) -> Any:
    """All of the above for plug-in ``name``; returns its class."""
    cls = check_module_and_docs(registry, package, name, base)
    check_settings_keys(registry, section, name)
    check_no_key_collision(registry, section_cls)
    return cls
