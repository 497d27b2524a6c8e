"""The pruning executor: the decoder-layer loop of a pruned generation.

Between two decoder layers the loop asks the method's policy how many image tokens to
keep (``core/policy.py``); when the count drops, the policy ranks the candidates (by
default by the attention row of the step's query at the previous layer, computed from
that layer's own post-rotary query and cached keys while every layer keeps its fast
attention kernel), and the executor physically removes the dropped tokens: from the
hidden states in prefill, and from the KV cache of the layers that no longer see them
in decode. A policy that decides from the attention (DyRate) is first shown the step's
attention per head and token group at the previous layer; one that re-selects at every
step (mode=mask) keeps the image tokens cached and hides the others from attention
instead. Surviving tokens keep their original position ids (FastV/VTW convention), or
with the policy's ``positions=renumber`` (PyramidDrop's convention) a prefill drop
renumbers the tokens of the layers from the drop on contiguously, and each later token of
such a layer takes the id after that layer's last one (rotary tables per key layout).

The model is reached only through ``core/hf_llava.py`` (``HFDecoder``), the one module
that knows transformers.

For ``dyrate-eval bench`` only, the attention that ranks the image tokens can also be
taken the way FastV's peers take it (``SCORINGS``), to time the core's design against
theirs on the same inputs.
"""

from __future__ import annotations

import torch

from ..arch import Arch
from ..errors import PruningConfigError
from ..measure.flops import layer_flops
from .layout import KeyLayout, compact, gather_rows, image_slots
from .merging import merge_features
from .plan import GROUPS, ExecutedPlan
from .policy import PruningPolicy, Ranking, RankingSignals, StepView, VisionSignals
from .selection import next_keep, top_slots

_INSTRUCTION = GROUPS.index("instruction")

# How the attention row that ranks and observes image tokens is obtained. "row": the
# core's way (one query row from the observation layer's own query and cached keys,
# SPEC section 3 rule 1). The others are FastV's peers, for the bench's side-by-side
# rows: "eager-weights" runs the language model in eager attention and reads the
# observation layer's weights from its own forward, every query's row materialised (FastV's
# reference code, output_attentions at layer K-1); "layer-rerun" runs the observation
# layer a second time in eager attention on its input to get those weights (LightCompress).
SCORINGS = ("row", "eager-weights", "layer-rerun")


class GenerationState:
    """Everything one generation (one KV cache) needs between forwards."""

    def __init__(self, img_pos: torch.Tensor, img_present: torch.Tensor, length: int, num_layers: int):
        self.img_pos = img_pos  # (B, N) timeline positions of image slots (0 where absent)
        self.img_present = img_present  # (B, N) False for slots padding rows with fewer image tokens
        self.length = length  # timeline length so far
        self.layouts: list[KeyLayout] = [None] * num_layers  # type: ignore[list-item]
        self.plan = ExecutedPlan(n_img=img_present.sum(1))
        self.step = 0
        self.scored_keys = torch.zeros(img_pos.shape[0], num_layers, dtype=torch.long, device=img_pos.device)
        self.extra_flops = torch.zeros_like(self.plan.n_img)  # this step's ranking and rerun FLOPs
        # (B,) image tokens dropped before the decoder: the later positions move down by as many
        self.position_shift: torch.Tensor | None = None
        self.decision: dict[str, torch.Tensor] = {}  # this step's observed decision, for the plan

    def reorder(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.img_pos.device)
        self.img_pos, self.img_present = self.img_pos[rows], self.img_present[rows]
        if self.position_shift is not None:
            self.position_shift = self.position_shift[rows]
        reordered: dict[int, KeyLayout] = {}
        self.layouts = [reordered.setdefault(id(lay), lay.select_rows(rows)) for lay in self.layouts]
        self.plan.reorder(rows)
        self.decision = {name: value[rows] for name, value in self.decision.items()}


class _OutputCapture:
    """Keeps what ``module`` returns while the context is open (nothing for None)."""

    def __init__(self, module):
        self.module = module
        self.output = None

    def __enter__(self):
        if self.module is not None:
            self._handle = self.module.register_forward_hook(self._keep)
        return self

    def _keep(self, module, args, output):
        self.output = output

    def __exit__(self, *exc):
        if self.module is not None:
            self._handle.remove()


class _MaskCache:
    """One attention mask per distinct key layout within a forward."""

    def __init__(self, decoder):
        self._decoder = decoder
        self._built: list[tuple[KeyLayout, object]] = []

    def get(self, hidden, layout, timeline_mask, cache, layer_idx):
        for built_for, mask in self._built:
            if built_for is layout:
                return mask
        if timeline_mask is None and layout.attends_all:
            key_mask = None
            if hidden.shape[1] == 1:  # one query that may see every cached key: nothing to mask
                self._built.append((layout, None))
                return None
        else:
            key_mask = layout.attended()
            if timeline_mask is not None:
                key_mask = key_mask & timeline_mask.gather(1, layout.index)
        mask = self._decoder.causal_mask(hidden, key_mask, cache, layer_idx)
        self._built.append((layout, mask))
        return mask


class _NewTokenRotary:
    """The rotary tables of a decode step's new tokens per key layout: for the ids
    generate passed, or for a layout renumbered at the prefill (positions=renumber) for
    the ids after its own last one, so that layers which dropped differently number the
    same token differently."""

    def __init__(self, decoder, embeds, position_ids):
        self._decoder, self._embeds = decoder, embeds
        self._given = (decoder.rotary(embeds, position_ids), position_ids)
        self._renumbered: dict[int, tuple] = {}

    def of(self, layout: KeyLayout):
        """(the rotary tables, the position ids) of the new tokens in the layers of ``layout``."""
        if layout.next_position is None:
            return self._given
        # layouts that share their numbering share its tensor (KeyLayout.without keeps it)
        key = id(layout.next_position)
        if key not in self._renumbered:
            new_tokens = self._embeds.shape[1]
            offsets = torch.arange(-new_tokens, 0, device=layout.next_position.device)
            ids = layout.next_position[:, None] + offsets  # the layout already counts this step's tokens
            self._renumbered[key] = (self._decoder.rotary(self._embeds, ids), ids)
        return self._renumbered[key]


class _Step:
    """Where a forward stands before decoder layer ``layer``: what scoring and ranking
    may read (the previous layer's input and what was kept of its run, the rotary
    tables, the step's query, the masks and the cache)."""

    def __init__(self, state, layer, layer_input, projected, rotary, query_timeline, timeline_mask, cache, q_row, hidden):
        self.state, self.layer, self.layer_input, self.projected = state, layer, layer_input, projected
        self.rotary, self.query_timeline, self.timeline_mask, self.cache = rotary, query_timeline, timeline_mask, cache
        self.q_row = q_row  # the step's query among this forward's rows; None at the prefill
        self.hidden = hidden  # the hidden states entering ``layer``


class _ExecutedSignals(RankingSignals):
    """The ranking signals of one selection, computed from the model when asked for."""

    def __init__(self, executor: "Executor", step: _Step, candidates: torch.Tensor):
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


class _ExecutedVisionSignals(VisionSignals):
    """The signals of the stage before the decoder, from the vision tower's feature layer
    (kept while the tower ran) and the prompt's embeddings."""

    def __init__(self, executor: "Executor", embeds: torch.Tensor, state: GenerationState):
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


class Executor:
    """Runs one installed policy on the decoder that ``decoder`` (an ``HFDecoder``) wraps."""

    def __init__(self, decoder, policy: PruningPolicy, scoring: str, arch: Arch, image_token_id: int):
        self.decoder, self.policy, self.scoring, self.arch = decoder, policy, scoring, arch
        self.image_token_id = image_token_id
        self.num_layers = decoder.num_layers

    # -- prefill -------------------------------------------------------------------

    def prefill(self, embeds, prompt_ids, attention_mask, position_ids, cache, kwargs):
        """Run the prompt; returns (the last hidden state of every prompt position, the
        generation's state)."""
        batch, length, _ = embeds.shape
        device = embeds.device
        is_image = prompt_ids.to(device) == self.image_token_id
        img_pos, img_present = image_slots(is_image)
        state = GenerationState(img_pos, img_present, length, self.num_layers)
        if position_ids is None:
            position_ids = torch.arange(length, device=device).unsqueeze(0)
        if attention_mask is None:
            query_timeline = torch.full((batch,), length - 1, device=device)
        else:  # the last real prompt token
            query_timeline = length - 1 - attention_mask.flip(1).to(torch.int8).argmax(1)
        full_layout = layout = KeyLayout.of_prompt(is_image, img_pos, img_present)
        full_hidden = None  # the last hidden state of every prompt position, once some are dropped
        if self.policy.reduces_before_decoder:
            full_hidden = embeds.new_zeros(embeds.shape)
            _scatter_rows(full_hidden, embeds, layout)
            embeds, layout, position_ids = self._reduce_before_decoder(state, embeds, layout, position_ids)
        cos, sin = self.decoder.rotary(embeds, position_ids)
        hidden, masks, layer_input, projected = embeds, _MaskCache(self.decoder), None, None
        for layer_idx in range(self.num_layers):
            if layer_idx > 0:
                step = _Step(state, layer_idx, layer_input, projected, (cos, sin), query_timeline, attention_mask, cache,
                             None, hidden)
                img_kept, merge_weights = self._select(step, layout)
                if merge_weights is not None:
                    hidden = self._merge_hidden(state, hidden, layout, img_kept, merge_weights)
                if img_kept is not None and not self.policy.progressive:
                    layout = layout.hiding(img_kept)
                elif img_kept is not None:
                    if full_hidden is None:
                        full_hidden = hidden.new_zeros(batch, length, hidden.shape[-1])
                    _scatter_rows(full_hidden, hidden, layout)
                    layout, local = layout.without(img_kept)
                    hidden = gather_rows(hidden, local)
                    if self.policy.positions == "renumber":
                        layout, renumbered = layout.renumbered(attention_mask)
                        cos, sin = self.decoder.rotary(hidden, renumbered)
                    else:
                        cos, sin = gather_rows(cos, local), gather_rows(sin, local)
            state.layouts[layer_idx] = layout
            layer_input = hidden
            with self._scoring_capture(layer_idx, state.step) as capture:
                hidden = self.decoder.run_layer(
                    layer_idx, hidden, masks.get(hidden, layout, attention_mask, cache, layer_idx), (cos, sin),
                    # gapped original ids would read as packed sequences to some kernels
                    position_ids if layout is full_layout else None, cache, kwargs,
                )
            projected = capture.output
        self._record_step(state, attention_mask, new_tokens=length)
        if full_hidden is None:
            return hidden, state
        _scatter_rows(full_hidden, hidden, layout)
        return full_hidden, state

    # -- decode ----------------------------------------------------------------------

    def decode(self, state, embeds, attention_mask, position_ids, cache, kwargs):
        batch, new_tokens, _ = embeds.shape
        device = embeds.device
        new_positions = torch.arange(state.length, state.length + new_tokens, device=device)
        state.length += new_tokens
        state.step += 1
        if position_ids is None:
            position_ids = new_positions.unsqueeze(0)
        if state.position_shift is not None:
            position_ids = position_ids.expand(batch, -1) - state.position_shift[:, None]
        appended: dict[int, KeyLayout] = {}
        state.layouts = [appended.setdefault(id(lay), lay.appended(new_positions)) for lay in state.layouts]
        rotaries = _NewTokenRotary(self.decoder, embeds, position_ids)
        query_timeline = torch.full((batch,), state.length - 1, device=device)
        hidden, masks, layer_input, projected, rotary = embeds, _MaskCache(self.decoder), None, None, None
        for layer_idx in range(self.num_layers):
            if layer_idx > 0:  # ``rotary``: the previous layer's, whose attention row may rank
                step = _Step(state, layer_idx, layer_input, projected, rotary, query_timeline, attention_mask, cache,
                             new_tokens - 1, hidden)
                img_kept, _ = self._select(step, state.layouts[layer_idx])  # merging is refused at decode steps
                if img_kept is not None and not self.policy.progressive:
                    self._hide_from_later_layers(state, layer_idx, img_kept)
                elif img_kept is not None:
                    self._evict(state, cache, layer_idx, img_kept, new_tokens)
            layout = state.layouts[layer_idx]
            rotary, layer_position_ids = rotaries.of(layout)
            layer_input = hidden
            with self._scoring_capture(layer_idx, state.step) as capture:
                hidden = self.decoder.run_layer(
                    layer_idx, hidden, masks.get(hidden, layout, attention_mask, cache, layer_idx),
                    rotary, layer_position_ids, cache, kwargs,
                )
            projected = capture.output
        self._record_step(state, attention_mask, new_tokens)
        return hidden

    def _reduce_before_decoder(self, state, embeds, layout, position_ids):
        """The policy's stage before layer 0: the image slots it keeps carry what they
        merged, the others leave the sequence, and positions close up behind them (the
        decoder sees the shorter prompt the vision side would have handed over). Returns
        (embeddings, layout, position ids) of the kept entries."""
        signals = _ExecutedVisionSignals(self, embeds, state)
        reduction = self.policy.reduce_before_decoder(signals)
        if reduction is None:
            return embeds, layout, position_ids
        kept = reduction.kept.to(layout.img_kept.device) & state.img_present
        if reduction.merge_weights is not None:
            features, flops = merge_features(signals.features(), kept, reduction.merge_weights.to(embeds.device))
            state.extra_flops += flops
            rows = torch.arange(embeds.shape[0], device=embeds.device)[:, None].expand_as(state.img_pos)
            embeds = embeds.clone()
            embeds[rows, state.img_pos] = features
        slot = layout.entry_slot
        dropped = (slot >= 0) & ~kept.gather(1, slot.clamp(min=0))  # (B, S) prompt entries dropped
        state.position_shift = dropped.sum(1)
        state.img_present = kept
        reduced, local = layout.without(kept)
        positions = position_ids.expand(embeds.shape[0], -1) - dropped.cumsum(1)
        return gather_rows(embeds, local), reduced, positions.gather(1, local)

    @staticmethod
    def _merge_hidden(state, hidden, layout, img_kept, merge_weights):
        """The prefill's hidden states with each kept image slot's replaced by its
        combination of the image slots' states (the others are dropped next)."""
        slots = img_kept.shape[1]
        merged, flops = merge_features(layout.by_slot(hidden, slots), img_kept, merge_weights.to(hidden.device))
        state.extra_flops += flops
        entries = layout.entry_slot
        is_kept = (entries >= 0) & img_kept.gather(1, entries.clamp(min=0)) & layout.valid[:, : entries.shape[1]]
        hidden = hidden.clone()
        prompt = hidden[:, : entries.shape[1]]
        prompt[is_kept] = merged.gather(1, entries.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))[is_kept]
        return hidden

    def _evict(self, state, cache, first_layer, img_kept, new_tokens):
        """Remove image slots not in ``img_kept`` from the caches of layers >= first_layer.

        Their layouts already end with this step's ``new_tokens`` (always kept), which
        those layers have not cached yet."""
        evicted: dict[int, tuple[KeyLayout, torch.Tensor]] = {}
        for layer_idx in range(first_layer, self.num_layers):
            old = state.layouts[layer_idx]
            if id(old) not in evicted:
                evicted[id(old)] = old.without(old.img_kept & img_kept)
            new_layout, local = evicted[id(old)]
            state.layouts[layer_idx] = new_layout
            self.decoder.keep_cached(cache, layer_idx, local[:, : local.shape[1] - new_tokens])

    def _hide_from_later_layers(self, state, first_layer, img_kept):
        """Attend to ``img_kept`` alone from ``first_layer`` on; every image token stays cached."""
        hidden: dict[int, KeyLayout] = {}
        for layer_idx in range(first_layer, self.num_layers):
            old = state.layouts[layer_idx]
            state.layouts[layer_idx] = hidden.setdefault(id(old), old.hiding(img_kept))

    # -- deciding ------------------------------------------------------------------------

    def _scoring_capture(self, layer_idx, step):
        """While the layer runs, keep its query projection when the policy observes the
        step's attention before the next layer: the scoring row then reuses it instead
        of projecting the query again (at 7B width, reading a 4096 x 4096 weight matrix
        once more at every decode step). With eager weights, keep what the attention
        module returns (its output and weights) after every layer, as the reference
        code has them at hand wherever it ranks."""
        if self.scoring == "eager-weights":
            return _OutputCapture(self.decoder.attention_module(layer_idx))
        observed = layer_idx + 1 < self.num_layers and self.policy.observes(layer_idx + 1, step)
        return _OutputCapture(self.decoder.query_projection(layer_idx) if observed and self.scoring == "row" else None)

    def _select(self, step: _Step, layout: KeyLayout) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Ask the policy before ``step.layer``, whose keys are ``layout`` so far. Returns
        the image slots to attend to from this layer on (None when nothing changes) and
        the merge weights of the image slots' hidden states, if the policy merges.

        The candidates are the slots still kept for a progressive policy (a dropped
        token never returns), every image slot of the prompt for one that re-selects
        at every step; the policy's scores rank them. A policy that observes this layer
        is shown the attention of the step's query per head and token group first."""
        policy, state = self.policy, step.state
        candidates = layout.img_kept if policy.progressive else state.img_present
        signals = _ExecutedSignals(self, step, candidates)
        view = StepView(n_img=state.plan.n_img)
        if policy.observes(step.layer, state.step):
            view.group_attention = state.layouts[step.layer - 1].group_sums(signals.attention_probs())
        asked, keep = next_keep(policy, step.layer, state.step, view, layout.img_kept.sum(1), candidates.sum(1))
        if view.group_attention is not None:
            n_img = state.plan.n_img
            state.decision = {
                "chosen_keep": torch.full_like(n_img, -1) if asked is None else asked.to(n_img.device),
                "group_attention": view.group_attention.mean(1),
                "decision_flops": torch.full_like(n_img, policy.decision_flops),
            }
        if keep is None:
            return None, None
        if bool((keep == 0).all()):
            return torch.zeros_like(layout.img_kept), None
        ranking = policy.score(signals)
        if not isinstance(ranking, Ranking):
            ranking = Ranking(ranking)
        if ranking.merge_weights is not None and step.q_row is not None:
            raise PruningConfigError(f"method {policy.name!r} merges image tokens at a decode step: only the prefill can")
        return top_slots(ranking.scores, candidates, keep), ranking.merge_weights

    def attention_row(self, step: _Step) -> torch.Tensor:
        """(B, heads, L) attention of the step's query at the layer before ``step.layer``:
        softmax over the keys that layer attends to, in the order of its layout's entries
        (0 elsewhere)."""
        obs_layer, state, layer_input = step.layer - 1, step.state, step.layer_input
        layout = state.layouts[obs_layer]
        key_ok = layout.attended()
        if step.q_row is None:  # prefill: the last real prompt token, at its place in this layer's rows
            pick = (layout.index == step.query_timeline[:, None]).to(torch.int8).argmax(1)[:, None]
            key_ok = key_ok & (layout.index <= step.query_timeline[:, None])
        else:  # decode: every cached entry precedes the step's newest token (the only one, mostly)
            pick = None if layer_input.shape[1] == 1 else torch.full((layer_input.shape[0], 1), step.q_row,
                                                                     device=layer_input.device)
            if step.timeline_mask is None and layout.attends_all:
                key_ok = None
        if step.timeline_mask is not None:
            key_ok = key_ok & step.timeline_mask.gather(1, layout.index)
        if self.scoring != "row":  # every query's weights (B, heads, rows, L), then the step's row
            if self.scoring == "eager-weights":  # they came with the layer's forward: no extra FLOPs
                weights = step.projected[1]
            else:
                weights = self._rerun_weights(step, key_ok)
            return weights.float()[:, :, 0] if pick is None else gather_rows(weights.transpose(1, 2).float(), pick)[:, 0]
        # the batch-1 cost of this row, for FLOPs
        state.scored_keys[:, obs_layer] = layout.index.shape[1] if key_ok is None else key_ok.sum(1)
        keys = self.decoder.cached_keys(step.cache, obs_layer)
        return self.decoder.attention_rows(obs_layer, layer_input, step.rotary, pick,
                                           None if key_ok is None else key_ok[:, None, :], keys, step.projected)[:, :, 0]

    def _rerun_weights(self, step: _Step, key_ok):
        """(B, heads, L, L) LightCompress's way: the observation layer run again on its
        input in eager attention, without the cache, for the weights of every query; its
        FLOPs go into the plan as the decision's."""
        if step.q_row is not None:
            raise PruningConfigError(
                f"method {self.policy.name!r} selects at decode steps; scoring by rerunning layer K-1 "
                "(LightCompress's way) reruns it on the prompt and can rank only at the prefill"
            )
        rows = key_ok.sum(1)
        step.state.extra_flops += layer_flops(self.arch, rows, rows)
        return self.decoder.rerun_weights(step.layer - 1, step.layer_input, step.rotary, key_ok)

    # -- the plan --------------------------------------------------------------------------

    def _record_step(self, state, timeline_mask, new_tokens):
        counts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for layout in state.layouts:
            if id(layout) in counts:
                continue
            real = layout.valid if timeline_mask is None else layout.valid & timeline_mask.gather(1, layout.index)
            keys = real.sum(1)
            if state.step == 0:  # prefill: every kept row is a query
                queries = keys
            elif timeline_mask is None:
                queries = torch.full_like(keys, new_tokens)
            else:
                queries = timeline_mask[:, -new_tokens:].sum(1)
            counts[id(layout)] = (layout.img_kept.sum(1), keys, queries)
        per_layer = [counts[id(layout)] for layout in state.layouts]
        decision = dict(state.decision)
        decision["decision_flops"] = decision.get("decision_flops", torch.zeros_like(state.extra_flops)) + state.extra_flops
        state.plan.add_step(
            *(torch.stack([c[i] for c in per_layer], dim=1) for i in range(3)), state.scored_keys, state.layouts[-1].img_kept,
            **decision,
        )
        state.scored_keys = torch.zeros_like(state.scored_keys)
        state.extra_flops = torch.zeros_like(state.extra_flops)
        state.decision = {}


def _scatter_rows(full, hidden, layout):
    rows = torch.arange(full.shape[0], device=full.device)[:, None].expand_as(layout.index)
    full[rows[layout.valid], layout.index[layout.valid]] = hidden[layout.valid]
