"""One combo's history record, typed: what was measured, how it was judged, on which machine. Versioned by SCHEMA.

A record's outcome (the names are defined here once; the gate, history, reports and the decision read them):

- PASSED: measured, every limit met.            - FAILED: measured, a limit missed (still a valid measurement).
- ERROR: not measured, a broken input or crash. - SKIPPED: not measured, cannot run here (no file, no CUDA).
- REMEASURE: the confirmation re-measurement of a suspected regression; evidence for its run's verdict, never a
  combo's result and never part of a window.

On disk a record is a JSON object (`Record.to_json`); `Record.from_json` reads it back, checks every field's type
and range (`storing.validate`) and refuses a schema it does not know. The round trip keeps every key: a field is
written when it is set or was read as null (`nulls`), and keys this version does not know stay in `extra`. Imports
nothing heavy (no numpy, torch or diffusers).

Schema 2 (this version) stores the gate's verdicts on the record (`history_verdict`, `ab`: `storing.verdicts`);
schema 1 files are read through `update_to_2`, the one place that knows the older layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from fluxgate.errors import HistoryError
from fluxgate.storing.validate import check_record
from fluxgate.storing.verdicts import REGRESSION, ABVerdict, HistoryVerdict

PASSED, FAILED, ERROR, SKIPPED, REMEASURE = "passed", "failed", "error", "skipped", "remeasure"
MEASURED = (PASSED, FAILED)  # outcomes whose metrics are measurements

SCHEMA = 2  # what this version writes
SCHEMAS = (1, 2)  # what it reads (1 through `update_to_2`)


def check_schema(found: Any, source: str) -> None:
    """Raises HistoryError (one line naming `source`, the schema found and the ones understood) unless `found` is
    a schema number this version reads; a larger one says it was written by a newer fluxgate."""
    readable = ", ".join(map(str, SCHEMAS))
    if found is None:
        raise HistoryError(f"{source}: no history schema number (this fluxgate reads schema {readable})")
    if isinstance(found, int) and not isinstance(found, bool) and found > SCHEMA:
        raise HistoryError(f"{source}: written by a newer fluxgate (history schema {found}; this one reads schema "
                           f"{readable}): upgrade fluxgate to read it")
    if isinstance(found, bool) or found not in SCHEMAS:
        raise HistoryError(f"{source}: history schema {found!r} is not one this fluxgate reads (schema {readable})")


def update_to_2(document: Mapping[str, Any]) -> dict[str, Any]:
    """A schema-1 run document as schema 2. Schema 1 kept no history verdict on the record, only the confirmation
    re-measurement (outcome REMEASURE, its `verdict`) of a suspected regression, which a gating run made: that
    becomes its combo's `history_verdict` (remeasured, gating). Every other record keeps none (readers say "not
    recorded"); the A/B verdict was already under the `ab` key."""
    records = [dict(record) if isinstance(record, Mapping) else record for record in document.get("records") or []]
    confirmed = {record.get("combo"): record.get("verdict") for record in records
                 if isinstance(record, dict) and record.get("outcome") == REMEASURE and isinstance(
                     record.get("verdict"), str) and isinstance(record.get("combo"), str)}
    for record in records:
        if not isinstance(record, dict):
            continue
        record["schema"] = 2
        verdict = confirmed.get(record.get("combo")) if isinstance(record.get("combo"), str) else None
        if verdict and record.get("outcome") != REMEASURE and record.get("history_verdict") is None:
            message = f"{record['combo']}: {verdict} (confirmed by re-measurement; recorded before schema 2)"
            record["history_verdict"] = {"outcome": verdict, "message": message, "remeasured": True,
                                         "gating": verdict == REGRESSION}
    return {**document, "schema": 2, "records": records}


def _split(cls, data: Mapping[str, Any], source: str) -> tuple[dict, dict, frozenset[str]]:
    """`data` as (known fields, unknown keys, known keys held as null)."""
    if not isinstance(data, Mapping):
        raise HistoryError(f"{source}: a {cls.__name__.lower()} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra", "nulls"}
    known = {key: value for key, value in data.items() if key in names}
    extra = {key: value for key, value in data.items() if key not in names}
    return known, extra, frozenset(key for key, value in known.items() if value is None)


def _json(instance, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The set fields of a Record or Metrics (and those read as null), then its unknown keys."""
    out = {}
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if f.name in ("extra", "nulls", *skip) or (value is None and f.name not in instance.nulls):
            continue
        out[f.name] = value.to_json() if hasattr(value, "to_json") else value
    return {**out, **instance.extra}


@dataclass(frozen=True)
class Metrics:
    """Everything measured about one combo (`fluxgate.gate` writes it). Times in seconds, memory in GiB (2**30 bytes),
    speeds in denoising steps per second; lists hold one value per timed step. None: not measured (a CPU run has no
    telemetry, an error record may stop before similarity)."""

    it_s: float | None = None  # 1 / median step time
    it_s_mean: float | None = None  # 1 / mean step time
    step_times_s: Sequence[float] | None = None  # every timed step (each image's first step excluded)
    step_stats: Mapping[str, Any] | None = None  # stats.StepStats.to_json()
    spikes: Mapping[str, Any] | None = None  # stats.Spikes.to_json()
    off_cpu_s: Sequence[float] | None = None  # per step: wall minus the main thread's CPU time
    run_wait_s: Sequence[float] | None = None  # per step: the main thread runnable but not running (Linux)
    host_step_times_s: Sequence[float] | None = None  # CUDA: host-clock step durations
    gpu_idle_at_end: Sequence[bool] | None = None  # CUDA: per step, nothing queued on the GPU at its end
    idle_probe_s: float | None = None  # CUDA: how long each step's end event was polled
    first_steps_s: Sequence[float] | None = None  # each timed image's first step
    step_sm_clock_mhz: Sequence[float | None] | None = None  # CUDA + NVML: per step, the lowest SM clock sampled in it
    throttled_steps: Sequence[bool] | None = None  # CUDA + NVML: per step, a clock-limiting reason was sampled in it
    e2e_s: float | None = None  # one whole pipeline call (seconds per image)
    peak_mem_gib: float | None = None  # CUDA max allocated, or peak process RSS on CPU (`mem_kind`)
    mem_kind: str | None = None  # "cuda_max_allocated" or "process_rss_peak"
    peak_reserved_gib: float | None = None  # CUDA: torch's reserved peak
    denoise_peak_gib: float | None = None  # CUDA: peak allocated during the denoising steps alone
    timed_steps_s: float | None = None  # sum of every timed step, first steps included
    kernel_path: Mapping[str, Any] | None = None  # measuring.kernels.KernelPath.to_json(): which GEMM ran
    step_flops: float | None = None  # model FLOPs of one denoising step
    images: int | None = None  # timed images pooled in step_times_s
    compile_s: float | None = None  # torch.compile time, before the timed images
    telemetry: Mapping[str, Any] | None = None  # measuring.telemetry.Telemetry.to_json() (NVML; CUDA only)
    mfu_bf16: float | None = None  # model FLOP utilisation against the run's measured bf16 roof (fraction)
    mfu_fp8: float | None = None  # the same against the fp8 roof, for an fp8 GEMM path
    # Similarity to the BF16 images of the same cases, summarised over the cases (`judging.similarity.summarise`):
    # MS-SSIM's one-sided 90 % lower bound (1.0 = identical) and PSNR at the mean MSE's upper bound, in dB (None with
    # ms_ssim set: identical, infinite). Records made before cases: the one image's values.
    ms_ssim: float | None = None
    psnr_db: float | None = None
    ms_ssim_worst: float | None = None  # the lowest case's MS-SSIM
    worst_case: str | None = None  # its name
    # One entry per case: {"case", "ms_ssim", "psnr_db", "broken_image", "image"} (image: the store's name).
    cases: Sequence[Mapping[str, Any]] | None = None
    broken_image: Sequence[str] | None = None  # judging.tripwire's problems over every case ([] = none)
    phases_s: Mapping[str, float] | None = None  # where the combo's wall time went, seconds per phase
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read
    nulls: frozenset[str] = field(default=frozenset(), compare=False, repr=False)  # fields written as null when None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "metrics") -> Metrics:
        """A record's "metrics" object. Raises HistoryError naming `source` when it is not a JSON object."""
        known, extra, nulls = _split(cls, data, source)
        return cls(**known, extra=extra, nulls=nulls)

    def to_json(self) -> dict[str, Any]:
        """The JSON object: the keys it was read with, or those set."""
        return _json(self)

    @property
    def host_syncs_per_step(self) -> int | None:
        """Host waits for the GPU inside one step (the kernel-path profile), or None when not measured."""
        path = self.kernel_path
        syncs = path.get("host_syncs_per_step") if isinstance(path, Mapping) else None
        return syncs if isinstance(syncs, int) and not isinstance(syncs, bool) else None

    @property
    def fallback(self) -> bool:
        """The quantized layers ran a dequantize -> bf16 GEMM fallback."""
        return isinstance(self.kernel_path, Mapping) and bool(self.kernel_path.get("fallback"))

    @property
    def gemm_label(self) -> str | None:
        """The kernel path's label (e.g. "fp8 GEMM per-row, fast accum (diffusers BFLFP8RLinear _scaled_mm)"), or None."""
        return self.kernel_path.get("label") if isinstance(self.kernel_path, Mapping) else None

    @property
    def energy_j(self) -> float | None:
        """NVML energy over the timed images, joules (None without telemetry)."""
        return self.telemetry.get("energy_j") if isinstance(self.telemetry, Mapping) else None

    @property
    def on_cuda(self) -> bool:
        """Peak memory is CUDA's (VRAM), not the process RSS."""
        return str(self.mem_kind or "").startswith("cuda")


@dataclass(frozen=True)
class Record:
    """One combo of one run as history keeps it. Mapping fields are plain JSON (read-only by convention).

    Identity: `combo` (`flux1-dev[nvfp4]`), `model`, `precision`, `runtime`, `profile`, `gpu_class`; `settings` (image
    settings: seed, steps, size) decide which records measure the same thing. A record of a re-measurement has
    outcome REMEASURE and its `verdict`, and no settings, failures, error or teardown."""

    combo: str
    model: str | None = None
    precision: str | None = None
    runtime: str | None = None  # None in records older than runtimes: eager
    profile: str | None = None
    gpu_class: str | None = None
    settings: Mapping[str, Any] | None = None
    weights: Mapping[str, Any] | None = None  # which checkpoint files, their identity and sha256
    image: str | None = None  # the combo's image, as the store names it (`HistoryStore.read_image`)
    metrics: Metrics = field(default_factory=Metrics)
    failures: Sequence[str] | None = None  # limits missed, one line each
    error: str | None = None  # why it was not measured (error or skip)
    outcome: str | None = None  # PASSED, FAILED, ERROR, SKIPPED or REMEASURE
    verdict: str | None = None  # REMEASURE records: the confirmed verdict ("regression", "no change", ...)
    teardown: Mapping[str, Any] | None = None  # device memory before the combo and after its teardown
    thresholds: Mapping[str, Any] | None = None  # the limits it was judged against (judging.baselines.Thresholds)
    not_judged: Sequence[str] | None = None  # limits not judged, one line each with why (CPU: host contention)
    environment: Mapping[str, Any] | None = None  # the machine's fingerprint (measuring.environment)
    run_id: str | None = None
    recorded: str | None = None  # UTC ISO time the record was written
    source_run_id: str | None = None  # a merged run's record: the shard run it came from
    history_verdict: HistoryVerdict | None = None  # the gate's verdict against history (schema 2)
    ab: ABVerdict | None = None  # one side of an A/B run: the paired verdict (`fluxgate.ab`)
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read
    nulls: frozenset[str] = field(default=frozenset(), compare=False, repr=False)  # fields written as null when None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str, environment: Mapping[str, Any] | None = None) -> Record:
        """Read one record. `source` names where it came from (a run file) in errors; `environment` is the run's
        fingerprint, for a record that carries none of its own (only a merged run's records do).

        Raises HistoryError (one line naming `source`, the combo and the field) for an unknown or missing schema or
        a field of the wrong type or range (`storing.validate.check_record`)."""
        check_record(data, source)
        known, extra, nulls = _split(cls, data, source)
        check_schema(extra.pop("schema", None), source)
        known["metrics"] = Metrics.from_json(known.get("metrics") or {}, f"{source}: {known['combo']} metrics")
        for name, typed in (("history_verdict", HistoryVerdict), ("ab", ABVerdict)):
            if known.get(name) is not None:
                known[name] = typed.from_json(known[name])
        nulls -= {"metrics"}
        record = cls(**known, extra=extra, nulls=nulls)
        return record.with_environment(environment) if environment is not None else record

    def to_json(self) -> dict[str, Any]:
        """The JSON object history stores: `schema`, then the keys it was read with, or those set."""
        return {"schema": SCHEMA, **_json(self)}

    def with_environment(self, environment: Mapping[str, Any]) -> Record:
        """This record, with `environment` as its fingerprint unless it carries its own."""
        return self if self.environment is not None else dataclasses.replace(self, environment=environment)

    @property
    def measured(self) -> bool:
        """Its metrics are a measurement of the combo (PASSED or FAILED)."""
        return self.outcome in MEASURED

    @property
    def env(self) -> Mapping[str, Any]:
        """The fingerprint, {} when there is none."""
        return self.environment or {}

    @property
    def branch(self) -> str | None:
        """The branch whose history the run belongs to (the pushed branch, or a pull request's target branch), from
        its fingerprint; None when not recorded (`measuring.environment.lane`)."""
        return self.env.get("branch")

    @property
    def event(self) -> str | None:
        """What started the run: `push`, `pull_request`, `workflow_dispatch`, `schedule` (GitHub's event names) or
        `local`; None when not recorded."""
        return self.env.get("event")

    @property
    def gpu_uuid(self) -> str:
        """The UUID of the GPU it ran on, "" when the fingerprint names none (a CPU run)."""
        return str((self.env.get("gpu") or {}).get("uuid") or "")


RESULT_NULLS = frozenset({"error", "teardown"})  # a combo's result always names both, null when there is none
