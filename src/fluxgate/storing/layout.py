"""The history store's layout (`fluxgate.storing.fsstore` has the picture): its folder names, a crashed writer's
temporary file, and the images a run document names. A leaf: the store and its housekeeping read it."""

from __future__ import annotations

import json
import re

SHARDS_DIR = ".workers"  # shard runs not merged yet: readers do not look there
IMAGES_DIR = "images"  # every run's images, content-addressed (`RunObject.save_image`); runs before: `<run_id>/`
MERGED_DIR = ".merged"  # runs of the root merged into another run: kept, so nothing is lost, and not read

# A crashed writer's temporary file: `.<name>.<random>.tmp` (tempfile.mkstemp's 8 characters, or 8 hex digits).
LEFTOVER = re.compile(r"\.[^/]+\.[A-Za-z0-9_]{8}\.tmp")
LEFTOVER_AGE_S = 3600.0


def modified_at(entry: dict) -> float | None:
    """An fsspec listing entry's modification time as a POSIX timestamp, None when the backend gives none."""
    value = next((entry[key] for key in ("mtime", "LastModified", "created") if entry.get(key) is not None), None)
    if isinstance(value, (int, float)):
        return float(value)
    return value.timestamp() if hasattr(value, "timestamp") else None


def image_names(data: bytes | Exception) -> set[str] | None:
    """The image names (`images/<hash>.png`, `<run>/<file>.png`) a run document's records and cases name; None for a
    document that cannot be read or parsed (it may name any)."""
    if isinstance(data, Exception):
        return None
    try:
        records = json.loads(data).get("records") or []
    except (ValueError, AttributeError, TypeError):
        return None
    if not isinstance(records, list):
        return None
    names = set()
    for record in records:
        if not isinstance(record, dict):
            continue
        names.add(record.get("image"))
        cases = (record.get("metrics") or {}).get("cases") if isinstance(record.get("metrics"), dict) else None
        names |= {case.get("image") for case in cases or [] if isinstance(case, dict)}
    return {name for name in names if isinstance(name, str)}


def image_folders(data: bytes | Exception) -> set[str]:
    """The image folders a run document's records name (a merged run's images stay in its shards' folders); an
    unreadable document names none."""
    return {name.split("/")[0] for name in image_names(data) or ()}
