"""A record's outcome: the names, defined once (history records, the gate, reports and the decision read them).

- PASSED: measured, every limit met.            - FAILED: measured, a limit missed (still a valid measurement).
- ERROR: not measured, a broken input or crash. - SKIPPED: not measured, cannot run here (no file, no CUDA).
- REMEASURE: the confirmation re-measurement of a suspected regression; evidence for its run's verdict, never a
  combo's result and never part of a baseline window.
"""

PASSED, FAILED, ERROR, SKIPPED, REMEASURE = "passed", "failed", "error", "skipped", "remeasure"
MEASURED = (PASSED, FAILED)  # outcomes whose metrics are measurements
