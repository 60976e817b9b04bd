"""Benchmark history: one JSON file per run, one record per combo; old records are never rewritten.

    <history-dir>/<run_id>.json = {"schema": 1, "run_id": ..., "started": ..., "environment": {...},
                                   "records": [{combo, model, precision, profile, outcome, metrics, ...}, ...]}
    <history-dir>/<run_id>/<model>.<precision>.png   each combo's image (the record's "image" field)

A run rewrites only its own file, and does so atomically after every combo (temporary file + rename), so an
interrupted run leaves a readable file holding every combo that finished. Reading skips a corrupt file with a
warning naming it and returns every other record.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fluxgate.checkpoints import atomic_write

SCHEMA = 1


@dataclass
class RunHistory:
    """The history file of the current run."""

    directory: Path
    run_id: str
    environment: dict
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    records: list[dict] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.directory / f"{self.run_id}.json"

    def save_image(self, combo_id: str, image) -> str:
        """Keep a combo's image beside the history (`<run_id>/<combo>.png`) for reports; returns the relative path."""
        relative = f"{self.run_id}/{file_name(combo_id)}.png"
        atomic_write(self.directory / relative, lambda tmp: image.save(tmp, format="PNG"))
        return relative

    def append(self, record: dict) -> None:
        """Add one combo's record and persist the whole run file atomically."""
        record = _finite({"schema": SCHEMA, "run_id": self.run_id,
                          "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record})
        document = {"schema": SCHEMA, "run_id": self.run_id, "started": self.started,
                    "environment": self.environment, "records": [*self.records, record]}
        text = json.dumps(document, indent=1, sort_keys=True, allow_nan=False, default=str) + "\n"
        atomic_write(self.path, lambda tmp: tmp.write_text(text))
        self.records.append(record)  # only once it is on disk: a failed write never poisons later appends


def file_name(combo_id: str) -> str:
    """`flux1-dev[nvfp4]` -> `flux1-dev.nvfp4`: a combo's name in file names and URLs (no brackets)."""
    return combo_id.replace("[", ".").replace("]", "")


def _finite(value):
    """NaN and infinities become None: strict JSON has no spelling for them (PSNR of identical images is inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def new_run_id() -> str:
    """Sortable and unique across runners: UTC time plus random suffix."""
    import secrets

    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def read(directory: Path) -> list[dict]:
    """Every record in `directory`, oldest run first; corrupt files are skipped with a warning naming them."""
    records: list[dict] = []
    for path in sorted(directory.glob("*.json")):
        try:
            document = json.loads(path.read_text())
            run_records = document["records"]
            environment = document.get("environment", {})
        except (OSError, ValueError, KeyError, TypeError) as error:
            warnings.warn(f"{path}: skipped unreadable history file ({type(error).__name__}: {error})", stacklevel=2)
            continue
        records.extend({**record, "environment": environment} for record in run_records)
    return records
