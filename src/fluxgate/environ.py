"""The environment variables fluxgate sets for a run it measures, each only where the user has not set it, and only
when the first combo is about to run (a pytest session that runs no fluxgate item sees none of them changed)."""

from __future__ import annotations

import os
import sys

# Nothing reaches the network unless the user opts in (HF_HUB_OFFLINE=0); diffusers' GGUF CUDA kernels are fetched
# from the Hub at import, so off unless asked for.
DEFAULTS = {"HF_HUB_OFFLINE": "1", "DIFFUSERS_GGUF_CUDA_KERNELS": "false"}


def apply_defaults(environ: dict | None = None) -> dict[str, str]:
    """Set each of DEFAULTS the environment lacks; returns those set. huggingface_hub reads HF_HUB_OFFLINE once, at
    import: where it was imported already (a user's earlier test), its constant is set too, unless the user set the
    variable."""
    environ = os.environ if environ is None else environ
    applied = {name: value for name, value in DEFAULTS.items() if name not in environ}
    environ.update(applied)
    constants = sys.modules.get("huggingface_hub.constants")
    if "HF_HUB_OFFLINE" in applied and constants is not None:
        constants.HF_HUB_OFFLINE = True
    return applied


# torch's CUDA caching-allocator settings (`--cuda-alloc-conf`): "default" leaves PYTORCH_CUDA_ALLOC_CONF alone.
ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
DEFAULT_ALLOC_CONF = "default"
