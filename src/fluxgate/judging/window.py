"""The window of a candidate record: which earlier runs it is judged against (`fluxgate.judging.compare`).

The window holds runs of the same combo, GPU class, profile and workload (the image settings but prompts, seeds and
cases: `workload`; similarity is compared only with runs of the same images) whose outcome is passed or failed (error and
skipped runs measured nothing usable), other than the candidate's own run: the last `last_n` recorded before it, or
every clean run of a named base commit. They must agree with the candidate on every comparability field
(`COMPARABILITY_FIELDS`). When only disagreeing runs exist, the verdict is "not comparable" and names the fields;
`ignore_fields` compares across a deliberate upgrade. A run made with the history gate off, under host contention,
on a GPU its xdist workers shared, as one side of an A/B run, or for a pull request never enters a window
(`unfit_for_window`). A run made in CI (its `event` is GitHub's) is judged only against the runs of its own branch
(`branch`: the pushed branch, or a pull request's target branch) started by a push, a manual dispatch or a schedule
(`lane_mismatch`): main's pushes against main's pushes, a pull request against its target's. A local run takes any
run but pull requests'; records made before runs named their branch and event (schema 1) are taken by every run.

Pure functions of `Record`s: no I/O, and the result never depends on the order of the records given.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from fluxgate.hookspec import COMPARABLE_FIELDS as DECLARED_FIELDS
from fluxgate import stats
from fluxgate.storing.record import Record

FIRST_RUN = "no earlier runs of"  # the start of a not-comparable reason where the combo has no history at all

# Fingerprint field -> its path in a record's environment. Two runs that differ in any of these measure a different
# system, so a difference is not the code's doing.
COMPARABILITY_FIELDS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "diffusers": ("diffusers",),
    "cuda": ("cuda",),
    "device_name": ("device_name",),
    "driver_version": ("gpu", "driver_version"),
    "compute_capability": ("compute_capability",),
    "power_limit_w": ("gpu", "power_limit_w"),
    "cuda_alloc_conf": ("cuda_alloc_conf",),  # torch's CUDA allocator settings
    "step_timing": ("step_timing",),  # which steps a record's step_times_s holds (fluxgate.measuring.measure.STEP_TIMING)
    "cupti_teardown": ("cupti_teardown",),  # kernel-path profiles detach CUPTI (fluxgate.measuring.kernels), or leave it on
    "cpu_threads": ("cpu_threads",),  # torch's intra-op threads: CPU devices only (CPU_ONLY_FIELDS)
}
# A run's environment lists under DECLARED_FIELDS the further fields it declared comparable (the hook
# `pytest_fluxgate_comparable_fields`, e.g. a team's attention backend): compared like the fields above, where either run
# declares them.
# Fields compared only between CPU runs: on a GPU the host's torch thread count does not set the step time.
CPU_ONLY_FIELDS = {"cpu_threads"}
# A field's value where a record has none: CUDA records made before these were recorded ran torch's own allocator
# settings and left CUPTI attached; CPU records never carry them.
COMPARABILITY_DEFAULTS = {"cuda_alloc_conf": "default", "cupti_teardown": False}


def _environment_field(environment: Mapping | None, path: tuple[str, ...]):
    value = environment or {}
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def fingerprint_differences(window_env: Mapping | None, candidate_env: Mapping | None,
                            ignore_fields: Iterable[str] = ()) -> list[str]:
    """`"torch 2.11.0 -> 2.12.0"` for each comparability field that differs (baseline -> candidate). Raises
    ValueError for an unknown field in `ignore_fields`."""
    ignored = set(ignore_fields)
    declared = set(_declared(window_env)) | set(_declared(candidate_env))
    unknown = ignored - set(COMPARABILITY_FIELDS) - declared
    if unknown:
        raise ValueError(f"ignore_fields: unknown field(s) {sorted(unknown)}; known: {sorted(COMPARABILITY_FIELDS)}")
    differences = []
    on_cpu = (candidate_env or {}).get("device_type") == "cpu"
    for name, path in COMPARABILITY_FIELDS.items():
        if name in CPU_ONLY_FIELDS and not on_cpu:
            continue
        before, after = (_environment_field(env, path) for env in (window_env, candidate_env))
        before, after = (COMPARABILITY_DEFAULTS.get(name) if value is None else value for value in (before, after))
        if name not in ignored and before != after:
            differences.append(f"{name} {_show(before)} -> {_show(after)}")
    declared = {name for env in (window_env, candidate_env) for name in _declared(env)} - set(COMPARABILITY_FIELDS)
    for name in sorted(declared - ignored):
        before, after = (_environment_field(env, (name,)) for env in (window_env, candidate_env))
        if before != after:
            differences.append(f"{name} {_show(before)} -> {_show(after)}")
    return differences


def _declared(environment: Mapping | None) -> list[str]:
    """The field names a run declared comparable (DECLARED_FIELDS), ignoring a malformed list."""
    names = (environment or {}).get(DECLARED_FIELDS) if isinstance(environment, Mapping) else None
    return [name for name in names if isinstance(name, str)] if isinstance(names, list) else []


def _show(value) -> str:
    return "absent" if value is None else str(value)


def _time_order(record: Record) -> tuple[str, str]:
    return (str(record.recorded or ""), str(record.run_id or ""))


def contention(record: Record) -> str | None:
    """`host contention: ...` when the record's steps waited for a CPU (`stats.contention_note`), else None."""
    return stats.contention_note(record.metrics.step_times_s, record.metrics.run_wait_s)


TRUSTED_EVENTS = ("push", "workflow_dispatch", "schedule")  # runs of a branch's own code, not a pull request's


def lane_mismatch(record: Record, candidate: Record) -> str | None:
    """Why `record` may not stand in the window of `candidate`, a CI run, for its branch or event (module docs);
    None when it may."""
    if candidate.event in (None, "local") or (record.event is None and record.branch is None):
        return None
    if record.event not in TRUSTED_EVENTS:
        return f"{record.event} run (the window of a CI run holds {', '.join(TRUSTED_EVENTS)} runs only)"
    if record.branch != candidate.branch:
        return f"run on branch {record.branch} (this run is judged against branch {candidate.branch})"
    return None


def unfit_for_window(record: Record) -> str | None:
    """Why a record may not stand in anyone's window, or None: its run had the history gate off (a CI
    `tests` run, whose speed nobody vouches for), its xdist workers shared a GPU, it is one side of an A/B run
    (`fluxgate.ab`: environment `ab_run`), it ran a pull request's code, or its steps ran under host contention. One
    such run in a window of few would blind the gate to a real slowdown."""
    if str(record.event or "").startswith("pull_request"):
        return "pull request run (its own code: never in another run's window)"
    if record.env.get("history_gate") == "off":
        return "run with --history-gate off"
    if record.env.get("shared_gpu"):
        return "run whose xdist workers shared a GPU"
    if record.env.get("ab_run"):
        return f"A/B run {record.env['ab_run']} (interleaved base and candidate: judged by `fluxgate.ab`)"
    return contention(record)


# Image settings that decide what the images show but not the work of a step (a prompt's or a seed's values, never
# the shapes): speed and memory compare across them, similarity does not (`same_images`).
CONTENT_SETTINGS = ("seed", "prompt", "cases")


def workload(settings) -> dict:
    """The image settings that decide a step's work (`settings` less CONTENT_SETTINGS)."""
    return {key: value for key, value in (settings or {}).items() if key not in CONTENT_SETTINGS}


def same_images(record: Record, candidate: Record) -> bool:
    """`record` made the same images as `candidate` (every image setting equal): its similarity is comparable."""
    return record.settings == candidate.settings


def same_measurement(records: Iterable[Record], candidate: Record) -> list[Record]:
    """Records of another run measuring what `candidate` measures (combo, GPU class, profile, the settings that
    decide a step's work: `workload`), with a usable (measured) outcome."""
    def same(r: Record) -> bool:
        return (r.combo, r.gpu_class, r.profile, workload(r.settings)) == (
            candidate.combo, candidate.gpu_class, candidate.profile, workload(candidate.settings))

    return [r for r in records if same(r) and r.measured and r.run_id != candidate.run_id]


def _kept_out(record: Record, candidate: Record) -> str | None:
    return unfit_for_window(record) or lane_mismatch(record, candidate)


def _eligible(records: Iterable[Record], candidate: Record, base_commit: str | None) -> list[Record]:
    """`same_measurement` records fit for a window (`unfit_for_window`), earlier or of the base commit; oldest
    first."""
    chosen = [r for r in same_measurement(records, candidate) if _kept_out(r, candidate) is None]
    if base_commit is None:
        # Without a named base, the baseline is the past: history replayed for an old run sees what existed then.
        chosen = [r for r in chosen if _time_order(r) < _time_order(candidate)]
    else:
        # A dirty tree at the base commit is not the base commit.
        chosen = [r for r in chosen if str(r.env.get("git_commit") or "").startswith(base_commit)
                  and not r.env.get("git_dirty")]
    return sorted(chosen, key=_time_order)


def select_window(records: Iterable[Record], candidate: Record, last_n: int = 5, base_commit: str | None = None,
                  ignore_fields: Iterable[str] = ()) -> list[Record]:
    """The window runs for `candidate`, oldest first: the last `last_n` comparable runs recorded before it, or with
    `base_commit` (a full or abbreviated SHA) every comparable run of that commit whose tree was clean. Raises
    ValueError for `last_n` < 1 or a base commit shorter than 4 hex digits."""
    if last_n < 1:
        raise ValueError(f"last_n must be at least 1, got {last_n}")
    if base_commit is not None and len(base_commit) < 4:
        raise ValueError(f"base_commit {base_commit!r}: give at least 4 hex digits of the commit")
    ignore_fields = tuple(ignore_fields)
    comparable = [r for r in _eligible(records, candidate, base_commit)
                  if not fingerprint_differences(r.environment, candidate.environment, ignore_fields)]
    return comparable if base_commit is not None else comparable[-last_n:]


def no_window_reason(records: list[Record], candidate: Record, base_commit: str | None, ignore_fields) -> str:
    """Why `candidate` has an empty window: no history at all (starts with FIRST_RUN), only runs kept out of
    windows, or only runs that differ in a comparability field (named)."""
    eligible = _eligible(records, candidate, base_commit)
    where = f"{candidate.gpu_class} (profile {candidate.profile}, same settings)"
    if base_commit is not None:
        where += f" at commit {base_commit}"
    if not eligible:
        kept_out = [why for r in same_measurement(records, candidate) if (why := _kept_out(r, candidate))]
        if kept_out:
            return (f"no usable earlier runs of {candidate.combo} on {where}: {len(kept_out)} kept out of "
                    f"windows, e.g. {kept_out[-1]}")
        return f"{FIRST_RUN} {candidate.combo} on {where}"
    latest = eligible[-1]
    differences = fingerprint_differences(latest.environment, candidate.environment, ignore_fields)
    return (f"{', '.join(differences)} (vs run {latest.run_id}; runs with the new value make their own window from "
            "the next run on)")
