"""Every field of a stored record checked for its type and range when it is read (`check_record`), so that no
reader (the gate's window, a report, the dashboard, the card) meets a value of the wrong shape.

A field is checked by a `Kind` (a name a user reads in the error, and a test); a nested JSON object by a `Spec`, a
dict of its known keys' kinds (keys it does not name pass as they are, for newer writers' additions). Null is
allowed for every field but `combo`: a record says "not measured" with null. Numbers must be finite (Python's json
reads `NaN`); step times positive, memory not negative. Imports nothing heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from fluxgate.errors import HistoryError
from fluxgate.storing import names
from fluxgate.storing.verdicts import AB_OUTCOMES, HISTORY_OUTCOMES


@dataclass(frozen=True)
class Kind:
    """What a field must hold, said as `expected` in an error."""

    expected: str
    test: Callable[[Any], bool]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _list_of(kind: Kind, expected: str) -> Kind:
    return Kind(expected, lambda value: isinstance(value, list) and all(kind.test(item) for item in value))


def _one_of(values) -> Kind:
    return Kind(f"one of {', '.join(map(str, values))}", lambda value: value in values)


STR = Kind("a string", lambda value: isinstance(value, str))
NAME = Kind("a safe name (letters, digits, '._@+-'; no '/' or leading '.')", names.is_name)
COMBO = Kind("a combo id such as flux1-dev[nvfp4]", names.is_combo)
IMAGE = Kind("an image name <folder>/<file>", names.is_image)
NUMBER = Kind("a finite number", _number)
POSITIVE = Kind("a finite number > 0", lambda value: _number(value) and value > 0)
NONNEGATIVE = Kind("a finite number >= 0", lambda value: _number(value) and value >= 0)
INT = Kind("an integer", lambda value: isinstance(value, int) and not isinstance(value, bool))
BOOL = Kind("true or false", lambda value: isinstance(value, bool))
OBJECT = Kind("a JSON object", lambda value: isinstance(value, Mapping))
STRS = _list_of(STR, "a list of strings")
NUMBERS = _list_of(NUMBER, "a list of finite numbers")
POSITIVES = _list_of(POSITIVE, "a list of finite numbers > 0")
BOOLS = _list_of(BOOL, "a list of true/false")
NUMBERS_OR_NULL = _list_of(Kind("", lambda value: value is None or _number(value)),
                           "a list of finite numbers or nulls")
NUMBER_VALUES = Kind("a JSON object of finite numbers",
                     lambda value: isinstance(value, Mapping) and all(map(_number, value.values())))

Spec = Mapping[str, "Kind | Spec | tuple"]  # a tuple ("list", Spec): a list of objects of that spec

ENVIRONMENT: Spec = {
    "git_commit": STR, "git_dirty": BOOL, "device_name": STR, "device_type": STR, "gpu_class": STR,
    "gpu": {"uuid": STR, "name": STR}, "history_gate": STR, "shared_gpu": BOOL, "ab_run": NAME, "ab_side": STR,
    "ab_tree": STR, "branch": STR, "event": STR,
    "ab_inject": {"combo": STR, "fraction": NUMBER, "shape": STR,
                  "plan": ("list", {"combo": STR, "fraction": NUMBER, "shape": STR})},
    "roof": {"bf16_tflops": NUMBER, "fp8_tflops": NUMBER}, "torch": STR, "diffusers": STR, "xdist_worker": STR,
}
CASE: Spec = {"case": NAME, "image": IMAGE, "ms_ssim": NUMBER, "psnr_db": NUMBER, "broken_image": STRS}
METRICS: Spec = {
    "it_s": NONNEGATIVE, "it_s_mean": NONNEGATIVE, "step_times_s": POSITIVES, "off_cpu_s": NUMBERS,
    "run_wait_s": NUMBERS,
    "host_step_times_s": POSITIVES, "gpu_idle_at_end": BOOLS, "idle_probe_s": NUMBER, "first_steps_s": POSITIVES,
    "step_sm_clock_mhz": NUMBERS_OR_NULL, "throttled_steps": BOOLS, "e2e_s": NONNEGATIVE,
    "peak_mem_gib": NONNEGATIVE, "mem_kind": STR, "peak_reserved_gib": NONNEGATIVE,
    "denoise_peak_gib": NONNEGATIVE, "timed_steps_s": NONNEGATIVE, "step_flops": NONNEGATIVE, "images": INT,
    "compile_s": NONNEGATIVE, "mfu_bf16": NUMBER, "mfu_fp8": NUMBER, "ms_ssim": NUMBER, "psnr_db": NUMBER,
    "ms_ssim_worst": NUMBER, "worst_case": STR, "broken_image": STRS, "phases_s": NUMBER_VALUES,
    "cases": ("list", CASE), "step_stats": {"cv": NUMBER},
    "spikes": {"n": INT, "idle_total": INT}, "telemetry": {"energy_j": NUMBER},
    "kernel_path": {"label": STR, "fallback": BOOL, "host_syncs_per_step": INT},
}
HISTORY_VERDICT: Spec = {
    "outcome": _one_of(HISTORY_OUTCOMES), "message": STR, "policy": NUMBER_VALUES, "window_run_ids": STRS,
    "window_it_s": POSITIVE, "window_peak_mem_gib": NONNEGATIVE, "remeasured": BOOL, "gating": BOOL,
}
AB: Spec = {
    "outcome": _one_of(AB_OUTCOMES), "ratio": NUMBER, "low": NUMBER, "high": NUMBER, "blocks": INT, "message": STR,
    "mem_ratio": NUMBER, "ratios": NUMBERS, "orders": STRS,
    "set_aside": Kind("a list of [block, why] pairs", lambda value: isinstance(value, list) and all(
        isinstance(item, list) and len(item) == 2 for item in value)),
    "seconds": NUMBER, "alternating_loads": BOOL, "contention": STR, "min_effect": NUMBER, "equivalence": NUMBER,
    "host_synchronous": BOOL, "image_outcome": _one_of(AB_OUTCOMES), "image_ratio": NUMBER, "image_low": NUMBER,
    "image_high": NUMBER, "image_message": STR, "ms_ssim": NUMBER,
    "loads": _list_of(Kind("a load number (1 or more)", lambda value: isinstance(value, int) and
                           not isinstance(value, bool) and value >= 1), "a list of load numbers"),
}
OUTCOMES = ("passed", "failed", "error", "skipped", "remeasure")
RECORD: Spec = {
    "model": NAME, "precision": NAME, "runtime": NAME, "profile": STR, "gpu_class": NAME, "settings": OBJECT,
    "weights": OBJECT, "image": IMAGE, "metrics": METRICS, "failures": STRS, "error": STR,
    "outcome": _one_of(OUTCOMES), "verdict": STR, "teardown": OBJECT, "environment": ENVIRONMENT, "run_id": NAME,
    "thresholds": {"min_it_s": NUMBER, "max_peak_mem_gib": NUMBER, "min_ms_ssim": NUMBER, "min_psnr_db": NUMBER},
    "recorded": STR, "source_run_id": NAME, "not_judged": STRS,
    "history_verdict": HISTORY_VERDICT, "ab": AB,
}
REQUIRED = {"history_verdict": ("outcome",), "ab": ("outcome",)}  # keys a verdict object cannot do without


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check(data: Mapping[str, Any], spec: Spec, where: str) -> None:
    """Raise ValueError "field <path>: expected ..., got ..." for the first key of `data` that fails `spec`."""
    for key, kind in spec.items():
        value = data.get(key)
        if value is None:
            continue
        path = f"{where}{key}"
        if isinstance(kind, Kind):
            if not kind.test(value):
                raise ValueError(f"field {path}: expected {kind.expected}, got {_short(value)}")
            continue
        if isinstance(kind, tuple):  # a list of objects
            if not isinstance(value, list):
                raise ValueError(f"field {path}: expected a list of JSON objects, got {_short(value)}")
            for index, item in enumerate(value):
                if not isinstance(item, Mapping):
                    raise ValueError(f"field {path}[{index}]: expected a JSON object, got {_short(item)}")
                _check(item, kind[1], f"{path}[{index}].")
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"field {path}: expected a JSON object, got {_short(value)}")
        for needed in REQUIRED.get(key, ()):
            if value.get(needed) is None:
                raise ValueError(f"field {path}.{needed}: missing")
        _check(value, kind, f"{path}.")


def check_record(data: Any, source: str) -> None:
    """Raises HistoryError, one line naming `source`, the record's combo and the field, when `data` is not a record
    of the right shape (module docs)."""
    if not isinstance(data, Mapping):
        raise HistoryError(f"{source}: a history record must be a JSON object, got {_short(data)}")
    combo = data.get("combo")
    if not COMBO.test(combo):
        raise HistoryError(f"{source}: record field combo: expected {COMBO.expected}, got {_short(combo)}")
    try:
        _check(data, RECORD, "")
    except ValueError as error:
        raise HistoryError(f"{source}: record {combo}: {error}") from None


def check_environment(data: Any, source: str) -> None:
    """Raises HistoryError naming `source` and the field when a run's fingerprint has the wrong shape."""
    if not isinstance(data, Mapping):
        raise HistoryError(f"{source}: field environment: expected a JSON object, got {_short(data)}")
    try:
        _check(data, ENVIRONMENT, "environment.")
    except ValueError as error:
        raise HistoryError(f"{source}: {error}") from None
