"""GPU resource hygiene, after the matrix (marker `faults`; `-m "not faults"` leaves it out): a combo that runs out of
device memory fails alone, saying how much it needed against what the GPU has, and the next combo starts from a clean
device. Skips off CUDA (tests/test_faults.py covers what a CPU can)."""

import pytest
import torch

from fluxgate.judging import baselines
from fluxgate.matrix import Combo
from fluxgate.measuring.memory import GIB, OutOfMemory, cuda_index
from fluxgate.plugin import run_session

pytestmark = pytest.mark.faults


def test_an_out_of_memory_combo_fails_alone_and_the_next_combo_starts_clean(gate, request):
    runner, device = gate.runner, gate.runner.device
    if device.type != "cuda" or gate.write:
        pytest.skip("out-of-memory injection runs on a CUDA device, in gate mode")
    index = cuda_index(device)
    combos = run_session(request.config).settings.combos  # eager: compiling again would only add minutes
    target, after = (Combo(c.model, c.precision) for c in (combos[0], combos[-1]))
    runner.measure(target)  # its model's shared components are built and every kernel it uses is loaded
    measured = baselines.measured_peak_gib(gate.baselines_root, gate.gpu_class, target)
    need_gib = measured[0] if measured else 8.0
    # Cap this process at what it holds now plus half of what the combo needs: it must run out part way.
    total = torch.cuda.get_device_properties(device).total_memory
    cap = torch.cuda.memory_reserved(device) + need_gib / 2 * GIB
    torch.cuda.set_per_process_memory_fraction(cap / total, index)
    try:
        with pytest.raises(OutOfMemory) as raised:
            runner.measure(target)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
    out_of_memory = runner.last_teardown
    message = gate._out_of_memory(target, raised.value)

    result, _ = runner.measure(after)
    next_combo = runner.last_teardown

    print(f"\n{message}\nteardown after the out-of-memory combo: {out_of_memory}\nafter {after.id}: {next_combo}")
    assert message.startswith(f"{target.id}: CUDA out of memory: needs ")
    assert f"the GPU has {total / GIB:.1f} GiB" in message and "capped at" in message and "\n" not in message
    for teardown in (out_of_memory, next_combo):
        # Within 1 % of before: torch's pool (what the next combo can use) and the device as NVML sees it.
        assert teardown["clean"], teardown
        assert teardown["used_after_gib"] <= 1.01 * teardown["used_before_gib"], teardown
    assert result.it_s > 0
