"""Seeded construction of a builder's modules on a device, leaving the caller's random state as it was."""

from __future__ import annotations

from collections.abc import Callable

import torch


def device_of(device: torch.device | str) -> torch.device:
    """`device` with its index: a tensor on cuda:0 is "already there" for the loader only if it asks for cuda:0."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def seeded_module(build: Callable[[], torch.nn.Module], seed: int, device: torch.device | str,
                  dtype: torch.dtype) -> torch.nn.Module:
    """`build()` with its class's own init, created on `device` under `seed` (the caller's RNG state is restored),
    then cast to `dtype` (after the float32 init, so a bf16 module holds exactly the rounded float32 weights), in eval
    mode."""
    device = device_of(device)
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        module = build()
    return module.to(dtype).eval()


def cpu_normal(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Standard normal float32 tensors of `shapes`, drawn in order on the CPU from one generator seeded with `seed`:
    the same values whatever device they are moved to next."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]
