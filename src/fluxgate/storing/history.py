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

from fluxgate.files import atomic_write
from fluxgate.judging.compare import REMEASURE

SCHEMA = 1


@dataclass
class RunHistory:
    """The history file of the current run."""

    directory: Path
    run_id: str
    environment: dict
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    records: list[dict] = field(default_factory=list)
    file_dir: Path | None = None  # where the run file goes when not `directory` (an xdist worker's, until merged)

    @property
    def path(self) -> Path:
        return (self.file_dir or self.directory) / f"{self.run_id}.json"

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
        records += read_file(path)
    return records


def read_paths(paths: list[Path]) -> list[dict]:
    """Every record of the given run files and folders of them (`read` for a folder, `read_file` for a file)."""
    return [record for path in paths for record in (read(path) if Path(path).is_dir() else read_file(Path(path)))]


def read_file(path: Path) -> list[dict]:
    """The records of one run file, each with its environment; a corrupt file gives [] and a warning naming it."""
    try:
        document = json.loads(path.read_text())
        run_records = document["records"]
        environment = document.get("environment", {})
    except (OSError, ValueError, KeyError, TypeError) as error:
        warnings.warn(f"{path}: skipped unreadable history file ({type(error).__name__}: {error})", stacklevel=3)
        return []
    # A merged run keeps each shard's fingerprint on its records; those win over the run's.
    return [{"environment": environment, **record} for record in run_records]


def prune_images(directory: Path, keep_runs: int) -> list[Path]:
    """Delete the image folders (`<run_id>/`) of all but the newest `keep_runs` runs in `directory` (run ids sort by
    time); their records stay, with an `image` that no longer exists (reports say so). Returns the folders removed.
    A GPU run's 16 PNGs are ~40 MB: without this the history grows without bound."""
    import shutil

    runs = sorted(directory.glob("*.json"))
    removed = []
    for path in runs[:max(0, len(runs) - keep_runs)]:
        folders = {path.stem} | {str(r["image"]).split("/")[0] for r in read_file(path) if r.get("image")}
        for folder in sorted(directory / name for name in folders):
            if folder.is_dir() and folder.parent == directory:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def merge(paths: list[Path], directory: Path, run_id: str | None = None, mark: dict | None = None) -> Path:
    """Combine the run files of shards (one run split across runners or GPUs) into one new run file in `directory`.

    Each record keeps its shard's environment fingerprint (device UUIDs differ between shards) and its source run
    id; the merged run's environment is the first shard's. A combo present in two shards is an error: shards must
    cover the matrix exactly once. `mark` is added to every record's environment (e.g. {"shared_gpu": True}).
    The shard files themselves are left as they are."""
    from fluxgate.errors import HistoryError

    documents = []
    for path in paths:
        try:
            documents.append(json.loads(Path(path).read_text()))
            documents[-1]["records"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise HistoryError(f"{path}: not a readable history run file ({type(error).__name__}: {error})") from None
    seen: dict[str, str] = {}
    merged = RunHistory(directory, run_id or new_run_id(), documents[0].get("environment", {}),
                        started=min(document.get("started", "") for document in documents))
    for path, document in zip(paths, documents):
        for record in document["records"]:
            # A confirmation re-measurement sits beside its combo's record in the same shard.
            if record["combo"] in seen and record.get("outcome") != REMEASURE:
                raise HistoryError(f"{path}: {record['combo']} is also in {seen[record['combo']]}; shards must not "
                                   "overlap")
            seen.setdefault(record["combo"], str(path))
            merged.records.append({**record, "run_id": merged.run_id, "source_run_id": document["run_id"],
                                   "environment": {**document.get("environment", {}), **(mark or {})}})
    document = {"schema": SCHEMA, "run_id": merged.run_id, "started": merged.started,
                "environment": merged.environment, "merged_from": [d["run_id"] for d in documents],
                "records": merged.records}
    text = json.dumps(document, indent=1, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(merged.path, lambda tmp: tmp.write_text(text))
    return merged.path
