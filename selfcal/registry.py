"""One generic registry for everything selected by name in params.yaml: calibration sources,
compression methods and evaluation tasks (in the spirit of lm-eval's registry).

One error text for every unknown name: ``unknown method 'x'; known: [...]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from selfcal.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``what``: "method", "source kind", "task")."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._items[name] = item
        return item

    def unknown(self, name: str) -> str:
        """The one message for a name nobody registered."""
        return f"unknown {self.what} {name!r}; known: {sorted(self._items)}"

    def get(self, name: str, *, key: str | None = None) -> T:
        """The entry, or a ConfigError naming the params ``key`` it came from."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"{key}: {self.unknown(name)}" if key else self.unknown(name)) from None

    def check(self, names: list[str]) -> list[str]:
        """For pydantic validators: ValueError with the one message on the first unknown name, or on a name listed
        twice (the same method twice is one DVC item; the same task twice is scored twice)."""
        for i, name in enumerate(names):
            if name not in self._items:
                raise ValueError(self.unknown(name))
            if name in names[:i]:
                raise ValueError(f"{name!r} is listed twice")
        return names

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def values(self) -> list[T]:
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
