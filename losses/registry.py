"""Named, user-extensible registries.

Config files name their choices (``kind: ce``, ``strategy: ddp``); a registry turns a name into
a class and builds it from the remaining config fields. Users add their own entries with the
``register`` decorator. This module is the one shared by ``lowbit.losses`` and the trainer; it
imports nothing from either so a loss stays usable alone in a notebook.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownChoiceError(ValueError):
    """A name or a field that a registry does not know. Its message lists what is known."""


def did_you_mean(name: str, known: list[str]) -> str:
    """Return ' Did you mean: X?' when ``name`` is close to one of ``known``, else ''."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" Did you mean: {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    """A mapping from names to factories (usually classes), filled by a decorator.

    Args:
        what: what the entries are, for error messages ("loss term", "strategy").
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: make ``factory`` available under ``name``."""

        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries and self._entries[name] is not factory:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._entries[name] = factory
            return factory

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        """Return the factory for ``name``; an unknown name raises with the valid ones listed."""
        if name not in self._entries:
            raise UnknownChoiceError(
                f"unknown {self.what} {name!r}.{did_you_mean(name, self.names())} "
                f"Known: {', '.join(self.names())}."
            )
        return self._entries[name]

    def build(self, spec: Mapping[str, Any], name_key: str = "kind", **extra: Any) -> T:
        """Build an entry from a config mapping such as ``{kind: kd_kl, temperature: 2.0}``.

        Fields the factory does not accept are rejected by name (a typo guard), with a
        suggestion and the accepted fields.
        """
        fields = dict(spec)
        if name_key not in fields:
            raise UnknownChoiceError(
                f"a {self.what} needs a '{name_key}' field; known: {', '.join(self.names())}"
            )
        name = fields.pop(name_key)
        factory = self.get(name)
        accepted = _accepted_kwargs(factory)
        if accepted is not None:
            for key in fields:
                if key not in accepted:
                    raise UnknownChoiceError(
                        f"{self.what} {name!r} has no field {key!r}.{did_you_mean(key, sorted(accepted))} "
                        f"Fields: {', '.join(sorted(accepted)) or '(none)'}."
                    )
        return factory(**fields, **extra)


def _accepted_kwargs(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword names a factory takes, or None when it takes ``**kwargs`` (anything goes)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
