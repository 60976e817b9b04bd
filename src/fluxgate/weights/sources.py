"""Where each profile's weights and pipeline components come from: one `Source` per profile, all answering the same
three questions for the runner (`fluxgate.measuring.runner`), which knows only this protocol.

- `tiny` (`tiny.TinySource`): checkpoints made from seeded random weights, written in each precision's real format and
  loaded through diffusers; toy-size text encoders and VAE; the prompt goes through the real tokenizers.
- `synthetic` (`synthetic.SyntheticSource`): the real full-size transformer with seeded random weights made on the
  device and loaded through the same diffusers quantized layers; full-size VAE; text embeddings given directly.
- `real` (`real.RealSource`): the user's checkpoint files and pipeline folders, named in fixtures/models.toml.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fluxgate.errors import SkipCombo
from fluxgate.matrix import Combo
from fluxgate.models import ModelSpec

if TYPE_CHECKING:
    import torch


class Source(Protocol):
    """A profile's weights and components, as the runner asks for them."""

    def transformer(self, combo: Combo, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The combo's transformer, loaded on `device` in the combo's precision, and where it came from (the record's
        `origin`: at least `path`, how it was made; a file's `file` and `sha256`; a real file's `identity`). Raises
        SkipCombo when this profile cannot make it here, FixtureError when its input is broken."""
        ...

    def components(self, model: ModelSpec, device: torch.device) -> dict[str, Any]:
        """The pipeline's other components (scheduler, VAE, text encoders, tokenizers: the pipeline class's keyword
        arguments but `transformer`), on `device`, shared by every precision of the model."""
        ...

    def prompt_kwargs(self, model: ModelSpec, prompt: str, device: torch.device) -> dict[str, Any]:
        """The pipeline call's keyword arguments that stand for `prompt`: the prompt itself, or its embeddings."""
        ...


def load_denoiser(source: Source, combo: Combo, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The combo's denoiser from `source`, in the combo's precision, and its origin. A file format comes from the source
    as it is; a load-then-transform backend (`PrecisionSpec.file_precision`; a combo's non-default backend is one) loads
    that precision's denoiser and then applies its format's `transform` (the origin says so); a backend with its own
    file (`BackendSpec.own_file`) loads that file from the source, then its `transform`. Raises SkipCombo when
    the precision's (or backend's) Python package is missing or its format says this device cannot run it (the reason
    names the package or the device), and what the source raises."""
    from dataclasses import replace

    spec = combo.precision_spec
    what = f"backend {spec.backend} of {spec.name}" if combo.backend else f"precision {spec.name}"
    missing = spec.missing_package()
    if missing:
        raise SkipCombo(f"{combo.id}: {what} needs the Python package {missing!r} (pip install "
                        f"{missing.replace('_', '-')})")
    reason = spec.implementation.unavailable(device) if spec.implementation.unavailable else None
    if reason:
        raise SkipCombo(f"{combo.id}: {what} cannot run on {device}: {reason}")
    if spec.file_precision is None:
        denoiser, origin = source.transformer(combo, device)
        if spec.transform is None:
            return denoiser, origin
        loaded = f"its own {spec.name} file"  # a backend with its own file (`BackendSpec.own_file`)
    else:  # the file's precision by its own default backend (itself a file format or a load-then-transform one)
        denoiser, origin = load_denoiser(source, replace(combo, precision=spec.file_precision, backend=""), device)
        loaded = spec.file_precision
    transformed = spec.transform(denoiser)
    denoiser = denoiser if transformed is None else transformed
    name = combo.variant.removesuffix(combo.runtime_spec.suffix)
    return denoiser, {**origin, "transform": f"{loaded} -> {name} ({spec.format})"}


def for_profile(profile: str, cache_dir: Path, seed: int, models_file: Path) -> Source:
    """The source of `profile` ("tiny": fixtures under `cache_dir`; "synthetic"; "real": the checkpoints `models_file`
    names), weights drawn from `seed`. Raises ValueError for another profile, FixtureError for an unreadable models
    file."""
    if profile == "tiny":
        from fluxgate.weights.tiny import TinySource

        return TinySource(cache_dir, seed)
    if profile == "synthetic":
        from fluxgate.weights.synthetic import SyntheticSource

        return SyntheticSource(seed)
    if profile == "real":
        from fluxgate.weights.real import RealSource

        return RealSource(models_file)
    raise ValueError(f"--profile {profile}: choose tiny, synthetic or real")
