"""Loads the fluxgate pytest plugin; nothing else lives here."""

pytest_plugins = ["fluxgate.plugin"]
