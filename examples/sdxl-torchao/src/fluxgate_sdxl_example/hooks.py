"""The example's fluxgate hooks (`fluxgate.hookspec`), registered through the `fluxgate.hooks` entry point, and its
one pytest option, `--sdxl-attention`.

A UNet denoiser's attention runs through diffusers' attention processors; which one ran changes speed, so the choice
is set on the pipeline before warm-up and timing (`pytest_fluxgate_prepare_pipeline`), recorded in the run's environment as
`sdxl_attention` (`pytest_fluxgate_environment`) and declared comparable (`pytest_fluxgate_comparable_fields`): a run with another
processor is "not comparable" with this one in the history gate rather than a speed regression.

Light at import (no torch, no diffusers): pytest loads this module when it starts.
"""

from __future__ import annotations

import os

ATTENTION_FIELD = "sdxl_attention"  # the environment field this package adds, and declares comparable
ATTENTION_ENV = "FLUXGATE_SDXL_ATTENTION"  # the choice where no pytest runs (an A/B worker), and the option's default
# name -> diffusers processor class: PyTorch's fused scaled_dot_product_attention, or the classic
# baddbmm + softmax + bmm
PROCESSORS = {"sdpa": "AttnProcessor2_0", "classic": "AttnProcessor"}
_chosen: dict[str, str] = {}  # the option's value, once pytest has parsed it


def attention() -> str:
    """The attention processor this run sets on UNet denoisers: `--sdxl-attention`, else $FLUXGATE_SDXL_ATTENTION,
    else "sdpa"."""
    return _chosen.get("attention") or os.environ.get(ATTENTION_ENV, "sdpa")


def pytest_addoption(parser) -> None:
    parser.getgroup("fluxgate").addoption(
        "--sdxl-attention", choices=sorted(PROCESSORS), default=None,
        help=f"attention processor of UNet denoisers (fluxgate-sdxl-example): 'sdpa' (AttnProcessor2_0) or 'classic' "
             f"(AttnProcessor); recorded as {ATTENTION_FIELD}, runs with another are not compared "
             f"[default: ${ATTENTION_ENV} or sdpa]")


def pytest_configure(config) -> None:
    value = config.getoption("sdxl_attention", None)
    if value:
        _chosen["attention"] = value


def pytest_fluxgate_prepare_pipeline(pipe, combo, device) -> None:
    """Set the chosen attention processor on every attention layer of a UNet denoiser (other denoisers are left as
    they are: FLUX's and Z-Image's attention takes its own processors)."""
    if combo.model_spec.denoiser != "unet":
        return
    from diffusers.models import attention_processor

    choice = attention()
    if choice not in PROCESSORS:
        raise ValueError(f"${ATTENTION_ENV}={choice!r}: choose {' or '.join(PROCESSORS)}")
    pipe.unet.set_attn_processor(getattr(attention_processor, PROCESSORS[choice])())


def pytest_fluxgate_environment(environment: dict, device) -> None:
    environment[ATTENTION_FIELD] = attention()


def pytest_fluxgate_comparable_fields() -> list[str]:
    return [ATTENTION_FIELD]
