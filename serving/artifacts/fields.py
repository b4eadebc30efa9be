"""Reading a JSON object field by field, with errors that name the file and the field's path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

_MISSING = object()


class ManifestError(ValueError):
    """A manifest that cannot be read: the message names the file and the field."""


class Fields:
    """One JSON object inside `path`, at `where` (e.g. "step.states[2]")."""

    def __init__(self, path: Path, data: Any, where: str = "") -> None:
        self.path, self.where = path, where
        if not isinstance(data, dict):
            raise self.error("", f"must be an object, got {type(data).__name__}")
        self.data = data

    def _at(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where and name else (self.where or name)

    def error(self, name: str, problem: str) -> ManifestError:
        return ManifestError(f"{self.path}: {self._at(name) or 'the top level'}: {problem}")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        """The field's value, which must be an instance of `kind` (or `default` when absent and given)."""
        if name not in self.data:
            if default is not _MISSING:
                return default
            raise self.error(name, "is missing")
        value = self.data[name]
        # bool is an int to Python, never to a manifest
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.error(name, f"must be {names}, got {value!r}")
        return value

    def child(self, name: str) -> Fields:
        return Fields(self.path, self.get(name, dict), self._at(name))

    def children(self, name: str) -> Iterator[Fields]:
        for k, item in enumerate(self.get(name, list)):
            yield Fields(self.path, item, f"{self._at(name)}[{k}]")
