"""Methods timed side by side on the same inputs in one process (SPEC section 5).

Per sample and method: time to first token (vision tower and prefill), decode time per
generated token, end-to-end time, FLOPs from the executed plan, peak KV-cache bytes and,
on a GPU, peak device memory. Methods run interleaved, sample by sample, so drifts of
the machine hit all of them alike; the first samples are warm-up and are not reported.
The number of new tokens is fixed, so random weights (a model built from a config,
nothing downloaded) time the real shapes faithfully.
"""

from __future__ import annotations


import pandas as pd
import torch
from tqdm import tqdm

from .errors import PruningConfigError
from .arch import ARCHS, Arch
from .hf_llava import install, last_plan
from .measure import sample_measurements, timed_generate
from .methods import PruningPolicy, make_policy, parse_settings


BENCH_COLUMNS = ("ttft_ms", "decode_ms_per_token", "end_to_end_ms", "tflops", "kv_bytes_peak", "device_memory_peak")


def parse_methods(spec: str, arch: Arch) -> list[tuple[str, PruningPolicy]]:
    """``original,fastv:K=2:R=0.5,vtw:K=16`` -> [(label, policy)], validated."""
    methods = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, *pairs = item.split(":")
        settings = parse_settings(pairs, label=f"method setting {{pair!r}} in {item!r}", example="fastv:K=2:R=0.5")
        methods.append((item, make_policy(name, arch, **settings)))
    if not methods:
        raise PruningConfigError("--methods is empty: give e.g. original,fastv:K=2:R=0.5")
    return methods


def load_bench_model(pretrained: str | None, arch_name: str | None, random_weights: bool, device: str, dtype: torch.dtype):
    """The model to time and its Arch. Named shapes always get random weights."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    if arch_name is not None:
        if arch_name not in ARCHS:
            raise PruningConfigError(f"--arch {arch_name!r} is not a known shape: use one of {', '.join(ARCHS)}")
        config = ARCHS[arch_name].llava_config()
    elif random_weights:
        config = AutoConfig.from_pretrained(pretrained)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(pretrained, dtype=dtype, device_map=device).eval()
        return model, Arch.from_config(model.config, str(pretrained))
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LlavaForConditionalGeneration(config).eval()
        finally:
            torch.set_default_dtype(previous)
    return model, Arch.from_config(config, arch_name or str(pretrained))


def bench_inputs(model, arch: Arch, text_tokens: int, samples: int, seed: int = 0) -> list[dict]:
    """Synthetic samples: BOS, text tokens around one image's tokens, random pixels."""
    generator = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    device, dtype = model.device, model.dtype
    inputs = []
    for _ in range(samples):
        text = torch.randint(3, image_id, (text_tokens - 1,), generator=generator)
        split = text_tokens // 3
        bos = torch.tensor([model.config.text_config.bos_token_id or 1])
        ids = torch.cat([bos, text[:split], torch.full((arch.n_img,), image_id), text[split:]])[None]
        pixels = torch.randn((1, 3, arch.image_size, arch.image_size), generator=generator)
        inputs.append({
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype),
        })
    return inputs


def time_generation(model, arch: Arch, inputs: dict, new_tokens: int) -> dict:
    """One greedy generation of exactly ``new_tokens`` tokens, measured."""
    _, timing = timed_generate(model, inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    record = sample_measurements(last_plan(model), arch, [new_tokens], 1, timing, model.dtype.itemsize)[0]
    return {key: record[key] for key in BENCH_COLUMNS}


def run_bench(model, arch: Arch, methods: list[tuple[str, PruningPolicy]], samples: int, new_tokens: int,
              text_tokens: int = 40, warmup: int = 1) -> pd.DataFrame:
    """A row per (method, measured sample); the first ``warmup`` samples are dropped."""
    rows = []
    inputs = bench_inputs(model, arch, text_tokens, samples + warmup)
    for index, sample in enumerate(tqdm(inputs, desc="bench")):
        for label, policy in methods:
            install(model, policy)
            measured = time_generation(model, arch, sample, new_tokens)
            if index >= warmup:
                rows.append({"method": label, "sample": index - warmup, **measured})
    return pd.DataFrame(rows)


def summarize_bench(rows: pd.DataFrame) -> pd.DataFrame:
    """Medians per method and each method's ratio to ``original`` (to the first method
    when original was not run)."""
    columns = ["ttft_ms", "decode_ms_per_token", "end_to_end_ms", "tflops", "kv_bytes_peak"]
    if rows["device_memory_peak"].notna().any():
        columns.append("device_memory_peak")
    order = list(dict.fromkeys(rows["method"]))
    medians = rows.groupby("method", sort=False)[columns].median().loc[order]
    reference = "original" if "original" in medians.index else order[0]
    ratios = medians / medians.loc[reference]
    table = medians.copy()
    for column in ("ttft_ms", "end_to_end_ms", "tflops", "kv_bytes_peak"):
        table[f"{column} ratio"] = ratios[column]
    return table.reset_index()
