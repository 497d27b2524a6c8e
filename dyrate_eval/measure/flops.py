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

import torch

from ..arch import Arch
from ..core.plan import ExecutedPlan
from ..core.simulate import simulate_plan
from ..errors import PruningConfigError
from ..methods import make_policy


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
    scoring += sum(record["decision_flops"])
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


def kept_count_flops(arch: Arch, K: int, text_tokens: torch.Tensor, n_img: torch.Tensor, kept: torch.Tensor,
                     steps: torch.Tensor, decision_flops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Language-model FLOPs of generations whose layers >= K see ``kept`` (B, T) image
    tokens at each step (layers < K see all ``n_img``), each row running ``steps`` (B,)
    of them, with a scoring row at layer K-1 and a decision at every step (DyRate,
    progressive); and of the unpruned model on the same prompts and lengths. Arithmetic
    only, so ``kept`` may carry gradients (DyRate's training); with whole counts it is
    what ``plan_flops`` counts for such a run (a test checks it). Returns ((B,), (B,))."""
    lm_head = 2 * arch.hidden * arch.vocab
    n_full = text_tokens + n_img  # (B,)
    step_index = torch.arange(kept.shape[1], device=kept.device)
    valid = step_index[None] < steps[:, None]  # (B, T)
    seen = step_index[None] + text_tokens[:, None]  # (B, T): prompt text and response tokens before the query
    full = n_full[:, None] + step_index[None]  # keys of the unpruned layers at each step
    pruned_keys = seen + kept
    queries = torch.where(step_index[None] == 0, pruned_keys, torch.ones_like(pruned_keys))
    full_queries = torch.where(step_index[None] == 0, full, torch.ones_like(full))
    unpruned_part = K * layer_flops(arch, full_queries, full) + lm_head
    pruned = unpruned_part + (arch.layers - K) * layer_flops(arch, queries, pruned_keys)
    pruned = pruned + scoring_flops(arch, full) + decision_flops
    original = arch.layers * layer_flops(arch, full_queries, full) + lm_head
    return (pruned * valid).sum(1), (original * valid).sum(1)


def paper_convention(plan: ExecutedPlan, arch: Arch, row: int = 0) -> int:
    """Prefill only, per layer 4nd^2 + 2n^2d + 2ndm with n the layer's tokens: the
    figure FastV and the DyRate paper report (multiply-accumulates, two-matrix MLP)."""
    d, m = arch.hidden, arch.intermediate
    return sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in plan.for_row(row, 1)["queries"][0])


def rate_for_share(method: str, arch: Arch, share: float, samples: list[tuple[int, int]], **settings) -> float:
    """The rate R at which ``method`` (any method with a rate setting R and a plan
    fixed before it runs: fastv, fixed_prune, depth_prune) spends ``share`` of the
    unpruned language-model FLOPs on ``samples`` (text tokens, new tokens), found by
    bisection: its share falls as R grows. Gives a FLOPs-matched baseline for a method
    that chooses its own rate."""
    def spent(policy) -> int:
        return sum(plan_flops(simulate_plan(policy, arch, text, new), arch)["language_model"] for text, new in samples)

    full = spent(make_policy("original", arch))

    def share_at(rate: float) -> float:
        return spent(make_policy(method, arch, R=rate, **settings)) / full

    low, high = 0.0, 1.0
    if not share_at(high) <= share <= share_at(low):
        raise PruningConfigError(
            f"no rate of {method} with {settings} spends {share:.1%} of the FLOPs on these samples: "
            f"its shares run from {share_at(high):.1%} (R=1) to {share_at(low):.1%} (R=0)"
        )
    for _ in range(20):  # rates are rounded to whole tokens; 2^-20 is far below one token
        middle = (low + high) / 2
        low, high = (middle, high) if share_at(middle) > share else (low, middle)
    return round((low + high) / 2, 4)
