"""Shared fixtures: pytester for the plugin tests, and the tiny FLUX.1 pipeline several modules measure."""

import pytest
import torch

# pytester's in-process runs (`runpytest`) drop every module first imported during them, and numpy's, scipy's and
# torch's extension modules and operator libraries cannot be imported twice. The plugin imports the run's modules only
# when a matrix test is collected and the builders and formats when a combo runs (free when unused), so this process
# imports them up front, once.
import fluxgate.gate  # noqa: F401
import fluxgate.measuring.runner  # noqa: F401
import fluxgate.session  # noqa: F401
import fluxgate.showing.publish  # noqa: F401
from fluxgate.matrix import Combo
from fluxgate.models import MODELS
from fluxgate.precisions import PRECISIONS
from fluxgate.weights.tiny import TinySource

pytest_plugins = ["pytester"]

for _model in MODELS.values():
    _model.builder  # noqa: B018 - imported for the reason above
for _precision in PRECISIONS.values():
    _precision.implementation  # noqa: B018


@pytest.fixture(scope="session")
def tiny_flux1(tmp_path_factory):
    """`precision -> FluxPipeline` at toy size on CPU, built exactly as the tiny profile builds it."""
    source, device = TinySource(tmp_path_factory.mktemp("cache"), seed=0), torch.device("cpu")
    model = Combo("flux1-dev", "bf16").model_spec
    components = source.components(model, device)

    def build(precision: str):
        transformer, _ = source.transformer(Combo("flux1-dev", precision), device)
        pipe = model.builder.pipeline_class(transformer=transformer, **components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return build


@pytest.fixture
def tiny_call_kwargs() -> dict:
    return {"prompt": "a red fox", "height": 256, "width": 256, "num_inference_steps": 8, "guidance_scale": 3.5,
            "max_sequence_length": 32, "output_type": "pil"}
