"""Calling fluxgate's hooks (`fluxgate.hookspec`) the same way in a pytest run and in an A/B worker process.

`register(pluginmanager)` adds the hookspecs and the `fluxgate.hooks` entry points' plugins to pytest's manager (the
plugin's `pytest_addhooks`); `worker_manager()` builds the same for an A/B worker, which runs no pytest.
`extended_environment` applies the environment and comparability hooks to a run's fingerprint.
"""

from __future__ import annotations

import json
from typing import Any

import pluggy

from fluxgate import hookspec
from fluxgate.errors import RegistryError
from fluxgate.hookspec import COMPARABLE_FIELDS
from fluxgate.registry import hook_modules


def register(pluginmanager: pluggy.PluginManager) -> None:
    """Add fluxgate's hookspecs, and every `fluxgate.hooks` entry point's plugin, to `pluginmanager`. Raises
    RegistryError for an entry point that cannot be loaded."""
    pluginmanager.add_hookspecs(hookspec)
    for origin, plugin in hook_modules():
        name = f"fluxgate.hooks:{origin}"
        if pluginmanager.get_plugin(name) is None and not pluginmanager.is_registered(plugin):
            pluginmanager.register(plugin, name)


class _WorkerManager(pluggy.PluginManager):
    """Recognises plain `pytest_fluxgate_*` functions as hook implementations, as pytest's own manager does."""

    def parse_hookimpl_opts(self, plugin, name: str):
        options = super().parse_hookimpl_opts(plugin, name)
        if options is None and name.startswith("pytest_fluxgate_") and callable(getattr(plugin, name, None)):
            return {}
        return options


def worker_manager() -> pluggy.PluginManager:
    """A plugin manager with fluxgate's hooks and the `fluxgate.hooks` entry points, for a process without pytest (an
    A/B worker). A conftest.py's hooks are pytest's alone: package them under `fluxgate.hooks` to reach A/B runs."""
    manager = _WorkerManager("pytest")
    register(manager)
    return manager


def extended_environment(hook: Any, environment: dict, device) -> dict:
    """`environment` (a run's fingerprint) with what `pytest_fluxgate_environment` implementations add, and the union of the
    `pytest_fluxgate_comparable_fields` they declare under COMPARABLE_FIELDS (sorted; absent when none). Raises
    RegistryError when a hook replaces one of fluxgate's own fields or adds a value JSON cannot hold."""
    added: dict = {}
    hook.pytest_fluxgate_environment(environment=added, device=device)
    replaced = sorted(set(added) & (set(environment) | {COMPARABLE_FIELDS}))
    if replaced:
        raise RegistryError(f"pytest_fluxgate_environment: a hook sets fluxgate's own field(s) {', '.join(replaced)}; "
                            "add fields under new names")
    try:
        json.dumps(added)
    except (TypeError, ValueError) as error:
        raise RegistryError(f"pytest_fluxgate_environment: a hook added a value JSON cannot hold ({error})") from None
    fields = sorted({name for names in hook.pytest_fluxgate_comparable_fields() for name in names})
    return {**environment, **added, **({COMPARABLE_FIELDS: fields} if fields else {})}
