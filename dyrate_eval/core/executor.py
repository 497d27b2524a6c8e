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

A policy may also act before layer 0 (VisionZip, PruMerge): from the vision tower's
feature layer it chooses the image tokens that enter the decoder and what they merge,
and the positions after the dropped ones close up. At a prefill drop a policy may merge
the dropped tokens' states into kept ones (SparseVLM's recycling).

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
from .capture import OutputCapture
from .layout import KeyLayout, gather_rows, image_slots, on_device
from .merging import merge_features
from .plan import ExecutedPlan
from .policy import PruningPolicy, Ranking, StepView
from .selection import applied_keep, top_slots
from .signals import ExecutedSignals, ExecutedVisionSignals, Step

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
        # this step's scoring rows: the keys each scored over, by layer (an int where all rows agree)
        self.scored_keys: dict[int, int | torch.Tensor] = {}
        self.extra_flops: int | torch.Tensor = 0  # this step's decision, ranking and rerun FLOPs
        self._constants: dict[tuple, torch.Tensor] = {}  # tensors made once (``constant``, ``unit_column``)
        # (B,) image tokens dropped before the decoder: the later positions move down by as many
        self.position_shift: torch.Tensor | None = None
        self.decision: dict[str, torch.Tensor] = {}  # this step's observed decision, for the plan

    def reorder(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.img_pos.device)
        self.img_pos, self.img_present = self.img_pos[rows], self.img_present[rows]
        if self.position_shift is not None:
            self.position_shift = self.position_shift[rows]
        self.layouts = _each_layout(self.layouts, lambda layout: layout.select_rows(rows))
        self.plan.reorder(rows)
        self.decision = {name: value[rows] for name, value in self.decision.items()}

    def constant(self, value: int, columns: int = 0) -> torch.Tensor:
        """(B,) or (B, columns) filled with ``value``, made once per generation (never written to)."""
        shape = (self.img_pos.shape[0], columns) if columns else (self.img_pos.shape[0],)
        return self._made_once(("fill", value, shape), lambda: torch.full(shape, value, device=self.img_pos.device))

    def unit_column(self, column: int, columns: int) -> torch.Tensor:
        """(B, columns) 1 in ``column``, 0 elsewhere, made once per generation (never written to)."""
        return self._made_once(("unit", column, columns),
                               lambda: torch.nn.functional.one_hot(self.constant(column), columns))

    def _made_once(self, key: tuple, make) -> torch.Tensor:
        if key not in self._constants:
            self._constants[key] = make()
        return self._constants[key]


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
        hidden, masks, layer_input, watched = embeds, _MaskCache(self.decoder), None, None
        for layer_idx in range(self.num_layers):
            if layer_idx > 0:
                step = Step(state, layer_idx, layer_input, watched, (cos, sin), query_timeline, attention_mask, cache,
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
            watched = capture.output
        self._record_step(state, attention_mask, length, reselected=True)
        if full_hidden is None:
            return hidden, state
        _scatter_rows(full_hidden, hidden, layout)
        return full_hidden, state

    # -- decode ----------------------------------------------------------------------

    def decode(self, state, embeds, attention_mask, position_ids, cache, kwargs):
        batch, new_tokens, _ = embeds.shape
        if position_ids is None:
            position_ids = torch.arange(state.length, state.length + new_tokens, device=embeds.device).unsqueeze(0)
        if state.position_shift is not None:
            position_ids = position_ids.expand(batch, -1) - state.position_shift[:, None]
        state.layouts = _each_layout(state.layouts, lambda layout: layout.appended(state.length, new_tokens))
        state.length += new_tokens
        state.step += 1
        rotaries = _NewTokenRotary(self.decoder, embeds, position_ids)
        hidden, masks, layer_input, watched, rotary = embeds, _MaskCache(self.decoder), None, None, None
        reselected = False  # whether some layer's image tokens changed at this step
        for layer_idx in range(self.num_layers):
            if layer_idx > 0:  # ``rotary``: the previous layer's, whose attention row may rank
                step = Step(state, layer_idx, layer_input, watched, rotary, None, attention_mask, cache,
                             new_tokens - 1, hidden)
                img_kept, _ = self._select(step, state.layouts[layer_idx])  # merging is refused at decode steps
                if img_kept is not None and not self.policy.progressive:
                    self._hide_from_later_layers(state, layer_idx, img_kept)
                elif img_kept is not None:
                    self._evict(state, cache, layer_idx, img_kept, new_tokens)
                reselected |= img_kept is not None
            layout = state.layouts[layer_idx]
            rotary, layer_position_ids = rotaries.of(layout)
            layer_input = hidden
            with self._scoring_capture(layer_idx, state.step) as capture:
                hidden = self.decoder.run_layer(
                    layer_idx, hidden, masks.get(hidden, layout, attention_mask, cache, layer_idx),
                    rotary, layer_position_ids, cache, kwargs,
                )
            watched = capture.output
        self._record_step(state, attention_mask, new_tokens, reselected)
        return hidden

    def _reduce_before_decoder(self, state, embeds, layout, position_ids):
        """The policy's stage before layer 0: the image slots it keeps carry what they
        merged, the others leave the sequence, and positions close up behind them (the
        decoder sees the shorter prompt the vision side would have handed over). Returns
        (embeddings, layout, position ids) of the kept entries."""
        signals = ExecutedVisionSignals(self, embeds, state)
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
        state.layouts[first_layer:] = _each_layout(state.layouts[first_layer:], lambda layout: layout.hiding(img_kept))

    # -- deciding ------------------------------------------------------------------------

    def _scoring_capture(self, layer_idx, step):
        """While the layer runs, keep its query when the policy observes the step's
        attention before the next layer: the scoring row then reuses it instead of
        projecting (at 7B width, reading a 4096 x 4096 weight matrix once more at every
        decode step) and rotating the query again. With eager weights, keep what the attention
        module returns (its output and weights) after every layer, as the reference
        code has them at hand wherever it ranks."""
        if self.scoring == "eager-weights":
            return OutputCapture(self.decoder.attention_module(layer_idx))
        observed = layer_idx + 1 < self.num_layers and self.policy.observes(layer_idx + 1, step)
        if observed and self.scoring == "row":
            return self.decoder.query_capture(layer_idx)
        return OutputCapture(None)

    def _select(self, step: Step, layout: KeyLayout) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Ask the policy before ``step.layer``, whose keys are ``layout`` so far. Returns
        the image slots to attend to from this layer on (None when nothing changes) and
        the merge weights of the image slots' hidden states, if the policy merges.

        The candidates are the slots still kept for a progressive policy (a dropped
        token never returns), every image slot of the prompt for one that re-selects
        at every step; the policy's scores rank them. A policy that observes this layer
        is shown the attention of the step's query per head and token group first."""
        policy, state = self.policy, step.state
        candidates = layout.img_kept if policy.progressive else state.img_present
        signals = ExecutedSignals(self, step, candidates)
        view = StepView(n_img=state.plan.n_img)
        if policy.observes(step.layer, state.step):
            view.group_attention = state.layouts[step.layer - 1].group_sums(signals.attention_probs())
        asked = policy.keep_before_layer(step.layer, state.step, view)
        # the counts only where the policy asked (most layers of most steps it does not)
        if asked is None:
            keep = None
        else:
            kept_now = layout.kept_count()
            keep = applied_keep(policy, asked, kept_now, kept_now if candidates is layout.img_kept else candidates.sum(1))
        if view.group_attention is not None:
            state.decision = {
                "chosen_keep": state.constant(-1) if asked is None else on_device(asked, state.img_pos.device),
                "group_attention": view.group_attention.mean(1),
            }
            state.extra_flops += policy.decision_flops
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

    def attention_row(self, step: Step) -> torch.Tensor:
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
                weights = step.watched[1]
            else:
                weights = self._rerun_weights(step, key_ok)
            return weights.float()[:, :, 0] if pick is None else gather_rows(weights.transpose(1, 2).float(), pick)[:, 0]
        # the batch-1 cost of this row, for FLOPs
        state.scored_keys[obs_layer] = layout.index.shape[1] if key_ok is None else key_ok.sum(1)
        keys = self.decoder.cached_keys(step.cache, obs_layer)
        return self.decoder.attention_rows(obs_layer, layer_input, step.rotary, pick,
                                           None if key_ok is None else key_ok[:, None, :], keys, step.watched)[:, :, 0]

    def _rerun_weights(self, step: Step, key_ok):
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

    def _record_step(self, state, timeline_mask, new_tokens, reselected):
        """Add the step to the plan; ``reselected``: whether some layer's image tokens
        changed at this step (always at the prefill)."""
        plan = state.plan
        if state.step == 0:  # prefill: every kept row is a query (its keys, counted below)
            queries = None
        elif timeline_mask is None:
            queries = state.constant(new_tokens, self.num_layers)
        else:  # (B, layers) this step's real tokens, the same in every layer
            queries = timeline_mask[:, -new_tokens:].sum(1, keepdim=True).expand(-1, self.num_layers)
        if reselected:
            kept, keys = self._count_layouts(state, timeline_mask)
            queries = keys if queries is None else queries
        else:  # every layer holds what it held at the last step, and this step's tokens
            kept, keys = plan.kept_image[-1], plan.keys[-1] + queries
        extra = state.extra_flops
        plan.add_step(kept, keys, queries, self._scored_table(state), state.layouts[-1].img_kept,
                      decision_flops=extra if isinstance(extra, torch.Tensor) else state.constant(extra), **state.decision)
        state.scored_keys, state.extra_flops, state.decision = {}, 0, {}

    def _count_layouts(self, state, timeline_mask):
        """(B, layers) each layer's kept image tokens and real keys, counted on its layout."""
        counts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layout in state.layouts:
            if id(layout) not in counts:
                real = layout.valid if timeline_mask is None else layout.valid & timeline_mask.gather(1, layout.index)
                counts[id(layout)] = (layout.kept_count(), real.sum(1))
        per_layer = [counts[id(layout)] for layout in state.layouts]
        return tuple(torch.stack([c[i] for c in per_layer], dim=1) for i in range(2))

    def _scored_table(self, state) -> torch.Tensor:
        """(B, layers) the keys of this step's scoring rows per layer (0 where none was computed)."""
        table = None
        for layer, count in state.scored_keys.items():
            column = state.unit_column(layer, self.num_layers) * (count if isinstance(count, int) else count[:, None])
            table = column if table is None else table + column
        return state.constant(0, self.num_layers) if table is None else table


def _each_layout(layouts: list[KeyLayout], change) -> list[KeyLayout]:
    """``change`` (KeyLayout -> KeyLayout) applied once per distinct layout of ``layouts``:
    layers that shared a layout share its successor."""
    changed: dict[int, KeyLayout] = {}
    for layout in layouts:
        if id(layout) not in changed:
            changed[id(layout)] = change(layout)
    return [changed[id(layout)] for layout in layouts]


def _scatter_rows(full, hidden, layout):
    rows = torch.arange(full.shape[0], device=full.device)[:, None].expand_as(layout.index)
    full[rows[layout.valid], layout.index[layout.valid]] = hidden[layout.valid]
