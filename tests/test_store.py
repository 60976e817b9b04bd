"""fluxgate.storing against every kind of location: a local folder, fsspec's memory filesystem and a real
S3-compatible server on localhost (moto's ThreadedMotoServer, started as s3fs's own tests start it). One object per
run, written whole; concurrent runners (threads and processes) never lose a record; a reader never sees part of a run;
a broken object is skipped with a warning naming it; shards merge without loss; old images are pruned."""

import io
import logging
import os
import re
import subprocess
import sys
import threading
import uuid
import warnings
from pathlib import Path

import pytest

from fluxgate.errors import HistoryError
from fluxgate.storing import open_store
from fluxgate.storing.fsio import resolve
from fluxgate.storing.fsstore import FsspecStore
from fluxgate.storing.local import LocalFolderStore
from fluxgate.storing.record import PASSED, Metrics, Record
from fluxgate.storing.store import new_run_id

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "fluxgate-history"
WRITERS = 8


@pytest.fixture(scope="module")
def s3_endpoint():
    """A writable S3-compatible server on a free localhost port, with one bucket; fsspec's configuration points
    `s3://` at it (in-process; subprocesses get FSSPEC_S3_ENDPOINT_URL, the documented way)."""
    import fsspec.config
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer  # the [test] extra: missing is a failure
    from s3fs import S3FileSystem

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("FSSPEC_S3_ENDPOINT_URL", endpoint)):
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        patch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
        S3FileSystem.clear_instance_cache()
        resolve(f"s3://{BUCKET}")[0].mkdir(BUCKET)
        yield endpoint
        S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(params=["local", "memory", "s3"])
def location(request, tmp_path) -> str:
    """A history location that does not exist yet, of each kind."""
    if request.param == "local":
        return str(tmp_path / "history")
    if request.param == "s3":
        request.getfixturevalue("s3_endpoint")
    slash = "/" if request.param == "memory" else ""  # as fsspec spells the URLs it names (memory paths are absolute)
    return f"{request.param}://{slash}{BUCKET}/{uuid.uuid4().hex}/history"


def _record(combo: str, it_s: float = 1.5, **extra) -> Record:
    return Record(combo=combo, outcome=PASSED, metrics=Metrics(it_s=it_s), **extra)


def _write_run(location: str, records: list[Record], run_id: str | None = None, shard: bool = False):
    run = open_store(location).open_run(run_id or new_run_id(), {"device": "cpu"}, shard=shard)
    for record in records:
        run.append(record)
    return run


def _png(shade: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _put(location: str, data: bytes) -> None:
    fs, path = resolve(location)
    fs.pipe_file(path, data)


def test_open_store_picks_the_implementation_from_the_location(tmp_path):
    assert type(open_store(tmp_path / "h")) is LocalFolderStore
    assert type(open_store(f"file://{tmp_path}/h")) is LocalFolderStore
    assert type(open_store("memory://fluxgate/h")) is FsspecStore
    with pytest.raises(HistoryError, match=r"^nosuch://h: no fsspec filesystem for this URL"):
        open_store("nosuch://h")


def test_runs_are_written_listed_and_read_back_with_their_images(location):
    from PIL import Image

    store = open_store(location)
    assert store.list_runs() == [] and store.load() == []
    first = _write_run(location, [_record("a[bf16]")], run_id="20260101T000000Z-aaaaaa")
    run = store.open_run("20260102T000000Z-bbbbbb", {"device": "cpu"})
    name = run.save_image("a[nvfp4]", Image.open(io.BytesIO(_png(200))))
    for record in (_record("a[bf16]", 2.0), _record("a[nvfp4]", 3.0, image=name)):
        run.append(record)

    assert store.list_runs() == [first.run_id, run.run_id]
    assert [(r.run_id, r.combo, r.metrics.it_s) for r in store.load()] == [
        (first.run_id, "a[bf16]", 1.5), (run.run_id, "a[bf16]", 2.0), (run.run_id, "a[nvfp4]", 3.0)]
    assert all(r.environment == {"device": "cpu"} for r in store.load_run(run.run_id))
    assert re.fullmatch(r"images/[0-9a-f]{32}\.png", name) and store.read_image(name)[:4] == b"\x89PNG"
    # content-addressed: the same image again (another run's, another combo's) is stored once, under one name
    again = store.open_run("20260103T000000Z-cccccc", {}).save_image("b[bf16]", Image.open(io.BytesIO(_png(200))))
    other = run.save_image("a[bf16]", Image.open(io.BytesIO(_png(100))))
    assert again == name and other != name
    assert store.read_image("nowhere/a.png") is None
    assert store.location(run.run_id) == run.location == f"{location}/{run.run_id}.json"
    assert store.image_location(name) == f"{location}/{name}"
    with pytest.raises(HistoryError, match="no run 20990101T000000Z-cccccc"):
        store.load_run("20990101T000000Z-cccccc")


def test_a_broken_object_is_skipped_with_a_warning_naming_it_and_the_rest_is_read(location):
    for run_id, combo in (("run-a", "a[bf16]"), ("run-b", "b[bf16]"), ("run-c", "c[bf16]")):
        _write_run(location, [_record(combo)], run_id=run_id)
    broken = f"{location}/run-b.json"
    fs, path = resolve(broken)
    _put(broken, fs.cat_file(path)[:40])
    _put(f"{location}/notes.json", b'["not a run"]')

    with pytest.warns(UserWarning) as caught:
        records = open_store(location).load()
    assert [r.combo for r in records] == ["a[bf16]", "c[bf16]"]
    messages = sorted(str(w.message) for w in caught)
    assert re.match(rf"{re.escape(broken)}: skipped unreadable history file \(JSONDecodeError", messages[1])
    assert messages[0].startswith(f"{location}/notes.json: skipped unreadable history file (HistoryError")
    with pytest.raises(HistoryError, match=rf"^{re.escape(broken)}: not a readable history run file"):
        open_store(location).load_run("run-b")


def test_runners_writing_at_once_lose_no_record(location):
    """WRITERS threads, each its own store and run, every run rewritten after each of its records."""
    errors = []

    def runner(index: int) -> None:
        try:
            _write_run(location, [_record(f"m{index}[p{n}]", it_s=index + n / 10) for n in range(4)])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=runner, args=(index,)) for index in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    store = open_store(location)
    assert len(store.list_runs()) == WRITERS
    assert sorted(r.combo for r in store.load()) == sorted(f"m{i}[p{n}]" for i in range(WRITERS) for n in range(4))


WRITER = """
import sys
from fluxgate.storing import open_store
from fluxgate.storing.record import PASSED, Metrics, Record
from fluxgate.storing.store import new_run_id

run = open_store(sys.argv[1]).open_run(new_run_id(), {"writer": sys.argv[2]})
for n in range(3):
    run.append(Record(combo=f"w{sys.argv[2]}[p{n}]", outcome=PASSED, metrics=Metrics(it_s=1.0)))
"""


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_runner_processes_writing_at_once_lose_no_record(kind, tmp_path, request):
    """Separate processes, configured only through the environment (FSSPEC_S3_ENDPOINT_URL, AWS_* keys)."""
    location = str(tmp_path / "history") if kind == "local" else f"s3://{BUCKET}/{uuid.uuid4().hex}/history"
    if kind == "s3":
        request.getfixturevalue("s3_endpoint")
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, location, str(index)], stderr=subprocess.PIPE,
                                  text=True, env=os.environ.copy()) for index in range(4)]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()[-2000:]
    records = open_store(location).load()
    assert sorted(r.combo for r in records) == sorted(f"w{i}[p{n}]" for i in range(4) for n in range(3))
    assert {r.environment["writer"] for r in records} == {"0", "1", "2", "3"}


def test_a_reader_during_writes_never_sees_a_partial_run(location):
    """Each append rewrites the whole run; a reader looping meanwhile sees, per run, the first k records, never a
    broken object or a warning. Records are padded so that a torn write would show."""
    combos = [f"m[p{n}]" for n in range(12)]
    reading, done = threading.Event(), threading.Event()
    seen, problems = [], []

    def reader() -> None:
        store = open_store(location)
        while True:
            last = done.is_set()  # one more read after the writer is done: the final state
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                records = store.load()
            problems.extend(str(w.message) for w in caught)
            by_run = {}
            for record in records:
                by_run.setdefault(record.run_id, []).append(record.combo)
            seen.extend(tuple(run) for run in by_run.values())
            reading.set()
            if last:
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert reading.wait(timeout=60)
        for _ in range(2):
            _write_run(location, [_record(combo, settings={"pad": "x" * 20_000}) for combo in combos])
    finally:
        done.set()
        thread.join()
    assert problems == []
    assert tuple(combos) in seen and all(list(run) == combos[:len(run)] for run in seen), seen[:3]
    assert len(open_store(location).load()) == 2 * len(combos)


def test_shards_written_at_once_merge_into_one_run_with_every_record_once(location):
    store = open_store(location)
    shards = []
    threads = [threading.Thread(target=lambda n=n: shards.append(_write_run(
        location, [_record(f"m[p{n}]"), _record(f"m[q{n}]")], shard=True))) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.list_runs() == [] and store.load() == []  # unmerged shards are not history yet

    merged = store.merge(sorted(shard.run_id for shard in shards), mark={"shared_gpu": False})
    assert store.list_runs() == [merged]
    records = store.load()
    assert sorted(r.combo for r in records) == sorted(f"m[{k}{n}]" for n in range(4) for k in "pq")
    assert {r.source_run_id for r in records} == {shard.run_id for shard in shards}
    assert all(r.run_id == merged and r.env["shared_gpu"] is False for r in records)
    fs, path = resolve(location)
    assert not fs.exists(f"{path}/.workers/{shards[0].run_id}.json")


def test_merging_runs_of_the_store_sets_them_aside_and_a_crash_before_that_counts_nothing_twice(location):
    runs = [_write_run(location, [_record(combo)]) for combo in ("a[bf16]", "a[nvfp4]")]
    fs, path = resolve(location)
    documents = [fs.cat_file(f"{path}/{run.run_id}.json") for run in runs]
    from fluxgate import merge

    assert merge.main([run.location for run in runs] + ["--history-dir", location]) == 0
    store = open_store(location)
    (merged,) = store.list_runs()
    assert sorted(r.combo for r in store.load()) == ["a[bf16]", "a[nvfp4]"]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{path}/.merged", detail=False)) == sorted(
        f"{run.run_id}.json" for run in runs)
    for run, document in zip(runs, documents):  # as if the merge died after writing the merged run
        _put(run.location, document)
    assert sorted(r.combo for r in store.load()) == ["a[bf16]", "a[nvfp4]"]
    with pytest.raises(HistoryError, match="also in"):
        store.merge([runs[0].run_id, runs[0].run_id])
    assert store.list_runs() == sorted([merged, *(run.run_id for run in runs)])  # a refused merge changes nothing


def test_images_of_all_but_the_newest_runs_are_pruned_and_their_records_stay(location):
    from PIL import Image

    store = open_store(location)
    names = []
    for day in (1, 2, 3):
        run = store.open_run(f"2026010{day}T000000Z-{day:06d}", {})
        names.append(run.save_image("a[bf16]", Image.open(io.BytesIO(_png(day)))))
        run.append(_record("a[bf16]", image=names[-1]))
    shard = store.open_run("20260100T000000Z-shard0", {}, shard=True)  # a merged run's images: in its shard's folder
    merged_image = shard.save_image("b[bf16]", Image.open(io.BytesIO(_png(9))))
    shard.append(_record("b[bf16]", image=merged_image))
    merged = store.merge([shard.run_id], run_id="20260100T000000Z-merged")

    assert store.prune_images(keep_runs=2) == []  # the images are under an hour old: a live run may name them yet
    removed = store.prune_images(keep_runs=2, min_age_s=0)
    # the merged run's (its shard saved it) and the first run's: no kept run names them
    assert sorted(removed) == sorted(store.image_location(name) for name in (names[0], merged_image))
    assert [store.read_image(name) is not None for name in names] == [False, True, True]
    assert len(store.load()) == 4 and merged in store.list_runs()
    assert store.prune_images(keep_runs=2, min_age_s=0) == []


@pytest.mark.subprocess
def test_a_history_url_is_used_by_a_pytest_run_and_a_bad_one_is_a_usage_error(s3_endpoint):
    location = f"s3://{BUCKET}/{uuid.uuid4().hex}/history"
    command = [sys.executable, "-m", "pytest", "perf", "-q", "-p", "no:cacheprovider", "-m", "not faults",
               "--device", "cpu", "--models", "z-image-turbo", "--precisions", "bf16", "--history-gate", "off"]
    done = subprocess.run([*command, "--history-dir", location], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    (record,) = open_store(location).load()
    assert record.combo == "z-image-turbo[bf16]" and open_store(location).read_image(record.image)[:4] == b"\x89PNG"
    assert f"{location}/{record.run_id}.json" in done.stdout
    bad = subprocess.run([*command, "--history-dir", "nosuch://h"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 4 and "--history-dir nosuch://h: no fsspec filesystem" in bad.stderr, bad.stderr[-2000:]


def test_publishing_reads_a_history_url(location, tmp_path):
    from fluxgate import publish

    metrics = Metrics(it_s=2.0, peak_mem_gib=1.0, ms_ssim=1.0, e2e_s=4.0)
    _write_run(location, [Record(combo="flux1-dev[bf16]", model="flux1-dev", precision="bf16", gpu_class="cpu",
                                 profile="tiny", outcome=PASSED, failures=[], metrics=metrics)])
    out = tmp_path / "report"
    assert publish.main(["--history-dir", location, "--out", str(out), "--baselines-dir", str(tmp_path)]) == 0
    assert "flux1-dev[bf16]" in (out / "summary.md").read_text()
