"""The open registries: models, precisions, backends and history rules, each filled from an entry-point group.

fluxgate's own entries load exactly like a team's (the way pytest loads its `default_plugins` and then the `pytest11`
entry points): first the built-in targets listed in `BUILTINS`, then every installed distribution's entry points of
the group. An entry point names an object, `package.module:NAME`, that is one spec or an iterable of specs (a
`fluxgate.models.ModelSpec`, a `fluxgate.precisions.PrecisionSpec` or `BackendSpec`, a `fluxgate.judging.rules.HistoryRule`):

    [project.entry-points."fluxgate.models"]
    sdxl = "team_models.specs:SDXL"

The module an entry point names must be light (declarations only, no torch): the registries are read when pytest
starts, to build `--help`, marks and items; a spec imports its implementation when a combo first needs it.

Nothing here imports torch, diffusers or gguf. Each registry is read once per process, on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from functools import cached_property
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from fluxgate.errors import RegistryError

MODELS_GROUP = "fluxgate.models"
PRECISIONS_GROUP = "fluxgate.precisions"
BACKENDS_GROUP = "fluxgate.backends"  # other backends of a precision (`fluxgate.precisions.BackendSpec`)
RULES_GROUP = "fluxgate.rules"
HOOKS_GROUP = "fluxgate.hooks"  # modules implementing `fluxgate.hookspec` (registered in pytest and in A/B workers)

# The built-ins, loaded first and the same way as entry points (`module:attribute`).
BUILTINS: dict[str, tuple[str, ...]] = {
    MODELS_GROUP: ("fluxgate.models.builtin:MODELS",),
    PRECISIONS_GROUP: ("fluxgate.precisions.builtin:PRECISIONS",),
    BACKENDS_GROUP: ("fluxgate.precisions.builtin:BACKENDS",),
    RULES_GROUP: ("fluxgate.judging.rules:RULES_BUILTIN",),
    HOOKS_GROUP: (),
}
BUILTIN_ORIGIN = "fluxgate"

Spec = TypeVar("Spec")


def marker_name(name: str) -> str:
    """The pytest marker of a registered name: `flux2_dev` for `flux2-dev`, `fp8_scaled` for `fp8-scaled`."""
    return name.replace("-", "_").replace(".", "_")


def load_target(target: str) -> Any:
    """The object `module:attribute` names. Raises RegistryError (one line) when it cannot be imported or found."""
    module_name, _, attribute = target.partition(":")
    try:
        value: Any = importlib.import_module(module_name)
        for part in filter(None, attribute.split(".")):
            value = getattr(value, part)
    except ImportError as error:
        raise RegistryError(f"{target}: cannot import {module_name} ({type(error).__name__}: {error})") from None
    except AttributeError:
        raise RegistryError(f"{target}: {module_name} has no {attribute}") from None
    return value


def group_targets(group: str) -> list[tuple[str, str]]:
    """(origin, `module:attribute`) of every entry of `group`: the built-ins, then the installed distributions'
    entry points (a distribution's own name is its origin; fluxgate's own entries, if declared, are not doubled)."""
    targets = [(BUILTIN_ORIGIN, target) for target in BUILTINS.get(group, ())]
    builtin = {target for _, target in targets}
    for point in entry_points(group=group):
        if point.value in builtin:
            continue
        origin = point.dist.name if point.dist is not None else point.name
        targets.append((f"{origin} (entry point {point.name})", point.value))
    return targets


class Registry(Mapping[str, Spec], Generic[Spec]):
    """A read-only mapping name -> spec of one entry-point group, filled on first access (`registry["flux1-dev"]`,
    `list(registry)`, `name in registry`). Specs must have a `name`; each name is registered once.

    Reading it raises RegistryError naming the entry point whose target is broken, is not a `kind`, or reuses a
    name another distribution registered."""

    def __init__(self, group: str, kind: type, noun: str):
        self.group, self.kind, self.noun = group, kind, noun

    @cached_property
    def _entries(self) -> dict[str, tuple[Spec, str]]:
        entries: dict[str, tuple[Spec, str]] = {}
        for origin, target in group_targets(self.group):
            value = _loaded(origin, target)
            specs = [value] if isinstance(value, self.kind) else _iterable(value)
            for spec in specs:
                if not isinstance(spec, self.kind):
                    raise RegistryError(f"{target} ({origin}): {type(spec).__name__} is not a "
                                        f"{self.kind.__module__}.{self.kind.__qualname__} ({self.group})")
                if spec.name in entries:
                    raise RegistryError(f"{self.noun} {spec.name!r} is registered twice: by {entries[spec.name][1]} "
                                        f"and by {origin} ({target}); rename one")
                entries[spec.name] = (spec, origin)
        return entries

    def origin(self, name: str) -> str:
        """Who registered `name`: "fluxgate", or a distribution and its entry point."""
        return self._entries[name][1]

    def __getitem__(self, name: str) -> Spec:
        return self._entries[name][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.group!r}: {', '.join(self) if '_entries' in self.__dict__ else 'not read yet'})"

    def forget(self) -> None:
        """Read the entry points again on the next access (tests that install a package mid-process)."""
        self.__dict__.pop("_entries", None)


def _iterable(value: Any) -> list:
    if isinstance(value, Mapping):
        return list(value.values())
    try:
        return list(value)
    except TypeError:
        return [value]


def _loaded(origin: str, target: str) -> Any:
    """`load_target(target)`, its RegistryError naming who registered it (`origin`: the distribution and entry point),
    so the user knows which package to fix or uninstall."""
    try:
        return load_target(target)
    except RegistryError as error:
        raise RegistryError(f"{origin}: {error}") from None


def hook_modules() -> list[tuple[str, Any]]:
    """(origin, module or object) of every `fluxgate.hooks` entry point: plugins that implement `fluxgate.hookspec`,
    registered in pytest's plugin manager and in each A/B worker's."""
    return [(origin, _loaded(origin, target)) for origin, target in group_targets(HOOKS_GROUP)]
