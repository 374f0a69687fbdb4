"""Registries by name for swappable parts, filled with an explicit decorator.

A registry either discovers its plug-in folder (``package=``: every public module in it is
imported on first lookup, so a new plug-in is a new module and nothing else) or imports a fixed
list of modules. Importing a registry stays cheap: plug-in modules import torch lazily.

A registered plug-in may declare, as class attributes:

* ``settings``: a :class:`~raugment.core.config.PluginSettings` dataclass of its own config keys,
  which its stage's section carries (:func:`~raugment.core.config.with_plugins`);
* ``needs``: the stages it cannot work without (e.g. ``("finetune",)``, ``("index",)``), which
  the study planner adds to the plan.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from raugment.core.config import ConfigError

T = TypeVar("T")


def import_package(package: str) -> list[str]:
    """Import every public module of ``package`` (a plug-in folder); their names, sorted."""
    pkg = importlib.import_module(package)
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


class Registry(Generic[T]):
    """name -> implementation, for one kind of swappable part."""

    def __init__(self, kind: str, modules: tuple[str, ...] = (), package: str | None = None):
        self.kind = kind
        self.package = package
        self._modules = modules
        self._loaded = False
        self._entries: dict[str, T] = {}
        self._origin: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@GENERATORS.register("simple")``."""
        def decorate(obj: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing is not obj:
                qual = getattr(existing, "__qualname__", existing)
                raise ValueError(f"{self.kind} {name!r} is already registered by {qual}")
            self._entries[name] = obj
            self._origin[name] = getattr(obj, "__module__", "")
            return obj
        return decorate

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._modules:
                importlib.import_module(module)
            if self.package:
                import_package(self.package)

    def get(self, name: str, key: str | None = None) -> T:
        """The implementation registered as ``name``.

        Raises:
            ValueError: listing the known names; a :class:`~raugment.core.config.ConfigError`
                naming the config ``key`` when ``name`` came from one.
        """
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            message = f"unknown {self.kind} {name!r}; known: {known}"
            raise (ConfigError(f"{key}: {message}") if key else ValueError(message)) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def module_of(self, name: str) -> str:
        """The module that registered ``name``."""
        self.get(name)
        return self._origin[name]

    def settings(self) -> list[Any]:
        """The distinct ``settings`` classes the registered plug-ins declare, in name order."""
        out: list[Any] = []
        for name in self.names():
            s = getattr(self._entries[name], "settings", None)
            if s is not None and s not in out:
                out.append(s)
        return out

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
