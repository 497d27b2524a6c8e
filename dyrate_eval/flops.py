"""FLOPs of a generation, counted from the plan it executed (SPEC section 5).

Every matrix product of the language model counts 2 x multiply-accumulates: q/k/v/o
projections with the real head counts, attention scores and values over the keys
present (the full queries x keys product, as the FastV formula counts it), the three
MLP matrices, the LM head for the one position per row whose logits ``generate``
computes, and the scoring rows the executor computes to rank image tokens. The vision
tower and projector are counted separately. ``paper_convention`` gives the prefill-only
figure FastV and the DyRate paper report (per layer 4nd^2 + 2n^2d + 2ndm).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import PruningConfigError
from .methods import PruningPolicy, StepView
from .plan import ExecutedPlan


@dataclass(frozen=True)
class Arch:
    """The dimensions FLOPs depend on."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    image_size: int
    patch_size: int
    # LLaVA-1.5 reads every patch token (the class token is dropped before the projector)
    @property
    def n_img(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_config(cls, config, name: str) -> "Arch":
        text, vision = config.text_config, config.vision_config
        return cls(
            name=name,
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            layers=text.num_hidden_layers,
            heads=text.num_attention_heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            vocab=text.vocab_size,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
        )

    def llava_config(self):
        """A LlavaConfig of this shape (for random-weight models; LLaVA's image token
        id sits 64 below the padded vocabulary's end, as in llava-hf's checkpoints)."""
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(
            hidden_size=self.vision_hidden,
            intermediate_size=self.vision_intermediate,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_hidden // 64,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )
        text = LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=4096,
        )
        return LlavaConfig(vision_config=vision, text_config=text, image_token_id=self.vocab - 64, vision_feature_layer=-2)


# The published LLaVA-1.5 shapes: Vicuna-v1.5 (Llama-2) decoders, CLIP ViT-L/14 at 336 px.
_CLIP_L_336 = {"vision_hidden": 1024, "vision_intermediate": 4096, "vision_layers": 24, "image_size": 336, "patch_size": 14}
ARCHS = {
    "llava-1.5-7b": Arch("llava-1.5-7b", 4096, 11008, 32, 32, 32, 128, 32064, **_CLIP_L_336),
    "llava-1.5-13b": Arch("llava-1.5-13b", 5120, 13824, 40, 40, 40, 128, 32064, **_CLIP_L_336),
    # For timing on a CPU: the 7B's depth, head size and token counts (576 image tokens)
    # at a sixteenth of its width, so a sample takes seconds on 2 cores.
    "llava-1.5-7b-cpu": Arch(
        "llava-1.5-7b-cpu", 256, 688, 32, 2, 2, 128, 32064,
        vision_hidden=128, vision_intermediate=512, vision_layers=24, image_size=336, patch_size=14,
    ),
}


def load_arch(name_or_path: str | Path) -> Arch:
    """A named shape (``llava-1.5-7b``, ``llava-1.5-13b``) or a model folder's config."""
    if str(name_or_path) in ARCHS:
        return ARCHS[str(name_or_path)]
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise PruningConfigError(
            f"--arch {name_or_path!r} is neither a known shape ({', '.join(ARCHS)}) nor a folder with a config.json"
        )
    from transformers import AutoConfig

    return Arch.from_config(AutoConfig.from_pretrained(path), name=path.name)


def layer_flops(arch: Arch, queries: int, keys: int) -> int:
    """One decoder layer's forward for ``queries`` new rows attending over ``keys`` keys."""
    d, hd = arch.hidden, arch.head_dim
    projections = 2 * queries * d * hd * (2 * arch.heads + 2 * arch.kv_heads)  # q and o; k and v
    attention = 4 * queries * keys * arch.heads * hd  # scores and weighted values
    mlp = 6 * queries * d * arch.intermediate  # gate, up and down
    return projections + attention + mlp


def scoring_flops(arch: Arch, keys: int) -> int:
    """One scoring row: the query projection of one token and its scores over ``keys``."""
    return 2 * arch.hidden * arch.heads * arch.head_dim + 2 * arch.heads * arch.head_dim * keys


def vision_flops(arch: Arch) -> int:
    """The CLIP tower on one image: patch embedding and every layer (class token included)."""
    n = arch.n_img + 1
    D, M = arch.vision_hidden, arch.vision_intermediate
    patch_embedding = 2 * arch.n_img * 3 * arch.patch_size**2 * D
    per_layer = 8 * n * D * D + 4 * n * n * D + 4 * n * D * M
    return patch_embedding + arch.vision_layers * per_layer


def projector_flops(arch: Arch) -> int:
    return 2 * arch.n_img * arch.vision_hidden * arch.hidden + 2 * arch.n_img * arch.hidden * arch.hidden


def plan_flops(plan: ExecutedPlan, arch: Arch, row: int = 0, num_steps: int | None = None) -> dict:
    """FLOPs of one row of an executed plan, by part. ``num_steps`` truncates to the
    forwards that belonged to the row (see ``ExecutedPlan.for_row``)."""
    record = plan.for_row(row, num_steps)
    lm_head = 2 * arch.hidden * arch.vocab
    per_step, scoring = [], 0
    for queries, keys, scored in zip(record["queries"], record["keys"], record["scored_keys"]):
        per_step.append(sum(layer_flops(arch, q, k) for q, k in zip(queries, keys)) + lm_head)
        scoring += sum(scoring_flops(arch, k) for k in scored if k)
    language_model = sum(per_step) + scoring
    return {
        "prefill": per_step[0] if per_step else 0,
        "decode": per_step[1:],
        "scoring": scoring,
        "language_model": language_model,
        "vision": vision_flops(arch),
        "projector": projector_flops(arch),
        "total": language_model + vision_flops(arch) + projector_flops(arch),
    }


def paper_convention(plan: ExecutedPlan, arch: Arch, row: int = 0) -> int:
    """Prefill only, per layer 4nd^2 + 2n^2d + 2ndm with n the layer's tokens: the
    figure FastV and the DyRate paper report (multiply-accumulates, two-matrix MLP)."""
    d, m = arch.hidden, arch.intermediate
    return sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in plan.for_row(row, 1)["queries"][0])


def simulate_plan(policy: PruningPolicy, arch: Arch, text_tokens: int, new_tokens: int) -> ExecutedPlan:
    """The plan the executor runs for one sample of ``text_tokens`` prompt tokens besides
    its image, generating ``new_tokens`` tokens (a prefill and new_tokens - 1 decode
    forwards), without a model. ``tests/test_flops.py`` checks it against real runs."""
    n_img = torch.tensor([arch.n_img])
    plan = ExecutedPlan(n_img=n_img)

    def decide(layer: int, step: int, kept_now: int) -> int | None:
        """The policy's new count before ``layer``, or None when nothing changes."""
        keep = policy.keep_before_layer(layer, step, StepView(n_img=n_img, kept=torch.tensor([kept_now])))
        return None if keep is None or int(keep[0]) >= kept_now else int(keep[0])

    def scores(keep: int) -> bool:
        return keep > 0 and policy.ranks_by_attention

    # prefill: drops shorten every later layer's sequence (layer 0 is never pruned)
    kept, scored = [arch.n_img], [0] * arch.layers
    for layer in range(1, arch.layers):
        keep = decide(layer, 0, kept[-1])
        if keep is not None and scores(keep):
            scored[layer - 1] = text_tokens + kept[layer - 1]
        kept.append(kept[-1] if keep is None else keep)
    keys = [text_tokens + count for count in kept]
    plan.add_step(torch.tensor([kept]), torch.tensor([keys]), torch.tensor([keys]), torch.tensor([scored]))

    # decode: one new query per layer; a drop evicts from the caches of every later layer
    for step in range(1, new_tokens):
        keys, scored = [count + 1 for count in keys], [0] * arch.layers
        for layer in range(1, arch.layers):
            keep = decide(layer, step, kept[layer])
            if keep is None:
                continue
            if scores(keep):
                scored[layer - 1] = keys[layer - 1]
            for later in range(layer, arch.layers):
                dropped = max(0, kept[later] - keep)
                kept[later] -= dropped
                keys[later] -= dropped
        plan.add_step(torch.tensor([kept]), torch.tensor([keys]), torch.tensor([[1] * arch.layers]), torch.tensor([scored]))
    return plan
