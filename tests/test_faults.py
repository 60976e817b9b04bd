"""Fault injection end to end, in subprocess runs of the matrix on CPU: a broken input fails only its own item, with
one line naming the file and what is wrong; an interrupted run (Ctrl-C, or a killed runner) leaves history and
baselines readable; nothing reaches the network. The in-process faults live in test_fault_units; the rebuild of a
corrupt cached file in test_checkpoints, and BaselineError for each broken baseline file alone in test_baselines.

The end-to-end runs use the tiny profile, not the real one: the real profile renders 1024 px, about 100 s per combo
on a 2-core CPU. A broken checkpoint reaches the tiny profile's loader by replacing a cached file together with its
provenance (as a writer bug, or a file put there by hand, would), so the cache takes it for intact.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import warnings
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import faults_support
import gguf
import numpy as np
import pytest
import tomli_w
import torch
from faults_support import (
    CPU,
    FLUX1_LINEAR,
    INPUTS,
    MATRIX,
    ROOT,
    SHARED_CACHE,
    bf16_weights,
    copy_baselines,
    no_temporary_files,
    read_history_strictly,
    with_rows_cut,
)
from PIL import Image

from fluxgate import defaults
from fluxgate.judging import baselines
from fluxgate.matrix import Combo
from fluxgate.measuring.runner import Runner
from fluxgate.models import MODELS
from fluxgate.precisions import PRECISIONS
from fluxgate.precisions.gguf_q8_0 import q8_0_gguf_tensors, write_gguf
from fluxgate.storing.local import LocalFolderStore
from fluxgate.storing.record import ERROR, PASSED, Record
from fluxgate.weights import tiny

pytestmark = pytest.mark.subprocess  # starts pytest or python in subprocesses: seconds each

INJECTORS = Path(__file__).resolve().parent / "injectors"
plugin_project = faults_support.plugin_project  # the shared fixture, found by pytest under this module's name for it

# A sitecustomize for the subprocess runs: every IPv4/IPv6 connection and DNS lookup is refused and logged, and each
# interpreter that loads it says so, so a run proves both that the blocker was active and that nothing tried.
NETWORK_BLOCKER = '''
import os, socket
_LOG = os.environ["FLUXGATE_NETWORK_LOG"]

def _log(line):
    with open(_LOG, "a") as handle:
        handle.write(f"{os.getpid()} {line}\\n")

def _refuse(what):
    _log(f"attempt {what}")
    raise OSError(f"network blocked by tests/test_faults.py ({what})")

_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex

def _guarded(original):
    def call(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _refuse(f"connect {address!r}")
        return original(self, address)
    return call

socket.socket.connect, socket.socket.connect_ex = _guarded(_connect), _guarded(_connect_ex)
socket.getaddrinfo = lambda host, *args, **kwargs: _refuse(f"getaddrinfo {host!r}")
_log("armed")
'''


def blocked_network_env(folder: Path) -> dict[str, str]:
    """Environment for a subprocess whose every interpreter refuses and logs network access (log: folder/log)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(NETWORK_BLOCKER)
    path = os.pathsep.join([str(folder), str(INJECTORS), os.environ.get("PYTHONPATH", ""), str(ROOT / "src")])
    return {**os.environ, "PYTHONPATH": path, "FLUXGATE_NETWORK_LOG": str(folder / "log")}


def matrix_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", "cpu", "--profile", "tiny",
            "--prompts", str(defaults.PACKAGED["prompts"]), *args]


def copy_cache(target: Path, *models: str) -> Path:
    """A private fixture cache with the shared cache's current checkpoints of `models` (what the shared cache lacks is
    built where it is first needed)."""
    for name in models:
        model = MODELS[name]
        shared = tiny.fixture_dir(model, INPUTS.seed, SHARED_CACHE)
        if shared.is_dir():
            shutil.copytree(shared, tiny.fixture_dir(model, INPUTS.seed, target))
    return target


def plant(cache: Path, combo: Combo, write) -> Path:
    """Replace the cached checkpoint of `combo` by what `write(path)` puts there, provenance included, so the cache
    takes it for intact and the loader is the first to see it; returns its path."""
    path = tiny.ensure(combo.model_spec, combo.precision_spec, INPUTS.seed, cache).path
    write(path)
    provenance_path = path.with_suffix(".json")
    provenance = json.loads(provenance_path.read_text())
    provenance.update(sha256=tiny.sha256_file(path), size_bytes=path.stat().st_size)
    provenance_path.write_text(json.dumps(provenance))
    return path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def gguf_with_unsupported_type(weights: dict[str, torch.Tensor], quantized: set[str], odd_key: str, path: Path):
    """A Q8_0 GGUF file except that `odd_key` is stored as Q8_1, a llama.cpp type diffusers cannot dequantize."""
    block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    rows, cols = weights[odd_key].shape
    odd = (odd_key, np.zeros((rows, cols // block * type_bytes), np.uint8), gguf.GGMLQuantizationType.Q8_1)
    write_gguf(path, "flux", [odd if tensor[0] == odd_key else tensor
                              for tensor in q8_0_gguf_tensors(weights, quantized)])


def junit_results(path: Path) -> dict[str, tuple[str, str]]:
    """Item name -> (outcome, failure message) from a JUnit XML report."""
    results = {}
    for case in ElementTree.parse(path).iter("testcase"):
        failure = case.find("failure")
        error = case.find("error")
        if failure is not None or error is not None:
            node = failure if failure is not None else error
            results[case.get("name")] = ("failed" if failure is not None else "error", node.get("message", ""))
        else:
            results[case.get("name")] = ("skipped" if case.find("skipped") is not None else "passed", "")
    return results


# ---------------------------------------------------------------------------------------------------------------
# Broken inputs: one run with a fault on most items; each broken item fails alone, the intact one passes.
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class FaultRun:
    results: dict[str, tuple[str, str]]  # item name -> (outcome, message)
    expected: dict[str, list[str]]  # broken item -> what its message must say
    records: list[Record]
    history_dir: Path
    network_log: list[str]
    output: str


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory) -> FaultRun:
    """The matrix on two xdist workers with the network blocked, against a copy of baselines/cpu, with these faults:

    flux1-dev[bf16]           intact: must pass
    flux1-dev[fp8-scaled]     truncated safetensors
    flux1-dev[gguf-q8_0]      GGUF holding a tensor type diffusers cannot dequantize (Q8_1)
    flux1-dev[nvfp4]          a linear with 16 rows too few for the model config
    flux2-dev[bf16]           baseline made with another seed and size (provenance.json)
    flux2-dev[gguf-q8_0]      truncated GGUF
    flux2-dev[nvfp4]          its thresholds entry holds a string where a number belongs
    z-image-turbo[bf16]       reference image missing
    """
    root = tmp_path_factory.mktemp("faults")
    cache = copy_cache(root / "cache", "flux1-dev", "flux2-dev", "z-image-turbo")
    folder = copy_baselines(root / "baselines") / "cpu"
    flux1 = bf16_weights(cache, "flux1-dev")
    linears = tiny.quantized_keys(MODELS["flux1-dev"], flux1, 32)
    expected: dict[str, list[str]] = {}

    path = plant(cache, Combo("flux1-dev", "fp8-scaled"), truncate)
    expected["flux1-dev[fp8-scaled]"] = [str(path), "truncated"]
    path = plant(cache, Combo("flux1-dev", "gguf-q8_0"),
                 lambda path: gguf_with_unsupported_type(flux1, linears, FLUX1_LINEAR, path))
    expected["flux1-dev[gguf-q8_0]"] = [str(path), FLUX1_LINEAR, "Q8_1", "cannot dequantize"]
    path = plant(cache, Combo("flux1-dev", "nvfp4"),
                 lambda path: PRECISIONS["nvfp4"].write(with_rows_cut(flux1, FLUX1_LINEAR), linears, path, "flux"))
    rows, cols = flux1[FLUX1_LINEAR].shape
    expected["flux1-dev[nvfp4]"] = [str(path), "does not fit the model config", FLUX1_LINEAR,
                                    f"has shape [{rows - 16}, {cols // 2}], but a {cols} -> {rows} linear"]
    path = plant(cache, Combo("flux2-dev", "gguf-q8_0"), truncate)
    expected["flux2-dev[gguf-q8_0]"] = [str(path), "truncated: "]

    provenance_path = folder / baselines.PROVENANCE_FILE
    provenance = json.loads(provenance_path.read_text())
    provenance["models"]["flux2-dev"].update(seed=INPUTS.seed + 1, size_px=512)
    provenance_path.write_text(json.dumps(provenance))
    expected["flux2-dev[bf16]"] = [str(provenance_path), "stale baseline for flux2-dev",
                                   f"seed {INPUTS.seed + 1} -> {INPUTS.seed}", "size_px 512 -> 256", "nox -s baselines"]
    thresholds_path = folder / baselines.THRESHOLDS_FILE
    thresholds = tomllib.loads(thresholds_path.read_text())
    thresholds["flux2-dev"]["nvfp4"]["min_it_s"] = "fast"
    thresholds_path.write_text(tomli_w.dumps(thresholds))
    expected["flux2-dev[nvfp4]"] = [str(thresholds_path), '["flux2-dev"."nvfp4"]', "min_it_s", "'fast'"]
    (folder / "z-image-turbo" / "fox.png").unlink()
    expected["z-image-turbo[bf16]"] = [str(folder / "z-image-turbo" / "fox.png"), "reference image missing",
                                       "nox -s baselines"]

    items = ["flux1-dev[bf16]", *[f"flux1-dev[{p}]" for p in ("fp8-scaled", "gguf-q8_0", "nvfp4")],
             *[f"flux2-dev[{p}]" for p in ("bf16", "gguf-q8_0", "nvfp4")], "z-image-turbo[bf16]"]
    done = subprocess.run(
        matrix_command(*[f"{MATRIX}::{item}" for item in items], "-n", "2", "--baselines-dir", str(folder.parent),
                       "--history-dir", str(root / "history"), "--fixture-cache", str(cache), "--history-gate", "off",
                       "--junitxml", str(root / "junit.xml")),
        cwd=ROOT, env=blocked_network_env(root / "network"), capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert (root / "junit.xml").is_file(), output[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unreadable history file would be skipped with a warning
        records = LocalFolderStore(root / "history").load()
    log = root / "network" / "log"
    return FaultRun(junit_results(root / "junit.xml"), expected, records, root / "history",
                    log.read_text().splitlines() if log.is_file() else [], output)


def test_intact_item_passes_and_only_the_broken_items_fail(fault_run):
    outcomes = {item: outcome for item, (outcome, _) in fault_run.results.items()}
    assert outcomes == {"flux1-dev[bf16]": "passed", **dict.fromkeys(fault_run.expected, "failed")}, \
        fault_run.output[-3000:]


@pytest.mark.parametrize("item", ["flux1-dev[fp8-scaled]", "flux1-dev[gguf-q8_0]", "flux1-dev[nvfp4]",
                                  "flux2-dev[bf16]", "flux2-dev[gguf-q8_0]", "flux2-dev[nvfp4]",
                                  "z-image-turbo[bf16]"])
def test_broken_input_fails_its_item_with_one_line_naming_the_file_and_the_problem(fault_run, item):
    outcome, message = fault_run.results[item]
    assert outcome == "failed", fault_run.output[-3000:]
    assert "\n" not in message.strip(), message
    assert "Traceback" not in message, message
    for fragment in fault_run.expected[item]:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_every_item_of_the_run_is_recorded_once_even_after_a_broken_one(fault_run):
    combos = [record.combo for record in fault_run.records]
    assert sorted(combos) == sorted(fault_run.results), fault_run.output[-3000:]
    records = {record.combo: record for record in fault_run.records}
    assert records["flux1-dev[bf16]"].outcome == PASSED
    for item in fault_run.expected:
        assert records[item].outcome == ERROR and str(fault_run.expected[item][0]) in records[item].error


def test_xdist_workers_histories_become_one_run_holding_every_combo_once(fault_run):
    (run_file,) = fault_run.history_dir.glob("*.json")
    combos = [record["combo"] for record in json.loads(run_file.read_text())["records"]]
    assert sorted(combos) == sorted(fault_run.results)
    assert len({record.source_run_id for record in fault_run.records}) == 2  # both workers measured and wrote
    images = [fault_run.history_dir / record.image for record in fault_run.records if record.image]
    assert images and all(image.is_file() for image in images)
    leftovers = [path for path in fault_run.history_dir.rglob("*") if path.is_file() and path.suffix != ".png"]
    assert leftovers == [run_file]  # no worker file, no temporary file beside the run


def test_a_run_with_the_network_blocked_reaches_out_nowhere(fault_run):
    armed = {line.split()[0] for line in fault_run.network_log if line.endswith(" armed")}
    attempts = [line for line in fault_run.network_log if " attempt " in line]
    assert len(armed) >= 3, fault_run.network_log  # the controller and both workers ran with the blocker
    assert attempts == []


# ---------------------------------------------------------------------------------------------------------------
# Interrupted runs: Ctrl-C and a killed runner, part way through a combo.
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Interrupted:
    returncode: int
    history_dir: Path
    baselines_root: Path
    baselines_before: dict[str, bytes]
    output: str


def _first_record_written(history_dir: Path) -> bool:
    for path in history_dir.glob("*.json"):
        try:
            return len(json.loads(path.read_text())["records"]) >= 1
        except (OSError, ValueError, KeyError):
            return False
    return False


def _default_sigint() -> None:
    # A job started in the background by a non-interactive shell (`cmd &`, nohup) ignores SIGINT, children inherit
    # that, and Python installs no KeyboardInterrupt handler for an ignored signal: Ctrl-C would never arrive.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory) -> dict[str, Interrupted]:
    """Two `--write-baselines` runs of flux1-dev bf16 then nvfp4 (slowed by 1 s a step), started together; once
    bf16 is in history and nvfp4's timed steps have begun (the injector's mark file), one gets SIGINT (Ctrl-C), the
    other SIGKILL: on a loaded 2-core machine a fixed wait after the bf16 record could miss nvfp4 altogether."""
    for precision in ("bf16", "nvfp4"):  # the runs must not be writing a checkpoint when they are killed
        tiny.ensure(MODELS["flux1-dev"], PRECISIONS[precision], INPUTS.seed, SHARED_CACHE)
    runs = {}
    for name in ("SIGINT", "SIGKILL"):
        root = tmp_path_factory.mktemp(name)
        copy_baselines(root / "baselines")
        before = {str(p.relative_to(root)): p.read_bytes() for p in (root / "baselines").rglob("*") if p.is_file()}
        env = {**blocked_network_env(root / "network"), "FLUXGATE_SLOW_COMBO": "flux1-dev[nvfp4]",
               "FLUXGATE_SLOW_DELAY_S": "1.0", "FLUXGATE_SLOW_MARK": str(root / "slowed")}
        output = (root / "output.txt").open("w")
        process = subprocess.Popen(
            matrix_command(MATRIX, "-p", "slow_combo", "--models", "flux1-dev", "--precisions", "bf16,nvfp4",
                           "--write-baselines", "--baselines-dir", str(root / "baselines"), "--history-dir",
                           str(root / "history"), "--fixture-cache", str(SHARED_CACHE)),
            cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, preexec_fn=_default_sigint)
        runs[name] = (process, root, before, output)
    pending, deadline = dict(runs), time.monotonic() + 300
    while pending and time.monotonic() < deadline:
        for name, (process, root, _, _) in list(pending.items()):
            if ((root / "slowed").exists() and _first_record_written(root / "history")) or process.poll() is not None:
                process.send_signal(getattr(signal, name))  # inside a slowed nvfp4 step
                del pending[name]
        time.sleep(0.1)
    results = {}
    for name, (process, root, before, output) in runs.items():
        try:
            returncode = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
        output.close()
        results[name] = Interrupted(returncode, root / "history", root / "baselines", before,
                                    (root / "output.txt").read_text())
    return results

def test_ctrl_c_mid_combo_keeps_every_finished_record_and_marks_the_interrupted_one(interrupted_runs):
    run = interrupted_runs["SIGINT"]
    assert run.returncode == pytest.ExitCode.INTERRUPTED, run.output[-3000:]
    records = {record.combo: record for record in read_history_strictly(run.history_dir)}
    assert records["flux1-dev[bf16]"].outcome == PASSED
    assert records["flux1-dev[nvfp4]"].outcome == ERROR
    assert "KeyboardInterrupt" in records["flux1-dev[nvfp4]"].error
    assert no_temporary_files(run.history_dir, run.baselines_root) == []


def test_ctrl_c_during_write_baselines_leaves_the_old_baselines_as_they_were(interrupted_runs):
    run = interrupted_runs["SIGINT"]
    root = run.baselines_root.parent
    after = {str(p.relative_to(root)): p.read_bytes() for p in run.baselines_root.rglob("*") if p.is_file()}
    assert after == run.baselines_before  # half a matrix is no baseline
    assert "run interrupted, baselines left as they were" in run.output
    folder = run.baselines_root / "cpu"
    tomllib.loads((folder / baselines.THRESHOLDS_FILE).read_text())
    json.loads((folder / baselines.PROVENANCE_FILE).read_text())
    settings_ = Runner("tiny", CPU, None, INPUTS).settings(MODELS["flux1-dev"])
    for precision in ("bf16", "nvfp4"):
        baselines.load(run.baselines_root, "cpu", Combo("flux1-dev", precision), settings_).reference("fox")
    for png in folder.glob("*/*.png"):
        with Image.open(png) as image:
            image.verify()


def test_killed_runner_leaves_history_readable_and_baselines_untouched(interrupted_runs):
    run = interrupted_runs["SIGKILL"]
    assert run.returncode == -signal.SIGKILL, run.output[-3000:]
    assert [r.combo for r in read_history_strictly(run.history_dir)] == ["flux1-dev[bf16]"]
    root = run.baselines_root.parent
    after = {str(p.relative_to(root)): p.read_bytes() for p in run.baselines_root.rglob("*") if p.is_file()}
    assert after == run.baselines_before
    assert no_temporary_files(run.history_dir, run.baselines_root) == []


# ---------------------------------------------------------------------------------------------------------------
# The network: offline unless the user opts in.
# ---------------------------------------------------------------------------------------------------------------

# Set when the first combo runs (not when pytest starts: a session without fluxgate items sees nothing changed).
ONE_COMBO = ("--device", "cpu", "--models", "z-image-turbo", "--precisions", "bf16", "--history-gate", "off")


@pytest.mark.parametrize(("preset", "expected"), [(None, "1"), ("0", "0"), ("1", "1")],
                         ids=["unset-becomes-offline", "user-opt-in-kept", "offline-kept"])
def test_a_run_sets_hf_hub_offline_unless_the_user_chose(plugin_project, monkeypatch, preset, expected):
    if preset is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", preset)
    plugin_project.makepyfile(test_env=f"""
        import os

        from fluxgate.plugin import matrix_test

        def test_before_any_combo():
            assert os.environ.get("HF_HUB_OFFLINE") == {preset!r}

        @matrix_test
        def test_offline_setting(combo, gate):
            assert os.environ.get("HF_HUB_OFFLINE") == {expected!r}
    """)
    plugin_project.runpytest("test_env.py", *ONE_COMBO, "--baselines-dir", str(ROOT / "baselines"),
                             "--history-dir", str(plugin_project.path / "history")).assert_outcomes(passed=2)


def test_with_hf_hub_offline_unset_the_hub_library_is_offline_during_the_run(plugin_project, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    plugin_project.makepyfile(test_env="""
        import huggingface_hub  # imported before the run starts, as a team's own earlier test may

        from fluxgate.plugin import matrix_test

        @matrix_test
        def test_hub_is_offline(combo, gate):
            assert huggingface_hub.constants.is_offline_mode()
    """)
    plugin_project.runpytest_subprocess("test_env.py", *ONE_COMBO, "--baselines-dir", str(ROOT / "baselines"),
                                        "--history-dir", str(plugin_project.path / "history"),
                                        timeout=300).assert_outcomes(passed=1)
