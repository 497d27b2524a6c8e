"""DyRate's training pass: the frozen model teacher-forced on prompt + answer, with an
attention function that weighs image keys per query, so that gradients reach the
predictor's choices. The model is reached through the core's ``HFDecoder``."""

from __future__ import annotations

import torch

from ..core.hf_llava import HFDecoder, attention_implementation, check_image_tokens, image_token_id, register_attention
from ..core.layout import gather_rows, image_slots, sum_by_group, token_groups
from ..errors import PruningConfigError

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


register_attention(_WEIGHTED_ATTENTION, _key_weighted_attention)


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
        decoder = HFDecoder(model)
        if not 1 <= K < decoder.num_layers:
            raise PruningConfigError(f"K={K} is not allowed: K must be an integer in 1..{decoder.num_layers - 1}")
        check_image_tokens(input_ids, image_token_id(model.config))
        self._decoder, self.K = decoder, K
        batch, length = input_ids.shape
        device = input_ids.device
        self.is_image = input_ids == image_token_id(model.config)
        steps = torch.arange(int(answer_lengths.max()), device=device)
        self.step_valid = steps[None] < answer_lengths[:, None]  # (B, T)
        self.step_rows = (prompt_lengths[:, None] - 1 + steps[None]).clamp(max=length - 1)  # (B, T)
        positions = torch.arange(length, device=device)
        # the prompt's queries belong to step 0, answer token t's to step t
        self._step_of_position = (positions[None] - (prompt_lengths[:, None] - 1)).clamp(0, len(steps) - 1)
        self.img_pos, self.img_present = image_slots(self.is_image)
        self.n_img = self.img_present.sum(1)
        with torch.no_grad():
            hidden = decoder.embed_prompt(input_ids, pixel_values)
            self._position_ids = positions[None].expand(batch, -1)
            self._rotary = decoder.rotary(hidden, self._position_ids)
            self._causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
            mask = decoder.causal_mask(hidden, None, None, None)
            for layer_idx in range(K):
                layer_input = hidden
                hidden = decoder.run_layer(layer_idx, hidden, mask, self._rotary, self._position_ids, None, {})
            self._hidden_at_K = hidden
            key_ok = positions[None, None, :] <= self.step_rows[..., None]  # (B, T, L): causal
            probs = decoder.attention_rows(K - 1, layer_input, self._rotary, self.step_rows, key_ok)  # (B, H, T, L)
            by_group = sum_by_group(probs, token_groups(self.is_image, prompt_lengths)[:, None, None, :])
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
        with attention_implementation(self._decoder.language_model, _WEIGHTED_ATTENTION):
            for layer_idx in range(self.K, self._decoder.num_layers):
                hidden = self._decoder.run_layer(layer_idx, hidden, self._causal, self._rotary, self._position_ids, None,
                                                 {"dyrate_key_weights": key_weights})
        return self._decoder.logits(gather_rows(hidden, self.step_rows))
