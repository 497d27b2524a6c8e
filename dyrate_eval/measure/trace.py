"""Step-by-step traces of a few generations, for the report's figures.

For each example image: the unpruned model's share of attention on the system,
image, instruction and response tokens at every generation step (the DyRate paper's
Fig. 2: the image share falls as the answer grows), and which image tokens a method
keeps at every step (Fig. 4). ``dyrate-eval trace`` writes ``trace.json`` and the
example images into a folder that ``dyrate-eval report`` reads beside the lmms-eval runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ..errors import PruningConfigError
from ..core.hf_llava import install, last_plan, uninstall
from ..core.policy import PruningPolicy
from ..core.layout import sum_by_group, token_groups
from ..core.plan import GROUPS, chosen_rates
from ..harness import resolve_dtype
from ..prompts import llava_prompt

TRACE_FILE = "trace.json"


def attention_shares(attentions, input_ids: torch.Tensor, image_token_id: int) -> list[dict[str, float]]:
    """Per generation step, the newest query's attention summed over each token group,
    averaged over layers and heads. ``attentions`` is what ``generate`` returns with
    ``output_attentions=True`` for one sample: per step, per layer (1, heads, q, keys)."""
    prompt = input_ids.shape[1]
    shares = []
    for step in attentions:
        row = torch.stack([layer[0, :, -1].float() for layer in step]).mean(dim=(0, 1))  # (keys,)
        is_image = torch.zeros(1, row.shape[0], dtype=torch.bool, device=row.device)
        is_image[:, :prompt] = input_ids.to(row.device) == image_token_id
        groups = token_groups(is_image, torch.tensor([prompt], device=row.device))[0]
        shares.append(dict(zip(GROUPS, sum_by_group(row, groups).tolist())))
    return shares


def trace_examples(model, processor, policy: PruningPolicy, images: list[Image.Image], prompt: str,
                   max_new_tokens: int) -> list[dict]:
    """Greedy generations of ``prompt`` on each image: unpruned with attentions, then
    with ``policy`` recording the kept image tokens of the last layer per step."""
    examples = []
    for image in images:
        inputs = processor(images=[image], text=[llava_prompt(prompt)], return_tensors="pt").to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id}
        uninstall(model)
        with torch.inference_mode():
            unpruned = model.generate(**inputs, output_attentions=True, return_dict_in_generate=True, **settings)
        install(model, policy)
        with torch.inference_mode():
            pruned = model.generate(**inputs, **settings)
        plan = last_plan(model)
        row = plan.for_row(0)
        prompt_length = inputs["input_ids"].shape[1]
        examples.append({
            "attention_by_step": attention_shares(unpruned.attentions, inputs["input_ids"], model.config.image_token_id),
            "unpruned_response": processor.tokenizer.decode(unpruned.sequences[0, prompt_length:], skip_special_tokens=True).strip(),
            "response": processor.tokenizer.decode(pruned[0, prompt_length:], skip_special_tokens=True).strip(),
            "kept_slots_by_step": [step.nonzero().flatten().tolist() for step in plan.kept_slots(0)],
            # the rate a per-step policy (DyRate) chose, where it chose one
            "rate_by_step": chosen_rates(row),
        })
    return examples


def write_trace(out_dir: str | Path, pretrained: str, policy: PruningPolicy, images: list[Image.Image], names: list[str],
                prompt: str, max_new_tokens: int) -> Path:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if not images:
        raise PruningConfigError("trace needs at least one example image")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # eager attention: the only implementation that returns attention weights
    model = LlavaForConditionalGeneration.from_pretrained(
        pretrained, dtype=resolve_dtype("auto", device), attn_implementation="eager", device_map=str(device)
    ).eval()
    processor = AutoProcessor.from_pretrained(pretrained)
    examples = trace_examples(model, processor, policy, images, prompt, max_new_tokens)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    for index, (image, name, example) in enumerate(zip(images, names, examples)):
        example["name"] = name
        example["image"] = f"example_{index}.png"
        image.save(out_dir / example["image"])
    trace = {"pretrained": pretrained, "policy": policy.describe(), "prompt": prompt, "grid": grid, "examples": examples}
    path = out_dir / TRACE_FILE
    path.write_text(json.dumps(trace, indent=1) + "\n")
    return path
