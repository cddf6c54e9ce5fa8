"""A name -> factory table: adding a component is one decorated function (timm style)."""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[F]):
    """Maps registry keys (as written in config files) to factory functions.

    >>> PROJECTORS = Registry("projector")
    >>> @PROJECTORS.register("linear")
    ... def linear(in_dim, out_dim): ...
    >>> PROJECTORS.build("linear", in_dim=4, out_dim=8)
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorator(factory: F) -> F:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice "
                                 f"({self._factories[name].__module__} and {factory.__module__})")
            self._factories[name] = factory
            return factory
        return decorator

    def get(self, name: str) -> F:
        if name not in self._factories:
            known = ", ".join(sorted(self._factories)) or "(none registered)"
            close = difflib.get_close_matches(name, self._factories, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {known}")
        return self._factories[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
