"""The side-by-side benchmark: what it measures, on the tiny model (no timing targets)."""

import pytest
import torch

from dyrate_eval import PruningConfigError, apply_pruning, executed_plan
from dyrate_eval.arch import Arch, load_arch
from dyrate_eval.bench import parse_methods, run_bench, summarize_bench
from dyrate_eval.measure import peak_kv_bytes

from .conftest import load_model


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
