"""The weight precisions of the matrix: `PRECISIONS`, one `PrecisionSpec` per precision, from the `fluxgate.precisions`
entry-point group (`fluxgate.registry`; fluxgate's own four are in `fluxgate.precisions.builtin`).

A spec holds the light facts (name, quality tier, file suffix, block size, the file a load-then-transform backend
loads) and names its `PrecisionFormat` (`fluxgate.precisions.spec`), the part that imports torch, diffusers or gguf:
how the file is written and loaded, the quantized layer the loader swaps in, its fast GEMM. Importing this package
imports none of them; `spec.format` imports the implementation the first time a combo needs it.

Adding a precision from outside fluxgate: a module declaring `PrecisionSpec(name=..., tier=..., format="pkg.mod:FORMAT")`
and an entry point naming it (README, "Extending from your own repository").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from fluxgate.registry import PRECISIONS_GROUP, Registry, load_target, marker_name

if TYPE_CHECKING:
    from fluxgate.precisions.spec import PrecisionFormat

__all__ = ["PRECISIONS", "TIERS", "PrecisionSpec"]

# Similarity limits are set per tier (fluxgate.judging.noise): the reference itself, 8-bit and 4-bit weights.
TIERS = ("reference", "8bit", "4bit")


@dataclass(frozen=True)
class PrecisionSpec:
    """A weight precision as the matrix knows it, without importing its implementation.

    `format` is the `module:attribute` of its `PrecisionFormat`. `file_precision` is None for a file format (the
    profile writes or finds a file in this precision), or the precision whose file a load-then-transform backend loads
    before its format's `transform` (e.g. torchao's fp8 quantizes a loaded bf16 transformer: "bf16"). `requires` names
    the Python packages its format imports, for the skip that says which one is missing. Raises ValueError for a tier
    outside `TIERS`."""

    name: str
    tier: str  # "reference", "8bit", "4bit": which similarity limits apply
    format: str  # `module:attribute` of its PrecisionFormat
    suffix: str = ".safetensors"  # the checkpoint file's extension (file formats)
    block_size: int = 1  # quantized linears need in_features divisible by this
    file_precision: str | None = None
    requires: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self):
        if self.tier not in TIERS:
            raise ValueError(f"precision {self.name}: tier {self.tier!r} is not one of {', '.join(TIERS)}")

    @property
    def marker(self) -> str:
        """The pytest marker of its combos: `fp8_scaled` for `fp8-scaled`."""
        return marker_name(self.name)

    @cached_property
    def implementation(self) -> PrecisionFormat:
        """The `PrecisionFormat` that `format` names, imported on first use. Raises RegistryError when it cannot be
        imported (a missing optional package among them: `missing_package` tells which)."""
        return load_target(self.format)

    # The format's parts, for code that writes, loads or profiles weights (each imports the implementation).
    write = property(lambda self: self.implementation.write)
    quantization_config = property(lambda self: self.implementation.quantization_config)
    layout = property(lambda self: self.implementation.layout)
    quantized_layer = property(lambda self: self.implementation.quantized_layer)
    packed_shapes = property(lambda self: self.implementation.packed_shapes)
    fast_gemm = property(lambda self: self.implementation.fast_gemm)
    transform = property(lambda self: self.implementation.transform)

    def missing_package(self) -> str | None:
        """The first of `requires` that is not installed, else None (cheap: no import)."""
        from importlib.util import find_spec

        return next((package for package in self.requires if find_spec(package) is None), None)


PRECISIONS: Registry[PrecisionSpec] = Registry(PRECISIONS_GROUP, PrecisionSpec, "precision")


def installed(specs: Iterable[PrecisionSpec] | None = None) -> list[PrecisionSpec]:
    """Of `specs` (default: every registered precision), those whose optional packages are installed: the ones whose
    layers and GEMMs this process can recognise (a precision missing its package has none loaded here)."""
    return [spec for spec in (PRECISIONS.values() if specs is None else specs) if spec.missing_package() is None]


def __getattr__(name: str) -> Any:
    if name == "DTYPE":  # the compute dtype lives with the implementations (torch); kept importable from here
        from fluxgate.precisions.spec import DTYPE

        return DTYPE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
