"""Compile time's own bound: a compiled combo's `compile_s` (seconds spent compiling before the timed images, the
first one-step call less a second one: `fluxgate.measuring.runtimes`) must stay under `max_compile_s` of its entry.

Compile time is not speed: it is paid once per combo (compiled code is dropped after each:
`fluxgate.measuring.runtimes`), it depends on inductor's on-disk cache (FLUX.1-dev bf16 on an H100: 21 s cold, 4 s
warm) and it moves with the torch version by design. What a PR must not do is make it several times longer
(torchao's fp8 compiled for 200 s where diffusers' fp8r compiled for 14 s, docs/methodology.md). So the bound is
loose, and derived from the slowest compile seen:

    max_compile_s = max(worst * (1 + margins.compile), worst + margins.compile_slack_s)

with `worst` the largest `compile_s` of the combo's runs (`fluxgate thresholds`, part `compile`) or of the baseline's
own run (`--write-baselines`), margins.compile = 1.0 (twice the worst) and margins.compile_slack_s = 60 s (a warm-cache
measurement does not make a cold cache fail). Eager combos have no compile time and no bound.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from typing import Iterable, Mapping

from fluxgate.storing.record import Record

MARGIN = 1.0  # margins.compile: the bound is at least (1 + MARGIN) x the slowest compile seen
SLACK_S = 60.0  # margins.compile_slack_s: and at least this many seconds above it
MAX_COMPILE_S = 86_400.0  # a recorded compile time above a day is not a measurement: left out


def margins(table: Mapping | None) -> tuple[float, float]:
    """(margin, slack in seconds) from a thresholds file's [margins] (`compile`, `compile_slack_s`; defaults where
    absent). Raises ValueError naming the key for a value that is not a finite number >= 0."""
    table = table or {}
    values = []
    for key, default in (("compile", MARGIN), ("compile_slack_s", SLACK_S)):
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"[margins] {key} = {value!r}: want a finite number >= 0")
        values.append(float(value))
    return values[0], values[1]


def bound(worst_s: float, margin: float = MARGIN, slack_s: float = SLACK_S) -> float:
    """The compile-time bound in seconds above the slowest measured compile `worst_s` (module docs)."""
    return round(max(worst_s * (1 + margin), worst_s + slack_s), 1)


FAILURE = "compile time: "  # how a missed bound's line starts


def failure(compile_s: float | None, max_compile_s: float | None, where: str) -> str | None:
    """The line of a compile time over its bound (`where` names the file and entry), else None: also when the combo
    was not compiled (`compile_s` None) or its entry has no bound."""
    if compile_s is None or max_compile_s is None or compile_s <= max_compile_s:
        return None
    return f"{FAILURE}{compile_s:.1f} s > max {max_compile_s:.1f} s ({where})"


@dataclass(frozen=True)
class CompileLimit:
    """One compiled combo's derived bound and the runs it rests on."""

    combo: str
    max_compile_s: float
    values_s: tuple[float, ...]
    run_ids: tuple[str, ...]
    margin: float = MARGIN
    slack_s: float = SLACK_S

    @property
    def derivation(self) -> str:
        runs = f"{len(self.values_s)} run{'s' if len(self.values_s) != 1 else ''}"
        return (f"slowest compile of {runs} {max(self.values_s):.1f} s (fastest "
                f"{min(self.values_s):.1f} s); bound max({1 + self.margin:g}x, +{self.slack_s:g} s)")

    def to_toml(self) -> dict:
        return {"max_compile_s": self.max_compile_s, "compile_runs": list(self.run_ids),
                "compile_derivation": self.derivation}


def derive(records: Iterable[Record], gpu_class: str, table_margins: Mapping | None = None
           ) -> dict[str, CompileLimit]:
    """The compile-time bound of every combo of `gpu_class` with a recorded `compile_s`, by combo id: from the records
    a speed limit would rest on (`spread.usable`: measured, one-sided, no host contention) whose compile time is a
    number of seconds up to MAX_COMPILE_S and did not itself miss a compile bound; `table_margins` (a thresholds
    file's [margins]) may set `compile` and `compile_slack_s`. Empty when no record has a compile time (an eager-only
    class). Raises ValueError for bad margins (`margins`) or naming the combos whose runs mix profiles."""
    from fluxgate.judging.spread import usable

    margin, slack_s = margins(table_margins)
    seen: dict[str, list[tuple[float, str]]] = {}
    profiles: dict[str, set[str]] = {}
    for record in usable(records, gpu_class):
        compile_s = record.metrics.compile_s
        if compile_s is None or not math.isfinite(compile_s) or not 0 <= compile_s <= MAX_COMPILE_S \
                or any(str(line).startswith(FAILURE) for line in record.failures or ()):
            continue
        seen.setdefault(record.combo, []).append((float(compile_s), str(record.run_id)))
        profiles.setdefault(record.combo, set()).add(str(record.profile))
    mixed = [combo for combo, kinds in sorted(profiles.items()) if len(kinds) > 1]
    if mixed:
        raise ValueError(f"{gpu_class}: runs of several profiles mixed in for {', '.join(mixed)}; give one profile's")
    return {combo: CompileLimit(combo, bound(max(v for v, _ in values), margin, slack_s),
                                tuple(v for v, _ in values), tuple(r for _, r in values), margin, slack_s)
            for combo, values in sorted(seen.items())}


NOTE = "# max_compile_s: the compile-time bound, from the slowest compile of the runs (compile_derivation).\n"
_OURS = ("# max_compile_s:",)


def apply_text(text: str, limits: dict[str, CompileLimit], source: str = "thresholds.toml") -> str:
    """The thresholds file's `text` with each compiled combo's bound replaced by its derived one. Raises ValueError
    naming a combo missing from the file (`source`)."""
    from fluxgate.judging.spread import rewrite, update_entries

    table = tomllib.loads(text)
    update_entries(table, limits, source)
    return rewrite(text, table, NOTE, _OURS)
