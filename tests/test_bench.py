"""The side-by-side benchmark: what it measures, on the tiny model (no timing targets)."""

import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from dyrate_eval import PruningConfigError, apply_pruning, executed_plan
from dyrate_eval.arch import Arch, load_arch
from dyrate_eval.measure.bench import PEERS, parse_methods, run_bench, summarize_bench, with_peers
from dyrate_eval.measure.flops import layer_flops, plan_flops, scoring_flops
from dyrate_eval.core.hf_llava import install, own_attention
from dyrate_eval.measure.timing import peak_kv_bytes
from dyrate_eval.methods import METHODS, make_policy

from .conftest import load_model
from .reference import greedy


def test_methods_are_parsed_and_validated(tiny_dir):
    arch = load_arch(tiny_dir)  # 4 decoder layers
    labels = [label for label, _ in parse_methods("original, fastv:K=2:R=0.5,vtw:K=3", arch)]
    assert labels == ["original", "fastv:K=2:R=0.5", "vtw:K=3"]
    with pytest.raises(PruningConfigError, match="K='9' is not allowed for method 'fastv'"):
        parse_methods("fastv:K=9", arch)
    with pytest.raises(PruningConfigError, match="method setting 'K2' in 'fastv:K2' must look like NAME=VALUE"):
        parse_methods("fastv:K2", arch)
    with pytest.raises(PruningConfigError, match="unknown method 'fast'"):
        parse_methods("original,fast", arch)


def test_peak_kv_bytes_are_the_cache_tensors(tiny_dir, make_inputs):
    inputs = make_inputs((0,))
    model = apply_pruning(load_model(tiny_dir), method="fastv", K=2, R=0.75)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.past_key_values.layers)
    arch = Arch.from_config(model.config, "tiny")
    assert peak_kv_bytes(executed_plan(model), arch, element_size=4) == cache_bytes


def test_bench_runs_methods_on_the_same_samples(tiny_dir):
    model = load_model(tiny_dir)
    arch = Arch.from_config(model.config, "tiny")
    methods = parse_methods("original,fastv:K=2:R=0.75,vtw:K=1", arch)
    rows = run_bench(model, arch, methods, samples=2, new_tokens=3, text_tokens=12, warmup=1)
    assert rows.groupby("method").size().to_dict() == {"original": 2, "fastv:K=2:R=0.75": 2, "vtw:K=1": 2}
    assert (rows["ttft_ms"] > 0).all() and (rows["end_to_end_ms"] >= rows["ttft_ms"]).all()
    table = summarize_bench(rows).set_index("method")
    assert table.loc["original", "tflops ratio"] == 1.0
    assert table.loc["vtw:K=1", "tflops ratio"] < table.loc["fastv:K=2:R=0.75", "tflops ratio"] < 1.0
    assert table.loc["vtw:K=1", "kv_bytes_peak ratio"] < 1.0


@pytest.mark.parametrize("option,value,allowed", [("--samples", "0", ">= 1"), ("--new-tokens", "0", ">= 1"), ("--warmup", "-1", ">= 0")])
def test_bench_refuses_counts_it_cannot_run(option, value, allowed, capsys):
    from dyrate_eval.cli import main

    with pytest.raises(SystemExit):
        main(["bench", option, value])
    assert f"argument {option}: '{value}' is not a whole number {allowed}" in capsys.readouterr().err


def test_bench_refuses_an_unwritable_out_before_measuring(tiny_dir, tmp_path, capsys):
    from dyrate_eval.cli import main

    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "bench.csv"
    assert main(["bench", "--pretrained", str(tiny_dir), "--samples", "1", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert f"--out {out} is not allowed: it cannot be written (File exists: {tmp_path / 'a_file'})" in captured.err
    assert captured.out == "", "nothing was measured"
    written = tmp_path / "new" / "bench.csv"
    assert main(["bench", "--pretrained", str(tiny_dir), "--methods", "original", "--samples", "1", "--warmup", "0",
                 "--new-tokens", "2", "--out", str(written)]) == 0
    assert len(written.read_text().splitlines()) == 2, "the header and the one sample"


@pytest.mark.parametrize("peer", list(PEERS))
def test_fastv_peers_keep_the_tokens_the_core_keeps(tiny_dir, make_inputs, peer):
    """Each peer ranks by the same attention as the core's scoring row, so it keeps the
    same image tokens and generates the same tokens; what differs is what it costs."""
    inputs = make_inputs((0, 1))
    model = load_model(tiny_dir)
    arch = Arch.from_config(model.config, "tiny")
    [(label, policy)] = parse_methods("fastv:K=2:R=0.75", arch)
    runs = {name: run for name, *run in with_peers([(label, policy)])}
    install(model, policy)
    core_tokens, core_logits, _ = greedy(model, inputs, 4)
    core_plan = executed_plan(model)
    peer_policy, scoring = runs[f"{label} ({peer})"]
    install(model, peer_policy, scoring)
    if peer == "eager-weights":  # the whole language model runs eager attention, as FastV's reference code
        assert model.model.language_model.config._attn_implementation == "eager"
    tokens, logits, _ = greedy(model, inputs, 4)
    plan = executed_plan(model)
    assert torch.equal(tokens, core_tokens)
    torch.testing.assert_close(logits, core_logits, atol=1e-4, rtol=1e-4)
    for row in range(2):
        assert torch.equal(plan.kept_slots(row), core_plan.kept_slots(row))
    keys, core_keys = plan.for_row(0)["keys"][0], core_plan.for_row(0)["keys"][0]
    if peer == "masked":  # the dropped tokens stay in the sequence: every layer holds all keys
        assert keys[-1] == keys[0] > core_keys[-1]
    else:
        assert keys == core_keys
    spent, core_spent = plan_flops(plan, arch)["language_model"], plan_flops(core_plan, arch)["language_model"]
    if peer == "layer-rerun":  # layer K-1 ran twice at the prefill
        n = core_keys[1]
        assert spent - core_spent == layer_flops(arch, n, n) - scoring_flops(arch, n)
    install(model, policy)  # back on the model's own implementation, through its watched twin
    assert own_attention(model) == "sdpa"
    assert model.model.language_model.config._attn_implementation.startswith("sdpa")


def test_layer_rerun_refuses_selections_at_decode_steps(tiny_dir, make_inputs):
    model = load_model(tiny_dir)
    arch = Arch.from_config(model.config, "tiny")
    install(model, make_policy("fixed_prune", arch, K=2, R=0.5, mode="mask"), "layer-rerun")
    with pytest.raises(PruningConfigError, match="can rank only at the prefill"):
        greedy(model, make_inputs((0,)), 3)


def test_bench_times_peers_every_method_and_batches(tiny_dir):
    model = load_model(tiny_dir)
    arch = Arch.from_config(model.config, "tiny")
    methods = parse_methods("all", arch, random_weights=True)
    assert {policy.name for _, policy in methods} == set(METHODS)
    assert "dyrate (random predictor)" in [label for label, _ in methods]
    rows = run_bench(model, arch, methods[:2], samples=1, new_tokens=2, text_tokens=12, warmup=0, peers=True, batch=2)
    assert list(rows["method"]) == ["original", "fastv:K=2:R=0.5"] + [f"fastv:K=2:R=0.5 ({peer})" for peer in PEERS]
    assert (rows["batch_size"] == 2).all()
    table = summarize_bench(rows).set_index("method")
    assert table.loc["fastv:K=2:R=0.5 (masked)", "kv_bytes_peak ratio"] == 1.0
    assert table.loc["fastv:K=2:R=0.5 (masked)", "kept_image_mean"] == table.loc["fastv:K=2:R=0.5", "kept_image_mean"]


def test_gpu_bench_script_writes_the_csv_and_the_table(tiny_dir, tmp_path):
    """scripts/bench_gpu.sh's path, on the CPU with a tiny model folder."""
    script = Path(__file__).parent.parent / "scripts" / "bench_gpu.sh"
    runs, report = tmp_path / "runs", tmp_path / "report"
    done = subprocess.run(
        [str(script), "--shapes", str(tiny_dir), "--batches", "1 2", "--samples", "1", "--warmup", "0", "--new-tokens", "2",
         "--device", "cpu", "--dtype", "float32", "--runs", str(runs), "--report", str(report)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    name = tiny_dir.name
    for batch in (1, 2):
        rows = pd.read_csv(runs / f"{name}_sdpa_b{batch}" / "bench.csv")
        assert set(rows["method"]) >= {"original", "dyrate (random predictor)", "fastv:K=2:R=0.5 (layer-rerun)"}
        assert (rows["batch_size"] == batch).all()
        table = (report / f"bench_{name}_sdpa_b{batch}.md").read_text()
        assert "fastv:K=2:R=0.5 (eager-weights)" in table and "decode_ms_per_token ratio" in table


def test_bench_ratios_pair_each_sample_with_the_originals():
    """A drift of the machine between samples hits the methods of one sample alike: the
    ratios are medians of per-sample ratios, not ratios of medians."""
    times = {"original": [1.0, 2.0, 10.0], "fastv": [1.1, 2.2, 1.0]}
    rows = pd.DataFrame([
        {"method": method, "sample": sample, "ttft_ms": value, "decode_ms_per_token": value, "end_to_end_ms": value,
         "tflops": 1.0, "kv_bytes_peak": 1, "device_memory_peak": None}
        for method, values in times.items() for sample, value in enumerate(values)
    ])
    table = summarize_bench(rows).set_index("method")
    assert table.loc["fastv", "decode_ms_per_token"] == 1.1  # the median time, beside the ratio
    assert table.loc["fastv", "decode_ms_per_token ratio"] == pytest.approx(1.1)  # the medians' ratio would be 0.55
    assert table.loc["fastv", "decode_ms_per_token ratio q1"] == pytest.approx(0.6)
    assert bool(table.loc["fastv", "decode_ms_per_token noisy"]) and not bool(table.loc["original", "decode_ms_per_token noisy"])
