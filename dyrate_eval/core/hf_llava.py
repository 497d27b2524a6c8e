"""The boundary to Hugging Face transformers: the one module of the project that touches
its internals. It checks the interfaces the core relies on (refusing a transformers
that moved them), wraps a ``LlavaForConditionalGeneration``'s Llama-style language
model for the executor (``HFDecoder``: its layers, masks, KV cache, projections), and
installs the executor by swapping the language model's class for a subclass whose
``forward`` runs ``core/executor.py``'s loop (and, for sdpa and eager attention, the
implementation for a watched twin that hands the executor a layer's query).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable

import torch
import transformers
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..arch import Arch
from ..errors import PruningConfigError
from .capture import OutputCapture
from .executor import SCORINGS, Executor
from .layout import gather_rows
from .plan import ExecutedPlan
from .policy import PruningPolicy

_STATE_ATTR = "_dyrate_generation_state"

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


def _attention_rows(layer, rotate, layer_input, rotary, pick, key_ok, keys=None, watched=None) -> torch.Tensor:
    """(B, heads, T, L) attention of the rows ``pick`` (B, T) of ``layer_input`` (all
    of its rows for None) at the decoder ``layer``: its own post-rotary queries against
    its keys (``keys`` from the cache, else computed from ``layer_input``), softmax where
    ``key_ok`` (B, T, L) allows (everywhere for None). Costs one query projection and
    rotation per row, or the rotation alone, unless ``watched`` (a ``QueryCapture`` open
    while the layer ran) holds the query the layer's attention call was given; the
    layer itself keeps its fast attention kernel."""
    attn = layer.self_attn
    head_dim = attn.head_dim
    picked = (lambda tensor: tensor) if pick is None else (lambda tensor: gather_rows(tensor, pick))
    if watched is not None and watched.rotated is not None:  # (B, H, rows, hd)
        query = watched.rotated if pick is None else gather_rows(watched.rotated.transpose(1, 2), pick).transpose(1, 2)
    else:  # the projection the layer kept, or one made here, rotated for the rows picked
        projected = (attn.q_proj(layer.input_layernorm(picked(layer_input))) if watched is None
                     else picked(watched.projection))
        query = projected.view(*projected.shape[:2], -1, head_dim).transpose(1, 2)  # (B, H, T, hd)
        cos, sin = rotary
        query = rotate(query, picked(cos), picked(sin))
    batch, rows = query.shape[0], query.shape[2]
    if keys is None:
        keys = attn.k_proj(layer.input_layernorm(layer_input)).view(batch, layer_input.shape[1], -1, head_dim).transpose(1, 2)
        keys = rotate(keys, *rotary)
    kv_heads = keys.shape[1]
    query = query.reshape(batch, kv_heads, -1, head_dim)  # head h uses kv head h // groups: (B, Hkv, groups * T, hd)
    logits = torch.matmul(query, keys.transpose(-1, -2)).float() * attn.scaling  # (B, Hkv, groups * T, L)
    logits = logits.view(batch, -1, rows, logits.shape[-1])
    if key_ok is not None:
        logits = logits.masked_fill(~key_ok[:, None], float("-inf"))
    return logits.softmax(-1)


class HFDecoder:
    """What the executor and DyRate's training pass need of a LLaVA model's language
    model: its layers run one at a time, masks, rotary tables, KV cache access, the
    projections that score attention rows, and the prompt's embeddings."""

    def __init__(self, model, vision: VisionCapture | None = None):
        self.model = model
        self.vision = vision  # the tower's feature layer, for a policy with a stage before the decoder
        self.inner, self.language_model = _language_model(model)
        self.layers = self.language_model.layers
        self.num_layers = len(self.layers)
        self.cache_argument = _cache_argument_of(self.language_model)
        self.rotate = _rotation_of(self.language_model)
        self.capturing: QueryCapture | None = None  # the capture open while its layer runs

    def rotary(self, hidden, position_ids):
        return self.language_model.rotary_emb(hidden, position_ids)

    def run_layer(self, layer_idx, hidden, mask, rotary, position_ids, cache, kwargs):
        if self.capturing is not None:  # the layer runs the watched implementation, which takes the capture
            kwargs = {**kwargs, _CAPTURE_ARGUMENT: self.capturing}
        return self.layers[layer_idx](
            hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids,
            use_cache=cache is not None, **{self.cache_argument: cache}, **kwargs,
        )

    def query_capture(self, layer_idx) -> "QueryCapture":
        """A context that keeps the query of decoder layer ``layer_idx`` while it runs (for ``attention_rows``)."""
        return QueryCapture(self, layer_idx)

    def causal_mask(self, hidden, key_mask, cache, layer_idx):
        return create_causal_mask(
            config=self.language_model.config,
            inputs_embeds=hidden,
            attention_mask=key_mask,
            position_ids=None,  # gapped original ids would read as packed sequences
            layer_idx=layer_idx,
            **{self.cache_argument: cache},
        )

    def attention_module(self, layer_idx):
        return self.layers[layer_idx].self_attn

    def cached_keys(self, cache, layer_idx):
        """(B, kv_heads, L, head_dim) the layer's cached post-rotary keys, or None without a cache."""
        return None if cache is None else cache.layers[layer_idx].keys

    def keys_at(self, layer_idx, cache, layer_input, rotary):
        """The layer's post-rotary keys: cached, or computed from its input without a cache."""
        keys = self.cached_keys(cache, layer_idx)
        if keys is not None:
            return keys
        layer = self.layers[layer_idx]
        batch, length = layer_input.shape[:2]
        keys = layer.self_attn.k_proj(layer.input_layernorm(layer_input))
        keys = keys.view(batch, length, -1, layer.self_attn.head_dim).transpose(1, 2)
        return self.rotate(keys, *rotary)

    def keep_cached(self, cache, layer_idx, local):
        """Keep only the cache entries ``local`` (B, L') of the layer, in that order."""
        cache_layer = cache.layers[layer_idx]
        index = local[:, None, :, None].expand(-1, cache_layer.keys.shape[1], -1, cache_layer.keys.shape[-1])
        cache_layer.keys = cache_layer.keys.gather(2, index)
        cache_layer.values = cache_layer.values.gather(2, index)

    def attention_rows(self, layer_idx, layer_input, rotary, pick, key_ok, keys=None, watched=None):
        return _attention_rows(self.layers[layer_idx], self.rotate, layer_input, rotary, pick, key_ok, keys, watched)

    def rerun_weights(self, layer_idx, layer_input, rotary, key_ok):
        """(B, heads, L, L) the layer run again on its input in eager attention, without
        the cache, for the attention weights of every query (LightCompress's scoring)."""
        layer = self.layers[layer_idx]
        with attention_implementation(self.language_model, "eager"), OutputCapture(layer.self_attn) as capture:
            mask = self.causal_mask(layer_input, key_ok, None, None)
            self.run_layer(layer_idx, layer_input, mask, rotary, None, None, {})
        return capture.output[1]

    def embed_prompt(self, input_ids, pixel_values):
        """The prompt's input embeddings with the image features in place of the image tokens."""
        embeds = self.inner.get_input_embeddings()(input_ids)
        config = self.model.config
        features = self.inner.get_image_features(
            pixel_values=pixel_values.to(embeds.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        features = torch.cat(list(features)).to(embeds.dtype)
        is_image = input_ids == image_token_id(config)
        if features.shape[0] != int(is_image.sum()):
            raise PruningConfigError(
                f"the prompts hold {int(is_image.sum())} image tokens but the images give {features.shape[0]} features"
            )
        return embeds.masked_scatter(is_image[..., None].expand_as(embeds), features)

    def logits(self, hidden):
        return self.model.lm_head(self.language_model.norm(hidden))


class QueryCapture:
    """The query of one decoder layer, kept while the layer runs (a context around its
    run): rotated, from inside its attention call, where the language model runs a
    watched attention implementation (``_watched_attention``); else its projection, from
    a hook on ``q_proj``, for ``attention_rows`` to rotate the rows it needs."""

    def __init__(self, decoder: HFDecoder, layer_idx: int):
        self.decoder, self.layer_idx = decoder, layer_idx
        self.inside_attention = decoder.language_model.config._attn_implementation.endswith(_WATCHED_SUFFIX)
        self.rotated: torch.Tensor | None = None  # (B, heads, rows, head_dim)
        self.projection: torch.Tensor | None = None  # (B, rows, heads x head_dim)
        self._hook: OutputCapture | None = None

    @property
    def output(self) -> "QueryCapture":
        """What the executor keeps of the layer's run (as of an ``OutputCapture``): the query, here."""
        return self

    def __enter__(self):
        if self.inside_attention:
            self.decoder.capturing = self
        else:
            self._hook = OutputCapture(self.decoder.layers[self.layer_idx].self_attn.q_proj).__enter__()
        return self

    def __exit__(self, *exc):
        if self._hook is None:
            self.decoder.capturing = None
        else:
            self._hook.__exit__(*exc)
            self.projection = self._hook.output


class VisionCapture:
    """Watches the vision tower's feature layer (the layer whose output the projector
    reads) while a policy with a stage before the decoder is installed: its query and
    key projections of every token, kept from the tower's own forward, so that the class
    token's attention needs no eager attention and no second pass."""

    def __init__(self, model):
        config = model.config
        if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
            raise PruningConfigError(
                "a stage before the decoder needs LLaVA-1.5's vision features (one feature layer, class token "
                f"dropped: vision_feature_select_strategy 'default'); this model has {config.vision_feature_layer!r}, "
                f"{config.vision_feature_select_strategy!r}"
            )
        layers = model.model.vision_tower.encoder.layers
        hidden_index = config.vision_feature_layer % (len(layers) + 1)  # an index into the tower's hidden states
        if hidden_index == 0:
            raise PruningConfigError("the vision feature layer is the embeddings: no attention to select tokens by")
        attention = layers[hidden_index - 1].self_attn  # hidden state h is the output of layer h - 1
        self.heads, self.head_dim, self.scale = attention.num_heads, attention.head_dim, attention.scale
        self.grid = config.vision_config.image_size // config.vision_config.patch_size
        self.queries: torch.Tensor | None = None  # (images, 1 + patches, heads x head_dim)
        self.keys: torch.Tensor | None = None
        self._handles = [
            attention.q_proj.register_forward_hook(lambda module, args, output: setattr(self, "queries", output)),
            attention.k_proj.register_forward_hook(lambda module, args, output: setattr(self, "keys", output)),
        ]

    def taken(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last image batch's (queries, keys), each (images, 1 + patches, heads, head_dim); forgotten here."""
        if self.queries is None or self.keys is None:
            raise PruningConfigError("the vision tower did not run before the prefill: pass pixel_values with the prompt")
        shape = (*self.keys.shape[:2], self.heads, self.head_dim)
        queries, keys = self.queries.view(shape), self.keys.view(shape)
        self.queries = self.keys = None
        return queries, keys

    def class_attention(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(images, patches) the class token's attention on each patch, averaged over heads,
        from ``taken()``'s tensors: its scores over every token (2 x hidden x tokens FLOPs per image)."""
        scores = torch.einsum("ihd,ithd->iht", queries[:, 0].float(), keys.float()) * self.scale
        return scores.softmax(-1).mean(1)[:, 1:]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _PrunedDecoderMixin:
    """Placed in front of the language model's own class; replaces only ``forward``."""

    _dyrate_executor: Executor
    _dyrate_prompt_ids: torch.Tensor | None
    last_plan: ExecutedPlan | None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None, **kwargs):
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(flag, False):
                raise PruningConfigError(
                    f"{flag}=True is not available on a pruned model: layers past the pruning point "
                    "see fewer tokens; use the unpruned model for per-layer outputs"
                )
        kwargs.pop("return_dict", None)
        executor = self._dyrate_executor
        cache_argument = executor.decoder.cache_argument
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = self.config.use_cache
        cache = kwargs.pop(cache_argument, None)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        state = getattr(cache, _STATE_ATTR, None)
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
        if state is None:
            hidden = self._dyrate_prefill(executor, inputs_embeds, attention_mask, position_ids, cache, kwargs)
        else:
            hidden = executor.decode(state, inputs_embeds, attention_mask, position_ids, cache, kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), **{cache_argument: cache if use_cache else None})

    def _dyrate_prefill(self, executor, embeds, attention_mask, position_ids, cache, kwargs):
        if cache is not None and cache.get_seq_length() > 0:
            raise PruningConfigError(
                "the KV cache passed to the pruned model already holds tokens it did not prune; "
                "start generation from an empty cache"
            )
        prompt_ids = self._dyrate_prompt_ids
        self._dyrate_prompt_ids = None
        if prompt_ids is None or prompt_ids.shape != embeds.shape[:2]:
            raise PruningConfigError(
                "the pruned language model must be called through the LLaVA model with input_ids, "
                "so that the image span can be found from the image token id"
            )
        hidden, state = executor.prefill(embeds, prompt_ids, attention_mask, position_ids, cache, kwargs)
        if cache is not None:
            setattr(cache, _STATE_ATTR, state)
            reorder_cache = cache.reorder_cache

            def reorder_cache_and_plan(beam_idx):
                reorder_cache(beam_idx)
                state.reorder(beam_idx)

            cache.reorder_cache = reorder_cache_and_plan
        self.last_plan = state.plan
        return hidden


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


def check_image_tokens(input_ids, token_id: int) -> None:
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


def _rotate_half_rotation(states, cos, sin):
    """Llama's rotary embedding of one (B, heads, T, head_dim) tensor; its
    ``apply_rotary_pos_emb`` rotates a query and a key together, and the scoring rows
    need the query alone (a DyRate decode step pays this at every step)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = states.shape[-1] // 2
    return states * cos + torch.cat((-states[..., half:], states[..., :half]), dim=-1) * sin


def _rotation_of(language_model) -> Callable:
    """``rotate(states, cos, sin)``: the rotary embedding of the language model's own
    modelling module applied to one tensor. Llama's own formula (``_rotate_half_rotation``)
    where it gives the model's function's result bit for bit on the model's own rotary
    tables, else the model's function (which rotates the tensor a second time as the key)."""
    apply_rotary = inspect.getmodule(_own_class(language_model)).apply_rotary_pos_emb
    config = language_model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    weight = language_model.embed_tokens.weight
    try:
        probe = torch.randn(1, 3, config.hidden_size, generator=torch.Generator().manual_seed(0)).to(weight)
        cos, sin = language_model.rotary_emb(probe, torch.arange(3, device=weight.device)[None] * 7)
        states = torch.randn(1, heads, 3, head_dim, generator=torch.Generator().manual_seed(1)).to(weight)
        same = torch.equal(_rotate_half_rotation(states, cos, sin), apply_rotary(states, states, cos, sin)[0])
    except RuntimeError:  # shapes the formula does not fit (a partial rotary), or a model spread over devices
        same = False
    if same:
        return _rotate_half_rotation
    return lambda states, cos, sin: apply_rotary(states, states, cos, sin)[0]


def install(model, policy: PruningPolicy, scoring: str = "row"):
    """Put the executor into ``model`` (in place) with ``policy``; re-installing swaps the
    policy. ``scoring`` other than "row" is one of FastV's peers (``executor.SCORINGS``),
    for the bench."""
    if scoring not in SCORINGS:
        raise PruningConfigError(f"scoring={scoring!r} is not allowed: use one of {', '.join(SCORINGS)}")
    inner, language_model = _language_model(model)
    token_id = image_token_id(model.config)
    # the tower's feature layer is watched only for a policy with a stage before the decoder
    installed_vision = getattr(language_model, "_dyrate_vision", None)
    vision = None
    if policy.reduces_before_decoder:
        vision = installed_vision or VisionCapture(model)
    if not isinstance(language_model, _PrunedDecoderMixin):
        base = type(language_model)
        language_model._dyrate_own_attention = language_model.config._attn_implementation
        language_model._dyrate_arch = model_arch(model)
        language_model.__class__ = type(f"Pruned{base.__name__}", (_PrunedDecoderMixin, base), {})
        language_model._dyrate_prompt_ids = None
        language_model.last_plan = None
        cache_argument = _cache_argument_of(language_model)

        def capture_prompt(module, args, kwargs):
            cache = kwargs.get(cache_argument)
            if cache is not None and getattr(cache, _STATE_ATTR, None) is not None:
                return  # a decode step: the image span is already known
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if language_model._dyrate_executor.policy.needs_image:
                check_image_tokens(input_ids, token_id)
            language_model._dyrate_prompt_ids = input_ids

        model_generate = model.generate

        @functools.wraps(model_generate)
        def generate_checked(*args, **kwargs):
            # generate runs the vision tower before the first forward: check first
            if language_model._dyrate_executor.policy.needs_image:
                check_image_tokens(kwargs.get("input_ids", args[0] if args else None), token_id)
            return model_generate(*args, **kwargs)

        model.generate = generate_checked
        language_model._dyrate_hook = inner.register_forward_pre_hook(capture_prompt, with_kwargs=True)
    if vision is not installed_vision and installed_vision is not None:
        installed_vision.remove()
    language_model._dyrate_vision = vision
    language_model._dyrate_executor = Executor(HFDecoder(model, vision), policy, scoring, language_model._dyrate_arch,
                                               token_id)
    own = language_model._dyrate_own_attention
    wanted = "eager" if scoring == "eager-weights" else _watched_attention(own) if own in _WATCHED_ATTENTION else own
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
        if language_model._dyrate_vision is not None:
            language_model._dyrate_vision.remove()
        language_model.__class__ = _own_class(language_model)
        for name in ("_dyrate_executor", "_dyrate_prompt_ids", "_dyrate_hook", "last_plan", "_dyrate_own_attention",
                     "_dyrate_arch", "_dyrate_vision"):
            delattr(language_model, name)
    return model


def own_attention(model) -> str:
    """The attention implementation the model runs without the executor (installed, the
    language model runs the executor's choice: a watched twin, or eager for a bench peer)."""
    _, language_model = _language_model(model)
    return getattr(language_model, "_dyrate_own_attention", language_model.config._attn_implementation)


def installed_policy(model) -> PruningPolicy | None:
    _, language_model = _language_model(model)
    executor = getattr(language_model, "_dyrate_executor", None)
    return None if executor is None else executor.policy


def last_plan(model) -> ExecutedPlan | None:
    _, language_model = _language_model(model)
    return getattr(language_model, "last_plan", None)


# -- attention functions and implementations ----------------------------------------------


# The attention implementations whose queries the core takes from inside the attention
# call: installed, the language model runs the implementation's watched twin
# (``_watched_attention``), which keeps the query of the layer a ``QueryCapture`` watches,
# so that the scoring row needs no second projection and rotation (a DyRate decode step
# pays those at every step). Others (FlashAttention, flex) run as they are, and the
# capture keeps the query's projection instead.
_WATCHED_ATTENTION = ("sdpa", "eager")
_WATCHED_SUFFIX = "+dyrate_watched"
_CAPTURE_ARGUMENT = "dyrate_query_capture"


def _watched_attention(own: str) -> str:
    """The name of ``own``'s watched implementation, registered (with ``own``'s masks) on first use."""
    name = own + _WATCHED_SUFFIX
    if name not in ALL_ATTENTION_FUNCTIONS:

        def watched(module, query, key, value, attention_mask, **kwargs):
            capture = kwargs.pop(_CAPTURE_ARGUMENT, None)
            if capture is not None:
                capture.rotated = query
            return _own_attention_function(own, type(module))(module, query, key, value, attention_mask, **kwargs)

        register_attention(name, watched)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[own])
    return name


@functools.cache
def _own_attention_function(own: str, attention_class: type) -> Callable:
    """What ``attention_class`` calls for implementation ``own``: the registry's function,
    or its modelling module's own ``eager_attention_forward`` (eager is not in the registry)."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(own, inspect.getmodule(attention_class).eager_attention_forward)


def register_attention(name: str, function: Callable) -> None:
    """Make ``function`` selectable as an attention implementation (``attention_implementation``)."""
    AttentionInterface.register(name, function)


@contextlib.contextmanager
def attention_implementation(language_model, name: str):
    previous = language_model.config._attn_implementation
    language_model.set_attn_implementation(name)
    try:
        yield
    finally:
        language_model.set_attn_implementation(previous)
