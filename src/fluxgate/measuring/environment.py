"""The environment fingerprint every history record and baseline carries: what ran, where, on which versions."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cuda` without a CUDA device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    return device


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def gpu_class(device: torch.device) -> str:
    """Baseline folder name: `cpu`, or the GPU's name as a slug (`nvidia-h100-80gb-hbm3`)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


@lru_cache(maxsize=1)
def git_commit(root: str = ".") -> dict:
    """HEAD commit and whether the tree has uncommitted changes; empty when not in a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    if commit.returncode != 0:
        return {}
    return {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def lane(root: str = ".") -> dict:
    """The run's `branch` (whose history it belongs to: the pushed branch, or a pull request's target branch) and
    `event` (GitHub's event name: push, pull_request, workflow_dispatch, schedule; `local` outside GitHub Actions),
    from GITHUB_EVENT_NAME / GITHUB_REF_NAME / GITHUB_BASE_REF, else git's current branch (None when detached).
    `judging.window` keeps each branch's windows to its own pushes and pull-request runs out of every window."""
    event = os.environ.get("GITHUB_EVENT_NAME")
    if event:
        name = "GITHUB_BASE_REF" if event.startswith("pull_request") else "GITHUB_REF_NAME"
        return {"branch": os.environ.get(name) or None, "event": event}
    try:
        found = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=root, capture_output=True, text=True,
                               timeout=10)
        branch = found.stdout.strip() if found.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        branch = ""
    return {"branch": branch if branch and branch != "HEAD" else None, "event": "local"}


def fingerprint(device: torch.device, root: Path) -> dict:
    """Versions, device and commit: two runs are comparable only where these agree."""
    import diffusers

    from fluxgate.measuring.measure import STEP_TIMING

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device_type": device.type,
        "device_name": device_name(device),
        "gpu_class": gpu_class(device),
        "cpu_threads": torch.get_num_threads(),
        "step_timing": STEP_TIMING,
        **git_commit(str(root)),
        **lane(str(root)),
    }
    if device.type == "cuda":
        from fluxgate.measuring.kernels import profiler_teardown
        from fluxgate.measuring.memory import allocator_settings
        from fluxgate.measuring.telemetry import gpu_fingerprint

        info["cuda"] = torch.version.cuda
        info["cuda_alloc_conf"] = allocator_settings()
        info["cupti_teardown"] = profiler_teardown()
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["gpu"] = gpu_fingerprint(device)
    return info
