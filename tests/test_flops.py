"""FLOPs from the executed plan, against torch's own FLOP counter and the paper's figures."""

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dyrate_eval import apply_pruning, executed_plan
from dyrate_eval.arch import ARCHS, Arch
from dyrate_eval.core.simulate import simulate_plan
from dyrate_eval.measure.flops import plan_flops
from dyrate_eval.core.hf_llava import install
from dyrate_eval.methods import make_policy

from .conftest import load_model
from .test_decode_eviction import KEEP_PER_STEP, ShrinkingKeep

NEW = 5


def counted_by_torch(model, inputs, new_tokens):
    """FlopCounterMode's count of a generate call. On a CPU it misses SDPA's flash
    kernel unless told how to count it (see NOTES-transformers5.md)."""
    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    }
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "method,settings",
    # every registered method at one setting is in the method matrix; these are the edge settings
    [("fastv", {"K": 1, "R": 0.9}), ("fastv", {"K": 2, "R": 0.75, "selection": "random"})],
)
def test_plan_flops_agree_with_flop_counter_mode(tiny_dir, make_inputs, method, settings):
    inputs = make_inputs((0,))
    model = apply_pruning(load_model(tiny_dir), method=method, **settings)
    measured = counted_by_torch(model, inputs, NEW)
    arch = Arch.from_config(model.config, "tiny")
    counted = plan_flops(executed_plan(model), arch)
    assert len(counted["decode"]) == NEW - 1
    assert abs(counted["total"] - measured) / measured < 0.01, (counted, measured)


def test_decode_eviction_flops_agree_with_flop_counter_mode(tiny_dir, make_inputs):
    inputs = make_inputs((0,))
    model = load_model(tiny_dir)
    arch = Arch.from_config(model.config, "tiny")
    install(model, ShrinkingKeep(arch, {}))
    measured = counted_by_torch(model, inputs, len(KEEP_PER_STEP))
    counted = plan_flops(executed_plan(model), arch)
    assert counted["scoring"] > 0
    assert abs(counted["total"] - measured) / measured < 0.01, (counted, measured)


@pytest.mark.parametrize(
    "method,settings",
    # every registered method at one setting is in the method matrix; these are the edge settings
    [("fastv", {"K": 3, "R": 0.9, "selection": "random"}), ("vtw", {"K": 1})],
)
def test_simulated_plan_is_the_executed_plan(tiny_dir, make_inputs, method, settings):
    inputs = make_inputs((1,))
    model = apply_pruning(load_model(tiny_dir), method=method, **settings)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    arch = Arch.from_config(model.config, "tiny")
    text_tokens = inputs["input_ids"].shape[1] - arch.n_img
    policy = make_policy(method, arch, **settings)
    assert simulate_plan(policy, arch, text_tokens, NEW).for_row(0) == executed_plan(model).for_row(0)


def test_simulated_decode_eviction_is_the_executed_plan(tiny_dir, make_inputs):
    inputs = make_inputs((1,))
    model = load_model(tiny_dir)
    arch = Arch.from_config(model.config, "tiny")
    install(model, ShrinkingKeep(arch, {}))
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=len(KEEP_PER_STEP), min_new_tokens=len(KEEP_PER_STEP), do_sample=False)
    simulated = simulate_plan(ShrinkingKeep(arch, {}), arch, inputs["input_ids"].shape[1] - arch.n_img, len(KEEP_PER_STEP))
    assert simulated.for_row(0) == executed_plan(model).for_row(0)


def flops_cli(*args):
    done = subprocess.run([sys.executable, "-m", "dyrate_eval.cli", "flops", *args], capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize(
    "method_args,low,high",
    [(["--method", "fastv", "--K", "2", "--R", "0.5"], 0.55, 0.58), (["--method", "vtw", "--K", "16"], 0.52, 0.56)],
)
def test_paper_convention_on_the_7b_shape(method_args, low, high):
    """FastV and the DyRate paper report about 55-58% for FastV K=2 R=0.5 on LLaVA-1.5-7B,
    and VTW K=16 near 55%, with about 40 text tokens."""
    code, out, err = flops_cli("--arch", "llava-1.5-7b", *method_args, "--text-tokens", "40", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert low <= report["ratio_paper_convention"] <= high
    assert 0 < report["ratio"] < 1 and report["flops"] < report["flops_original"]
    assert report["image_tokens"] == 576


def test_flops_command_refuses_bad_input():
    code, _, err = flops_cli("--arch", "llava-1.5-7b", "--method", "fastv", "--K", "40")
    assert code == 2 and "K='40' is not allowed for method 'fastv': K must be an integer in 1..31" in err
    code, _, err = flops_cli("--arch", "no-such-model", "--method", "vtw")
    assert code == 2 and "--arch 'no-such-model' is neither a known shape" in err
    code, _, err = flops_cli("--arch", "llava-1.5-7b", "--text-tokens", "-5")
    assert code == 2 and "argument --text-tokens: '-5' is not a whole number >= 0" in err
    code, _, err = flops_cli("--arch", "llava-1.5-7b", "--new-tokens", "-3")
    assert code == 2 and "argument --new-tokens: '-3' is not a whole number >= 1" in err


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-1.5-13b", "llava-1.5-7b-cpu", "llava-1.5-7b-4layers"])
def test_random_weight_configs_have_the_named_shape(name):
    """bench builds its random 7B / 13B models from these configs."""
    arch = ARCHS[name]
    assert Arch.from_config(arch.llava_config(), name) == arch
