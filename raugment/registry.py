"""Registries by name for swappable parts, filled with an explicit decorator.

A registry knows which modules define its entries and imports them on first lookup, so
``GENERATORS.get("simple")`` works without the caller importing the generation module first, and
importing a registry stays cheap (no torch).
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> implementation, for one kind of swappable part."""

    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind = kind
        self._modules = modules
        self._loaded = False
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@GENERATORS.register("simple")``."""
        def decorate(obj: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing is not obj:
                qual = getattr(existing, "__qualname__", existing)
                raise ValueError(f"{self.kind} {name!r} is already registered by {qual}")
            self._entries[name] = obj
            return obj
        return decorate

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._modules:
                importlib.import_module(module)

    def get(self, name: str) -> T:
        """The implementation registered as ``name``; a ValueError listing the known names."""
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise ValueError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# The registries of the project. Modules listed here register into them on import.
PROMPT_BUILDERS: Registry = Registry("prompt builder", ("raugment.prompts",))
# personalised methods (5-9) register their generation side from their own package
GENERATORS: Registry = Registry("generation method", ("raugment.generate", "raugment.personalise.generation"))
RETRIEVERS: Registry = Registry("retrieval backend", ("raugment.retrieve",))
FILTERS: Registry = Registry("filter", ("raugment.filter",))
MODELS: Registry = Registry("classifier model", ("raugment.models.classifier",))
FINETUNERS: Registry = Registry("fine-tuning method", ("raugment.finetune",))
DATASETS: Registry = Registry("dataset source", ("raugment.dataset",))
