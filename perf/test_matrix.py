"""The perf matrix: one item per model x precision combo (`flux2-dev[nvfp4]`), asserting speed, memory and
similarity to the stored BF16 image. Select with `--models`, `--precisions` or marks (`-m "nvfp4"`)."""

from fluxgate.plugin import matrix_test


@matrix_test
def test_combo(combo, judge):
    judge(combo)
