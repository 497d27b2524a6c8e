"""Paired latency of an evaluated run (issue 19): its method timed against the original,
interleaved on the same prompts of the run's tasks, in one process (``dyrate-eval latency``).

For an lmms-eval results file of this project's models (a cell of run_all.sh), the run's
lmms-eval model is built again from its ``--model_args``, the first docs of each of its
tasks are prompted as lmms-eval prompts them, and each sample is generated with the run's
method and with the original, one after the other, with the generation settings the task
ran with (so each answers at its own length). The order swaps from one sample to the
next, so that whatever the first of two generations pays falls on both alike. The first
``warmup`` samples of every task are generated and not recorded. The times come from
``measure.timing.timed_generate``, the clock of the runs' own records.

The pairs go to the run's latency file (``report.runs.latency_file``, read and checked
there), written under a temporary name and renamed when complete. The report shows each
table's latency as the median of the per-sample ratios to the original with their
interquartile range (``summarize_pairs``).
"""

from __future__ import annotations

import functools
import gc
import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch

from ..errors import PruningConfigError
from ..harness import lmms_model_class, task_manager
from ..methods import make_policy
from ..report.runs import LATENCY_COLUMNS, latency_file, read_run_configuration, read_runs
from .timing import generated_lengths, paired_ratio, timed_generate

# the tables' latency measures: label -> (time column of a latency file, unit)
LATENCY_MEASURES = {"latency": ("end_to_end_ms", "ms"), "TTFT": ("ttft_ms", "ms"), "decode": ("decode_ms_per_token", "ms/token")}
# what summarize_pairs gives per table row, in the tables' order
SUMMARY_COLUMNS = [
    column for label, (_, unit) in LATENCY_MEASURES.items()
    for column in (f"{label} ({unit})", f"original {label} ({unit})", f"{label} ratio", f"{label} ratio q1",
                   f"{label} ratio q3", f"{label} noisy")
] + ["answer tokens", "original answer tokens", "latency samples"]


def summarize_pairs(pairs: pd.DataFrame) -> dict:
    """Per measure: the method's and the original's median times, the median of the
    per-sample ratios method / original with its quartiles, and whether the spread
    (the interquartile range) is larger than the effect (the median's distance from 1).
    Decode ratios count the samples where both generations made a decode step. Then
    the median answer lengths, which the end-to-end times include."""
    summary = {}
    for label, (column, unit) in LATENCY_MEASURES.items():
        median, q1, q3, noisy = paired_ratio((pairs[column] / pairs[f"{column}_original"]).dropna())
        summary |= {
            f"{label} ({unit})": pairs[column].median(),
            f"original {label} ({unit})": pairs[f"{column}_original"].median(),
            f"{label} ratio": median,
            f"{label} ratio q1": q1,
            f"{label} ratio q3": q3,
            f"{label} noisy": noisy,
        }
    summary["answer tokens"] = pairs["new_tokens"].median()
    summary["original answer tokens"] = pairs["new_tokens_original"].median()
    summary["latency samples"] = len(pairs)
    return summary


@functools.cache
def task_prompts(task: str, count: int, include_path: str) -> list[tuple[int, str, list]]:
    """The first ``count`` docs of an lmms-eval task as lmms-eval prompts them: (doc id,
    context, images). Built once per process: the cells of a grid share their tasks."""
    from lmms_eval.api.task import Task
    from lmms_eval.tasks import get_task_dict

    task_object = get_task_dict([task], task_manager(task, include_path)).get(task)
    if not isinstance(task_object, Task) or task_object.OUTPUT_TYPE != "generate_until":
        raise PruningConfigError(f"task {task!r} does not generate answers (output_type generate_until): it has no latency to time")
    task_object.build_all_requests(limit=count)
    prompts = []
    # generate_until arguments: (context, generation settings, doc_to_visual, doc_id, task, split)
    for context, _, doc_to_visual, doc_id, _, split in (instance.arguments for instance in task_object.instances):
        images = [image for image in doc_to_visual(task_object.dataset[split][doc_id]) or [] if image is not None]
        prompts.append((doc_id, context, images))
    if len(prompts) < count:
        raise PruningConfigError(f"task {task} has {len(prompts)} docs: too few for the {count} the latency pass asks "
                                 "((--samples + --warmup) x --batch)")
    return prompts


def _timed(model, policy, inputs: dict, settings: dict) -> dict:
    """One generate call of the lmms-eval model with ``policy``, timed."""
    model.use_policy(policy)
    output, timing = timed_generate(model.model, inputs, **settings)
    new_tokens = max(generated_lengths(output[:, inputs["input_ids"].shape[1]:], settings["eos_token_id"]))
    return {
        "new_tokens": new_tokens,
        "ttft_ms": timing.ttft_ms,
        # a one-token answer has no decode step: no time per decoded token (rather than zero)
        "decode_ms_per_token": timing.decode_ms_per_token if new_tokens > 1 else math.nan,
        "end_to_end_ms": timing.end_to_end_ms,
    }


def time_pairs(model, prompts: list[tuple[int, str, list]], settings: dict, warmup: int, batch: int) -> list[dict]:
    """The lmms-eval model's own policy and the original on each sample of ``prompts``
    (``batch`` prompts per generate call), alternating which goes first; the first
    ``warmup`` samples are left out. The model keeps its own policy afterwards."""
    policy, original = model.policy, make_policy("original", model.arch)
    pairs = []
    for index, start in enumerate(range(0, len(prompts), batch)):
        chunk = prompts[start : start + batch]
        inputs = model.encode_requests([context for _, context, _ in chunk], [images for *_, images in chunk])
        method_first = index % 2 == 0
        order = [("method", policy), ("original", original)]
        timed = {}
        for name, each in order if method_first else order[::-1]:
            torch.manual_seed(index)  # a sampling decoding draws the same numbers for both
            timed[name] = _timed(model, each, inputs, settings)
        if index >= warmup:
            pairs.append({
                "sample": index - warmup,
                "doc_ids": " ".join(str(doc_id) for doc_id, _, _ in chunk),
                "first": "method" if method_first else "original",
                **timed["method"],
                **{f"{key}_original": value for key, value in timed["original"].items()},
            })
    model.use_policy(policy)
    return pairs


def measure_run(results_file: Path, rows: list[dict], samples: int, warmup: int, batch: int, include_path: str,
                device: str | None = None) -> pd.DataFrame:
    """The latency file's rows for one run (``rows``: its results file's, from
    ``read_runs``): ``samples`` pairs per task after ``warmup``."""
    configuration = read_run_configuration(results_file)
    prompts = {task: task_prompts(task, (samples + warmup) * batch, include_path) for task in configuration.generation_kwargs}
    decodings = {row["task"]: row["decoding"] for row in rows}
    model = lmms_model_class(configuration.model).create_from_arg_string(
        configuration.model_args, {"batch_size": batch, "device": device})
    try:
        gpu = f" ({torch.cuda.get_device_name(model.device)})" if model.device.type == "cuda" else ""
        conditions = {
            "samples": samples, "warmup": warmup, "batch_size": batch, "device": f"{model.device.type}{gpu}",
            "dtype": str(model.model.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        }
        run = {"results_file": results_file.name, **{key: rows[0][key] for key in ("model", "pretrained", "method", "settings")}}
        table = []
        for task, generation_kwargs in configuration.generation_kwargs.items():
            settings = model.generate_settings(generation_kwargs)
            for pair in time_pairs(model, prompts[task], settings, warmup, batch):
                table.append({**run, "task": task, "decoding": decodings[task], **conditions, **pair})
    finally:
        del model  # its memory freed before the next run's model loads
        gc.collect()
    return pd.DataFrame(table, columns=list(LATENCY_COLUMNS))


def write_latency(results_file: Path, table: pd.DataFrame) -> Path:
    """The run's latency file, whole or not at all: written under a temporary name the
    report never reads, then renamed."""
    path = latency_file(results_file)
    partial = path.with_name(f"{path.name}.partial")
    table.to_csv(partial, index=False)
    partial.replace(path)
    return path


def latency_pass(paths: list[str | Path], samples: int, warmup: int, batch: int = 1, include_path: str = "tasks",
                 device: str | None = None, force: bool = False) -> Iterator[tuple[Path, pd.DataFrame | None]]:
    """Every run under ``paths`` measured and written in turn: (its latency file, its
    pairs), or (the file, None) for a run measured earlier (all are redone with ``force``).
    Every run is checked, as the report checks it, before the first is measured."""
    runs = {file: list(rows) for file, rows in itertools.groupby(read_runs(paths), key=lambda row: row["file"])}
    for file, rows in runs.items():
        results_file = Path(file)
        path = latency_file(results_file)
        if path.exists() and not force:
            yield path, None
            continue
        table = measure_run(results_file, rows, samples, warmup, batch, include_path, device)
        yield write_latency(results_file, table), table
