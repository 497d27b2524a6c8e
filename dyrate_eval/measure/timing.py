"""What each generated sample cost (SPEC section 5): FLOPs from the executed plan, time
to first token, decode time per token, end-to-end time and memory.

The lmms-eval wrappers write one record per sample into lmms-eval's samples log, and
``dyrate-eval bench`` times methods side by side with the same functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..arch import Arch
from ..core.simulate import simulate_plan
from .flops import plan_flops
from ..methods import make_policy
from ..core.plan import ExecutedPlan, chosen_rates


class StepClock(LogitsProcessor):
    """Notes the time at which each forward's logits reach the sampler."""

    def __init__(self, synchronize):
        self.synchronize = synchronize
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.synchronize()
        self.times.append(time.perf_counter())
        return scores


@dataclass
class BatchTiming:
    """One ``generate`` call. With several samples in a batch, each waited this long."""

    ttft_ms: float  # vision tower and prefill, up to the first token's logits
    decode_ms_per_token: float
    end_to_end_ms: float
    device_memory_peak: int | None  # bytes, on a GPU


def timed_generate(model, inputs: dict, **generate_kwargs) -> tuple[torch.Tensor, BatchTiming]:
    """``model.generate(**inputs, **generate_kwargs)``, synchronised and timed."""
    on_gpu = model.device.type == "cuda"
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    clock = StepClock(synchronize)
    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
    processors.append(clock)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, logits_processor=processors, **generate_kwargs)
    synchronize()
    end = time.perf_counter()
    decode_steps = len(clock.times) - 1
    timing = BatchTiming(
        ttft_ms=(clock.times[0] - start) * 1e3,
        decode_ms_per_token=(clock.times[-1] - clock.times[0]) * 1e3 / decode_steps if decode_steps else 0.0,
        end_to_end_ms=(end - start) * 1e3,
        device_memory_peak=torch.cuda.max_memory_allocated() if on_gpu else None,
    )
    return output, timing


def paired_ratio(ratios) -> tuple[float, float, float, bool]:
    """Per-sample ratios method / original (a pandas Series) as the tables and the bench
    show them: (median, first quartile, third quartile, whether the spread, the
    interquartile range, is larger than the effect, the median's distance from 1)."""
    q1, median, q3 = ratios.quantile([0.25, 0.5, 0.75])
    return median, q1, q3, bool(q3 - q1 > abs(median - 1))


def generated_lengths(new_tokens: torch.Tensor, eos_token_id: int) -> list[int]:
    """Per sample, the tokens it generated up to and including its first end-of-sequence
    token: the number of forwards that were its own (a finished sample keeps running in
    its batch, padded)."""
    ended = new_tokens == eos_token_id
    first_eos = torch.where(ended.any(1), ended.float().argmax(1) + 1, torch.full_like(ended[:, 0], new_tokens.shape[1], dtype=torch.long))
    return first_eos.tolist()


def peak_kv_bytes(plan: ExecutedPlan, arch: Arch, element_size: int, row: int = 0, num_steps: int | None = None) -> int:
    """The largest KV cache of the row over its steps: a key and a value per entry of
    every layer (the executor's caches hold exactly the plan's keys)."""
    per_entry = 2 * arch.kv_heads * arch.head_dim * element_size
    steps = plan.keys[: num_steps or plan.num_steps]
    return max(int(step[row].sum()) for step in steps) * per_entry


@lru_cache(maxsize=4096)
def original_flops(arch: Arch, text_tokens: int, new_tokens: int) -> tuple[int, int]:
    """What the unpruned model spends on the same prompt and number of new tokens:
    (total, language model)."""
    parts = plan_flops(simulate_plan(make_policy("original", arch), arch, text_tokens, new_tokens), arch)
    return parts["total"], parts["language_model"]


def sample_measurements(plan: ExecutedPlan, arch: Arch, lengths: list[int], num_beams: int, timing: BatchTiming,
                        element_size: int) -> list[dict]:
    """One record per sample of a generate call. With beam search a sample's rows are its
    beams (HF expands the batch sample by sample) and its FLOPs and KV bytes are their sum."""
    records = []
    for sample, length in enumerate(lengths):
        rows = range(sample * num_beams, (sample + 1) * num_beams)
        parts = [plan_flops(plan, arch, row, length) for row in rows]
        first = plan.for_row(rows[0], length)
        text_tokens = first["queries"][0][0] - first["kept_image"][0][0]  # layer 0 sees the text and the image tokens it kept
        total = sum(p["total"] for p in parts)
        language_model = sum(p["language_model"] for p in parts)
        reference, reference_language_model = (num_beams * f for f in original_flops(arch, text_tokens, length))
        kept = torch.tensor(first["kept_image"], dtype=torch.float32)  # (steps, layers)
        rates = chosen_rates(first)
        decisions = {} if all(rate is None for rate in rates) else {
            # DyRate's choices: the rate per step and what its observation layer saw
            "rate_by_step": rates,
            "group_attention_by_step": [[round(v, 4) for v in shares] if shares else None for shares in first["group_attention"]],
        }
        records.append({
            "tflops": total / 1e12,
            "tflops_language_model": language_model / 1e12,
            "tflops_prefill": sum(p["prefill"] for p in parts) / 1e12,
            "tflops_decode": sum(sum(p["decode"]) for p in parts) / 1e12,
            "tflops_scoring": sum(p["scoring"] for p in parts) / 1e12,
            "tflops_vision_projector": sum(p["vision"] + p["projector"] for p in parts) / 1e12,
            "tflops_original": reference / 1e12,
            "flops_ratio": total / reference,
            # the share the papers report: the decoder's work (scoring included), no vision tower
            "flops_ratio_language_model": language_model / reference_language_model,
            "text_tokens": text_tokens,
            "new_tokens": length,
            "image_tokens": first["n_img"],
            # mean over decoder layers, per step (step 0 is the prefill)
            "kept_image_by_step": [round(v, 2) for v in kept.mean(1).tolist()],
            "kept_image_mean": float(kept.mean()),
            # what the deepest layers see, per step: the kept count of FastV / DyRate
            "kept_image_last_layer_by_step": [int(v) for v in kept[:, -1].tolist()],
            **decisions,
            "kv_bytes_peak": sum(peak_kv_bytes(plan, arch, element_size, row, length) for row in rows),
            "ttft_ms": timing.ttft_ms,
            "decode_ms_per_token": timing.decode_ms_per_token,
            "end_to_end_ms": timing.end_to_end_ms,
            "batch_size": len(lengths),
            "device_memory_peak": timing.device_memory_peak,
        })
    return records
