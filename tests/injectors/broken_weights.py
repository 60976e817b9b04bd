"""A pytest plugin (`-p broken_weights`, with this folder on PYTHONPATH) that breaks one combo's images the way a broken
checkpoint file or kernel would, so a whole `pytest perf` run shows what the gate says about it: the broken-image
tripwire (`fluxgate.judging.tripwire`) must name each breakage with its own line.

FLUXGATE_BREAK_COMBO: the combo id (`flux1-dev[nvfp4]`, `z-image-turbo[fp8-scaled-compile]`).
FLUXGATE_BREAK_KIND: one of KINDS:

  nan              NaN in some weights of the quantized blocks, in the stored format: a bf16 weight row; fp8 codes
                   0x7f (E4M3's NaN); nvfp4 block scales 0x7f (FP4 codes have no NaN); Q8_0 block scales 0x7e00
                   (fp16 NaN). One linear of the first quantized block.
  zeroed-blocks    every quantized-block linear's stored weight bytes zero (a file whose tensors were never written).
  swapped-nibbles  nvfp4 only: every packed FP4 byte with its two nibbles swapped (the odd element read as the even);
                   any other precision is refused (it has no nibbles).
  scale-layout     the block scales read in the wrong layout: nvfp4 `weight_scale` [N, K/16] stored transposed (its
                   bytes read back as [N, K/16]); fp8-scaled per-row `weight_scale` [N] in another row order (the
                   rows' scales rotated by half: a fused linear's parts concatenated in another order); gguf-q8_0
                   blocks read as 32 codes then the fp16 scale (ggml stores the scale first). bf16 is refused.
  half-black       the bottom half of the decoded image black (a decode kernel that wrote only its top half).
  channel-noise    the red plane of the decoded image replaced by uniform noise (a decode or colour-conversion kernel
                   that scribbles over one plane).
  latent-noise     one latent channel replaced by Gaussian noise of its own mean and std as the VAE gets it (a kernel
                   that scribbles over one channel of the final latents).

Weight kinds change the loaded transformer's tensors in place, right after the profile's source made them (tiny:
from the fixture file; synthetic: on the GPU; real: from the user's file), on whatever device they are: every
profile, no format-specific loader touched. Image kinds wrap the pipeline's `vae.decode` while the combo is loaded
(the shared VAE is restored on leaving). It wraps `Runner.loaded`, which `Runner.measure` (the gate) and an A/B
worker both use, so a re-measurement breaks the same way.

Used as a library too (tests/test_tripwire_calibration.py): `break_transformer(transformer, combo, kind)` and
`break_pipeline(pipe, kind)` / `restore_pipeline(pipe)`.
"""

from __future__ import annotations

import os

import torch

from fluxgate.matrix import Combo

WEIGHT_KINDS = ("nan", "zeroed-blocks", "swapped-nibbles", "scale-layout")
IMAGE_KINDS = ("half-black", "channel-noise", "latent-noise")
KINDS = WEIGHT_KINDS + IMAGE_KINDS
NOISE_SEED = 1234  # the noise kinds' generator (CPU, then moved: the same noise on every device)
NOISE_CHANNEL = 0  # the latent channel latent-noise replaces, the image plane channel-noise replaces (red)


class BreakError(ValueError):
    """A breakage that cannot apply to the combo (swapped nibbles of a format without nibbles)."""


def refusal(combo: Combo, kind: str) -> str | None:
    """Why `kind` cannot break `combo`, or None."""
    if kind not in KINDS:
        return f"FLUXGATE_BREAK_KIND={kind!r}: choose one of {', '.join(KINDS)}"
    if kind == "swapped-nibbles" and combo.precision != "nvfp4":
        return (f"FLUXGATE_BREAK_KIND=swapped-nibbles: {combo.id} is {combo.precision}, which packs no two 4-bit "
                "values per byte; only nvfp4 has nibbles to swap")
    if kind == "scale-layout" and combo.precision == "bf16":
        return f"FLUXGATE_BREAK_KIND=scale-layout: {combo.id} is bf16, which stores no scales to lay out wrongly"
    return None


def quantized_linears(transformer: torch.nn.Module, combo: Combo) -> list[tuple[str, torch.nn.Module]]:
    """The linears of the combo's quantized blocks (`ModelSpec.quantized_blocks`), as the precision loaded them: its
    quantized layer, or plain linears for bf16 (the same layers a quantized checkpoint quantizes)."""
    precision = combo.precision_spec
    layer = precision.quantized_layer or torch.nn.Linear
    blocks = combo.model_spec.quantized_blocks
    return [(name, module) for name, module in transformer.named_modules()
            if isinstance(module, layer) and name.startswith(blocks) and module.in_features % precision.block_size == 0]


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's storage as uint8 (a view: writing it writes the tensor), for fp8 and packed formats."""
    return tensor.data.view(torch.uint8) if tensor.dtype != torch.uint8 else tensor.data


def _nan(module: torch.nn.Module, precision: str) -> None:
    with torch.no_grad():
        if precision == "bf16":
            module.weight.data[0] = float("nan")
        elif precision == "fp8-scaled":
            _bytes(module.weight)[0] = 0x7F  # E4M3FN: S.1111.111 is NaN
        elif precision == "nvfp4":
            _bytes(module.weight_scale)[0] = 0x7F  # the row's block scales NaN: every value of the row NaN
        elif precision == "gguf-q8_0":
            blocks = _bytes(module.weight).reshape(module.out_features, -1, 34)
            blocks[0, :, 0], blocks[0, :, 1] = 0x00, 0x7E  # fp16 0x7e00 (little-endian): NaN scale, first row
        else:
            raise BreakError(f"nan: unknown precision {precision}")


def _zero(module: torch.nn.Module, precision: str) -> None:
    with torch.no_grad():
        _bytes(module.weight).zero_()  # bf16 / fp8 / FP4 / Q8_0 (scale 0, codes 0): all-zero bytes are 0.0


def _swap_nibbles(module: torch.nn.Module, precision: str) -> None:
    with torch.no_grad():
        packed = _bytes(module.weight)
        packed.copy_((packed >> 4) | (packed << 4))  # uint8 shifts drop the bits shifted out


def _scale_layout(module: torch.nn.Module, precision: str) -> None:
    with torch.no_grad():
        if precision == "nvfp4":
            scales = _bytes(module.weight_scale)  # [N, K/16]
            scales.copy_(scales.t().contiguous().view(scales.shape))
        elif precision == "fp8-scaled":
            scale = module.weight_scale.data  # [N] fp32
            scale.copy_(torch.roll(scale, scale.numel() // 2))
        elif precision == "gguf-q8_0":
            blocks = _bytes(module.weight).reshape(module.out_features, -1, 34)
            blocks.copy_(torch.roll(blocks, -2, dims=-1))  # codes first, then the scale: the scale read from 2 codes
        else:
            raise BreakError(f"scale-layout: {precision} stores no block scales")


_BREAK = {"nan": _nan, "zeroed-blocks": _zero, "swapped-nibbles": _swap_nibbles, "scale-layout": _scale_layout}


def break_transformer(transformer: torch.nn.Module, combo: Combo, kind: str) -> str:
    """Break `transformer` (the combo's, as its source loaded it) in place; a line saying what was done. Image kinds
    leave it alone. Raises BreakError for a kind the combo cannot have (`refusal`)."""
    problem = refusal(combo, kind)
    if problem:
        raise BreakError(problem)
    if kind in IMAGE_KINDS:
        return f"{kind}: transformer untouched"
    linears = quantized_linears(transformer, combo)
    if not linears:
        raise BreakError(f"{combo.id}: no quantized-block linears found to break")
    chosen = linears[:1] if kind == "nan" else linears
    for _, module in chosen:
        _BREAK[kind](module, combo.precision)
    return f"{kind}: {len(chosen)} of {len(linears)} quantized-block linears ({chosen[0][0]}, ...)"


def _noise(shape, device, dtype, uniform: bool) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(NOISE_SEED)
    values = torch.rand(shape, generator=generator) * 2 - 1 if uniform else torch.randn(shape, generator=generator)
    return values.to(device, dtype)


def _broken_decode(decode, kind: str):
    def call(z, *args, **kwargs):
        if kind == "latent-noise":
            z = z.clone()
            channel = z[:, NOISE_CHANNEL].float()
            z[:, NOISE_CHANNEL] = (_noise(channel.shape, z.device, torch.float32, False) * channel.std()
                                   + channel.mean()).to(z.dtype)
        output = decode(z, *args, **kwargs)
        sample = output.sample if hasattr(output, "sample") else output[0]  # [B, 3, H, W] in [-1, 1]
        if kind == "half-black":
            sample[..., sample.shape[-2] // 2:, :] = -1.0  # -1 is black
        elif kind == "channel-noise":
            plane = sample[:, NOISE_CHANNEL]
            plane.copy_(_noise(plane.shape, plane.device, plane.dtype, True))
        return output

    return call


def break_pipeline(pipe, kind: str) -> None:
    """For an image kind: make `pipe.vae.decode` break its images (an instance attribute on the shared VAE, taken away
    by `restore_pipeline`)."""
    if kind in IMAGE_KINDS:
        pipe.vae.decode = _broken_decode(type(pipe.vae).decode.__get__(pipe.vae), kind)


def restore_pipeline(pipe) -> None:
    if pipe is not None and "decode" in vars(pipe.vae):
        del pipe.vae.decode


class _BreakingSource:
    """The runner's source, with the target combo's transformer broken as it is made."""

    def __init__(self, source, kind: str, log: list):
        self.source, self.kind, self.log = source, kind, log

    def transformer(self, combo, device):
        transformer, origin = self.source.transformer(combo, device)
        self.log.append(break_transformer(transformer, combo, self.kind))
        return transformer, {**origin, "broken_on_purpose": self.log[-1]}

    def __getattr__(self, name):
        return getattr(self.source, name)


class _Broken:
    """`Runner.loaded(combo)` with the combo broken while it is loaded, when it is the target."""

    def __init__(self, held, combo, kind: str):
        self.held, self.combo, self.kind, self.log = held, combo, kind, []

    def __enter__(self):
        runner = self.held.runner
        source = runner.source
        runner.source = _BreakingSource(source, self.kind, self.log)
        try:
            entered = self.held.__enter__()
        finally:
            runner.source = source
        break_pipeline(entered.pipe, self.kind)
        return entered

    def __exit__(self, *exc):
        restore_pipeline(self.held.pipe)
        return self.held.__exit__(*exc)


def install(target: str, kind: str) -> None:
    """Wrap `Runner.loaded` so the combo `target` is broken by `kind` (module docstring)."""
    from fluxgate.measuring import runner

    original = runner.Runner.loaded

    def loaded(self, combo):
        held = original(self, combo)
        return _Broken(held, combo, kind) if combo.id == target else held

    runner.Runner.loaded = loaded


def pytest_configure(config):
    import pytest

    target, kind = os.environ.get("FLUXGATE_BREAK_COMBO"), os.environ.get("FLUXGATE_BREAK_KIND")
    if not target or not kind:
        raise pytest.UsageError("-p broken_weights needs FLUXGATE_BREAK_COMBO=<combo id> and "
                                f"FLUXGATE_BREAK_KIND=<{'|'.join(KINDS)}>")
    combo = Combo.parse(target)
    from fluxgate.models import MODELS
    from fluxgate.precisions import PRECISIONS

    if combo.model not in MODELS or combo.precision not in PRECISIONS or combo.id != target:
        raise pytest.UsageError(f"FLUXGATE_BREAK_COMBO={target!r}: not a combo id like flux1-dev[nvfp4]")
    problem = refusal(combo, kind)
    if problem:
        raise pytest.UsageError(problem)
    install(target, kind)
