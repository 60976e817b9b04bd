"""The test matrix: which model x precision x backend x runtime combos exist and which ones a run selects.

Its axes: the models (`fluxgate.models.MODELS`), the precisions (`fluxgate.precisions.PRECISIONS`), the backends that
run a precision's file (each precision's own, "diffusers" for fluxgate's, and `fluxgate.precisions.BACKENDS`) and the
runtimes, defined here (`RUNTIMES`; how each one runs a transformer is `fluxgate.measuring.runtimes`).

A combo's id names what is not the default: `flux1-dev[fp8-scaled]` (default backend, eager),
`flux1-dev[fp8-scaled@comfy]` (backend comfy), `flux1-dev[fp8-scaled@comfy-compile]` (and compiled). The part in
brackets, the combo's `variant`, is its key in baselines and trade-offs; history windows compare whole ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fluxgate.models import MODELS, ModelSpec

if TYPE_CHECKING:  # the precisions import diffusers and gguf: only code that writes or loads weights needs them
    from fluxgate.precisions import PrecisionSpec


@dataclass(frozen=True)
class RuntimeSpec:
    """One value of the runtime axis: eager, or the transformer's repeated blocks under torch.compile."""

    name: str
    compiles: bool

    @property
    def marker(self) -> str:
        return self.name

    @property
    def suffix(self) -> str:
        """What the runtime adds to a combo's precision in ids and baseline keys: `fp8-scaled-compile`."""
        return "" if self.name == "eager" else f"-{self.name}"


RUNTIMES: dict[str, RuntimeSpec] = {spec.name: spec for spec in (RuntimeSpec("eager", False),
                                                                RuntimeSpec("compile", True))}
DEFAULT_RUNTIMES = ["eager"]


@dataclass(frozen=True, order=True)
class Combo:
    """One item of the matrix: a model at a weight precision, run by a backend ("": the precision's default), eager or
    compiled. A backend given by its default's name is stored as "" (one combo, one id)."""

    model: str
    precision: str
    runtime: str = "eager"
    backend: str = ""

    def __post_init__(self):
        if self.backend:
            from fluxgate.precisions import PRECISIONS

            if self.precision in PRECISIONS and PRECISIONS[self.precision].backend == self.backend:
                object.__setattr__(self, "backend", "")

    @classmethod
    def parse(cls, combo_id: str) -> "Combo":
        """`flux2-dev[nvfp4]` -> Combo("flux2-dev", "nvfp4"); `flux1-dev[bf16-compile]` -> runtime "compile";
        `flux1-dev[fp8-scaled@comfy-compile]` -> backend "comfy", runtime "compile"."""
        model, _, variant = combo_id.rstrip("]").partition("[")
        runtime = next((spec.name for spec in RUNTIMES.values() if spec.suffix and variant.endswith(spec.suffix)),
                       "eager")
        precision, _, backend = variant.removesuffix(RUNTIMES[runtime].suffix).partition("@")
        return cls(model, precision, runtime, backend)

    @property
    def variant(self) -> str:
        """Precision, backend and runtime as one name (`fp8-scaled`, `fp8-scaled@comfy-compile`): the key of
        baselines."""
        return self.precision + (f"@{self.backend}" if self.backend else "") + self.runtime_spec.suffix

    @property
    def id(self) -> str:
        """Test-item id, e.g. `flux2-dev[nvfp4]`, `flux1-dev[fp8-scaled-compile]`."""
        return f"{self.model}[{self.variant}]"

    @property
    def is_reference(self) -> bool:
        """The combo whose image is the model's reference: BF16, its default backend, eager."""
        return self.precision == "bf16" and self.runtime == "eager" and not self.backend

    @property
    def model_spec(self) -> ModelSpec:
        return MODELS[self.model]

    @property
    def precision_spec(self) -> PrecisionSpec:
        """The spec that runs this combo: the precision's own, or the precision run by the combo's backend
        (`PrecisionSpec.with_backend`: its format, the precision's tier)."""
        from fluxgate.precisions import resolved

        return resolved(self.precision, self.backend)

    @property
    def backend_name(self) -> str:
        """The backend that runs it, the default's name included (`diffusers`, `comfy`)."""
        return self.precision_spec.backend

    @property
    def runtime_spec(self) -> RuntimeSpec:
        return RUNTIMES[self.runtime]

    @property
    def marks(self) -> tuple[str, ...]:
        """Marker names that select this combo (`-m "flux2_dev and nvfp4 and compile"`, `-m comfy`)."""
        from fluxgate.registry import marker_name

        return ("gpu", self.model_spec.marker, self.precision_spec.marker, marker_name(self.backend_name),
                self.runtime_spec.marker)


def parse_names(option: str, value: str | None, known: dict[str, object]) -> list[str]:
    """Comma-separated names from a command-line option, validated against a registry; None means all."""
    if value is None or value.strip() in ("", "all"):
        return list(known)
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{option}: unknown name(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def combos(models: list[str] | None = None, precisions: list[str] | None = None,
           runtimes: list[str] | None = None, backends: list[str] | None = None) -> list[Combo]:
    """Every selected combo, grouped by model with bf16 eager first so each model's reference image exists early; a
    model's combos are the precisions it runs in (`ModelSpec.precisions`), each by the selected backends that run it
    (`backends` None: each precision's default only)."""
    from fluxgate.precisions import PRECISIONS, backends_of

    models = list(MODELS) if models is None else models
    precisions = list(PRECISIONS) if precisions is None else precisions
    runtimes = DEFAULT_RUNTIMES if runtimes is None else runtimes

    def runs(precision: str) -> list[str]:
        names = backends_of(precision)
        return names[:1] if backends is None else [name for name in names if name in backends]

    return [Combo(model, precision, runtime, backend) for model in models for precision in PRECISIONS
            if precision in precisions and MODELS[model].runs(precision) for backend in runs(precision)
            for runtime in RUNTIMES if runtime in runtimes]


def parse_backends(value: str | None) -> list[str] | None:
    """`--backends`: None (unset) keeps each precision's default backend; 'all' or names -> the names. Raises
    ValueError naming an unknown one."""
    from fluxgate.precisions import backend_names

    return None if value is None else parse_names("--backends", value, backend_names())


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """`--shard i/n` (1 <= i <= n) -> (i, n); None means no sharding."""
    if value is None:
        return None
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise ValueError(f"--shard {value}: expected i/n with whole numbers, e.g. 1/2") from None
    if not 1 <= index <= count:
        raise ValueError(f"--shard {value}: i must be between 1 and n (got {index} of {count})")
    return index, count


def shard(selected: list[Combo], index: int, count: int) -> list[Combo]:
    """Shard `index` of `count`: every count-th combo of the selection, so each shard gets a share of every model
    (the expensive models are spread out) and the shards together cover the selection exactly once."""
    return selected[index - 1::count]
