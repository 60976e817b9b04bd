"""Where history is kept, behind one small interface: a `HistoryStore` holds runs (each a `Run` of `Record`s) and
their images; `RunWriter` appends the current run. `fluxgate.storing.open_store(location)` opens one: a folder on disk
(`fluxgate.storing.local.LocalFolderStore`) or a URL of any fsspec filesystem, e.g. an S3 bucket
(`fluxgate.storing.fsstore.FsspecStore`, the one place that knows how runs are laid out); nothing outside
`fluxgate.storing` knows the layout.

A run is written whole after every combo (readers never see a partial run) and never rewritten by another run.
Reading skips an unreadable run with a warning naming it and returns every other record.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Protocol, Sequence

from fluxgate.errors import HistoryError
from fluxgate.storing import names
from fluxgate.storing.record import REMEASURE, SCHEMA, Record, check_schema, update_to_2
from fluxgate.storing.validate import check_environment
from fluxgate.storing.verdicts import HistoryVerdict


@dataclass(frozen=True)
class Run:
    """One run as stored: its id, UTC start time (ISO), fingerprint and records, oldest first. A merged run names the
    shard runs it was made from (`merged_from`); its records carry their shard's fingerprint."""

    run_id: str
    environment: Mapping[str, Any]
    records: tuple[Record, ...] = ()
    started: str = ""
    merged_from: tuple[str, ...] | None = None

    @classmethod
    def from_json(cls, data: Any, source: str) -> Run:
        """Read a run document (a schema-1 one through `update_to_2`). A record of the wrong shape is skipped with a
        UserWarning naming `source`, the combo and the field; the run's other records stay. Raises HistoryError (one
        line naming `source`) when it is no run document, has an unknown, missing or newer schema, or a run id,
        fingerprint or `merged_from` of the wrong shape."""
        if isinstance(data, Mapping) and data.get("schema") is not None:
            check_schema(data.get("schema"), source)  # a newer fluxgate's file says so, whatever its layout
        if not isinstance(data, Mapping) or not isinstance(data.get("records"), list):
            raise HistoryError(f"{source}: not a history run (a JSON object with a list of records)")
        check_schema(data.get("schema"), source)
        if data["schema"] == 1:
            data = update_to_2(data)
        environment = data.get("environment") or {}
        check_environment(environment, source)
        run_id, merged_from = data.get("run_id"), data.get("merged_from")
        names.check_run_id(run_id, f"{source}: field run_id")
        if merged_from is not None and not (isinstance(merged_from, list) and all(map(names.is_name, merged_from))):
            raise HistoryError(f"{source}: field merged_from: expected a list of run ids, got {str(merged_from)[:40]}")
        return cls(run_id, environment, tuple(_readable_records(data["records"], source, run_id)),
                   str(data.get("started", "")), None if merged_from is None else tuple(merged_from))

    def to_json(self) -> dict[str, Any]:
        """The run document: schema, run_id, started, environment, records (and merged_from for a merged run)."""
        document = {"schema": SCHEMA, "run_id": self.run_id, "started": self.started,
                    "environment": self.environment, "records": [record.to_json() for record in self.records]}
        return document if self.merged_from is None else {**document, "merged_from": list(self.merged_from)}

    def readable(self) -> list[Record]:
        """The records as readers take them: each with the run's fingerprint unless it carries its own."""
        return [record.with_environment(self.environment) for record in self.records]


def _readable_records(documents: list, source: str, run_id: str):
    """The records of a run document that have the right shape and belong to it (a record without a run id takes the
    run's); each other one skipped with a one-line warning."""
    for document in documents:
        try:
            record = Record.from_json(document, source)
        except HistoryError as error:
            warnings.warn(f"{error}; record skipped", stacklevel=4)
            continue
        if record.run_id is None:
            record = dataclasses.replace(record, run_id=run_id)
        if record.run_id != run_id:
            warnings.warn(f"{source}: record {record.combo}: run_id {record.run_id} is not this run's ({run_id}); "
                          "record skipped", stacklevel=4)
            continue
        yield record


def holds_all_of(merged: Run, shard: Run) -> bool:
    """`merged` holds every record of `shard` (each of `shard`'s combos, with `source_run_id` naming it) and `shard` is
    not newer than `merged`: only then may readers skip `shard` as merged into it (nothing is lost). Run ids start
    with their UTC start time to the second (`new_run_id`), and a merge makes its id after its shards ran."""
    held = {record.combo for record in merged.records if record.source_run_id == shard.run_id}
    combos = {record.combo for record in shard.records if record.outcome != REMEASURE}
    return shard.run_id[:len(_TIME)] <= merged.run_id[:len(_TIME)] and combos <= held


class RunWriter(Protocol):
    """The current run's history: `append` persists the whole run (atomically) after every combo."""

    run_id: str
    environment: dict
    records: list[Record]  # as stored (NaN and infinities are None)

    @property
    def location(self) -> str:
        """Where the run is kept (a file path or URL), for messages and provenance."""

    @property
    def store(self) -> HistoryStore:
        """The store the run belongs to (its earlier runs are the history it is judged against)."""

    def save_image(self, combo_id: str, image) -> str:
        """Keep a combo's PIL image; returns its name for the record's `image` (`HistoryStore.read_image`)."""

    def append(self, record: Record) -> Record:
        """Add one combo's record (stamped with run id, schema and time) and persist the run; returns the stored
        record. Raises ValueError (a value JSON cannot hold) or OSError when it cannot be written; earlier records
        stay stored."""

    def record_verdicts(self, verdicts: Mapping[str, HistoryVerdict]) -> None:
        """Store each combo's verdict against history (combo id -> verdict) on its record and persist the run, once,
        at the end of the run. Raises OSError when it cannot be written."""


class HistoryStore(Protocol):
    """Runs and their images. Run ids sort by start time (`new_run_id`)."""

    def list_runs(self) -> list[str]:
        """Run ids, oldest first (shards not yet merged are not listed)."""

    def load(self) -> list[Record]:
        """Every record of every run, oldest run first; an unreadable run is skipped with a UserWarning naming it."""

    def load_run(self, run_id: str) -> list[Record]:
        """The records of one run (or unmerged shard). Raises HistoryError when it is missing or unreadable."""

    def location(self, run_id: str) -> str:
        """Where run `run_id` is kept, for messages."""

    def open_run(self, run_id: str, environment: dict, *, shard: bool = False) -> RunWriter:
        """Start writing run `run_id`. A shard's run (an xdist worker's) is kept apart, unseen by `load` and
        `list_runs`, until `merge` joins it into one run."""

    def read_image(self, name: str) -> bytes | None:
        """The PNG bytes of a record's `image`, None when it is gone (pruned) or unreadable."""

    def image_location(self, name: str) -> str:
        """Where a record's `image` is kept, for messages."""

    def prune_images(self, keep_runs: int, min_age_s: float = 3600.0) -> list[str]:
        """Delete the images of all but the newest `keep_runs` runs (records stay) once `min_age_s` old; returns what
        was removed."""

    def clean_leftovers(self, older_than_s: float = 3600.0) -> list[str]:
        """Delete crashed writers' temporary files older than `older_than_s`; returns what was removed."""

    def merge(self, run_ids: Sequence[str], *, run_id: str | None = None, mark: dict | None = None) -> str:
        """Join shard runs of this store into one new run (`merge_runs`) and set the shards aside, so no
        measurement counts twice; returns the new run's id. Raises HistoryError for overlapping or unreadable
        shards, leaving everything as it was."""


def merge_runs(shards: Sequence[tuple[str, Run]], run_id: str, mark: Mapping[str, Any] | None = None) -> Run:
    """Combine the runs of shards (one run split across runners or GPUs; `(source name, Run)` pairs) into run
    `run_id`. Each record keeps its shard's fingerprint (device UUIDs differ between shards) plus `mark` (e.g.
    {"shared_gpu": True}) and its shard's run id (`source_run_id`); the merged run's fingerprint is the first
    shard's. Raises HistoryError when a combo is in two shards: shards must cover the matrix exactly once."""
    seen: dict[str, str] = {}
    records = []
    for source, shard in shards:
        environment = {**shard.environment, **(mark or {})}
        for record in shard.records:
            # A confirmation re-measurement sits beside its combo's record in the same shard.
            if record.combo in seen and record.outcome != REMEASURE:
                raise HistoryError(f"{source}: {record.combo} is also in {seen[record.combo]}; shards must not overlap")
            seen.setdefault(record.combo, source)
            records.append(dataclasses.replace(record, run_id=run_id, source_run_id=shard.run_id,
                                               environment=environment))
    return Run(run_id, shards[0][1].environment, tuple(records), min(shard.started for _, shard in shards),
               tuple(shard.run_id for _, shard in shards))


def stamped(record: Record, run_id: str) -> Record:
    """`record` as run `run_id` stores it: with the run's id and the time written, and JSON-safe (NaN and infinities
    become None, a Path its text), so that the record in memory is the record on disk."""
    data = finite({**record.to_json(), "run_id": run_id, "recorded": now()})
    return Record.from_json(json.loads(json.dumps(data, default=str)), f"run {run_id}")


def now() -> str:
    """UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_TIME = "20261130T083818Z"  # the time part of a run id, as long as it is


def new_run_id() -> str:
    """Sortable and unique across runners: UTC time plus random suffix."""
    import secrets

    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def file_name(combo_id: str) -> str:
    """`flux1-dev[nvfp4]` -> `flux1-dev.nvfp4`: a combo's name in file names and URLs (no brackets)."""
    return combo_id.replace("[", ".").replace("]", "")


def finite(value):
    """NaN and infinities become None: strict JSON has no spelling for them (PSNR of identical images is inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value
