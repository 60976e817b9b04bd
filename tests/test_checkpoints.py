"""fluxgate.weights.tiny: fixture checkpoints made once per content key, reused, rebuilt when corrupt; and the loader's
errors on broken files."""

import shutil

import gguf
import pytest
import torch
from safetensors.torch import load_file

from fluxgate.errors import FixtureError
from fluxgate.models import MODELS
from fluxgate.precisions import PRECISIONS
from fluxgate.weights import tiny
from fluxgate.weights.loading import load_transformer

MODEL = MODELS["flux1-dev"]
Q8_0 = PRECISIONS["gguf-q8_0"]


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A fixture cache holding flux1-dev in bf16 and gguf-q8_0, and the gguf-q8_0 Checkpoint; tests copy it."""
    cache = tmp_path_factory.mktemp("cache")
    return cache, tiny.ensure(MODEL, Q8_0, seed=0, cache_dir=cache)


@pytest.fixture
def cache(built_cache, tmp_path):
    """A private copy of the built cache, free to damage."""
    shutil.copytree(built_cache[0], tmp_path / "cache")
    return tmp_path / "cache"


def test_first_ensure_builds_the_file_and_records_its_sha256(built_cache):
    _, checkpoint = built_cache
    assert checkpoint.path.is_file() and checkpoint.path.suffix == ".gguf" and not checkpoint.reused
    assert checkpoint.sha256 == tiny.sha256_file(checkpoint.path)
    assert (checkpoint.config_dir / "config.json").is_file()


def test_second_ensure_reuses_the_cached_file(built_cache, cache):
    checkpoint = tiny.ensure(MODEL, Q8_0, seed=0, cache_dir=cache)
    assert checkpoint.reused
    assert checkpoint.sha256 == built_cache[1].sha256


def test_another_seed_never_reuses_the_checkpoint_of_seed_0(tmp_path):
    assert tiny.fixture_dir(MODEL, 1, tmp_path) != tiny.fixture_dir(MODEL, 0, tmp_path)


def test_truncated_cached_file_is_reported_and_rebuilt_intact(built_cache, cache):
    path = tiny.fixture_dir(MODEL, 0, cache) / built_cache[1].path.name
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=f"{path}: cached checkpoint is corrupt"):
        checkpoint = tiny.ensure(MODEL, Q8_0, seed=0, cache_dir=cache)
    assert not checkpoint.reused
    assert checkpoint.sha256 == built_cache[1].sha256 == tiny.sha256_file(path)


def test_quantized_keys_are_the_block_linear_weights_and_nothing_outside_the_blocks():
    with torch.device("meta"):
        state_dict = MODEL.builder.transformer_class(**MODEL.builder.tiny_transformer_config).state_dict()
    keys = tiny.quantized_keys(MODEL, state_dict, Q8_0.block_size)
    assert {"transformer_blocks.0.attn.to_q.weight", "transformer_blocks.1.ff.net.2.weight",
            "transformer_blocks.0.norm1.linear.weight", "single_transformer_blocks.1.proj_out.weight"} <= keys
    # 14 linears per double-stream block, 6 per single-stream block; 2 of each in the tiny config
    assert sum(key.startswith("transformer_blocks.") for key in keys) == 2 * 14
    assert sum(key.startswith("single_transformer_blocks.") for key in keys) == 2 * 6
    assert not {"x_embedder.weight", "context_embedder.weight", "proj_out.weight", "norm_out.linear.weight",
                "time_text_embed.timestep_embedder.linear_1.weight"} & keys
    assert not [key for key in keys if ".norm_" in key], "RMSNorm weights are not linears"


def test_gguf_checkpoint_stores_exactly_the_quantized_keys_as_q8_0(built_cache):
    source = built_cache[1].path.with_name("transformer-bf16.safetensors")
    expected = tiny.quantized_keys(MODEL, load_file(str(source)), Q8_0.block_size)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(built_cache[1].path)).tensors}
    assert {name for name, kind in types.items() if kind == gguf.GGMLQuantizationType.Q8_0} == expected
    assert set(types.values()) == {gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32}


@pytest.mark.parametrize(("precision", "damage"), [
    ("bf16", lambda data: data[: len(data) // 2]),
    ("gguf-q8_0", lambda data: b"GGUF" + bytes(range(256)) * 4),
])
def test_loading_a_broken_checkpoint_raises_one_line_fixture_error_naming_the_file(built_cache, tmp_path, precision,
                                                                                    damage):
    spec = PRECISIONS[precision]
    good = built_cache[1].path.with_name(f"transformer-{precision}{spec.suffix}")
    broken = tmp_path / good.name
    broken.write_bytes(damage(good.read_bytes()))
    with pytest.raises(FixtureError) as error:
        load_transformer(spec, MODEL.builder.transformer_class, broken, built_cache[1].config_dir, torch.device("cpu"))
    message = str(error.value)
    assert "\n" not in message and str(broken) in message
