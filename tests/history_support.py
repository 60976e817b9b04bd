"""Test histories whose records carry the gate's verdicts, stored the way `fluxgate.gate.Gate.verdicts` stores them."""

from __future__ import annotations

from fluxgate.judging import compare


def judge_like_the_gate(writer, policy: compare.Policy = compare.DEFAULT_POLICY, last_n: int = 5) -> list:
    """Judge the run `writer` has written against its store's history and store each verdict on its record (as the
    gate does at the end of a run, without the re-measurement); returns the verdicts."""
    verdicts = compare.compare_run(writer.store.load(), writer.run_id, last_n=last_n, policy=policy)
    writer.record_verdicts({verdict.combo: verdict.stored(gating=True) for verdict in verdicts})
    return verdicts
