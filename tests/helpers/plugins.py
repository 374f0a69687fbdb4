"""Plug-in checks the registry contract tests share, and a plug-in folder written by a test (a
package whose ``__init__`` holds ``REG``, a :class:`~raugment.core.registry.Registry` over the
folder, as a stage's plug-in folder does)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import uuid
from pathlib import Path

import pytest
import yaml

from raugment.config import load_config
from raugment.core.config import PluginSettings, from_dict, section_name
from raugment.core.registry import Registry


def check_registration(registry: Registry, name: str, base: type) -> type:
    """Registered name == module name == ``.name``; class and module documented; a ``base``."""
    cls = registry.get(name)
    module = registry.module_of(name)
    assert module.rsplit(".", 1)[1] == name == cls.name
    assert (cls.__doc__ or "").strip() and (importlib.import_module(module).__doc__ or "").strip()
    assert issubclass(cls, base)
    return cls


def check_settings(cls: type, section: type) -> None:
    """A plug-in's own keys are keys of ``section`` with defaults, loadable from YAML data, and
    from ``--set`` when ``section`` is one of the config's sections."""
    if cls.settings is None:
        return
    assert issubclass(cls.settings, PluginSettings) and dataclasses.is_dataclass(cls.settings)
    defaults = dataclasses.asdict(cls.settings())
    assert set(defaults) <= {f.name for f in dataclasses.fields(section)}
    key = section_name(section)
    for name, value in defaults.items():
        loaded = from_dict(yaml.safe_load(yaml.safe_dump({name: value})), section)
        assert _plain(getattr(cls.settings.of(loaded), name)) == value
        if key != section.__name__:  # a section of the config: ``--set section.key=value``
            cfg = load_config(None, [f"{key}.{name}={json.dumps(value)}"])
            assert _plain(getattr(cls.settings.of(getattr(cfg, key)), name)) == value


def _plain(value: object) -> object:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value  # type: ignore[arg-type]


def plugin_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, modules: dict[str, str]) -> Registry:
    """Write ``modules`` (file name -> source; they reach the registry as ``from . import REG``) into
    a new package on ``sys.path``; its registry, not yet loaded."""
    name = f"plugins_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / name
    folder.mkdir()
    (folder / "__init__.py").write_text("from raugment.core.registry import Registry\n\n"
                                        f"REG = Registry({kind!r}, package=__name__)\n")
    for file, source in modules.items():
        (folder / file).write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module(name).REG
