"""The pruning executor for Hugging Face ``LlavaForConditionalGeneration``.

This is the only module of the project that touches transformers internals. It swaps
the class of the LLaVA language model (a Llama-style decoder) for a subclass with its
own decoder-layer loop. Between two layers the loop asks the method's policy how many
image tokens to keep; when the count drops it ranks the image tokens by the attention
row of the step's query at the previous layer (computed here from that layer's own
post-rotary query and cached keys, while every layer keeps its fast attention kernel),
then physically removes the dropped tokens: from the hidden states in prefill, and from
the KV cache of the layers that no longer see them in decode. A policy that decides from
the attention (DyRate) is first shown the step's attention per head and token group at
the previous layer; one that re-selects at every step (mode=mask) keeps the image tokens
cached and hides the others from attention instead.

For ``dyrate-eval bench`` only, the attention that ranks the image tokens can also be
taken the way FastV's peers take it (``SCORINGS``), to time the core's design against
theirs on the same inputs.

DyRate's training runs here too (``TeacherForcedPass``): the frozen model teacher-forced
on prompt + answer, with a registered attention function that weighs image keys per
query, so that gradients reach the predictor's choices.

Bookkeeping. Every token of a generation has a timeline position: prompt positions
0..S-1, then one per generated token. Each decoder layer has a key layout, the timeline
positions its KV cache holds, per batch row. Layers that saw the same drops share one
layout object. Rows of a batch may keep different counts; shorter rows are padded at
the front with filler entries that are masked out as keys (exact, like left padding).
Surviving tokens keep their original position ids (FastV/VTW convention).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import transformers
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from .arch import Arch
from .errors import PruningConfigError
from .flops import layer_flops
from .methods import PruningPolicy, StepView
from .plan import GROUPS, ExecutedPlan
from .ranking import top_slots

_STATE_ATTR = "_dyrate_generation_state"

# How the attention row that ranks and observes image tokens is obtained. "row": the
# core's way (one query row from the observation layer's own query and cached keys,
# SPEC section 3 rule 1). The others are FastV's peers, for the bench's side-by-side
# rows: "eager-weights" runs the language model in eager attention and reads the
# observation layer's weights from its own forward, every query's row materialised (FastV's
# reference code, output_attentions at layer K-1); "layer-rerun" runs the observation
# layer a second time in eager attention on its input to get those weights (LightCompress).
SCORINGS = ("row", "eager-weights", "layer-rerun")

# The oldest and newest transformers releases the test suite passed on (pyproject.toml's
# floor and the version in requirements.lock; tests/test_install.py keeps them in step).
TESTED_TRANSFORMERS = ("5.20.0", "5.24.0")


def _parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)


def _refuse_drift(problem: str):
    low, high = TESTED_TRANSFORMERS
    raise PruningConfigError(
        f"transformers {transformers.__version__} {problem}; the pruning core was tested with transformers "
        f"{low} to {high}: install the tested set (README, Install) or report the change"
    )


@functools.cache
def _cache_argument(language_class: type, layer_class: type) -> str:
    """The name under which the installed transformers passes the KV cache to the language
    model, its decoder layers and ``create_causal_mask`` (``past_key_values`` up to 5.23,
    ``cache`` from 5.24), after checking every interface the executor relies on; an
    interface that moved is refused here, before it can fail later in an unrelated way."""
    model_arguments = _parameters(language_class.forward)
    names = [name for name in ("cache", "past_key_values") if name in model_arguments]
    if not names:
        _refuse_drift(f"passes {language_class.__name__}.forward no KV cache argument the core knows (cache, past_key_values)")
    name = names[0]
    wanted = {
        f"{layer_class.__name__}.forward": (layer_class.forward, {"hidden_states", "attention_mask", "position_ids",
                                                                  "position_embeddings", "use_cache", name}),
        "masking_utils.create_causal_mask": (create_causal_mask, {"config", "inputs_embeds", "attention_mask",
                                                                  "position_ids", "layer_idx", name}),
    }
    for where, (function, arguments) in wanted.items():
        missing = arguments - _parameters(function)
        if missing:
            _refuse_drift(f"changed the arguments of {where} (missing: {', '.join(sorted(missing))})")
    if name not in BaseModelOutputWithPast.__dataclass_fields__:
        _refuse_drift(f"has no field {name!r} in BaseModelOutputWithPast")
    if not callable(getattr(AttentionInterface, "register", None)):
        _refuse_drift("has no AttentionInterface.register (the attention-function registry)")
    if not hasattr(DynamicCache(), "layers"):
        _refuse_drift("keeps DynamicCache's keys and values elsewhere than in DynamicCache.layers")
    return name


@dataclass
class _KeyLayout:
    """The keys one or more decoder layers hold: timeline positions per row.

    The first P entries of every row hold prompt positions (and filler); each entry
    after them is a generated token, appended at its step and never dropped. What a
    prompt entry is (its image slot, its token group) therefore holds from one drop to
    the next, and is carried here rather than looked up from the timeline at every step."""

    index: torch.Tensor  # (B, L) timeline positions, ascending per row
    valid: torch.Tensor  # (B, L) False for filler entries
    img_kept: torch.Tensor  # (B, N) which image slots the layers attend to
    entry_slot: torch.Tensor  # (B, P) image slot of each prompt entry, -1 for the others
    entry_group: torch.Tensor  # (B, P) token group of each prompt entry, an index into GROUPS
    # (B, L) True for cached image entries hidden from attention at this step: policies
    # that re-select among all image tokens at every step (mode=mask) keep them cached
    hidden: torch.Tensor | None = None
    # whether some row may hold filler (rows that kept different counts); without it
    # and without hidden entries every entry is attended, known without a look at ``valid``
    filler: bool = False

    def appended(self, positions: torch.Tensor) -> "_KeyLayout":
        batch = self.index.shape[0]
        new = positions.unsqueeze(0).expand(batch, -1)
        no = torch.zeros_like(new, dtype=torch.bool)
        return _KeyLayout(
            torch.cat([self.index, new], dim=1),
            torch.cat([self.valid, ~no], dim=1),
            self.img_kept,
            self.entry_slot,
            self.entry_group,
            None if self.hidden is None else torch.cat([self.hidden, no], dim=1),
            self.filler,
        )

    def select_rows(self, rows: torch.Tensor) -> "_KeyLayout":
        hidden = None if self.hidden is None else self.hidden[rows]
        return _KeyLayout(self.index[rows], self.valid[rows], self.img_kept[rows], self.entry_slot[rows],
                          self.entry_group[rows], hidden, self.filler)

    @property
    def generated(self) -> int:
        """Entries after the prompt's: the tokens generated so far."""
        return self.index.shape[1] - self.entry_slot.shape[1]

    def attended(self) -> torch.Tensor:
        """(B, L) the entries queries may attend to."""
        return self.valid if self.hidden is None else self.valid & ~self.hidden

    @property
    def attends_all(self) -> bool:
        return self.hidden is None and not self.filler


def _token_groups(is_image: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """(B, L) token group of each position, as an index into ``GROUPS``: system before
    the image, image, instruction up to the end of the prompt, response after it (left
    padding counts as system; it gets no attention)."""
    positions = torch.arange(is_image.shape[1], device=is_image.device).expand_as(is_image)
    first_image = is_image.to(torch.int8).argmax(1, keepdim=True)
    groups = torch.full_like(positions, GROUPS.index("instruction"))
    groups[positions < first_image] = GROUPS.index("system")
    groups[positions >= prompt_lengths[:, None]] = GROUPS.index("response")
    groups[is_image] = GROUPS.index("image")
    return groups


_RESPONSE = GROUPS.index("response")


def _sum_by_group(probs: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(..., len(GROUPS)): attention rows ``probs`` (..., L) summed over the keys of each
    token group; ``groups`` (L positions' group indices) broadcasts to ``probs``."""
    summed = probs.new_zeros(*probs.shape[:-1], len(GROUPS))
    return summed.scatter_add_(-1, groups.expand_as(probs), probs)


def _slot_table(img_pos: torch.Tensor, img_present: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) image slot of each position, -1 for non-image positions."""
    batch, slots = img_pos.shape
    table = torch.full((batch, length), -1, dtype=torch.long, device=img_pos.device)
    slot_ids = torch.arange(slots, device=img_pos.device).expand(batch, -1)
    rows = torch.arange(batch, device=img_pos.device)[:, None].expand(-1, slots)
    table[rows[img_present], img_pos[img_present]] = slot_ids[img_present]
    return table


def _image_slots(is_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the positions of its image tokens in ascending order, padded to the row
    with the most (positions 0 there), and which slots are real: ((B, N), (B, N))."""
    slots = int(is_image.sum(1).max())
    img_pos = torch.sort((~is_image).to(torch.int8), dim=1, stable=True).indices[:, :slots]
    img_present = is_image.gather(1, img_pos)
    return img_pos * img_present, img_present


class _GenerationState:
    """Everything one generation (one KV cache) needs between forwards."""

    def __init__(self, img_pos: torch.Tensor, img_present: torch.Tensor, length: int, num_layers: int):
        self.img_pos = img_pos  # (B, N) timeline positions of image slots (0 where absent)
        self.img_present = img_present  # (B, N) False for slots padding rows with fewer image tokens
        self.prompt_length = length  # positions from here on are generated tokens
        self.length = length  # timeline length so far
        self.layouts: list[_KeyLayout] = [None] * num_layers  # type: ignore[list-item]
        self.plan = ExecutedPlan(n_img=img_present.sum(1))
        self.step = 0
        self.scored_keys = torch.zeros(img_pos.shape[0], num_layers, dtype=torch.long, device=img_pos.device)
        self.decision: dict[str, torch.Tensor] = {}  # this step's observed decision, for the plan

    def reorder(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.img_pos.device)
        self.img_pos, self.img_present = self.img_pos[rows], self.img_present[rows]
        reordered: dict[int, _KeyLayout] = {}
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


def _compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Local indices of the True entries of each row, in order, front-padded with
    filler to the longest row; returns (local (B, L'), valid (B, L'))."""
    longest = int(keep.sum(1).max())
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices  # dropped first, kept after
    local = order[:, order.shape[1] - longest :]
    return local, keep.gather(1, local)


class _MaskCache:
    """One attention mask per distinct key layout within a forward."""

    def __init__(self):
        self._built: list[tuple[_KeyLayout, object]] = []

    def get(self, model, hidden, layout, timeline_mask, cache, layer_idx):
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
        mask = create_causal_mask(
            config=model.config,
            inputs_embeds=hidden,
            attention_mask=key_mask,
            position_ids=None,  # gapped original ids would read as packed sequences
            layer_idx=layer_idx,
            **{model._dyrate_cache_argument: cache},
        )
        self._built.append((layout, mask))
        return mask


def _gather_rows(tensor: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Gather along dim 1 of a (B, L, ...) tensor (expanded over batch if needed)."""
    tensor = tensor.expand(local.shape[0], *tensor.shape[1:])
    index = local.reshape(*local.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
    return tensor.gather(1, index)


def _attention_rows(layer, apply_rotary, layer_input, rotary, pick, key_ok, keys=None, projected=None) -> torch.Tensor:
    """(B, heads, T, L) attention of the rows ``pick`` (B, T) of ``layer_input`` (all
    of its rows for None) at the decoder ``layer``: its own post-rotary queries against
    its keys (``keys`` from the cache, else computed from ``layer_input``), softmax where
    ``key_ok`` (B, T, L) allows (everywhere for None). Costs one query projection per row unless
    ``projected``, the layer's own query projection of every row of ``layer_input``, was
    kept while it ran; the layer itself keeps its fast attention kernel."""
    attn = layer.self_attn
    head_dim = attn.head_dim
    cos, sin = rotary
    picked = (lambda tensor: tensor) if pick is None else (lambda tensor: _gather_rows(tensor, pick))
    if projected is None:
        projected = attn.q_proj(layer.input_layernorm(picked(layer_input)))
    else:
        projected = picked(projected)
    batch, rows = projected.shape[:2]
    query = projected.view(batch, rows, -1, head_dim).transpose(1, 2)  # (B, H, T, hd)
    query = apply_rotary(query, query, picked(cos), picked(sin))[0]
    if keys is None:
        keys = attn.k_proj(layer.input_layernorm(layer_input)).view(batch, layer_input.shape[1], -1, head_dim).transpose(1, 2)
        keys = apply_rotary(keys, keys, cos, sin)[0]
    kv_heads = keys.shape[1]
    query = query.reshape(batch, kv_heads, -1, head_dim)  # head h uses kv head h // groups: (B, Hkv, groups * T, hd)
    logits = torch.matmul(query, keys.transpose(-1, -2)).float() * attn.scaling  # (B, Hkv, groups * T, L)
    logits = logits.view(batch, -1, rows, logits.shape[-1])
    if key_ok is not None:
        logits = logits.masked_fill(~key_ok[:, None], float("-inf"))
    return logits.softmax(-1)


class _PrunedDecoderMixin:
    """Placed in front of the language model's own class; replaces only ``forward``."""

    _dyrate_policy: PruningPolicy
    _dyrate_image_token_id: int
    _dyrate_cache_argument: str
    _dyrate_prompt_ids: torch.Tensor | None
    _dyrate_rotary: Callable
    _dyrate_scoring: str
    _dyrate_arch: Arch
    last_plan: ExecutedPlan | None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None, **kwargs):
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(flag, False):
                raise PruningConfigError(
                    f"{flag}=True is not available on a pruned model: layers past the pruning point "
                    "see fewer tokens; use the unpruned model for per-layer outputs"
                )
        kwargs.pop("return_dict", None)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = self.config.use_cache
        cache = kwargs.pop(self._dyrate_cache_argument, None)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        state = getattr(cache, _STATE_ATTR, None)
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
        if state is None:
            hidden = self._dyrate_prefill(inputs_embeds, attention_mask, position_ids, cache, kwargs)
        else:
            hidden = self._dyrate_decode(state, inputs_embeds, attention_mask, position_ids, cache, kwargs)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden), **{self._dyrate_cache_argument: cache if use_cache else None}
        )

    # -- prefill -------------------------------------------------------------------

    def _dyrate_prefill(self, embeds, attention_mask, position_ids, cache, kwargs):
        batch, length, _ = embeds.shape
        device = embeds.device
        if cache is not None and cache.get_seq_length() > 0:
            raise PruningConfigError(
                "the KV cache passed to the pruned model already holds tokens it did not prune; "
                "start generation from an empty cache"
            )
        prompt_ids = self._dyrate_prompt_ids
        self._dyrate_prompt_ids = None
        if prompt_ids is None or prompt_ids.shape != (batch, length):
            raise PruningConfigError(
                "the pruned language model must be called through the LLaVA model with input_ids, "
                "so that the image span can be found from the image token id"
            )
        is_image = prompt_ids.to(device) == self._dyrate_image_token_id
        img_pos, img_present = _image_slots(is_image)
        state = _GenerationState(img_pos, img_present, length, len(self.layers))
        if cache is not None:
            setattr(cache, _STATE_ATTR, state)
            reorder_cache = cache.reorder_cache

            def reorder_cache_and_plan(beam_idx):
                reorder_cache(beam_idx)
                state.reorder(beam_idx)

            cache.reorder_cache = reorder_cache_and_plan
        self.last_plan = state.plan

        if position_ids is None:
            position_ids = torch.arange(length, device=device).unsqueeze(0)
        cos, sin = self.rotary_emb(embeds, position_ids)
        if attention_mask is None:
            query_timeline = torch.full((batch,), length - 1, device=device)
        else:  # the last real prompt token
            query_timeline = length - 1 - attention_mask.flip(1).to(torch.int8).argmax(1)
        full_layout = layout = _KeyLayout(
            torch.arange(length, device=device).expand(batch, -1),
            torch.ones(batch, length, dtype=torch.bool, device=device),
            img_present.clone(),
            _slot_table(img_pos, img_present, length),
            _token_groups(is_image, torch.full((batch,), length, device=device)),
        )
        full_hidden = None  # the last hidden state of every prompt position, once some are dropped
        hidden, masks, layer_input, projected = embeds, _MaskCache(), None, None
        for layer_idx, layer in enumerate(self.layers):
            if layer_idx > 0:
                img_kept = self._dyrate_select(
                    state, layer_idx, layout, layer_input, projected, (cos, sin), query_timeline, attention_mask, cache,
                    q_row=None,
                )
                if img_kept is not None and not self._dyrate_policy.progressive:
                    layout = self._dyrate_masked(layout, img_kept)
                elif img_kept is not None:
                    if full_hidden is None:
                        full_hidden = hidden.new_zeros(batch, length, hidden.shape[-1])
                    self._dyrate_scatter_rows(full_hidden, hidden, layout)
                    layout, local = self._dyrate_filter(layout, img_kept)
                    hidden = _gather_rows(hidden, local)
                    cos, sin = _gather_rows(cos, local), _gather_rows(sin, local)
            state.layouts[layer_idx] = layout
            layer_input = hidden
            with self._dyrate_scoring_capture(layer, layer_idx, state.step) as capture:
                hidden = layer(
                    hidden,
                    attention_mask=masks.get(self, hidden, layout, attention_mask, cache, layer_idx),
                    position_embeddings=(cos, sin),
                    # gapped original ids would read as packed sequences to some kernels
                    position_ids=position_ids if layout is full_layout else None,
                    use_cache=cache is not None,
                    **{self._dyrate_cache_argument: cache},
                    **kwargs,
                )
            projected = capture.output
        self._dyrate_record_step(state, attention_mask, new_tokens=length)
        if full_hidden is None:
            return hidden
        self._dyrate_scatter_rows(full_hidden, hidden, layout)
        return full_hidden

    # -- decode ----------------------------------------------------------------------

    def _dyrate_decode(self, state, embeds, attention_mask, position_ids, cache, kwargs):
        batch, new_tokens, _ = embeds.shape
        device = embeds.device
        new_positions = torch.arange(state.length, state.length + new_tokens, device=device)
        state.length += new_tokens
        state.step += 1
        if position_ids is None:
            position_ids = new_positions.unsqueeze(0)
        cos, sin = self.rotary_emb(embeds, position_ids)
        appended: dict[int, _KeyLayout] = {}
        state.layouts = [appended.setdefault(id(lay), lay.appended(new_positions)) for lay in state.layouts]
        query_timeline = torch.full((batch,), state.length - 1, device=device)
        hidden, masks, layer_input, projected = embeds, _MaskCache(), None, None
        for layer_idx, layer in enumerate(self.layers):
            if layer_idx > 0:
                img_kept = self._dyrate_select(
                    state, layer_idx, state.layouts[layer_idx], layer_input, projected, (cos, sin), query_timeline,
                    attention_mask, cache, q_row=new_tokens - 1,
                )
                if img_kept is not None and not self._dyrate_policy.progressive:
                    self._dyrate_mask_later_layers(state, layer_idx, img_kept)
                elif img_kept is not None:
                    self._dyrate_evict(state, cache, layer_idx, img_kept, new_tokens)
            layer_input = hidden
            with self._dyrate_scoring_capture(layer, layer_idx, state.step) as capture:
                hidden = layer(
                    hidden,
                    attention_mask=masks.get(self, hidden, state.layouts[layer_idx], attention_mask, cache, layer_idx),
                    position_embeddings=(cos, sin),
                    position_ids=position_ids,
                    use_cache=True,
                    **{self._dyrate_cache_argument: cache},
                    **kwargs,
                )
            projected = capture.output
        self._dyrate_record_step(state, attention_mask, new_tokens)
        return hidden

    def _dyrate_evict(self, state, cache, first_layer, img_kept, new_tokens):
        """Remove image slots not in ``img_kept`` from the caches of layers >= first_layer.

        Their layouts already end with this step's ``new_tokens`` (always kept), which
        those layers have not cached yet."""
        evicted: dict[int, tuple[_KeyLayout, torch.Tensor]] = {}
        for layer_idx in range(first_layer, len(self.layers)):
            old = state.layouts[layer_idx]
            if id(old) not in evicted:
                kept = old.img_kept & img_kept
                evicted[id(old)] = self._dyrate_filter(old, kept)
            new_layout, local = evicted[id(old)]
            state.layouts[layer_idx] = new_layout
            cache_layer = cache.layers[layer_idx]
            cached = local[:, : local.shape[1] - new_tokens]
            index = cached[:, None, :, None].expand(-1, cache_layer.keys.shape[1], -1, cache_layer.keys.shape[-1])
            cache_layer.keys = cache_layer.keys.gather(2, index)
            cache_layer.values = cache_layer.values.gather(2, index)

    def _dyrate_mask_later_layers(self, state, first_layer, img_kept):
        """Attend to ``img_kept`` alone from ``first_layer`` on; every image token stays cached."""
        masked: dict[int, _KeyLayout] = {}
        for layer_idx in range(first_layer, len(self.layers)):
            old = state.layouts[layer_idx]
            if id(old) not in masked:
                masked[id(old)] = self._dyrate_masked(old, img_kept)
            state.layouts[layer_idx] = masked[id(old)]

    # -- shared pieces -----------------------------------------------------------------

    def _dyrate_scoring_capture(self, layer, layer_idx, step):
        """While ``layer`` runs, keep its query projection when the policy observes the
        step's attention before the next layer: the scoring row then reuses it instead
        of projecting the query again (at 7B width, reading a 4096 x 4096 weight matrix
        once more at every decode step). With eager
        weights, keep what the attention module returns (its output and weights) after
        every layer, as the reference code has them at hand wherever it ranks."""
        if self._dyrate_scoring == "eager-weights":
            return _OutputCapture(layer.self_attn)
        observed = layer_idx + 1 < len(self.layers) and self._dyrate_policy.observes(layer_idx + 1, step)
        return _OutputCapture(layer.self_attn.q_proj if observed and self._dyrate_scoring == "row" else None)

    def _dyrate_select(self, state, layer_idx, layout, layer_input, projected, rotary, query_timeline, timeline_mask, cache,
                       q_row):
        """Ask the policy before ``layer_idx``, whose keys are ``layout`` so far. Returns
        the image slots to attend to from this layer on, or None when nothing changes.
        ``projected`` is what ``_dyrate_scoring_capture`` kept of the previous layer.

        The slots are the top by the step's attention at layer_idx-1 (unless the policy
        ranks them itself) among the candidates: the slots still kept for a progressive
        policy (a dropped token never returns), every image slot of the prompt for one
        that re-selects at every step. A policy that observes this layer is shown the
        attention of the step's query per head and token group first."""
        policy = self._dyrate_policy
        view = StepView(n_img=state.plan.n_img)
        probs = None
        if policy.observes(layer_idx, state.step):
            probs = self._dyrate_attention_row(state, layer_idx - 1, layer_input, projected, rotary, query_timeline,
                                               timeline_mask, cache, q_row)
            view.group_attention = self._dyrate_group_attention(state, layer_idx - 1, probs)
        keep = policy.keep_before_layer(layer_idx, state.step, view)
        if probs is not None:
            n_img = state.plan.n_img
            rerun_flops = state.decision.get("decision_flops")  # what scoring by a layer rerun cost, if it did
            state.decision = {
                "chosen_keep": torch.full_like(n_img, -1) if keep is None else keep.to(n_img.device),
                "group_attention": view.group_attention.mean(1),
                "decision_flops": torch.full_like(n_img, policy.decision_flops),
            }
            if rerun_flops is not None:
                state.decision["decision_flops"] += rerun_flops
        if keep is None:
            return None
        kept_now = layout.img_kept.sum(1)
        candidates = layout.img_kept if policy.progressive else state.img_present
        keep = torch.minimum(keep.to(kept_now.device), kept_now if policy.progressive else candidates.sum(1))
        if policy.progressive and torch.equal(keep, kept_now):
            return None
        if bool((keep == 0).all()):
            return torch.zeros_like(layout.img_kept)
        if policy.ranks_by_attention:
            if probs is None:
                probs = self._dyrate_attention_row(state, layer_idx - 1, layer_input, projected, rotary, query_timeline,
                                                   timeline_mask, cache, q_row)
            scores = self._dyrate_image_scores(state, layer_idx - 1, probs)
        else:
            scores = policy.selection_scores(candidates)
        return top_slots(scores, candidates, keep)

    @staticmethod
    def _dyrate_masked(layout, img_kept):
        """The layout with the image entries not in ``img_kept`` hidden (still cached)."""
        slot = layout.entry_slot
        hidden = (slot >= 0) & ~img_kept.gather(1, slot.clamp(min=0))
        hidden = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], layout.generated)], dim=1)
        return _KeyLayout(layout.index, layout.valid, img_kept, slot, layout.entry_group, hidden, layout.filler)

    @staticmethod
    def _dyrate_filter(layout, img_kept):
        """The layout without the image slots that are not in ``img_kept``, and the
        local indices of its entries in the old one."""
        slot = layout.entry_slot
        prompt = slot.shape[1]
        keep_prompt = layout.valid[:, :prompt] & ((slot < 0) | img_kept.gather(1, slot.clamp(min=0)))
        local, valid = _compact(torch.cat([keep_prompt, layout.valid[:, prompt:]], dim=1))
        # generated entries are never dropped: they stay the last ones
        prompt_local = local[:, : local.shape[1] - layout.generated]
        kept = _KeyLayout(layout.index.gather(1, local), valid, img_kept, slot.gather(1, prompt_local),
                          layout.entry_group.gather(1, prompt_local), filler=not bool(valid.all()))
        return kept, local

    def _dyrate_attention_row(self, state, obs_layer, layer_input, projected, rotary, query_timeline, timeline_mask,
                              cache, q_row):
        """(B, heads, L) attention of the step's query at ``obs_layer``: softmax over the
        keys that layer attends to, in the order of its layout's entries (0 elsewhere)."""
        layout = state.layouts[obs_layer]
        batch = layer_input.shape[0]
        key_ok = layout.attended()
        if q_row is None:  # prefill: the last real prompt token, at its place in this layer's rows
            pick = (layout.index == query_timeline[:, None]).to(torch.int8).argmax(1)[:, None]
            key_ok = key_ok & (layout.index <= query_timeline[:, None])
        else:  # decode: every cached entry precedes the step's newest token (the only one, mostly)
            pick = None if layer_input.shape[1] == 1 else torch.full((batch, 1), q_row, device=layer_input.device)
            if timeline_mask is None and layout.attends_all:
                key_ok = None
        if timeline_mask is not None:
            key_ok = key_ok & timeline_mask.gather(1, layout.index)
        if self._dyrate_scoring != "row":  # every query's weights (B, heads, rows, L), then the step's row
            if self._dyrate_scoring == "eager-weights":  # they came with the layer's forward: no extra FLOPs
                weights = projected[1]
            else:
                weights = self._dyrate_rerun_weights(state, obs_layer, layer_input, rotary, key_ok, q_row)
            return weights.float()[:, :, 0] if pick is None else _gather_rows(weights.transpose(1, 2).float(), pick)[:, 0]
        # the batch-1 cost of this row, for FLOPs
        state.scored_keys[:, obs_layer] = layout.index.shape[1] if key_ok is None else key_ok.sum(1)
        keys = cache.layers[obs_layer].keys if cache is not None else None
        return _attention_rows(self.layers[obs_layer], self._dyrate_rotary, layer_input, rotary, pick,
                               None if key_ok is None else key_ok[:, None, :], keys, projected)[:, :, 0]

    def _dyrate_rerun_weights(self, state, obs_layer, layer_input, rotary, key_ok, q_row):
        """(B, heads, L, L) LightCompress's way: the observation layer run again on its
        input in eager attention, without the cache, for the weights of every query; its
        FLOPs go into the plan as the decision's."""
        if q_row is not None:
            raise PruningConfigError(
                f"method {self._dyrate_policy.name!r} selects at decode steps; scoring by rerunning layer K-1 "
                "(LightCompress's way) reruns it on the prompt and can rank only at the prefill"
            )
        layer = self.layers[obs_layer]
        with _attention_implementation(self, "eager"), _OutputCapture(layer.self_attn) as capture:
            mask = create_causal_mask(config=self.config, inputs_embeds=layer_input, attention_mask=key_ok, position_ids=None,
                                      **{self._dyrate_cache_argument: None})
            layer(layer_input, attention_mask=mask, position_embeddings=rotary, position_ids=None, use_cache=False,
                  **{self._dyrate_cache_argument: None})
        rows = key_ok.sum(1)
        state.decision["decision_flops"] = layer_flops(self._dyrate_arch, rows, rows)
        return capture.output[1]

    @staticmethod
    def _dyrate_image_scores(state, obs_layer, probs):
        """(B, N) head-averaged attention of the step's query to each image slot."""
        layout = state.layouts[obs_layer]
        slot, prompt = layout.entry_slot, layout.entry_slot.shape[1]
        per_entry = probs[..., :prompt].mean(1) * layout.valid[:, :prompt]
        # slot -1 (not an image token) lands in a spare first column
        by_slot = per_entry.new_zeros(per_entry.shape[0], state.img_pos.shape[1] + 1)
        return by_slot.scatter_(1, slot + 1, per_entry)[:, 1:]

    @staticmethod
    def _dyrate_group_attention(state, obs_layer, probs):
        """(B, heads, len(GROUPS)) the step's attention per head summed over each token group:
        the prompt entries by their groups, the generated ones all in the response group."""
        layout = state.layouts[obs_layer]
        prompt = layout.entry_group.shape[1]
        summed = _sum_by_group(probs[..., :prompt], layout.entry_group[:, None, :])
        summed[..., _RESPONSE] += probs[..., prompt:].sum(-1)
        return summed

    @staticmethod
    def _dyrate_scatter_rows(full, hidden, layout):
        rows = torch.arange(full.shape[0], device=full.device)[:, None].expand_as(layout.index)
        full[rows[layout.valid], layout.index[layout.valid]] = hidden[layout.valid]

    def _dyrate_record_step(self, state, timeline_mask, new_tokens):
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
        state.plan.add_step(
            *(torch.stack([c[i] for c in per_layer], dim=1) for i in range(3)), state.scored_keys, state.layouts[-1].img_kept,
            **state.decision,
        )
        state.scored_keys = torch.zeros_like(state.scored_keys)
        state.decision = {}


# -- installing on a model ---------------------------------------------------------------


def _language_model(model):
    inner = getattr(model, "model", None)
    language_model = getattr(inner, "language_model", None)
    layers = getattr(language_model, "layers", None)
    if language_model is None or layers is None or not hasattr(language_model, "rotary_emb"):
        raise PruningConfigError(
            f"pruning needs a LlavaForConditionalGeneration with a Llama-style language model; "
            f"got {type(model).__name__}"
        )
    attn = layers[0].self_attn
    if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "head_dim", "scaling")):
        raise PruningConfigError(
            f"pruning needs Llama-style attention layers (q_proj, k_proj, head_dim, scaling); "
            f"got {type(attn).__name__}"
        )
    _cache_argument_of(language_model)
    return inner, language_model


def _cache_argument_of(language_model) -> str:
    return _cache_argument(_own_class(language_model), type(language_model.layers[0]))


def model_arch(model) -> Arch:
    """The shape of a LLaVA model with a Llama-style language model (else a clear error)."""
    _language_model(model)
    return Arch.from_config(model.config, name=getattr(model.config, "_name_or_path", "") or type(model).__name__)


def image_token_id(config) -> int:
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)
    if token_id is None:
        raise PruningConfigError("the model config names no image token id (image_token_id)")
    return int(token_id)


def _check_image_tokens(input_ids, token_id: int) -> None:
    if input_ids is None:
        raise PruningConfigError(
            "pruning needs input_ids to find the image span from the image token id; "
            "inputs_embeds alone cannot be pruned"
        )
    missing = (input_ids == token_id).sum(1) == 0
    if bool(missing.any()):
        row = int(missing.nonzero()[0])
        raise PruningConfigError(
            f"the prompt of sample {row} has no image token (id {token_id}): pruning needs an image "
            "in every prompt; put the processor's image placeholder (e.g. '<image>') in the text"
        )


def _own_class(language_model) -> type:
    """The language model's class without the executor put in front of it."""
    return type(language_model).__mro__[2] if isinstance(language_model, _PrunedDecoderMixin) else type(language_model)


def _rotary_of(language_model) -> Callable:
    """The rotary function of the language model's own modelling module."""
    return inspect.getmodule(_own_class(language_model)).apply_rotary_pos_emb


def install(model, policy: PruningPolicy, scoring: str = "row"):
    """Put the executor into ``model`` (in place) with ``policy``; re-installing swaps the
    policy. ``scoring`` other than "row" is one of FastV's peers (``SCORINGS``), for the bench."""
    if scoring not in SCORINGS:
        raise PruningConfigError(f"scoring={scoring!r} is not allowed: use one of {', '.join(SCORINGS)}")
    inner, language_model = _language_model(model)
    if not isinstance(language_model, _PrunedDecoderMixin):
        base = type(language_model)
        language_model._dyrate_own_attention = language_model.config._attn_implementation
        language_model._dyrate_arch = model_arch(model)
        pruned_class = type(f"Pruned{base.__name__}", (_PrunedDecoderMixin, base), {})
        language_model.__class__ = pruned_class
        language_model._dyrate_rotary = _rotary_of(language_model)
        language_model._dyrate_prompt_ids = None
        language_model.last_plan = None
        token_id = image_token_id(model.config)
        cache_argument = language_model._dyrate_cache_argument = _cache_argument_of(language_model)

        def capture_prompt(module, args, kwargs):
            cache = kwargs.get(cache_argument)
            if cache is not None and getattr(cache, _STATE_ATTR, None) is not None:
                return  # a decode step: the image span is already known
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if language_model._dyrate_policy.needs_image:
                _check_image_tokens(input_ids, token_id)
            language_model._dyrate_prompt_ids = input_ids

        model_generate = model.generate

        @functools.wraps(model_generate)
        def generate_checked(*args, **kwargs):
            # generate runs the vision tower before the first forward: check first
            if language_model._dyrate_policy.needs_image:
                _check_image_tokens(kwargs.get("input_ids", args[0] if args else None), token_id)
            return model_generate(*args, **kwargs)

        model.generate = generate_checked
        language_model._dyrate_image_token_id = token_id
        language_model._dyrate_hook = inner.register_forward_pre_hook(capture_prompt, with_kwargs=True)
    language_model._dyrate_policy = policy
    language_model._dyrate_scoring = scoring
    wanted = "eager" if scoring == "eager-weights" else language_model._dyrate_own_attention
    if language_model.config._attn_implementation != wanted:
        language_model.set_attn_implementation(wanted)
    return model


def uninstall(model):
    """Restore the model's own language-model class."""
    _, language_model = _language_model(model)
    if isinstance(language_model, _PrunedDecoderMixin):
        language_model._dyrate_hook.remove()
        del model.generate  # the instance wrapper; the class method shows again
        if language_model.config._attn_implementation != language_model._dyrate_own_attention:
            language_model.set_attn_implementation(language_model._dyrate_own_attention)
        language_model.__class__ = _own_class(language_model)
        for name in ("_dyrate_policy", "_dyrate_rotary", "_dyrate_prompt_ids", "_dyrate_image_token_id", "_dyrate_hook",
                     "_dyrate_cache_argument", "last_plan", "_dyrate_scoring", "_dyrate_own_attention", "_dyrate_arch"):
            delattr(language_model, name)
    return model


def installed_policy(model) -> PruningPolicy | None:
    _, language_model = _language_model(model)
    return getattr(language_model, "_dyrate_policy", None)


def last_plan(model) -> ExecutedPlan | None:
    _, language_model = _language_model(model)
    return getattr(language_model, "last_plan", None)


# -- DyRate training: the frozen model teacher-forced, with differentiable key weights ----------

_WEIGHTED_ATTENTION = "dyrate_key_weighted"


def _key_weighted_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            dyrate_key_weights=None, **kwargs):
    """Attention whose exponentiated scores are multiplied by per-query key weights
    before normalisation: weights of 0 and 1 give exactly the attention with those keys
    removed, and a gradient reaches the weights (DyRate's differentiable policy)."""
    if dyrate_key_weights is None:
        raise RuntimeError("the key-weighted attention is only for TeacherForcedPass.logits")
    groups = query.shape[1] // key.shape[1]  # head h uses kv head h // groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~attention_mask, float("-inf"))
    weighted = (logits - logits.amax(-1, keepdim=True).detach()).exp() * dyrate_key_weights
    probs = weighted / weighted.sum(-1, keepdim=True).clamp_min(torch.finfo(weighted.dtype).tiny)
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous(), None


AttentionInterface.register(_WEIGHTED_ATTENTION, _key_weighted_attention)


@contextlib.contextmanager
def _attention_implementation(language_model, name: str):
    previous = language_model.config._attn_implementation
    language_model.set_attn_implementation(name)
    try:
        yield
    finally:
        language_model.set_attn_implementation(previous)


class TeacherForcedPass:
    """A frozen LLaVA model teacher-forced on prompt + answer, as DyRate's training sees it.

    Rows are right-padded sequences: ``prompt_lengths[b]`` prompt tokens (with the image
    tokens), then ``answer_lengths[b]`` answer tokens. Step t of row b is the query at
    position prompt_lengths[b] - 1 + t (t = 0 is the last prompt token, the prefill's
    query), which predicts answer token t. Layers < K run once, without gradients, and
    give at every step what the predictor observes at layer K-1 (the same computation
    as in generation). ``logits(keep_weights)`` runs layers >= K where every query of
    step t (the prompt's queries belong to step 0) weighs image slot i by
    ``keep_weights[b, t, i]``; with 0/1 weights that is the generation whose kept sets
    they are.
    """

    def __init__(self, model, input_ids: torch.Tensor, pixel_values: torch.Tensor, prompt_lengths: torch.Tensor,
                 answer_lengths: torch.Tensor, K: int):
        inner, language_model = _language_model(model)
        if not 1 <= K < len(language_model.layers):
            raise PruningConfigError(f"K={K} is not allowed: K must be an integer in 1..{len(language_model.layers) - 1}")
        token_id = image_token_id(model.config)
        _check_image_tokens(input_ids, token_id)
        self._model, self._language_model, self.K = model, language_model, K
        batch, length = input_ids.shape
        device = input_ids.device
        self.is_image = input_ids == token_id
        steps = torch.arange(int(answer_lengths.max()), device=device)
        self.step_valid = steps[None] < answer_lengths[:, None]  # (B, T)
        self.step_rows = (prompt_lengths[:, None] - 1 + steps[None]).clamp(max=length - 1)  # (B, T)
        positions = torch.arange(length, device=device)
        # the prompt's queries belong to step 0, answer token t's to step t
        self._step_of_position = (positions[None] - (prompt_lengths[:, None] - 1)).clamp(0, len(steps) - 1)
        self.img_pos, self.img_present = _image_slots(self.is_image)
        self.n_img = self.img_present.sum(1)
        with torch.no_grad():
            embeds = inner.get_input_embeddings()(input_ids)
            features = inner.get_image_features(
                pixel_values=pixel_values.to(embeds.dtype),
                vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                return_dict=True,
            ).pooler_output
            features = torch.cat(list(features)).to(embeds.dtype)
            if features.shape[0] != int(self.is_image.sum()):
                raise PruningConfigError(
                    f"the prompts hold {int(self.is_image.sum())} image tokens but the images give {features.shape[0]} features"
                )
            hidden = embeds.masked_scatter(self.is_image[..., None].expand_as(embeds), features)
            self._position_ids = positions[None].expand(batch, -1)
            self._rotary = language_model.rotary_emb(hidden, self._position_ids)
            self._causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
            mask = create_causal_mask(config=language_model.config, inputs_embeds=hidden, attention_mask=None,
                                      position_ids=None, **{_cache_argument_of(language_model): None})
            for layer in language_model.layers[:K]:
                layer_input = hidden
                hidden = layer(hidden, attention_mask=mask, position_embeddings=self._rotary, position_ids=self._position_ids)
            self._hidden_at_K = hidden
            key_ok = positions[None, None, :] <= self.step_rows[..., None]  # (B, T, L): causal
            probs = _attention_rows(language_model.layers[K - 1], _rotary_of(language_model), layer_input, self._rotary,
                                    self.step_rows, key_ok)  # (B, H, T, L)
            by_group = _sum_by_group(probs, _token_groups(self.is_image, prompt_lengths)[:, None, None, :])
            self.group_attention = by_group.transpose(1, 2)  # (B, T, H, groups): what the predictor observes
            per_key = probs.mean(1)  # (B, T, L)
            self.image_scores = per_key.gather(2, self.img_pos[:, None, :].expand(-1, len(steps), -1))  # (B, T, N)

    def logits(self, keep_weights: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab) logits of every step with image slot weights ``keep_weights``
        (B, T, N) on layers >= K; gradients flow to the weights."""
        batch, length = self.is_image.shape
        slots = keep_weights.shape[2]
        per_query = keep_weights.gather(1, self._step_of_position[..., None].expand(-1, -1, slots))  # (B, L, N)
        slot_of_key = torch.full((batch, length), 0, dtype=torch.long, device=keep_weights.device)
        slot_of_key.scatter_(1, self.img_pos, torch.arange(slots, device=keep_weights.device).expand(batch, -1))
        per_key = per_query.gather(2, slot_of_key[:, None, :].expand(-1, length, -1))  # (B, L, L)
        key_weights = torch.where(self.is_image[:, None, :], per_key, torch.ones_like(per_key))[:, None]
        hidden = self._hidden_at_K
        with _attention_implementation(self._language_model, _WEIGHTED_ATTENTION):
            for layer in self._language_model.layers[self.K:]:
                hidden = layer(hidden, attention_mask=self._causal, position_embeddings=self._rotary,
                               position_ids=self._position_ids, dyrate_key_weights=key_weights)
        rows = _gather_rows(hidden, self.step_rows)
        return self._model.lm_head(self._language_model.norm(rows))
