"""The weight precisions of the matrix: `PRECISIONS`, one `PrecisionSpec` per precision, from the `fluxgate.precisions`
entry-point group (`fluxgate.registry`; fluxgate's own four are in `fluxgate.precisions.builtin`), and the other
backends that run a precision's file: `BACKENDS`, one `BackendSpec` each, from the `fluxgate.backends` group.

A precision's own format is its default backend (`PrecisionSpec.backend`, "diffusers" for fluxgate's four: diffusers'
quantized layers). Another backend loads the precision's file through that default and then swaps its quantized
layers for its own (`BackendSpec.format` names a `PrecisionFormat` with a `transform`): `fp8-scaled@comfy` runs the
fp8 weights through ComfyUI's comfy-kitchen path. `PrecisionSpec.with_backend` is that backend seen as a precision
(its own format, the same tier), so the loaders, the kernel-path check and the judging need nothing else.

A spec holds the light facts (name, quality tier, file suffix, block size, the file a load-then-transform backend
loads) and names its `PrecisionFormat` (`fluxgate.precisions.spec`), the part that imports torch, diffusers or gguf:
how the file is written and loaded, the quantized layer the loader swaps in, its fast GEMM. Importing this package
imports none of them; `spec.format` imports the implementation the first time a combo needs it.

Adding a precision from outside fluxgate: a module declaring `PrecisionSpec(name=..., tier=..., format="pkg.mod:FORMAT")`
and an entry point naming it (README, "Extending from your own repository").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from fluxgate.registry import BACKENDS_GROUP, PRECISIONS_GROUP, Registry, load_target, marker_name

if TYPE_CHECKING:
    from fluxgate.precisions.spec import PrecisionFormat

__all__ = ["BACKENDS", "PRECISIONS", "TIERS", "BackendSpec", "PrecisionSpec"]

# Similarity limits are set per tier (fluxgate.judging.noise): the reference itself, 8-bit and 4-bit weights.
TIERS = ("reference", "8bit", "4bit")


@dataclass(frozen=True)
class PrecisionSpec:
    """A weight precision as the matrix knows it, without importing its implementation.

    `format` is the `module:attribute` of its `PrecisionFormat`. `file_precision` is None for a file format (the
    profile writes or finds a file in this precision), or the precision whose file a load-then-transform backend loads
    before its format's `transform` (e.g. torchao's fp8 quantizes a loaded bf16 transformer: "bf16"). `requires` names
    the Python packages its format imports, for the skip that says which one is missing. `backend` names what its own
    format is, the default backend of its combos (`BackendSpec` adds others). Raises ValueError for a tier outside
    `TIERS`."""

    name: str
    tier: str  # "reference", "8bit", "4bit": which similarity limits apply
    format: str  # `module:attribute` of its PrecisionFormat
    suffix: str = ".safetensors"  # the checkpoint file's extension (file formats)
    block_size: int = 1  # quantized linears need in_features divisible by this
    file_precision: str | None = None
    requires: tuple[str, ...] = ()
    description: str = ""
    backend: str = "diffusers"
    file_name: str = ""  # the name the generated profiles keep its file under ("": `name`)

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

    def with_backend(self, backend: BackendSpec) -> PrecisionSpec:
        """This precision run by `backend`: its file loaded through this spec (`file_precision`), then `backend`'s
        format's `transform`; or, for a backend with its own file (`BackendSpec.own_file`), that file (kept as
        `<precision>@<backend>`) loaded by the backend's format, then its `transform`. The tier stays, the packages
        add up."""
        own = {"file_precision": None, "file_name": backend.name} if backend.own_file else \
            {"file_precision": self.name}
        return replace(self, format=backend.format, backend=backend.backend, **own,
                       requires=tuple(dict.fromkeys(self.requires + backend.requires)),
                       description=backend.description)


@dataclass(frozen=True)
class BackendSpec:
    """A backend that runs `precision`'s file other than its default: the file loaded by the precision's own format
    (or, `own_file`, by `format` itself), then `format`'s (`module:attribute` of a `PrecisionFormat`) `transform` swaps
    the quantized layers for its own.
    Registered by `name`, `<precision>@<backend>` (what combo ids show: `flux1-dev[fp8-scaled@comfy]`)."""

    precision: str
    backend: str  # a short name, marker and `--backends` value, e.g. "comfy"
    format: str
    requires: tuple[str, ...] = ()
    description: str = ""
    # The generated profiles (tiny, synthetic) write this backend its own file, through its format's `write` and
    # `layout`, where its users' files hold other numbers than the precision's own (ComfyUI's fp8 files: one scale
    # per tensor, where BFL's have one per row); the real profile loads the precision's slot file either way.
    own_file: bool = False

    def __post_init__(self):
        if not self.backend or any(mark in self.backend for mark in "@[]") or self.backend.endswith("-compile"):
            raise ValueError(f"backend {self.backend!r} of {self.precision}: want a short name without @ [ ] "
                             "that does not end in -compile")

    @property
    def name(self) -> str:
        return f"{self.precision}@{self.backend}"

    @property
    def marker(self) -> str:
        return marker_name(self.backend)


PRECISIONS: Registry[PrecisionSpec] = Registry(PRECISIONS_GROUP, PrecisionSpec, "precision")
BACKENDS: Registry[BackendSpec] = Registry(BACKENDS_GROUP, BackendSpec, "backend")


def backends_of(precision: str) -> list[str]:
    """The backend names that run `precision`: its default first, then the registered others."""
    return [PRECISIONS[precision].backend] + [spec.backend for spec in BACKENDS.values() if spec.precision == precision]


def backend_names() -> dict[str, str]:
    """Every backend name -> what it is, for `--backends` and the markers (defaults first)."""
    names = {spec.backend: f"each precision's own format ({spec.backend})" for spec in PRECISIONS.values()}
    for spec in BACKENDS.values():
        names.setdefault(spec.backend, spec.description or spec.name)
    return names


def resolved(precision: str, backend: str = "") -> PrecisionSpec:
    """The spec that runs `precision` with `backend` ("" or its default: the precision's own). Raises KeyError for an
    unknown precision or a backend not registered for it."""
    spec = PRECISIONS[precision]
    return spec if backend in ("", spec.backend) else spec.with_backend(BACKENDS[f"{precision}@{backend}"])


def backend_specs() -> list[PrecisionSpec]:
    """Every registered backend of a registered precision, as the spec that runs it (the kernel-path check's
    formats beside the precisions' own)."""
    return [PRECISIONS[b.precision].with_backend(b) for b in BACKENDS.values() if b.precision in PRECISIONS]


def installed(specs: Iterable[PrecisionSpec] | None = None) -> list[PrecisionSpec]:
    """Of `specs` (default: every registered precision), those whose optional packages are installed: the ones whose
    layers and GEMMs this process can recognise (a precision missing its package has none loaded here)."""
    return [spec for spec in (PRECISIONS.values() if specs is None else specs) if spec.missing_package() is None]


def __getattr__(name: str) -> Any:
    if name == "DTYPE":  # the compute dtype lives with the implementations (torch); kept importable from here
        from fluxgate.precisions.spec import DTYPE

        return DTYPE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
