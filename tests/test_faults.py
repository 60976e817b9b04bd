"""Fault injection on CPU: a broken input fails only its own item, with one line naming the file or option and what is
wrong; an interrupted run leaves history and baselines readable; concurrent writers never lose or mix a record; the
same combo makes the same image twice; the quantizers refuse what their format cannot hold; nothing reaches the
network.

Covered elsewhere and not repeated here: the loader's one-line error on a half safetensors / garbage GGUF file and the
rebuild of a corrupt cached file (test_checkpoints), BaselineError for each broken baseline file in isolation
(test_baselines), unknown `--models` (test_plugin), `parse_shard` itself (test_shards), error bounds over ordinary
value ranges (test_precisions), and the speed verdict's properties (test_compare).

The end-to-end runs use the tiny profile, not the real one: the real profile renders 1024 px, about 100 s per combo
on a 2-core CPU. A broken checkpoint reaches the tiny profile's loader by replacing a cached file together with its
provenance (as a writer bug, or a file put there by hand, would), so the cache takes it for intact.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import warnings
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from fluxgate import baselines, checkpoints, history
from fluxgate.compare import NO_CHANGE, REGRESSION, memory_verdict, similarity_verdict
from fluxgate.errors import BaselineError, FixtureError
from fluxgate.matrix import Combo
from fluxgate.models import MODELS
from fluxgate.precisions import PRECISIONS, Q8_0_MAX_ABS, load_transformer
from fluxgate.runner import Inputs, Runner
from fluxgate.sources import TinySource
from test_precisions import BOUNDS, FLOAT_SLACK, _state_dict, round_trip

ROOT = Path(__file__).resolve().parents[1]
INJECTORS = Path(__file__).resolve().parent / "injectors"
MATRIX = "perf/test_matrix.py"
SHARED_CACHE = Path(os.environ.get("FLUXGATE_CACHE", ROOT / ".fluxgate-cache")).resolve()
INPUTS = Inputs.from_file(ROOT / "fixtures" / "prompts.toml")
CPU = torch.device("cpu")

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
            "--prompts", str(ROOT / "fixtures" / "prompts.toml"), *args]


def copy_baselines(target: Path) -> Path:
    """A private copy of baselines/cpu (the root to pass as --baselines-dir) without speed and memory limits: what
    is under test here is how a run treats broken inputs, not how fast a shared 2-core machine is today."""
    shutil.copytree(ROOT / "baselines" / "cpu", target / "cpu")
    path = target / "cpu" / baselines.THRESHOLDS_FILE
    table = tomllib.loads(path.read_text())
    for model in MODELS:
        for entry in table.get(model, {}).values():
            entry.update(min_it_s=0.0, max_peak_mem_gib=1e6)
    path.write_text(tomli_w.dumps(table))
    return target


def copy_cache(target: Path, *models: str) -> Path:
    """A private fixture cache with the shared cache's current checkpoints of `models` (what the shared cache lacks is
    built where it is first needed)."""
    for name in models:
        model = MODELS[name]
        shared = checkpoints.fixture_dir(model, INPUTS.seed, SHARED_CACHE)
        if shared.is_dir():
            shutil.copytree(shared, checkpoints.fixture_dir(model, INPUTS.seed, target))
    return target


def plant(cache: Path, combo: Combo, write) -> Path:
    """Replace the cached checkpoint of `combo` by what `write(path)` puts there, provenance included, so the cache
    takes it for intact and the loader is the first to see it; returns its path."""
    path = checkpoints.ensure(combo.model_spec, combo.precision_spec, INPUTS.seed, cache).path
    write(path)
    provenance_path = path.with_suffix(".json")
    provenance = json.loads(provenance_path.read_text())
    provenance.update(sha256=checkpoints.sha256_file(path), size_bytes=path.stat().st_size)
    provenance_path.write_text(json.dumps(provenance))
    return path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def bf16_weights(cache: Path, model: str) -> dict[str, torch.Tensor]:
    spec = MODELS[model]
    return load_file(str(checkpoints.ensure(spec, PRECISIONS["bf16"], INPUTS.seed, cache).path))


def gguf_with_unsupported_type(weights: dict[str, torch.Tensor], quantized: set[str], odd_key: str, path: Path):
    """A Q8_0 GGUF file except that `odd_key` is stored as Q8_1, a llama.cpp type diffusers cannot dequantize."""
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for key, value in weights.items():
        array = value.float().numpy()
        if key == odd_key:
            block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
            rows, cols = array.shape
            writer.add_tensor(key, np.zeros((rows, cols // block * type_bytes), np.uint8),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        elif key in quantized:
            writer.add_tensor(key, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, array, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def with_rows_cut(weights: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """`weights` with 16 output rows of `key` missing: a checkpoint whose shapes do not fit the model config."""
    return {**weights, key: weights[key][:-16].contiguous()}


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


def no_temporary_files(*folders: Path) -> list[Path]:
    """Whatever `atomic_write` (or anything else) left behind half-written under `folders`."""
    return [path for folder in folders for path in folder.rglob("*") if path.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------------
# Broken inputs: one run with a fault on most items; each broken item fails alone, the intact one passes.
# ---------------------------------------------------------------------------------------------------------------

FLUX1_LINEAR = "single_transformer_blocks.0.attn.to_k.weight"


@dataclass
class FaultRun:
    results: dict[str, tuple[str, str]]  # item name -> (outcome, message)
    expected: dict[str, list[str]]  # broken item -> what its message must say
    records: list[dict]
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
    linears = checkpoints.quantized_keys(MODELS["flux1-dev"], flux1, 32)
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
    expected["flux2-dev[gguf-q8_0]"] = [str(path), "truncated or corrupt GGUF"]

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
    (folder / "z-image-turbo.png").unlink()
    expected["z-image-turbo[bf16]"] = [str(folder / "z-image-turbo.png"), "reference image missing",
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
        records = history.read(root / "history")
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
    combos = [record["combo"] for record in fault_run.records]
    assert sorted(combos) == sorted(fault_run.results), fault_run.output[-3000:]
    records = {record["combo"]: record for record in fault_run.records}
    assert records["flux1-dev[bf16]"]["outcome"] == "passed"
    for item in fault_run.expected:
        assert records[item]["outcome"] == "error" and str(fault_run.expected[item][0]) in records[item]["error"]


def test_xdist_workers_histories_become_one_run_holding_every_combo_once(fault_run):
    (run_file,) = fault_run.history_dir.glob("*.json")
    combos = [record["combo"] for record in json.loads(run_file.read_text())["records"]]
    assert sorted(combos) == sorted(fault_run.results)
    assert len({record["source_run_id"] for record in fault_run.records}) == 2  # both workers measured and wrote
    images = [fault_run.history_dir / record["image"] for record in fault_run.records if record.get("image")]
    assert images and all(image.is_file() for image in images)
    leftovers = [path for path in fault_run.history_dir.rglob("*") if path.is_file() and path.suffix != ".png"]
    assert leftovers == [run_file]  # no worker file, no temporary file beside the run


def test_a_run_with_the_network_blocked_reaches_out_nowhere(fault_run):
    armed = {line.split()[0] for line in fault_run.network_log if line.endswith(" armed")}
    attempts = [line for line in fault_run.network_log if " attempt " in line]
    assert len(armed) >= 3, fault_run.network_log  # the controller and both workers ran with the blocker
    assert attempts == []


# ---------------------------------------------------------------------------------------------------------------
# Broken checkpoint files the run above does not cover, straight through the loader.
# ---------------------------------------------------------------------------------------------------------------

def _flip_header_bytes(data: bytes) -> bytes:
    return data[:10] + b"\xff" * 10 + data[20:]


@pytest.mark.parametrize(("precision", "damage", "says"), [
    ("fp8-scaled", _flip_header_bytes, "corrupt safetensors header"),
    ("nvfp4", lambda data: data[:6], "truncated or corrupt"),  # shorter than the header length field
    ("gguf-q8_0", lambda data: b"GGML" + data[4:], "not a GGUF file"),
    ("gguf-q8_0", lambda data: data[:100], "truncated or corrupt GGUF"),  # cut inside the tensor index
], ids=["safetensors-flipped-header", "safetensors-6-bytes", "gguf-bad-magic", "gguf-cut-in-header"])
def test_damaged_checkpoint_file_names_the_file_and_what_is_wrong(tmp_path, precision, damage, says):
    model, spec = MODELS["flux1-dev"], PRECISIONS[precision]
    good = checkpoints.ensure(model, spec, INPUTS.seed, SHARED_CACHE)
    broken = tmp_path / good.path.name
    broken.write_bytes(damage(good.path.read_bytes()))
    with pytest.raises(FixtureError) as error:
        load_transformer(spec, model.module.TRANSFORMER_CLASS, broken, good.config_dir, CPU)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{broken}: cannot load as {precision}") and says in message


def test_fp8_checkpoint_whose_shapes_do_not_fit_the_config_is_refused_naming_the_tensor(tmp_path):
    model, spec = MODELS["flux1-dev"], PRECISIONS["fp8-scaled"]
    weights = bf16_weights(SHARED_CACHE, "flux1-dev")
    path = tmp_path / "misfit.safetensors"
    spec.write(with_rows_cut(weights, FLUX1_LINEAR), checkpoints.quantized_keys(model, weights, 1), path, "flux")
    config = checkpoints.ensure(model, spec, INPUTS.seed, SHARED_CACHE).config_dir
    rows, cols = weights[FLUX1_LINEAR].shape
    says = f"{FLUX1_LINEAR} has shape [{rows - 16}, {cols}], but a {cols} -> {rows} linear needs [{rows}, {cols}]"
    with pytest.raises(FixtureError, match=re.escape(says)) as error:
        load_transformer(spec, model.module.TRANSFORMER_CLASS, path, config, CPU)
    assert str(error.value).startswith(f"{path}: ")


# ---------------------------------------------------------------------------------------------------------------
# Bad options: a usage error naming the option, before anything is built.
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def plugin_project(pytester):
    """A pytester project with the real matrix test and the fluxgate plugin."""
    pytester.makeconftest('pytest_plugins = ["fluxgate.plugin"]')
    pytester.makepyfile(test_matrix=(ROOT / MATRIX).read_text())
    return pytester


@pytest.mark.parametrize(("args", "says"), [
    (["--precisions", "bf16,fp4"], f"--precisions: unknown name(s) fp4; choose from {', '.join(PRECISIONS)}"),
    (["--models", "flux1-dev", "--precisions", "nvfp4,Q8_0"], "--precisions: unknown name(s) Q8_0"),
    (["--shard", "3/2"], "--shard 3/2: i must be between 1 and n (got 3 of 2)"),
    (["--shard", "0/4"], "--shard 0/4: i must be between 1 and n"),
    (["--shard", "1/0"], "--shard 1/0: i must be between 1 and n"),
    (["--shard", "half"], "--shard half: expected i/n"),
])
def test_bad_selection_option_is_a_one_line_usage_error_naming_it(plugin_project, args, says):
    result = plugin_project.runpytest("--collect-only", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert any(says in line for line in result.errlines), result.errlines


# ---------------------------------------------------------------------------------------------------------------
# A baseline made on another software stack.
# ---------------------------------------------------------------------------------------------------------------

def test_a_gpu_baseline_made_on_other_hardware_is_stale_but_other_software_is_what_the_gate_judges(tmp_path):
    folder = tmp_path / "nvidia-h100-80gb-hbm3"
    folder.mkdir()
    made_on = {"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
               "torch": "2.11.0+cu130"}
    settings = {"profile": "synthetic", "seed": 0, "steps": 28, "size_px": 1024, "guidance_scale": 3.5, "prompt": "p"}
    (folder / baselines.PROVENANCE_FILE).write_text(json.dumps(
        {"runs": {"r1": {"environment": made_on}}, "models": {"flux1-dev": {**settings, "run_id": "r1"}}}))
    check = functools.partial(baselines.check_fresh, folder / baselines.PROVENANCE_FILE, "flux1-dev", settings)

    check({**made_on, "torch": "2.12.0+cu130"})  # a torch upgrade is judged against the old baseline, not refused
    with pytest.raises(BaselineError) as stale:
        check({**made_on, "device_name": "NVIDIA H200", "compute_capability": "9.0"})
    message = str(stale.value)
    assert message.startswith(f"{folder / baselines.PROVENANCE_FILE}: stale baseline for flux1-dev")
    assert "device_name 'NVIDIA H100 80GB HBM3' -> 'NVIDIA H200'" in message and "nox -s baselines" in message
    assert "\n" not in message


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


@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory) -> dict[str, Interrupted]:
    """Two `--write-baselines` runs of flux1-dev bf16 then nvfp4 (slowed by 0.5 s a step), started together; once
    bf16 is in history and nvfp4 is being measured, one gets SIGINT (Ctrl-C), the other SIGKILL."""
    for precision in ("bf16", "nvfp4"):  # the runs must not be writing a checkpoint when they are killed
        checkpoints.ensure(MODELS["flux1-dev"], PRECISIONS[precision], INPUTS.seed, SHARED_CACHE)
    runs = {}
    for name in ("SIGINT", "SIGKILL"):
        root = tmp_path_factory.mktemp(name)
        copy_baselines(root / "baselines")
        before = {str(p.relative_to(root)): p.read_bytes() for p in (root / "baselines").rglob("*") if p.is_file()}
        env = {**blocked_network_env(root / "network"), "FLUXGATE_SLOW_COMBO": "flux1-dev[nvfp4]",
               "FLUXGATE_SLOW_DELAY_S": "0.5"}
        output = (root / "output.txt").open("w")
        process = subprocess.Popen(
            matrix_command(MATRIX, "-p", "slow_combo", "--models", "flux1-dev", "--precisions", "bf16,nvfp4",
                           "--write-baselines", "--baselines-dir", str(root / "baselines"), "--history-dir",
                           str(root / "history"), "--fixture-cache", str(SHARED_CACHE)),
            cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        runs[name] = (process, root, before, output)
    pending, deadline = dict(runs), time.monotonic() + 300
    while pending and time.monotonic() < deadline:
        for name, (process, root, _, _) in list(pending.items()):
            if _first_record_written(root / "history") or process.poll() is not None:
                time.sleep(1.0)  # into nvfp4: load, warm-up, slowed steps
                process.send_signal(getattr(signal, name))
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


def _read_history_strictly(directory: Path) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return history.read(directory)


def test_ctrl_c_mid_combo_keeps_every_finished_record_and_marks_the_interrupted_one(interrupted_runs):
    run = interrupted_runs["SIGINT"]
    assert run.returncode == pytest.ExitCode.INTERRUPTED, run.output[-3000:]
    records = {record["combo"]: record for record in _read_history_strictly(run.history_dir)}
    assert records["flux1-dev[bf16]"]["outcome"] == "passed"
    assert records["flux1-dev[nvfp4]"]["outcome"] == "error"
    assert "KeyboardInterrupt" in records["flux1-dev[nvfp4]"]["error"]
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
        baselines.load(run.baselines_root, "cpu", Combo("flux1-dev", precision), settings_).reference()
    for png in folder.glob("*.png"):
        with Image.open(png) as image:
            image.verify()


def test_killed_runner_leaves_history_readable_and_baselines_untouched(interrupted_runs):
    run = interrupted_runs["SIGKILL"]
    assert run.returncode == -signal.SIGKILL, run.output[-3000:]
    assert [r["combo"] for r in _read_history_strictly(run.history_dir)] == ["flux1-dev[bf16]"]
    root = run.baselines_root.parent
    after = {str(p.relative_to(root)): p.read_bytes() for p in run.baselines_root.rglob("*") if p.is_file()}
    assert after == run.baselines_before
    assert no_temporary_files(run.history_dir, run.baselines_root) == []


# ---------------------------------------------------------------------------------------------------------------
# Concurrency: runners appending history at the same time, with a reader watching.
# ---------------------------------------------------------------------------------------------------------------

WRITERS, APPENDS = 4, 30


def _payload(run_id: str, index: int) -> str:
    """A record body long enough that a torn or interleaved write could not go unnoticed."""
    return f"{run_id}:{index}:" + "x" * (500 + 37 * index)


def _append_records(directory: str, run_id: str, start) -> None:
    run = history.RunHistory(Path(directory), run_id, {"writer": run_id})
    start.wait()
    for index in range(APPENDS):
        run.append({"combo": f"{run_id}#{index}", "index": index, "payload": _payload(run_id, index)})


def _watch(directory: str, start, stop, problems) -> None:
    """Read the history over and over while it is written; report anything a reader should never see."""
    start.wait()
    seen, found, most = 0, [], {}
    while not stop.is_set() and not found:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records = history.read(Path(directory))
        found += [str(warning.message) for warning in caught]
        combos = [record["combo"] for record in records]
        found += [f"duplicate {combo}" for combo in set(combos) if combos.count(combo) > 1]
        found += [f"torn {r['combo']}" for r in records if r["payload"] != _payload(r["run_id"], r["index"])]
        for run_id in {record["run_id"] for record in records}:  # each run: a prefix of its appends, in order
            indices = [record["index"] for record in records if record["run_id"] == run_id]
            if indices != list(range(len(indices))):
                found.append(f"{run_id} holds {indices}")
            if len(indices) < most.get(run_id, 0):
                found.append(f"{run_id} lost records: {most[run_id]} seen before, {len(indices)} now")
            most[run_id] = max(most.get(run_id, 0), len(indices))
        seen += 1
    problems.put((seen, found))


def test_concurrent_runners_appending_history_never_lose_duplicate_or_mix_a_record(tmp_path):
    context = multiprocessing.get_context("fork")
    start, stop, problems = context.Barrier(WRITERS + 1), context.Event(), context.Queue()
    writers = [context.Process(target=_append_records, args=(str(tmp_path), f"run-{n}", start))
               for n in range(WRITERS)]
    watcher = context.Process(target=_watch, args=(str(tmp_path), start, stop, problems))
    for process in (*writers, watcher):
        process.start()
    for process in writers:
        process.join(timeout=120)
    stop.set()
    seen, found = problems.get(timeout=60)
    watcher.join(timeout=60)

    assert [process.exitcode for process in writers] == [0] * WRITERS
    assert found == [] and seen > 1
    records = _read_history_strictly(tmp_path)
    assert sorted((r["run_id"], r["index"]) for r in records) == sorted(
        (f"run-{n}", i) for n in range(WRITERS) for i in range(APPENDS))
    assert all(r["payload"] == _payload(r["run_id"], r["index"]) for r in records)
    assert no_temporary_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# Determinism: the same combo twice on one machine.
# ---------------------------------------------------------------------------------------------------------------

def test_the_same_bf16_combo_twice_makes_the_same_image_bit_for_bit():
    images = []
    for _ in range(2):  # a fresh runner each time: components, transformer and generator made anew
        runner = Runner("tiny", CPU, TinySource(SHARED_CACHE, INPUTS.seed), INPUTS)
        result, _ = runner.run(Combo("flux1-dev", "bf16"))
        images.append(np.asarray(result.image))
    assert images[0].shape == (256, 256, 3)
    assert images[0].tobytes() == images[1].tobytes()


# ---------------------------------------------------------------------------------------------------------------
# Quantizers: error bounds at the extremes of the bf16 range, and NaN / Inf refused naming the tensor.
# ---------------------------------------------------------------------------------------------------------------

BF16_MAX = float(torch.finfo(torch.bfloat16).max)
BF16_SMALLEST_SUBNORMAL = 2.0**-133
MAGNITUDES = [0.0, BF16_SMALLEST_SUBNORMAL, 1e-39, 1e-30, 1e-8, 1.0, 1e4, 1e7, 1e20, 1e36, 1e38]


@st.composite
def extreme_weights(draw) -> torch.Tensor:
    """bf16 `[N, K]` (N a multiple of 16 up to 48, K of 32 up to 128) whose rows span the whole bf16 range: zeros,
    subnormals, huge values, each row gaussian at its own magnitude, plus a few single values anywhere in range."""
    n, k = 16 * draw(st.integers(1, 3)), 32 * draw(st.integers(1, 4))
    exponents = st.floats(-40, 38).map(lambda e: 10.0**e)
    scales = draw(st.lists(st.sampled_from(MAGNITUDES) | exponents, min_size=n, max_size=n))
    values = torch.randn(n, k, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))).double()
    values *= torch.tensor(scales, dtype=torch.float64)[:, None]
    for row, col, value in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, k - 1),
                                                   st.sampled_from(MAGNITUDES) | exponents), max_size=3)):
        values[row, col] = value
    return values.clamp(-BF16_MAX, BF16_MAX).to(torch.bfloat16)


@pytest.mark.filterwarnings("ignore:(divide by zero|overflow|invalid value) encountered:RuntimeWarning")
@pytest.mark.parametrize("precision", list(PRECISIONS))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weight=extreme_weights())
def test_extreme_weights_round_trip_within_the_format_bound_or_are_refused_naming_the_tensor(precision, weight):
    if precision == "bf16":
        assert torch.equal(round_trip("bf16", _state_dict(weight))["w.weight"][1], weight.float())
    elif precision == "gguf-q8_0" and float(weight.float().abs().max()) > Q8_0_MAX_ABS:
        with pytest.raises(FixtureError, match=r"^w\.weight: .*exceeds what Q8_0 can hold"):
            round_trip(precision, _state_dict(weight))
    else:  # compared without dividing: an all-zero tensor has a zero bound (and must come back exactly)
        w = weight.double()
        error = (round_trip(precision, _state_dict(weight))["w.weight"][1].double() - w).abs()
        excess = error - BOUNDS[precision](w) * FLOAT_SLACK
        assert torch.isfinite(error).all() and excess.max() <= 0, f"{float(excess.max()):.3g} beyond the bound"


@settings(max_examples=40, deadline=None)
@given(precision=st.sampled_from(list(PRECISIONS)), bad=st.sampled_from([math.nan, math.inf, -math.inf]),
       in_weight=st.booleans(), where=st.tuples(st.integers(0, 15), st.integers(0, 63)))
def test_nan_or_inf_in_any_tensor_is_refused_naming_it_and_writes_nothing(precision, bad, in_weight, where):
    state_dict = _state_dict(torch.randn(16, 64).to(torch.bfloat16))
    key = "w.weight" if in_weight else "w.bias"
    damaged = state_dict[key].clone()
    damaged[where if in_weight else where[0]] = bad
    state_dict[key] = damaged
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"transformer{PRECISIONS[precision].suffix}"
        with pytest.raises(FixtureError, match=rf"^{key}: 1 of {damaged.numel()} values are NaN or infinite"):
            PRECISIONS[precision].write(state_dict, {"w.weight"}, path, "flux")
        assert not path.exists()


def test_a_fixture_checkpoint_that_cannot_be_written_names_the_file_and_the_tensor(tmp_path, monkeypatch):
    model = MODELS["flux1-dev"]
    original = model.tiny_transformer

    def poisoned(seed):
        transformer = original(seed)
        with torch.no_grad():
            transformer.x_embedder.weight[0, 0] = math.nan
        return transformer

    monkeypatch.setattr(type(model), "tiny_transformer", lambda self, seed: poisoned(seed))
    with pytest.raises(FixtureError) as error:
        checkpoints.ensure(model, PRECISIONS["bf16"], INPUTS.seed, tmp_path)
    path = checkpoints.fixture_dir(model, INPUTS.seed, tmp_path) / "transformer-bf16.safetensors"
    assert str(error.value).startswith(f"{path}: cannot write this checkpoint (x_embedder.weight: 1 of ")
    assert not path.exists() and no_temporary_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# The memory and similarity verdicts (the speed verdict's properties live in test_compare).
# ---------------------------------------------------------------------------------------------------------------

VERDICTS = {"memory": (memory_verdict, st.floats(0.05, 200.0), lambda window: max(window) * 1.5 + 1.0),
            "ms_ssim": (similarity_verdict, st.floats(0.2, 1.0), lambda window: min(window) - 0.1)}


@pytest.mark.parametrize("metric", list(VERDICTS))
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_memory_and_similarity_verdicts_ignore_identical_runs_flag_large_shifts_and_ignore_order(metric, data):
    verdict, values, shifted = VERDICTS[metric]
    window = data.draw(st.lists(values, min_size=1, max_size=6))
    repeat = data.draw(st.sampled_from(window))
    assert verdict(repeat, [repeat] * len(window)).outcome == NO_CHANGE
    assert verdict(shifted(window), window).outcome == REGRESSION
    candidate = data.draw(values)
    reordered = data.draw(st.permutations(window))
    assert verdict(candidate, reordered) == verdict(candidate, window)


# ---------------------------------------------------------------------------------------------------------------
# The network: offline unless the user opts in.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("preset", "expected"), [(None, "1"), ("0", "0"), ("1", "1")],
                         ids=["unset-becomes-offline", "user-opt-in-kept", "offline-kept"])
def test_plugin_sets_hf_hub_offline_unless_the_user_chose(plugin_project, monkeypatch, preset, expected):
    if preset is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", preset)
    plugin_project.makepyfile(test_env=f"""
        import os

        def test_offline_setting():
            assert os.environ.get("HF_HUB_OFFLINE") == {expected!r}
    """)
    plugin_project.runpytest("test_env.py").assert_outcomes(passed=1)


def test_with_hf_hub_offline_unset_the_hub_library_is_offline_during_the_run(plugin_project, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    plugin_project.makepyfile(test_env="""
        import huggingface_hub

        def test_hub_is_offline():
            assert huggingface_hub.constants.is_offline_mode()
    """)
    plugin_project.runpytest_subprocess("test_env.py", timeout=120).assert_outcomes(passed=1)
