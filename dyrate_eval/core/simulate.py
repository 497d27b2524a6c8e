"""The plan the executor runs, without a model: for FLOPs before a run (the schedule
searches' budgets, FLOPs-matched rates, ``dyrate-eval flops``). It asks the policy the
same questions through the same rules as the executor (``selection.applied_keep``, the
policy's ``score``), so there is no second copy of a method's decisions;
``tests/test_flops.py`` and the method matrix check it against real runs."""

from __future__ import annotations

import torch

from ..arch import Arch
from ..errors import PruningConfigError
from .merging import merge_flops
from .plan import ExecutedPlan
from .policy import PruningPolicy, Ranking, RankingSignals, StepView, VisionSignals
from .selection import applied_keep


class _SimulatedSignals(RankingSignals):
    """Zeros of the executor's shapes for one sample; records what the executor's
    signals would cost: ``scored_keys`` for the attention row, ``flops`` for the rest."""

    def __init__(self, arch: Arch, layer: int, step: int, scored_keys: int):
        candidates = torch.ones(1, arch.n_img, dtype=torch.bool)
        super().__init__(layer, step, candidates, torch.zeros(1, arch.n_img, dtype=torch.long))
        self._arch, self._would_score = arch, scored_keys
        self.scored_keys = 0
        self.flops = 0

    def attention(self):
        self.scored_keys = self._would_score
        return torch.zeros(1, self._arch.n_img)

    def keys(self):
        return torch.zeros(1, self._arch.kv_heads, self._arch.n_img, self._arch.head_dim)

    def hidden(self):
        return torch.zeros(1, self._arch.n_img, self._arch.hidden)

    def instruction_attention(self):
        raise PruningConfigError(
            "a ranking by the instruction's attention costs a scoring row per instruction token, which a simulation "
            "without the prompt cannot count: its FLOPs come from a run"
        )

    def add_flops(self, flops):
        self.flops += int(flops if isinstance(flops, int) else flops.reshape(-1)[0])


class _SimulatedVisionSignals(VisionSignals):
    """Zeros of the executor's shapes for the stage before the decoder, one sample; records its costs."""

    def __init__(self, arch: Arch):
        super().__init__(arch.n_img, arch.image_size // arch.patch_size)
        self._arch = arch
        self.flops = 0

    def cls_attention(self):
        self.add_flops(2 * self._arch.vision_hidden * (self._arch.n_img + 1))
        return torch.zeros(1, self._arch.n_img)

    def keys(self):
        return torch.zeros(1, self._arch.n_img, self._arch.vision_head_dim)

    def features(self):
        return torch.zeros(1, self._arch.n_img, self._arch.hidden)

    def add_flops(self, flops):
        self.flops += int(flops if isinstance(flops, int) else flops.reshape(-1)[0])


def _before_decoder(policy: PruningPolicy, arch: Arch) -> tuple[int, int]:
    """(image tokens entering the decoder, FLOPs of the stage before it) for one sample."""
    if not policy.reduces_before_decoder:
        return arch.n_img, 0
    signals = _SimulatedVisionSignals(arch)
    reduction = policy.reduce_before_decoder(signals)
    if reduction is None:
        return arch.n_img, signals.flops
    kept = int(reduction.kept.sum())
    merging = 0 if reduction.merge_weights is None else merge_flops(kept, arch.n_img, arch.hidden)
    return kept, signals.flops + merging


def simulate_plan(policy: PruningPolicy, arch: Arch, text_tokens: int, new_tokens: int) -> ExecutedPlan:
    """The plan the executor runs for one sample of ``text_tokens`` prompt tokens besides
    its image, generating ``new_tokens`` tokens (a prefill and new_tokens - 1 decode
    forwards). Policies that decide how many from the attention (DyRate, PruMerge) have no plan
    before they run."""
    n_img = torch.tensor([arch.n_img])
    if any(policy.observes(layer, step) for layer in range(arch.layers) for step in range(min(new_tokens, 2))):
        raise PruningConfigError(
            f"method {policy.name!r} decides how many tokens to keep from what each input's attention shows: its FLOPs "
            "come from a run (the samples log of an lmms-eval run, or `dyrate-eval bench`), not from a simulation"
        )
    plan = ExecutedPlan(n_img=n_img)
    view = StepView(n_img=n_img)
    entering, flops_before = _before_decoder(policy, arch)

    def decide(layer: int, step: int, kept_now: int, keys_scored: int) -> tuple[int | None, int, int]:
        """(the new count or None, the scoring row's keys, other FLOPs) before ``layer``."""
        asked = policy.keep_before_layer(layer, step, view)
        keep = None if asked is None else applied_keep(policy, asked, torch.tensor([kept_now]), torch.tensor([entering]))
        if keep is None:
            return None, 0, 0
        if int(keep[0]) == 0:  # nothing to rank
            return 0, 0, 0
        signals = _SimulatedSignals(arch, layer, step, keys_scored)
        ranking = policy.score(signals)
        merging = 0
        if isinstance(ranking, Ranking) and ranking.merge_weights is not None:
            merging = merge_flops(int(keep[0]), arch.n_img, arch.hidden)
        return int(keep[0]), signals.scored_keys, signals.flops + merging

    # prefill: a progressive drop shortens every later layer's sequence (layer 0 is never
    # pruned); a masking policy hides tokens that stay in the sequence
    kept, scored, flops = [entering], [0] * arch.layers, flops_before
    for layer in range(1, arch.layers):
        keep, scored[layer - 1], extra = decide(layer, 0, kept[-1], text_tokens + kept[layer - 1])
        flops += extra
        kept.append(kept[-1] if keep is None else keep)
    present = kept if policy.progressive else [entering] * arch.layers
    keys = [text_tokens + count for count in present]
    plan.add_step(torch.tensor([kept]), torch.tensor([keys]), torch.tensor([keys]), torch.tensor([scored]),
                  decision_flops=torch.tensor([flops]))

    # decode: one new query per layer; a progressive drop evicts from the caches of every
    # later layer, a masking policy only changes what they attend to
    for step in range(1, new_tokens):
        keys, scored, flops = [count + 1 for count in keys], [0] * arch.layers, 0
        for layer in range(1, arch.layers):
            attended = keys[layer - 1] - (present[layer - 1] - kept[layer - 1])
            keep, scored[layer - 1], extra = decide(layer, step, kept[layer], attended)
            flops += extra
            if keep is None:
                continue
            for later in range(layer, arch.layers):
                if policy.progressive:
                    dropped = max(0, kept[later] - keep)
                    kept[later] -= dropped
                    keys[later] -= dropped
                else:
                    kept[later] = keep
        plan.add_step(torch.tensor([kept]), torch.tensor([keys]), torch.tensor([[1] * arch.layers]), torch.tensor([scored]),
                      decision_flops=torch.tensor([flops]))
    return plan
