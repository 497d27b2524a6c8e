"""LLaVA-1.5 with a visual-token reduction method, as an lmms-eval model.

``--model dyrate_llava --model_args pretrained=...,method=fastv,K=2,R=0.5`` runs any
method of the shared core (DyRate when no method is given); ``original_llava``, ``fastv_llava`` and ``vtw_llava`` are
the same model with their method fixed. Prompts use LLaVA-1.5's conversation format.
Data parallel: ``accelerate launch --num_processes N -m lmms_eval ...`` gives each
rank its share of the documents (lmms-eval shards them by rank); on a machine without
GPUs add ``--multi_gpu`` so that accelerate starts N processes (they talk over gloo).
The run-level averages in the results file's ``throughput`` section cover every rank.

A doc without an image: ``original`` runs it as a text-only prompt; every other method
selects image tokens and refuses the run before generating anything, naming the task
and the docs, so that no answer is generated and then lost.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger
from tqdm import tqdm
from transformers import AutoProcessor, LlavaForConditionalGeneration

from dyrate_eval import EMBEDDED_MODEL_DIR, PruningConfigError, executed_plan
from dyrate_eval.arch import Arch, llava_config
from dyrate_eval.core.hf_llava import install
from dyrate_eval.core.policy import PruningPolicy
from dyrate_eval.harness import DEFAULT_METHOD, LMMS_MODELS, resolve_dtype
from dyrate_eval.measure.timing import BatchTiming, generated_lengths, sample_measurements, timed_generate
from dyrate_eval.methods import make_policy
from dyrate_eval.prompts import IMAGE_PLACEHOLDER, llava_prompt

# Without pretrained= the wrappers run the embedded model, which works offline; real
# checkpoints (e.g. llava-hf/llava-1.5-7b-hf) are given with pretrained=.
DEFAULT_PRETRAINED = str(EMBEDDED_MODEL_DIR)
DEFAULT_MAX_NEW_TOKENS = 128
# Held in --output_path by the run writing there (see _claim_output_path).
OUTPUT_LOCK = ".dyrate-eval-run.lock"
# Generation settings a task may give; anything else in gen_kwargs is not for HF generate.
_SAMPLING_KEYS = ("temperature", "top_p", "top_k")


def _output_path(argv: list[str]) -> Path | None:
    """lmms-eval's --output_path, refused when it cannot be written: lmms-eval writes its
    results only when every doc is done, and then only warns when it cannot."""
    # no abbreviations: dyrate-eval's own commands build these models too, and their
    # --out would otherwise read as --output_path
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_path")
    output_path = parser.parse_known_args(argv)[0].output_path
    if not output_path:
        return None
    path = Path(output_path).absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "is not a folder" if not existing.is_dir() else "cannot be written by this user"
        raise PruningConfigError(
            f"--output_path {output_path} is not allowed: {existing} {why}, so the results would be lost after the "
            "whole run; allowed is a folder this user can create or write"
        )
    return path


def _claim_output_path(path: Path):
    """One run at a time per output folder: two runs stamped the same second write one
    results file and mix their samples logs. The lock lives as long as the returned
    file stays open (the process)."""
    path.mkdir(parents=True, exist_ok=True)
    lock = (path / OUTPUT_LOCK).open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise PruningConfigError(
            f"--output_path {path} is not allowed: another run is writing into it (it holds {path / OUTPUT_LOCK}); "
            "give each run its own --output_path"
        ) from None
    return lock


def _is_padding(request: Instance) -> bool:
    """Whether lmms-eval added the request only to give every rank as many as the others."""
    return isinstance(request.metadata, dict) and bool(request.metadata.get("__padding_only__"))


def _batch_metrics(measurements: list[dict], timing: BatchTiming) -> dict:
    """What ``log_metrics`` takes for one generate call: totals and the samples' means."""
    def mean(key):
        return sum(record[key] for record in measurements) / len(measurements)

    new_tokens = sum(record["new_tokens"] for record in measurements)
    return {
        "total_elapsed_time": timing.end_to_end_ms / 1e3,
        "total_gen_tokens": new_tokens,
        "avg_speed": new_tokens / max(timing.end_to_end_ms / 1e3, 1e-9),
        "additional_metrics": {
            "total_requests": len(measurements),
            **{key: mean(key) for key in ("tflops", "flops_ratio", "flops_ratio_language_model", "kept_image_mean", "kv_bytes_peak")},
            "ttft_ms": timing.ttft_ms,
            "decode_ms_per_token": timing.decode_ms_per_token,
        },
    }


@dataclass
class MeasuredTokenCounts(TokenCounts):
    """Token counts with the sample's measurements (FLOPs, latency, kept tokens, memory)
    attached: lmms-eval writes ``to_dict()`` into each sample's ``token_counts`` entry of
    the samples log, which is where the report joins them to the scores by task and doc id."""

    measurements: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "dyrate": self.measurements}


class PrunedLlava(lmms):
    is_simple = True
    lmms_name = "dyrate_llava"  # its entry in LMMS_MODELS says which method it runs

    def __init__(
        self,
        pretrained: str = DEFAULT_PRETRAINED,
        method: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **method_settings,
    ) -> None:
        super().__init__()
        method = self._resolve_method(method)
        if pretrained == DEFAULT_PRETRAINED and not (EMBEDDED_MODEL_DIR / "config.json").is_file():
            raise PruningConfigError(
                f"the embedded model is missing from {EMBEDDED_MODEL_DIR}: train it with "
                f"`dyrate-eval train-embedded --out {EMBEDDED_MODEL_DIR}` or give pretrained="
            )
        output_path = _output_path(sys.argv[1:])
        config = llava_config(pretrained)
        # Validate the method against the model's shape before loading any weights.
        self.arch = Arch.from_config(config, name=str(pretrained))
        policy = make_policy(method, self.arch, **method_settings)
        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError:
            raise PruningConfigError(f"batch_size={batch_size!r} is not allowed: batch_size must be a positive integer") from None
        if self.batch_size_per_gpu < 1:
            raise PruningConfigError(f"batch_size={batch_size!r} is not allowed: batch_size must be a positive integer")

        on_cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
        # cpu=True makes a multi-process launch use gloo (MULTI_CPU) instead of looking for GPUs
        self.accelerator = Accelerator(cpu=on_cpu)
        if self.accelerator.num_processes > 1:
            self._device = self.accelerator.device
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        # One claim per run, however many ranks: the launcher's RANK says which is first
        # (the accelerator made here counts one process; lmms-eval sets the ranks later)
        if output_path and int(os.environ.get("RANK", 0)) == 0:
            self._output_lock = _claim_output_path(output_path)
        torch_dtype = resolve_dtype(dtype, self._device)

        self.pretrained = pretrained
        self._model = LlavaForConditionalGeneration.from_pretrained(
            pretrained, dtype=torch_dtype, attn_implementation=attn_implementation, device_map=str(self._device)
        ).eval()
        install(self._model, policy)
        self.policy = policy
        # lmms-eval's evaluate() ends by deleting a model's modules (to free memory for a
        # judge model); a model evaluated again (the schedule searches) keeps them
        self.keep_weights = False
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.processor.tokenizer.padding_side = "left"  # batched generation
        self.tokenizer = self.processor.tokenizer

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "PrunedLlava":
        # lmms-eval passes its own --batch_size, --max_batch_size and --device beside
        # --model_args; a name in both would end in a TypeError about multiple values
        given = utils.simple_parse_args_string(arg_string)
        from_options = {key for key, value in (additional_config or {}).items() if value is not None}
        clashing = sorted(from_options & set(given))
        if clashing:
            key = clashing[0]
            raise PruningConfigError(
                f"{key}={given[key]} is not allowed in --model_args: lmms-eval sets {key} with its own option; "
                f"give --{key} {given[key]} instead"
            )
        return super().create_from_arg_string(arg_string, additional_config)

    def _resolve_method(self, method: str | None) -> str:
        fixed_method = LMMS_MODELS[self.lmms_name]
        if fixed_method is None:
            return method or DEFAULT_METHOD
        if method not in (None, fixed_method):
            raise PruningConfigError(
                f"method={method!r} is not allowed for this model: it always runs {fixed_method!r}; "
                "use --model dyrate_llava to choose the method"
            )
        return fixed_method

    def use_policy(self, policy: PruningPolicy) -> None:
        """Run ``policy`` from the next request on (the model stays loaded)."""
        install(self._model, policy)
        self.policy = policy

    def clean(self) -> None:
        if not self.keep_weights:
            super().clean()

    @property
    def method(self) -> str:
        return self.policy.name

    @property
    def policy_settings(self) -> dict:
        """What each sample records as its policy (the report checks it against the run's settings)."""
        return self.policy.describe()

    @property
    def model(self) -> LlavaForConditionalGeneration:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # -- inputs ------------------------------------------------------------------

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    @staticmethod
    def _visuals(doc_to_visual, doc) -> list:
        return [visual for visual in doc_to_visual(doc) or [] if visual is not None]

    def _refuse_docs_without_image(self, requests: list[Instance]) -> None:
        """Before any generation: a method that selects image tokens cannot run a doc
        without an image, and failing mid-run would lose every answer before it. Each
        doc's visuals are drawn here once more; a doc's image costs far less than its answer."""
        if not self.policy.needs_image:
            return
        missing: dict[str, list] = {}
        for request in requests:
            *_, doc_to_visual, doc_id, task, split = request.args
            if not self._visuals(doc_to_visual, self._doc(task, split, doc_id)):
                missing.setdefault(task, []).append(doc_id)
        if missing:
            named = "; ".join(f"task {task} doc {', '.join(map(str, sorted(set(ids))))}" for task, ids in missing.items())
            raise PruningConfigError(
                f"method {self.method!r} prunes image tokens, and these docs have no image: {named}. Nothing was "
                "generated. Only method 'original' runs docs without an image: run them with original_llava, or "
                "evaluate the method on docs that all have one"
            )

    def _encode(self, prompts: list[str], images: list) -> dict:
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(self._device)
        if "pixel_values" in inputs:  # not for a batch of text-only prompts
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs

    def encode_requests(self, contexts: list[str], visuals: list[list]) -> dict:
        """Inputs for requests' contexts and images, prompted as ``generate_until`` prompts them."""
        prompts = [self._prompt(context, images) for context, images in zip(contexts, visuals)]
        return self._encode(prompts, [image for images in visuals for image in images])

    @staticmethod
    def _prompt(context: str, images: list) -> str:
        if IMAGE_PLACEHOLDER in context:
            return llava_prompt(context, num_images=0)
        return llava_prompt(context, num_images=len(images))

    # -- lmms-eval API -------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        self._refuse_docs_without_image(requests)
        # Longest prompts first, grouped by identical generation settings; each request's
        # args carry whether lmms-eval added it only to even out the ranks' shares.
        collator = utils.Collator(
            [(*request.args, _is_padding(request)) for request in requests], lambda args: (-len(args[0]), args[0]), grouping=True
        )
        logger.info(f"rank {self.rank}/{self.world_size}: {len(requests)} generation requests, method {self.method}")
        results, batch_metrics = [], []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model responding")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits, padding = zip(*chunk)
            gen_kwargs = dict(all_gen_kwargs[0])
            prompts, images = [], []
            for context, doc_to_visual, doc_id, task, split in zip(contexts, doc_to_visuals, doc_ids, tasks, splits):
                visuals = self._visuals(doc_to_visual, self._doc(task, split, doc_id))
                prompts.append(self._prompt(context, visuals))
                images.extend(visuals)
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            inputs = self._encode(prompts, images)
            settings = self.generate_settings(gen_kwargs)
            output, timing = timed_generate(self._model, inputs, **settings)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            lengths = generated_lengths(new_tokens, self.tokenizer.eos_token_id)
            measurements = sample_measurements(
                executed_plan(self._model), self.arch, lengths, settings["num_beams"], timing, self._model.dtype.itemsize
            )
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for context, text, record in zip(contexts, texts, measurements):
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                text = text.strip()
                counts = MeasuredTokenCounts(input_tokens=record["text_tokens"] + record["image_tokens"],
                                             output_tokens=record["new_tokens"], measurements={"policy": self.policy_settings, **record})
                results.append(GenerationResult(text, token_counts=counts))
                self.cache_hook.add_partial("generate_until", (context, all_gen_kwargs[0]), text)
                progress.update(1)
            counted = [record for record, pad in zip(measurements, padding) if not pad]
            if counted:
                batch_metrics.append(_batch_metrics(counted, timing))
        progress.close()
        self._log_metrics(batch_metrics)
        return collator.get_original(results)

    def _log_metrics(self, batch_metrics: list[dict]) -> None:
        """Run-level averages: lmms-eval writes the mean of each ``avg_<key>`` over the
        logged batches into the results file's ``throughput`` section (per-task means come
        from the samples logs, see ``dyrate-eval report``). Only rank 0 writes that file,
        so with several ranks every rank's batches are gathered first (each rank calls
        generate_until once: lmms-eval evens out the ranks' shares with padding requests,
        which are left out here)."""
        if self.world_size > 1:
            gathered = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, batch_metrics)
            batch_metrics = [metrics for rank_metrics in gathered for metrics in rank_metrics]
        for metrics in batch_metrics:
            log_metrics(**metrics)

    def generate_settings(self, gen_kwargs: dict) -> dict:
        """HF ``generate`` settings for a task's generation settings (``dyrate-eval latency``
        generates with them too)."""
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
        settings = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if do_sample:
            settings.update({key: gen_kwargs[key] for key in _SAMPLING_KEYS if gen_kwargs.get(key) is not None})
        else:  # the checkpoint's generation_config may carry sampling defaults
            settings.update({"temperature": None, "top_p": None, "top_k": None})
        return settings

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        self._refuse_docs_without_image(requests)
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [request.args for request in requests]:
            doc = self._doc(task, split, doc_id)
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = self._visuals(doc_to_visual, doc)
            prompt = self._prompt(context, visuals)
            inputs = self._encode([f"{prompt} {continuation}"], visuals)
            prompt_length = self._encode([prompt], visuals)["input_ids"].shape[1]
            with torch.inference_mode():
                logits = self._model(**inputs).logits[0, prompt_length - 1 : -1].float()
            targets = inputs["input_ids"][0, prompt_length:]
            log_probs = logits.log_softmax(-1).gather(1, targets[:, None]).sum()
            results.append((float(log_probs), bool((logits.argmax(-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported by the dyrate-eval LLaVA models")


class DyRateLlava(PrunedLlava):
    """Any method of the core, chosen with ``method=`` (default: dyrate, with the
    predictor shipped for the embedded model, or ``predictor=DIR``)."""


class OriginalLlava(PrunedLlava):
    lmms_name = "original_llava"


class FastVLlava(PrunedLlava):
    lmms_name = "fastv_llava"


class VTWLlava(PrunedLlava):
    lmms_name = "vtw_llava"
