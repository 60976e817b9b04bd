"""Faults checked in process, without a matrix run: a damaged checkpoint file through the loader, a bad selection
option, a baseline made on other hardware, concurrent history writers (never lose, duplicate or mix a record), the
same combo making the same image twice, the quantizers at the extremes of the bf16 range and refusing NaN / Inf,
and the properties of the memory and similarity verdicts.

Covered elsewhere and not repeated here: the end-to-end runs with broken inputs, interrupted runs and the network
(test_faults), the loader's one-line error on a half safetensors / garbage GGUF file (test_checkpoints), unknown
`--models` (test_plugin), `parse_shard` itself (test_shards), error bounds over ordinary value ranges
(test_precisions), and the speed verdict's properties (test_compare).
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import re
import tempfile
import warnings
from pathlib import Path

import faults_support
import numpy as np
import pytest
import torch
from faults_support import (
    CPU,
    FLUX1_LINEAR,
    INPUTS,
    SHARED_CACHE,
    bf16_weights,
    no_temporary_files,
    read_history_strictly,
    with_rows_cut,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_precisions import BOUNDS, FLOAT_SLACK, _state_dict, round_trip

from fluxgate.errors import BaselineError, FixtureError
from fluxgate.judging import baselines
from fluxgate.judging.compare import NO_CHANGE, REGRESSION, memory_verdict, similarity_verdict
from fluxgate.matrix import Combo
from fluxgate.measuring.runner import Runner
from fluxgate.models import MODELS
from fluxgate.precisions import PRECISIONS
from fluxgate.precisions.gguf_q8_0 import Q8_0_MAX_ABS
from fluxgate.storing.local import LocalFolderStore
from fluxgate.storing.record import Record
from fluxgate.weights import tiny
from fluxgate.weights.loading import load_transformer
from fluxgate.weights.tiny import TinySource

plugin_project = faults_support.plugin_project  # the shared fixture, found by pytest under this module's name for it


# ---------------------------------------------------------------------------------------------------------------
# Broken checkpoint files the end-to-end run (test_faults) does not cover, straight through the loader.
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
    good = tiny.ensure(model, spec, INPUTS.seed, SHARED_CACHE)
    broken = tmp_path / good.path.name
    broken.write_bytes(damage(good.path.read_bytes()))
    with pytest.raises(FixtureError) as error:
        load_transformer(spec, model.builder.transformer_class, broken, good.config_dir, CPU)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{broken}: cannot load as {precision}") and says in message


def test_fp8_checkpoint_whose_shapes_do_not_fit_the_config_is_refused_naming_the_tensor(tmp_path):
    model, spec = MODELS["flux1-dev"], PRECISIONS["fp8-scaled"]
    weights = bf16_weights(SHARED_CACHE, "flux1-dev")
    path = tmp_path / "misfit.safetensors"
    spec.write(with_rows_cut(weights, FLUX1_LINEAR), tiny.quantized_keys(model, weights, 1), path, "flux")
    config = tiny.ensure(model, spec, INPUTS.seed, SHARED_CACHE).config_dir
    rows, cols = weights[FLUX1_LINEAR].shape
    says = f"{FLUX1_LINEAR} has shape [{rows - 16}, {cols}], but a {cols} -> {rows} linear needs [{rows}, {cols}]"
    with pytest.raises(FixtureError, match=re.escape(says)) as error:
        load_transformer(spec, model.builder.transformer_class, path, config, CPU)
    assert str(error.value).startswith(f"{path}: ")


# ---------------------------------------------------------------------------------------------------------------
# Bad options: a usage error naming the option, before anything is built.
# ---------------------------------------------------------------------------------------------------------------

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
    settings = {"profile": "synthetic", "seed": 0, "steps": 28, "size_px": 1024, "guidance_scale": 3.5,
                "cases": [{"name": "fox", "prompt": "p", "seed": 0}]}
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
# Concurrency: runners appending history at the same time, with a reader watching.
# ---------------------------------------------------------------------------------------------------------------

WRITERS, APPENDS = 4, 30


def _payload(run_id: str, index: int) -> str:
    """A record body long enough that a torn or interleaved write could not go unnoticed."""
    return f"{run_id}:{index}:" + "x" * (500 + 37 * index)


def _append_records(directory: str, run_id: str, start) -> None:
    run = LocalFolderStore(Path(directory)).open_run(run_id, {"writer": run_id})
    start.wait()
    for index in range(APPENDS):
        run.append(Record(combo=f"{run_id}[p{index}]", extra={"index": index, "payload": _payload(run_id, index)}))


def _watch(directory: str, start, stop, problems) -> None:
    """Read the history over and over while it is written; report anything a reader should never see."""
    start.wait()
    seen, found, most = 0, [], {}
    while not stop.is_set() and not found:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records = LocalFolderStore(Path(directory)).load()
        found += [str(warning.message) for warning in caught]
        combos = [record.combo for record in records]
        found += [f"duplicate {combo}" for combo in set(combos) if combos.count(combo) > 1]
        found += [f"torn {r.combo}" for r in records if r.extra["payload"] != _payload(r.run_id, r.extra["index"])]
        for run_id in {record.run_id for record in records}:  # each run: a prefix of its appends, in order
            indices = [record.extra["index"] for record in records if record.run_id == run_id]
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
    records = read_history_strictly(tmp_path)
    assert sorted((r.run_id, r.extra["index"]) for r in records) == sorted(
        (f"run-{n}", i) for n in range(WRITERS) for i in range(APPENDS))
    assert all(r.extra["payload"] == _payload(r.run_id, r.extra["index"]) for r in records)
    assert no_temporary_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# Determinism: the same combo twice on one machine.
# ---------------------------------------------------------------------------------------------------------------

def test_the_same_bf16_combo_twice_makes_the_same_image_bit_for_bit():
    images = []
    for _ in range(2):  # a fresh runner each time: components, transformer and generator made anew
        runner = Runner("tiny", CPU, TinySource(SHARED_CACHE, INPUTS.seed), INPUTS)
        result, _ = runner.measure(Combo("flux1-dev", "bf16"))
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
        tiny.ensure(model, PRECISIONS["bf16"], INPUTS.seed, tmp_path)
    path = tiny.fixture_dir(model, INPUTS.seed, tmp_path) / "transformer-bf16.safetensors"
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
