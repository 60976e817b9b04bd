"""The test matrix: which model x precision x runtime combos exist and which ones a run selects.

Its three axes: the models (`fluxgate.models.MODELS`), the precisions (`fluxgate.precisions.PRECISIONS`) and the
runtimes, defined here (`RUNTIMES`; how each one runs a transformer is `fluxgate.measuring.runtimes`).
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
    """One item of the matrix: a model at a weight precision, run eager or compiled."""

    model: str
    precision: str
    runtime: str = "eager"

    @classmethod
    def parse(cls, combo_id: str) -> "Combo":
        """`flux2-dev[nvfp4]` -> Combo("flux2-dev", "nvfp4"); `flux1-dev[bf16-compile]` -> runtime "compile"."""
        model, _, variant = combo_id.rstrip("]").partition("[")
        for runtime in RUNTIMES.values():
            if runtime.suffix and variant.endswith(runtime.suffix):
                return cls(model, variant.removesuffix(runtime.suffix), runtime.name)
        return cls(model, variant)

    @property
    def variant(self) -> str:
        """Precision and runtime as one name (`fp8-scaled`, `fp8-scaled-compile`): the key of baselines."""
        return self.precision + self.runtime_spec.suffix

    @property
    def id(self) -> str:
        """Test-item id, e.g. `flux2-dev[nvfp4]`, `flux1-dev[fp8-scaled-compile]`."""
        return f"{self.model}[{self.variant}]"

    @property
    def is_reference(self) -> bool:
        """The combo whose image is the model's reference: BF16, eager."""
        return self.precision == "bf16" and self.runtime == "eager"

    @property
    def model_spec(self) -> ModelSpec:
        return MODELS[self.model]

    @property
    def precision_spec(self) -> PrecisionSpec:
        from fluxgate.precisions import PRECISIONS

        return PRECISIONS[self.precision]

    @property
    def runtime_spec(self) -> RuntimeSpec:
        return RUNTIMES[self.runtime]

    @property
    def marks(self) -> tuple[str, ...]:
        """Marker names that select this combo (`-m "flux2_dev and nvfp4 and compile"`)."""
        return ("gpu", self.model_spec.marker, self.precision_spec.marker, self.runtime_spec.marker)


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
           runtimes: list[str] | None = None) -> list[Combo]:
    """Every selected combo, grouped by model with bf16 eager first so each model's reference image exists early; a
    model's combos are the precisions it runs in (`ModelSpec.precisions`)."""
    from fluxgate.precisions import PRECISIONS

    models = list(MODELS) if models is None else models
    precisions = list(PRECISIONS) if precisions is None else precisions
    runtimes = DEFAULT_RUNTIMES if runtimes is None else runtimes
    return [Combo(model, precision, runtime) for model in models for precision in PRECISIONS
            if precision in precisions and MODELS[model].runs(precision) for runtime in RUNTIMES if runtime in runtimes]


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
