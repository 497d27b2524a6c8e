"""Methods timed side by side on the same inputs in one process (SPEC section 5).

Per sample and method: time to first token (vision tower and prefill), decode time per
generated token, end-to-end time, FLOPs from the executed plan, peak KV-cache bytes, the
image tokens kept on average and, on a GPU, peak device memory. Methods run interleaved,
sample by sample, so drifts of the machine hit all of them alike; the first samples are
warm-up and are not reported. The number of new tokens is fixed, so random weights (a
model built from a config, nothing downloaded) time the real shapes faithfully.

With ``peers``, every FastV method is also timed as FastV's peers run it (``PEERS``), so
that the table shows what the core's design buys on the same inputs.
"""

from __future__ import annotations

import pandas as pd
import torch
from tqdm import tqdm

from ..errors import PruningConfigError
from ..arch import ARCHS, Arch
from ..core.hf_llava import install, last_plan
from .timing import paired_ratio, sample_measurements, timed_generate
from ..core.policy import PruningPolicy
from ..methods import FastV, make_policy, parse_settings
from ..dyrate.predictor import RatePredictor


BENCH_COLUMNS = ("ttft_ms", "decode_ms_per_token", "end_to_end_ms", "tflops", "kv_bytes_peak", "device_memory_peak")
# columns a bench CSV carries beside BENCH_COLUMNS (older files lack them)
EXTRA_COLUMNS = ("kept_image_mean", "batch_size")


class MaskedFastV(FastV):
    """FastV masked instead of dropped: the same selection, the dropped image tokens kept
    in the sequence and in every cache and hidden from layers >= K by the attention mask
    (FastV's reference code without its in-place option). Saves no FLOPs; a bench peer."""

    progressive = False


# FastV's peers: label suffix -> (how the executor gets the ranking attention (core.executor.SCORINGS),
# whether dropped tokens are only masked)
PEERS = {
    "eager-weights": ("eager-weights", False),  # FastV's reference: eager attention, layer K-1's weights
    "layer-rerun": ("layer-rerun", False),  # LightCompress: layer K-1 run again for its weights
    "masked": ("row", True),  # FastV's attention-mask variant
}


def random_predictor(arch: Arch, K: int = 2, seed: int = 0) -> RatePredictor:
    """A DyRate predictor with random weights (seeded) for a random-weight model, which has
    no trained one: its choices are arbitrary but made, and paid for, at every step."""
    predictor = RatePredictor.for_model(arch, K)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        predictor.linear.weight.copy_(torch.randn(predictor.linear.weight.shape, generator=generator))
        predictor.linear.bias.copy_(torch.randn(predictor.linear.bias.shape, generator=generator))
    predictor.source = f"random weights (seed {seed})"
    return predictor


def all_methods(arch: Arch) -> str:
    """Every registered method at the paper's settings, for ``--methods all``: FastV K=2
    R=0.5 (and ranked by key norm), VTW at its default K, DyRate, the ablation baselines
    at K=2 R=0.5 (FixedPrune re-selecting at every step), a schedule that halves the
    image tokens at K=2 and again (a quarter) from half the depth on, and PyramidDrop,
    DART, VisionZip, PruMerge+ and SparseVLM at their papers' defaults."""
    n, half = arch.n_img, arch.layers // 2
    counts = [n] * 2 + [n // 2] * max(0, half - 2) + [n // 4] * (arch.layers - max(2, half))
    return ",".join([
        "original", "fastv:K=2:R=0.5", "knorm:K=2:R=0.5", "vtw", "dyrate", "fixed_prune:K=2:R=0.5:mode=mask",
        "depth_prune:K=2:R=0.5", "schedule:schedule=" + "/".join(map(str, counts)), "pdrop", "dart", "visionzip",
        "prumerge:plus=true", "sparsevlm",
    ])


def parse_methods(spec: str, arch: Arch, random_weights: bool = False) -> list[tuple[str, PruningPolicy]]:
    """``original,fastv:K=2:R=0.5,vtw:K=16`` (or ``all``) -> [(label, policy)], validated.
    On a model with random weights, dyrate without predictor= gets ``random_predictor``."""
    methods = []
    if spec.strip() == "all":
        spec = all_methods(arch)
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, *pairs = item.split(":")
        settings = parse_settings(pairs, label=f"method setting {{pair!r}} in {item!r}", example="fastv:K=2:R=0.5")
        label = item
        if name == "dyrate" and random_weights and "predictor" not in settings:
            settings["predictor"] = random_predictor(arch)
            label = f"{item} (random predictor)"
        methods.append((label, make_policy(name, arch, **settings)))
    if not methods:
        raise PruningConfigError("--methods is empty: give e.g. original,fastv:K=2:R=0.5")
    return methods


def with_peers(methods: list[tuple[str, PruningPolicy]]) -> list[tuple[str, PruningPolicy, str]]:
    """(label, policy, scoring) for every method, each FastV followed by its ``PEERS``."""
    runs = []
    for label, policy in methods:
        runs.append((label, policy, "row"))
        # FastV's peers take its attention ranking their way: a subclass ranking by
        # another signal (knorm) has none
        if type(policy) is FastV:
            for peer, (scoring, masked) in PEERS.items():
                values = {setting.name: getattr(policy, setting.name) for setting in FastV.settings}
                # masking keeps the hidden tokens cached with their ids: it cannot renumber, and ids change no work
                masked_values = values | {"positions": "original"}
                runs.append((f"{label} ({peer})", MaskedFastV(policy.arch, masked_values) if masked else policy, scoring))
    return runs


def load_bench_model(pretrained: str | None, arch_name: str | None, random_weights: bool, device: str, dtype: torch.dtype,
                     attention: str | None = None):
    """The model to time and its Arch. Named shapes always get random weights.
    ``attention`` is the attention implementation (default: transformers' choice)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    if arch_name is not None:
        if arch_name not in ARCHS:
            raise PruningConfigError(f"--arch {arch_name!r} is not a known shape: use one of {', '.join(ARCHS)}")
        config = ARCHS[arch_name].llava_config()
    elif random_weights:
        config = AutoConfig.from_pretrained(pretrained)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(pretrained, dtype=dtype, device_map=device).eval()
        if attention:
            model.set_attn_implementation(attention)
        return model, Arch.from_config(model.config, str(pretrained))
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LlavaForConditionalGeneration(config).eval()
        finally:
            torch.set_default_dtype(previous)
    if attention:
        model.set_attn_implementation(attention)
    return model, Arch.from_config(config, arch_name or str(pretrained))


def bench_inputs(model, arch: Arch, text_tokens: int, samples: int, seed: int = 0, batch: int = 1) -> list[dict]:
    """Synthetic samples: BOS, text tokens around one image's tokens, random pixels;
    ``batch`` prompts of the same length per sample."""
    generator = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    device, dtype = model.device, model.dtype
    inputs = []
    for _ in range(samples):
        rows = []
        for _ in range(batch):
            text = torch.randint(3, image_id, (text_tokens - 1,), generator=generator)
            split = text_tokens // 3
            bos = torch.tensor([model.config.text_config.bos_token_id or 1])
            rows.append(torch.cat([bos, text[:split], torch.full((arch.n_img,), image_id), text[split:]]))
        ids = torch.stack(rows)
        pixels = torch.randn((batch, 3, arch.image_size, arch.image_size), generator=generator)
        inputs.append({
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype),
        })
    return inputs


def time_generation(model, arch: Arch, inputs: dict, new_tokens: int) -> dict:
    """One greedy generation of exactly ``new_tokens`` tokens, measured: the call's
    times, the first sample's FLOPs, KV bytes and kept image tokens."""
    _, timing = timed_generate(model, inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    batch = inputs["input_ids"].shape[0]
    record = sample_measurements(last_plan(model), arch, [new_tokens] * batch, 1, timing, model.dtype.itemsize)[0]
    return {key: record[key] for key in BENCH_COLUMNS + EXTRA_COLUMNS}


def run_bench(model, arch: Arch, methods: list[tuple[str, PruningPolicy]], samples: int, new_tokens: int,
              text_tokens: int = 40, warmup: int = 1, peers: bool = False, batch: int = 1) -> pd.DataFrame:
    """A row per (method, measured sample); the first ``warmup`` samples are dropped.
    With ``peers``, each FastV method is followed by its peers (``PEERS``)."""
    runs = with_peers(methods) if peers else [(label, policy, "row") for label, policy in methods]
    rows = []
    inputs = bench_inputs(model, arch, text_tokens, samples + warmup, batch=batch)
    for index, sample in enumerate(tqdm(inputs, desc="bench")):
        for label, policy, scoring in runs:
            install(model, policy, scoring)
            measured = time_generation(model, arch, sample, new_tokens)
            if index >= warmup:
                rows.append({"method": label, "sample": index - warmup, **measured})
    return pd.DataFrame(rows)


_TIMES = ("ttft_ms", "decode_ms_per_token", "end_to_end_ms")


def summarize_bench(rows: pd.DataFrame) -> pd.DataFrame:
    """Medians per method, and each measure's ratio to ``original`` (to the first method
    when original was not run): the median of the per-sample ratios, as methods run
    interleaved sample by sample, so that a drift of the machine between samples cancels
    (``measure.latency.summarize_pairs``' convention). The times' ratios come with their
    quartiles and whether their spread is larger than their effect."""
    columns = ["ttft_ms", "decode_ms_per_token", "end_to_end_ms", "tflops", "kv_bytes_peak"]
    columns += [column for column in ("kept_image_mean",) if column in rows]
    if rows["device_memory_peak"].notna().any():
        columns.append("device_memory_peak")
    order = list(dict.fromkeys(rows["method"]))
    table = rows.groupby("method", sort=False)[columns].median().loc[order]
    reference = "original" if "original" in table.index else order[0]
    reference_rows = rows[rows["method"] == reference].set_index("sample")
    for column in ("ttft_ms", "decode_ms_per_token", "end_to_end_ms", "tflops", "kv_bytes_peak"):
        per_sample = (rows[column] / rows["sample"].map(reference_rows[column])).groupby(rows["method"], sort=False)
        spread = pd.DataFrame([paired_ratio(ratios) for _, ratios in per_sample], index=[method for method, _ in per_sample],
                              columns=[f"{column} ratio", f"{column} ratio q1", f"{column} ratio q3", f"{column} noisy"])
        table = table.join(spread if column in _TIMES else spread[[f"{column} ratio"]])
    return table.reset_index()
