"""The signals a policy decides by, as the executor computes them from the model: the
ranking signals between two decoder layers (``policy.RankingSignals``) and those of the
stage before the decoder (``policy.VisionSignals``). Each is computed only when a policy
asks for it, and its cost goes into the step's FLOPs."""

from __future__ import annotations

import torch

from ..errors import PruningConfigError
from .layout import KeyLayout, compact, gather_rows
from .plan import GROUPS
from .policy import RankingSignals, VisionSignals

_INSTRUCTION = GROUPS.index("instruction")


class Step:
    """Where a forward stands before decoder layer ``layer``: what scoring and ranking
    may read (the previous layer's input and what was watched of its run: its query, or
    with eager weights its attention module's output; the rotary tables, the step's
    query, the masks and the cache)."""

    def __init__(self, state, layer, layer_input, watched, rotary, query_timeline, timeline_mask, cache, q_row, hidden):
        self.state, self.layer, self.layer_input, self.watched = state, layer, layer_input, watched
        self.rotary, self.timeline_mask, self.cache = rotary, timeline_mask, cache
        self.query_timeline = query_timeline  # (B,) at the prefill: the timeline position of its query; None after
        self.q_row = q_row  # the step's query among this forward's rows; None at the prefill
        self.hidden = hidden  # the hidden states entering ``layer``


class ExecutedSignals(RankingSignals):
    """The ranking signals of one selection, computed from the model when asked for."""

    def __init__(self, executor, step: Step, candidates: torch.Tensor):
        super().__init__(step.layer, step.state.step, candidates, step.state.img_pos)
        self._executor, self._step = executor, step
        self._probs: torch.Tensor | None = None

    @property
    def _observed(self) -> KeyLayout:
        return self._step.state.layouts[self.layer - 1]

    def attention_probs(self) -> torch.Tensor:
        """(B, heads, L) the step's attention row at the previous layer, computed once."""
        if self._probs is None:
            self._probs = self._executor.attention_row(self._step)
        return self._probs

    def attention(self):
        layout = self._observed
        prompt = layout.entry_slot.shape[1]
        return layout.by_slot(self.attention_probs()[..., :prompt].mean(1), self.candidates.shape[1])

    def keys(self):
        step, layout = self._step, self._observed
        keys = self._executor.decoder.keys_at(self.layer - 1, step.cache, step.layer_input, step.rotary)
        prompt = layout.entry_slot.shape[1]
        return layout.by_slot(keys[:, :, :prompt].transpose(1, 2), self.candidates.shape[1]).transpose(1, 2)

    def hidden(self):
        self._prefill_only("their hidden states")
        return self._observed.by_slot(self._step.hidden, self.candidates.shape[1])

    def instruction_attention(self):
        self._prefill_only("the instruction's attention")
        step, layout = self._step, self._observed
        prompt = layout.entry_group.shape[1]
        is_instruction = (layout.entry_group == _INSTRUCTION) & layout.valid[:, :prompt]
        if step.timeline_mask is not None:
            is_instruction &= step.timeline_mask.gather(1, layout.index[:, :prompt])
        rows, valid = compact(is_instruction)  # (B, T) the instruction entries, front-padded
        causal = layout.index[:, None, :] <= layout.index.gather(1, rows)[:, :, None]  # (B, T, L)
        key_ok = layout.attended()[:, None, :] & causal
        if step.timeline_mask is not None:
            key_ok &= step.timeline_mask.gather(1, layout.index)[:, None, :]
        decoder = self._executor.decoder
        probs = decoder.attention_rows(self.layer - 1, step.layer_input, step.rotary, rows, key_ok,
                                       decoder.cached_keys(step.cache, self.layer - 1))  # (B, H, T, L)
        # as a batch-1 run: each row's projection and its scores over the row's real entries
        real = layout.valid if step.timeline_mask is None else layout.valid & step.timeline_mask.gather(1, layout.index)
        arch = self._executor.arch
        per_row = 2 * arch.hidden * arch.heads * arch.head_dim + 2 * arch.heads * arch.head_dim * real.sum(1)
        self.add_flops(valid.sum(1) * per_row)
        per_entry = probs.mean(1)[..., :prompt].transpose(1, 2)  # (B, P, T)
        return layout.by_slot(per_entry, self.candidates.shape[1]).transpose(1, 2) * valid[..., None], valid

    def _prefill_only(self, what: str) -> None:
        if self._step.q_row is not None:
            raise PruningConfigError(
                f"method {self._executor.policy.name!r} ranks image tokens by {what} at a decode step; a decode step "
                "holds the image tokens only as cached keys: rank by keys() or attention() there"
            )

    def add_flops(self, flops):
        self._step.state.extra_flops += flops


class ExecutedVisionSignals(VisionSignals):
    """The signals of the stage before the decoder, from the vision tower's feature layer
    (kept while the tower ran) and the prompt's embeddings."""

    def __init__(self, executor, embeds: torch.Tensor, state):
        vision = executor.decoder.vision
        super().__init__(state.img_pos.shape[1], vision.grid)
        self._vision, self._embeds, self._state = vision, embeds, state
        self._queries, self._keys = vision.taken()
        images, tokens = self._keys.shape[:2]
        rows = embeds.shape[0]
        one_image_per_prompt = rows % images == 0 and tokens - 1 == self.image_tokens and bool(state.img_present.all())
        if not one_image_per_prompt:
            raise PruningConfigError(
                f"method {executor.policy.name!r} reduces one image per prompt before the decoder: this batch has "
                f"{rows} prompts, {images} images of {tokens - 1} patches, and prompts with "
                f"{state.img_present.sum(1).tolist()} image tokens"
            )
        if images < rows:  # generate encodes each image once, then repeats it for every beam
            self._queries, self._keys = (tensor.repeat_interleave(rows // images, dim=0) for tensor in (self._queries, self._keys))

    def cls_attention(self):
        self.add_flops(2 * self._vision.heads * self._vision.head_dim * self._keys.shape[1])
        return self._vision.class_attention(self._queries, self._keys).to(self._embeds.device)

    def keys(self):
        return self._keys[:, 1:].float().mean(2).to(self._embeds.device)

    def features(self):
        return gather_rows(self._embeds, self._state.img_pos)

    def add_flops(self, flops):
        self._state.extra_flops += flops
