"""The example's matrix: one item per selected combo (`sdxl-base[bf16]`, `sdxl-base[torchao-fp8-row]`), judged
against this repository's baselines/<gpu-class>/ like fluxgate's own. Nothing else is needed: the plugin comes
with fluxgate (its `pytest11` entry point), the model, precision and hooks with this package's entry points.

    pytest --device cpu --profile tiny --models sdxl-base          # judge
    pytest --device cpu --profile tiny --models sdxl-base --write-baselines   # (re)write baselines/cpu
"""

from fluxgate.plugin import matrix_test


@matrix_test
def test_combo(combo, judge):
    judge(combo)
