"""Calling fluxgate's hooks (`fluxgate.hookspec`) the same way in a pytest run and in an A/B worker process.

fluxgate's hooks live in their own plugin manager (`FluxgateHooks`), not in pytest's: pytest's manager takes only
functions named `pytest_*` as implementations (`PytestPluginManager.parse_hookimpl_opts`), marked or not, so a
`fluxgate_*` function in a conftest.py or a `fluxgate.hooks` module registered there is never called.

`register(pluginmanager)` registers the `fluxgate.hooks` entry points' modules with pytest (the plugin's
`pytest_addhooks`), so they may add pytest options and hooks too; `manager(pluginmanager)` gathers the `fluxgate_*`
implementations of every plugin pytest holds then (conftest.py files, installed plugins, those modules) when a run
opens its gate; `worker_manager()` builds the same for an A/B worker, which runs no pytest.
`extended_environment` applies the environment and comparability hooks to a run's fingerprint.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import pluggy

from fluxgate import hookspec
from fluxgate.errors import RegistryError
from fluxgate.hookspec import COMPARABLE_FIELDS
from fluxgate.registry import hook_modules


HOOK_PREFIX = "fluxgate_"
# The options of an implementation without `@pytest.hookimpl`, as the installed pluggy spells them.
_UNMARKED = dict(getattr(pluggy.HookimplMarker("pytest")(lambda: None), "pytest_impl"))


class FluxgateHooks(pluggy.PluginManager):
    """fluxgate's hooks (`fluxgate.hookspec`). As pytest does for its own, a routine named after a hook is an
    implementation, with or without `@pytest.hookimpl(...)` (whose tryfirst / trylast / wrapper options count)."""

    def __init__(self):
        super().__init__("pytest")
        self.add_hookspecs(hookspec)

    def parse_hookimpl_opts(self, plugin, name: str):
        if not name.startswith(HOOK_PREFIX):
            return None
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and inspect.isroutine(getattr(plugin, name, None)):
            return dict(_UNMARKED)
        return opts


def register(pluginmanager: pluggy.PluginManager) -> None:
    """Register every `fluxgate.hooks` entry point's module with pytest's `pluginmanager` (its `pytest_*` hooks:
    options, configure). Raises RegistryError for an entry point that cannot be loaded."""
    for origin, plugin in hook_modules():
        name = f"fluxgate.hooks:{origin}"
        if pluginmanager.get_plugin(name) is None and not pluginmanager.is_registered(plugin):
            pluginmanager.register(plugin, name)


def manager(pluginmanager: pluggy.PluginManager | None = None) -> FluxgateHooks:
    """fluxgate's hooks with the implementations of every `fluxgate.hooks` entry point and of every plugin pytest's
    `pluginmanager` holds now (conftest.py files, installed plugins). Raises RegistryError for an entry point that
    cannot be loaded."""
    hooks = FluxgateHooks()
    plugins = [(pluginmanager.get_name(plugin), plugin) for plugin in pluginmanager.get_plugins()
               ] if pluginmanager is not None else []
    plugins += [(f"fluxgate.hooks:{origin}", plugin) for origin, plugin in hook_modules()]
    for name, plugin in plugins:
        if not hooks.is_registered(plugin):
            hooks.register(plugin, name)
    return hooks


def worker_manager() -> FluxgateHooks:
    """fluxgate's hooks for a process without pytest (an A/B worker): the `fluxgate.hooks` entry points only. A
    conftest.py's hooks are pytest's alone: package them under `fluxgate.hooks` to reach A/B runs."""
    return manager(None)


def extended_environment(hook: Any, environment: dict, device) -> dict:
    """`environment` (a run's fingerprint) with what `fluxgate_environment` implementations add, and the union of the
    `fluxgate_comparable_fields` they declare under COMPARABLE_FIELDS (sorted; absent when none). Raises
    RegistryError when a hook replaces one of fluxgate's own fields or adds a value JSON cannot hold."""
    added: dict = {}
    hook.fluxgate_environment(environment=added, device=device)
    replaced = sorted(set(added) & (set(environment) | {COMPARABLE_FIELDS}))
    if replaced:
        raise RegistryError(f"fluxgate_environment: a hook sets fluxgate's own field(s) {', '.join(replaced)}; "
                            "add fields under new names")
    try:
        json.dumps(added)
    except (TypeError, ValueError) as error:
        raise RegistryError(f"fluxgate_environment: a hook added a value JSON cannot hold ({error})") from None
    fields = sorted({name for names in hook.fluxgate_comparable_fields() for name in names})
    return {**environment, **added, **({COMPARABLE_FIELDS: fields} if fields else {})}
