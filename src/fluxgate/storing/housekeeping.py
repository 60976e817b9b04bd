"""Keeping a history store small and clean: crashed writers' temporary files removed, and the images of all but
the newest runs pruned. `store` is an `fluxgate.storing.fsstore.FsspecStore` (its `fs`, `root`, listing and reading
methods); the layout is `fluxgate.storing.layout`'s."""

from __future__ import annotations

import time

from fluxgate.storing.fsio import backend_errors
from fluxgate.storing.layout import IMAGES_DIR, LEFTOVER, LEFTOVER_AGE_S, MERGED_DIR, SHARDS_DIR, image_folders, \
    image_names, modified_at


def clean_leftovers(store, older_than_s: float = LEFTOVER_AGE_S) -> list[str]:
    """Delete the temporary files of writers that died between writing and renaming (`.<name>.<random>.tmp`, as
    `files.atomic_write` and `fsio.write_whole` make them) in the root, `.workers/` and the image folders, once
    they are `older_than_s` seconds old: a live writer's temporary file exists for well under a second, so a
    concurrent run's is never touched. Only names of that pattern are deleted, never a folder. Returns what was
    removed; a store whose listing gives no modification time (object stores, which write in one PUT and leave
    none) is left alone. Raises OSError when a listing fails."""
    removed = []
    now = time.time()
    folders = [store.root] + [entry["name"] for entry in store._entries() if entry["type"] == "directory"]
    for folder in folders:
        with backend_errors(store.display(folder)):
            try:
                entries = store.fs.ls(folder, detail=True)
            except FileNotFoundError:
                continue
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            mtime = modified_at(entry)
            if entry["type"] != "file" or not LEFTOVER.fullmatch(name) or mtime is None or \
                    now - mtime < older_than_s:
                continue
            with backend_errors(store.display(entry["name"])):
                try:
                    store.fs.rm(entry["name"])
                except FileNotFoundError:
                    continue  # another runner cleaned it first
            removed.append(store.display(entry["name"]))
    return removed

def prune_images(store, keep_runs: int, min_age_s: float = LEFTOVER_AGE_S) -> list[str]:
    """Delete the images of all but the newest `keep_runs` runs: their image folders (`<run_id>/`, and those of
    the shards a merged run came from: runs before content addressing) and every `images/<hash>.png` that no
    kept run nor unmerged shard names, once `min_age_s` old (a live run may have saved it and not yet named it);
    the old runs' records stay, with an `image` that no longer exists (reports say so). Returns what was
    removed. A GPU run's 16 PNGs are ~40 MB: without this the history grows without bound. Raises OSError when
    the root cannot be listed or a file not removed."""
    entries = store._entries()
    folders = {entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry["type"] == "directory"}
    content_addressed = IMAGES_DIR in folders
    folders -= {SHARDS_DIR, MERGED_DIR, IMAGES_DIR}
    runs = store._run_objects()
    old, kept = runs[:max(0, len(runs) - keep_runs)], runs[max(0, len(runs) - keep_runs):]
    removed = []
    for path, data in zip(old, store._read_many(old)):
        run_id = path.rsplit("/", 1)[-1].removesuffix(".json")
        for folder in sorted(({run_id} | image_folders(data)) & folders):
            with backend_errors(store.display(store.join(folder))):
                try:
                    store.fs.rm(store.join(folder), recursive=True)
                except FileNotFoundError:
                    pass  # another runner pruned it first
            folders.discard(folder)
            removed.append(store.display(store.join(folder)))
    if content_addressed and old:  # an image goes when no kept run (nor an unmerged shard) names it
        shards = [entry["name"] for entry in store._list(store.join(SHARDS_DIR)) if entry["type"] == "file"]
        names = [image_names(data) for data in store._read_many([*kept, *shards])]
        if any(found is None for found in names):
            return removed  # a run that cannot be read or parsed may name any image: keep them all
        named = set().union(*names)
        now = time.time()
        for entry in store._list(store.join(IMAGES_DIR)):
            name = f"{IMAGES_DIR}/{entry['name'].rstrip('/').rsplit('/', 1)[-1]}"
            mtime = modified_at(entry)
            if entry["type"] != "file" or name in named or mtime is None or now - mtime < min_age_s:
                continue
            with backend_errors(store.display(entry["name"])):
                try:
                    store.fs.rm(entry["name"])
                except FileNotFoundError:
                    continue
            removed.append(store.display(entry["name"]))
    return removed
