"""Judging: a measured combo against its stored baseline (gate, baselines, similarity, tripwire) and against its
history (compare, spread). Pure statistics over records, except `gate`, which drives the measurement.
"""
