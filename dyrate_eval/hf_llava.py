"""The pruning executor for Hugging Face ``LlavaForConditionalGeneration``.

This is the only module of the project that touches transformers internals. It swaps
the class of the LLaVA language model (a Llama-style decoder) for a subclass with its
own decoder-layer loop. Between two layers the loop asks the method's policy how many
image tokens to keep; when the count drops it ranks the image tokens by the attention
row of the step's query at the previous layer (computed here from that layer's own
post-rotary query and cached keys, while every layer keeps its fast attention kernel),
then physically removes the dropped tokens: from the hidden states in prefill, and from
the KV cache of the layers that no longer see them in decode.

Bookkeeping. Every token of a generation has a timeline position: prompt positions
0..S-1, then one per generated token. Each decoder layer has a key layout, the timeline
positions its KV cache holds, per batch row. Layers that saw the same drops share one
layout object. Rows of a batch may keep different counts; shorter rows are padded at
the front with filler entries that are masked out as keys (exact, like left padding).
Surviving tokens keep their original position ids (FastV/VTW convention).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from .errors import PruningConfigError
from .methods import PruningPolicy, StepView
from .plan import ExecutedPlan

_STATE_ATTR = "_dyrate_generation_state"


@dataclass
class _KeyLayout:
    """The keys one or more decoder layers hold: timeline positions per row."""

    index: torch.Tensor  # (B, L) timeline positions, ascending per row
    valid: torch.Tensor  # (B, L) False for filler entries
    img_kept: torch.Tensor  # (B, N) which image slots are among the keys

    def appended(self, positions: torch.Tensor) -> "_KeyLayout":
        batch = self.index.shape[0]
        new = positions.unsqueeze(0).expand(batch, -1)
        return _KeyLayout(
            torch.cat([self.index, new], dim=1),
            torch.cat([self.valid, torch.ones_like(new, dtype=torch.bool)], dim=1),
            self.img_kept,
        )

    def select_rows(self, rows: torch.Tensor) -> "_KeyLayout":
        return _KeyLayout(self.index[rows], self.valid[rows], self.img_kept[rows])


class _GenerationState:
    """Everything one generation (one KV cache) needs between forwards."""

    def __init__(self, img_pos: torch.Tensor, img_present: torch.Tensor, length: int, num_layers: int):
        self.img_pos = img_pos  # (B, N) timeline positions of image slots (0 where absent)
        self.img_present = img_present  # (B, N) False for slots padding rows with fewer image tokens
        self.length = length  # timeline length so far
        self.layouts: list[_KeyLayout] = [None] * num_layers  # type: ignore[list-item]
        self.plan = ExecutedPlan(n_img=img_present.sum(1))
        self.step = 0
        self.scored_keys = torch.zeros(img_pos.shape[0], num_layers, dtype=torch.long, device=img_pos.device)

    def slot_of_position(self) -> torch.Tensor:
        """(B, length) image slot of each timeline position, -1 for non-image positions."""
        batch, slots = self.img_pos.shape
        table = torch.full((batch, self.length), -1, dtype=torch.long, device=self.img_pos.device)
        slot_ids = torch.arange(slots, device=self.img_pos.device).expand(batch, -1)
        rows = torch.arange(batch, device=self.img_pos.device)[:, None].expand(-1, slots)
        table[rows[self.img_present], self.img_pos[self.img_present]] = slot_ids[self.img_present]
        return table

    def reorder(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.img_pos.device)
        self.img_pos, self.img_present = self.img_pos[rows], self.img_present[rows]
        reordered: dict[int, _KeyLayout] = {}
        self.layouts = [reordered.setdefault(id(lay), lay.select_rows(rows)) for lay in self.layouts]
        self.plan.reorder(rows)


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
        if timeline_mask is None and bool(layout.valid.all()):
            key_mask = None
        else:
            key_mask = layout.valid
            if timeline_mask is not None:
                key_mask = key_mask & timeline_mask.gather(1, layout.index)
        mask = create_causal_mask(
            config=model.config,
            inputs_embeds=hidden,
            attention_mask=key_mask,
            past_key_values=cache,
            position_ids=None,  # gapped original ids would read as packed sequences
            layer_idx=layer_idx,
        )
        self._built.append((layout, mask))
        return mask


def _gather_rows(tensor: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Gather along dim 1 of a (B, L, ...) tensor (expanded over batch if needed)."""
    tensor = tensor.expand(local.shape[0], *tensor.shape[1:])
    index = local.reshape(*local.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
    return tensor.gather(1, index)


class _PrunedDecoderMixin:
    """Placed in front of the language model's own class; replaces only ``forward``."""

    _dyrate_policy: PruningPolicy
    _dyrate_image_token_id: int
    _dyrate_prompt_ids: torch.Tensor | None
    _dyrate_rotary: Callable
    last_plan: ExecutedPlan | None

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
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
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        state = getattr(past_key_values, _STATE_ATTR, None)
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
        if state is None:
            hidden = self._dyrate_prefill(inputs_embeds, attention_mask, position_ids, past_key_values, kwargs)
        else:
            hidden = self._dyrate_decode(state, inputs_embeds, attention_mask, position_ids, past_key_values, kwargs)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden), past_key_values=past_key_values if use_cache else None
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
        slots = int(is_image.sum(1).max())
        img_pos = torch.sort((~is_image).to(torch.int8), dim=1, stable=True).indices[:, :slots]  # ascending
        img_present = is_image.gather(1, img_pos)
        state = _GenerationState(img_pos * img_present, img_present, length, len(self.layers))
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
        )
        full_hidden = None  # the last hidden state of every prompt position, once some are dropped
        hidden, masks, layer_input = embeds, _MaskCache(), None
        for layer_idx, layer in enumerate(self.layers):
            if layer_idx > 0:
                img_kept = self._dyrate_select(
                    state, layer_idx, layout, layer_input, (cos, sin), query_timeline, attention_mask, cache, q_row=None
                )
                if img_kept is not None:
                    if full_hidden is None:
                        full_hidden = hidden.new_zeros(batch, length, hidden.shape[-1])
                    self._dyrate_scatter_rows(full_hidden, hidden, layout)
                    layout, local = self._dyrate_filter(layout, img_kept, state.slot_of_position())
                    hidden = _gather_rows(hidden, local)
                    cos, sin = _gather_rows(cos, local), _gather_rows(sin, local)
            state.layouts[layer_idx] = layout
            layer_input = hidden
            hidden = layer(
                hidden,
                attention_mask=masks.get(self, hidden, layout, attention_mask, cache, layer_idx),
                position_embeddings=(cos, sin),
                # gapped original ids would read as packed sequences to some kernels
                position_ids=position_ids if layout is full_layout else None,
                past_key_values=cache,
                use_cache=cache is not None,
                **kwargs,
            )
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
        hidden, masks, layer_input = embeds, _MaskCache(), None
        for layer_idx, layer in enumerate(self.layers):
            if layer_idx > 0:
                img_kept = self._dyrate_select(
                    state, layer_idx, state.layouts[layer_idx], layer_input, (cos, sin), query_timeline,
                    attention_mask, cache, q_row=new_tokens - 1,
                )
                if img_kept is not None:
                    self._dyrate_evict(state, cache, layer_idx, img_kept, new_tokens)
            layer_input = hidden
            hidden = layer(
                hidden,
                attention_mask=masks.get(self, hidden, state.layouts[layer_idx], attention_mask, cache, layer_idx),
                position_embeddings=(cos, sin),
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                **kwargs,
            )
        self._dyrate_record_step(state, attention_mask, new_tokens)
        return hidden

    def _dyrate_evict(self, state, cache, first_layer, img_kept, new_tokens):
        """Remove image slots not in ``img_kept`` from the caches of layers >= first_layer.

        Their layouts already end with this step's ``new_tokens`` (always kept), which
        those layers have not cached yet."""
        slot_table = state.slot_of_position()
        evicted: dict[int, tuple[_KeyLayout, torch.Tensor]] = {}
        for layer_idx in range(first_layer, len(self.layers)):
            old = state.layouts[layer_idx]
            if id(old) not in evicted:
                kept = old.img_kept & img_kept
                evicted[id(old)] = self._dyrate_filter(old, kept, slot_table)
            new_layout, local = evicted[id(old)]
            state.layouts[layer_idx] = new_layout
            cache_layer = cache.layers[layer_idx]
            cached = local[:, : local.shape[1] - new_tokens]
            index = cached[:, None, :, None].expand(-1, cache_layer.keys.shape[1], -1, cache_layer.keys.shape[-1])
            cache_layer.keys = cache_layer.keys.gather(2, index)
            cache_layer.values = cache_layer.values.gather(2, index)

    # -- shared pieces -----------------------------------------------------------------

    def _dyrate_select(self, state, layer_idx, layout, layer_input, rotary, query_timeline, timeline_mask, cache, q_row):
        """Ask the policy before ``layer_idx``, whose keys are ``layout`` so far. Returns
        the image slots to keep from this layer on (top by the step's attention at
        layer_idx-1 among those still kept, unless the policy ranks them itself), or None
        when nothing changes."""
        kept_now = layout.img_kept.sum(1)
        keep = self._dyrate_policy.keep_before_layer(
            layer_idx, state.step, StepView(n_img=state.plan.n_img, kept=kept_now)
        )
        if keep is None:
            return None
        keep = torch.minimum(keep.to(kept_now.device), kept_now)
        if torch.equal(keep, kept_now):
            return None
        if bool((keep == 0).all()):
            return torch.zeros_like(layout.img_kept)
        if self._dyrate_policy.ranks_by_attention:
            scores = self._dyrate_image_scores(
                state, layer_idx - 1, layer_input, rotary, query_timeline, timeline_mask, cache, q_row
            )
        else:
            scores = self._dyrate_policy.selection_scores(layout.img_kept)
        scores = scores.masked_fill(~layout.img_kept, float("-inf"))
        order = scores.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return (rank < keep[:, None]) & layout.img_kept

    @staticmethod
    def _dyrate_filter(layout, img_kept, slot_table):
        """The layout without the image slots that are not in ``img_kept``."""
        entry_slot = slot_table.gather(1, layout.index)
        is_kept_image = img_kept.gather(1, entry_slot.clamp(min=0))
        keep = layout.valid & ((entry_slot < 0) | is_kept_image)
        local, valid = _compact(keep)
        return _KeyLayout(layout.index.gather(1, local), valid, img_kept), local

    def _dyrate_image_scores(self, state, obs_layer, layer_input, rotary, query_timeline, timeline_mask, cache, q_row):
        """(B, N) attention of the step's query to each image slot at ``obs_layer``,
        averaged over heads, softmax over all keys that layer holds."""
        layout_prev = state.layouts[obs_layer]
        layer = self.layers[obs_layer]
        attn = layer.self_attn
        batch = layer_input.shape[0]
        head_dim = attn.head_dim
        cos, sin = rotary
        if q_row is None:  # prefill: the last real prompt token, at its place in this layer's rows
            q_row_local = (layout_prev.index == query_timeline[:, None]).to(torch.int8).argmax(1)
        else:
            q_row_local = torch.full((batch,), q_row, device=layer_input.device)
        pick = q_row_local[:, None]
        normed = layer.input_layernorm(_gather_rows(layer_input, pick))
        query = attn.q_proj(normed).view(batch, 1, -1, head_dim).transpose(1, 2)  # (B, H, 1, hd)
        q_cos, q_sin = _gather_rows(cos, pick), _gather_rows(sin, pick)
        query = self._dyrate_rotary(query, query, q_cos, q_sin)[0]
        if cache is not None:
            keys = cache.layers[obs_layer].keys
        else:
            keys = attn.k_proj(layer.input_layernorm(layer_input)).view(batch, layer_input.shape[1], -1, head_dim).transpose(1, 2)
            keys = self._dyrate_rotary(keys, keys, cos, sin)[0]
        kv_heads = keys.shape[1]
        query = query.reshape(batch, kv_heads, -1, head_dim)  # head h uses kv head h // groups
        logits = torch.matmul(query, keys.transpose(-1, -2)).float() * attn.scaling  # (B, Hkv, groups, L)
        key_ok = layout_prev.valid & (layout_prev.index <= query_timeline[:, None])
        if timeline_mask is not None:
            key_ok &= timeline_mask.gather(1, layout_prev.index)
        logits = logits.masked_fill(~key_ok[:, None, None, :], float("-inf"))
        state.scored_keys[:, obs_layer] = key_ok.sum(1)  # the batch-1 cost of this row, for FLOPs
        per_key = logits.softmax(-1).mean(dim=(1, 2))  # (B, L)
        by_position = torch.zeros(batch, state.length, device=per_key.device)
        by_position.scatter_(1, layout_prev.index, per_key * layout_prev.valid)
        return by_position.gather(1, state.img_pos)

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
            *(torch.stack([c[i] for c in per_layer], dim=1) for i in range(3)), state.scored_keys, state.layouts[-1].img_kept
        )
        state.scored_keys = torch.zeros_like(state.scored_keys)


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
    return inner, language_model


def num_decoder_layers(model) -> int:
    return len(_language_model(model)[1].layers)


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


def install(model, policy: PruningPolicy):
    """Put the executor into ``model`` (in place) with ``policy``; re-installing swaps the policy."""
    inner, language_model = _language_model(model)
    if not isinstance(language_model, _PrunedDecoderMixin):
        base = type(language_model)
        pruned_class = type(f"Pruned{base.__name__}", (_PrunedDecoderMixin, base), {})
        language_model.__class__ = pruned_class
        rotary = inspect.getmodule(base).apply_rotary_pos_emb
        language_model._dyrate_rotary = rotary
        language_model._dyrate_prompt_ids = None
        language_model.last_plan = None
        token_id = image_token_id(model.config)

        def capture_prompt(module, args, kwargs):
            cache = kwargs.get("past_key_values")
            if cache is not None and getattr(cache, _STATE_ATTR, None) is not None:
                return  # a decode step: the image span is already known
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            _check_image_tokens(input_ids, token_id)
            language_model._dyrate_prompt_ids = input_ids

        model_generate = model.generate

        @functools.wraps(model_generate)
        def generate_checked(*args, **kwargs):
            # generate runs the vision tower before the first forward: check first
            _check_image_tokens(kwargs.get("input_ids", args[0] if args else None), token_id)
            return model_generate(*args, **kwargs)

        model.generate = generate_checked
        language_model._dyrate_image_token_id = token_id
        language_model._dyrate_hook = inner.register_forward_pre_hook(capture_prompt, with_kwargs=True)
    language_model._dyrate_policy = policy
    return model


def uninstall(model):
    """Restore the model's own language-model class."""
    _, language_model = _language_model(model)
    if isinstance(language_model, _PrunedDecoderMixin):
        language_model._dyrate_hook.remove()
        del model.generate  # the instance wrapper; the class method shows again
        language_model.__class__ = type(language_model).__mro__[2]
        for name in ("_dyrate_policy", "_dyrate_rotary", "_dyrate_prompt_ids", "_dyrate_image_token_id", "_dyrate_hook", "last_plan"):
            delattr(language_model, name)
    return model


def installed_policy(model) -> PruningPolicy | None:
    _, language_model = _language_model(model)
    return getattr(language_model, "_dyrate_policy", None)


def last_plan(model) -> ExecutedPlan | None:
    _, language_model = _language_model(model)
    return getattr(language_model, "last_plan", None)
