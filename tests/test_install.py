"""The tested dependency set and the core's refusal of a transformers it does not know."""

import re
import tomllib
from pathlib import Path

import pytest
import transformers

from dyrate_eval import PruningConfigError, apply_pruning
from dyrate_eval.core import hf_llava

from .conftest import load_model

REPO = Path(__file__).resolve().parents[1]


def locked_versions() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "requirements.lock").read_text(), flags=re.M)
    return {name.lower(): version for name, version in pins}


def test_the_tested_range_is_the_pyproject_floor_and_the_locked_version():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.search(r">=([\d.]+)", d).group(1) for d in dependencies if d.startswith("transformers"))
    low, high = hf_llava.TESTED_TRANSFORMERS
    assert [int(p) for p in low.split(".")] == [int(p) for p in floor.split(".")] + [0] * (3 - len(floor.split(".")))
    assert locked_versions()["transformers"] == high


def test_the_lock_pins_every_dependency_and_no_torch():
    locked = locked_versions()
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in dependencies:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        assert name == "torch" or name in locked, f"{name} is not in requirements.lock"
    assert not {"torch", "torchvision", "timm"} & set(locked)
    assert not [name for name in locked if name.startswith(("nvidia-", "cuda-")) or name == "triton"]


def _refusal(model) -> str:
    hf_llava._cache_argument.cache_clear()
    try:
        with pytest.raises(PruningConfigError) as error:
            apply_pruning(model, method="fastv", K=2, R=0.5)
    finally:
        hf_llava._cache_argument.cache_clear()
    low, high = hf_llava.TESTED_TRANSFORMERS
    message = str(error.value)
    assert f"transformers {transformers.__version__} " in message
    assert f"tested with transformers {low} to {high}" in message
    assert type(model.model.language_model).__name__.startswith("Drifted"), "a refused model is left as it was"
    return message


def _drifted(module, **methods):
    """Give ``module`` a subclass of its own class with ``methods`` replaced."""
    module.__class__ = type(f"Drifted{type(module).__name__}", (type(module),), methods)


def test_a_language_model_without_a_known_cache_argument_is_refused(tiny_dir):
    model = load_model(tiny_dir)
    _drifted(model.model.language_model, forward=lambda self, input_ids=None, kv_store=None, **kwargs: None)
    assert "no KV cache argument the core knows (cache, past_key_values)" in _refusal(model)


def test_a_decoder_layer_with_other_arguments_is_refused(tiny_dir):
    model = load_model(tiny_dir)
    _drifted(model.model.language_model)
    for layer in model.model.language_model.layers:
        _drifted(layer, forward=lambda self, hidden_states, attention_mask=None, rotary=None, **kwargs: None)
    assert "changed the arguments of DriftedLlamaDecoderLayer.forward (missing: " in _refusal(model)


def test_a_create_causal_mask_with_other_arguments_is_refused(tiny_dir, monkeypatch):
    model = load_model(tiny_dir)
    _drifted(model.model.language_model)
    monkeypatch.setattr(hf_llava, "create_causal_mask", lambda config, inputs_embeds, attention_mask, **kwargs: None)
    assert "changed the arguments of masking_utils.create_causal_mask (missing: " in _refusal(model)
