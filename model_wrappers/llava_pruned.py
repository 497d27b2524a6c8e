"""LLaVA-1.5 with a visual-token reduction method, as an lmms-eval model.

``--model dyrate_llava --model_args pretrained=...,method=fastv,K=2,R=0.5`` runs any
method of the shared core (DyRate when no method is given); ``original_llava``, ``fastv_llava`` and ``vtw_llava`` are
the same model with their method fixed. Prompts use LLaVA-1.5's conversation format.
Data parallel: ``accelerate launch --num_processes N -m lmms_eval ...`` gives each
rank its share of the documents (lmms-eval shards them by rank); on a machine without
GPUs add ``--multi_gpu`` so that accelerate starts N processes (they talk over gloo).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger
from tqdm import tqdm
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from dyrate_eval import EMBEDDED_MODEL_DIR, PruningConfigError, executed_plan
from dyrate_eval.arch import Arch
from dyrate_eval.hf_llava import install
from dyrate_eval.measure import generated_lengths, sample_measurements, timed_generate
from dyrate_eval.methods import DEFAULT_METHOD, LMMS_MODELS, make_policy
from dyrate_eval.pruning import resolve_dtype
from dyrate_eval.prompts import IMAGE_PLACEHOLDER, llava_prompt

# Without pretrained= the wrappers run the embedded model, which works offline; real
# checkpoints (e.g. llava-hf/llava-1.5-7b-hf) are given with pretrained=.
DEFAULT_PRETRAINED = str(EMBEDDED_MODEL_DIR)
DEFAULT_MAX_NEW_TOKENS = 128
# Generation settings a task may give; anything else in gen_kwargs is not for HF generate.
_SAMPLING_KEYS = ("temperature", "top_p", "top_k")


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
        config = AutoConfig.from_pretrained(pretrained)
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
        torch_dtype = resolve_dtype(dtype, self._device)

        self.pretrained = pretrained
        self._model = LlavaForConditionalGeneration.from_pretrained(
            pretrained, dtype=torch_dtype, attn_implementation=attn_implementation, device_map=str(self._device)
        ).eval()
        install(self._model, policy)
        self.method = method
        self.policy_settings = policy.describe()
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.processor.tokenizer.padding_side = "left"  # batched generation
        self.tokenizer = self.processor.tokenizer

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

    def _encode(self, prompts: list[str], images: list) -> dict:
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(self._device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs

    @staticmethod
    def _prompt(context: str, images: list) -> str:
        if IMAGE_PLACEHOLDER in context:
            return llava_prompt(context, num_images=0)
        return llava_prompt(context, num_images=len(images))

    # -- lmms-eval API -------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        # Longest prompts first, grouped by identical generation settings.
        collator = utils.Collator(
            [request.args for request in requests], lambda args: (-len(args[0]), args[0]), grouping=True
        )
        logger.info(f"rank {self.rank}/{self.world_size}: {len(requests)} generation requests, method {self.method}")
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model responding")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
            gen_kwargs = dict(all_gen_kwargs[0])
            prompts, images = [], []
            for context, doc_to_visual, doc_id, task, split in zip(contexts, doc_to_visuals, doc_ids, tasks, splits):
                visuals = list(doc_to_visual(self._doc(task, split, doc_id)))
                prompts.append(self._prompt(context, visuals))
                images.extend(visuals)
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            inputs = self._encode(prompts, images)
            settings = self._generate_settings(gen_kwargs)
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
            self._log_batch(measurements, timing)
        progress.close()
        return collator.get_original(results)

    def _log_batch(self, measurements: list[dict], timing) -> None:
        """Run-level averages: lmms-eval writes the mean of each ``avg_<key>`` over batches
        into the results file's ``throughput`` section (per-task means come from the
        samples logs, see ``dyrate-eval report``)."""
        def mean(key):
            return sum(record[key] for record in measurements) / len(measurements)

        log_metrics(
            total_elapsed_time=timing.end_to_end_ms / 1e3,
            total_gen_tokens=sum(record["new_tokens"] for record in measurements),
            avg_speed=sum(record["new_tokens"] for record in measurements) / max(timing.end_to_end_ms / 1e3, 1e-9),
            additional_metrics={
                "total_requests": len(measurements),
                **{key: mean(key) for key in ("tflops", "flops_ratio", "flops_ratio_language_model", "kept_image_mean", "kv_bytes_peak")},
                "ttft_ms": timing.ttft_ms,
                "decode_ms_per_token": timing.decode_ms_per_token,
            },
        )

    def _generate_settings(self, gen_kwargs: dict) -> dict:
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
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [request.args for request in requests]:
            doc = self._doc(task, split, doc_id)
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = list(doc_to_visual(doc))
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
