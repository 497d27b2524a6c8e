"""Where the embedded model's attention ranks image tokens, layer by layer (a diagnostic
for the README's "why FastV loses to a random choice here").

For the caption task's scenes, each layer's attention from the last prompt token (mean
over heads, normalised over the image tokens) is compared with the world's object masks:
the share of that attention on object patches (against the share of patches objects
cover), and what FastV keeping the top half by that layer's attention keeps (K = layer + 1,
R = 0.5): the share of object patches and the number of objects left with no patch at
all, against a random half of the same size.

    python scripts/attention_on_objects.py [--scenes 200] [--pretrained DIR]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from dyrate_eval.embedded import EMBEDDED_MODEL_DIR
from dyrate_eval.prompts import llava_prompt
from dyrate_eval.core.selection import top_slots
from dyrate_eval.embedded.tasks import CAPTION_PROMPT, EVAL_SEED, SCENE_RANGES
from dyrate_eval.embedded.examples import patch_owner
from dyrate_eval.embedded.world import render, sample_scene

RANDOM_DRAWS = 200
RATE = 0.5


def objects_missed(owner: np.ndarray, kept: np.ndarray) -> int:
    """Objects (owner ids > 0) none of whose patches is in ``kept``."""
    present = set(np.unique(owner[owner > 0]))
    return len(present - set(np.unique(owner[kept])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", default=str(EMBEDDED_MODEL_DIR))
    parser.add_argument("--scenes", type=int, default=len(SCENE_RANGES["caption"]))
    args = parser.parse_args()
    model = LlavaForConditionalGeneration.from_pretrained(args.pretrained, dtype=torch.float32, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(args.pretrained)
    rng = np.random.default_rng(0)
    rows = []  # per scene and layer: attention on objects, object patches kept, objects missed (ranked, random)
    cover = []
    for scene_id in list(SCENE_RANGES["caption"])[: args.scenes]:
        scene = sample_scene(scene_id, EVAL_SEED)
        image, mask = render(scene)
        owner = patch_owner(scene, mask)
        on_object = owner > 0
        cover.append(on_object.mean())
        inputs = processor(images=image, text=llava_prompt(CAPTION_PROMPT), return_tensors="pt")
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
        image_rows = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
        keep = round((1 - RATE) * len(image_rows))  # FastV's keep count
        random_missed = np.mean([objects_missed(owner, rng.permutation(len(owner)) < keep) for _ in range(RANDOM_DRAWS)])
        per_layer = []
        for attention in attentions:
            score = attention[0, :, -1, image_rows].mean(0)
            score = score / score.sum()
            kept = top_slots(score[None], torch.ones_like(score[None], dtype=torch.bool), torch.tensor([keep]))[0].numpy()
            per_layer.append((float(score[torch.from_numpy(on_object)].sum()), on_object[kept].sum() / max(on_object.sum(), 1),
                              objects_missed(owner, kept), random_missed))
        rows.append(per_layer)
    table = np.array(rows).mean(axis=0)
    print(f"{args.scenes} caption scenes; object patches: {np.mean(cover):.1%} of the image tokens; "
          f"FastV columns keep the top {1 - RATE:.0%} by the layer's attention (K = layer + 1, R = {RATE:g})")
    print("layer | attention on objects | object patches kept | objects with no patch kept (random half)")
    for layer, (on_objects, kept, missed, random_missed) in enumerate(table):
        print(f"{layer:5d} | {on_objects:20.1%} | {kept:19.1%} | {missed:.2f} ({random_missed:.2f})")


if __name__ == "__main__":
    main()
