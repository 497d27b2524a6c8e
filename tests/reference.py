"""An independent reference for pruned runs: the unmodified model (eager attention),
whose layers >= K cannot attend to the dropped image keys. Nothing here uses the
project's executor."""

from __future__ import annotations

import torch


def image_positions(input_ids, image_token_id):
    return [torch.nonzero(row == image_token_id).flatten() for row in input_ids]


def fastv_selection(eager_model, inputs, K, R):
    """Per sample, the image positions FastV keeps: top round((1-R) N) by the last
    prompt token's head-averaged attention at layer K-1, from eager attention weights."""
    with torch.no_grad():
        out = eager_model(**inputs, output_attentions=True, use_cache=False)
    attention = out.attentions[K - 1]  # (B, H, S, S)
    kept = []
    for row, positions in enumerate(image_positions(inputs["input_ids"], eager_model.config.image_token_id)):
        scores = attention[row, :, -1, :].mean(0)[positions]
        keep = int(torch.round(torch.tensor((1 - R) * len(positions), dtype=torch.float64)))
        kept.append(positions[scores.topk(keep).indices].sort().values)
    return kept


class MaskedKeys:
    """Forward pre-hooks that remove ``dropped[row]`` key positions from the attention
    of every layer >= K (in prefill and in every decode step)."""

    def __init__(self, model, K, dropped):
        self.handles = []
        self.dropped = dropped
        for layer in model.model.language_model.layers[K:]:
            self.handles.append(layer.self_attn.register_forward_pre_hook(self._hook, with_kwargs=True))

    def _hook(self, module, args, kwargs):
        mask = kwargs["attention_mask"]
        assert mask is not None and mask.dim() == 4, "reference expects a materialised eager mask"
        mask = mask.clone()
        blocked = torch.finfo(mask.dtype).min if mask.dtype.is_floating_point else False
        for row, positions in enumerate(self.dropped):
            mask[row, :, :, positions] = blocked
        kwargs["attention_mask"] = mask
        return args, kwargs

    def remove(self):
        for handle in self.handles:
            handle.remove()


def dropped_positions(inputs, image_token_id, kept):
    return [
        positions[~torch.isin(positions, keep)]
        for positions, keep in zip(image_positions(inputs["input_ids"], image_token_id), kept)
    ]


def greedy(model, inputs, new_tokens=6, **kwargs):
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
            return_dict_in_generate=True, min_new_tokens=new_tokens, **kwargs,
        )
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, dim=1), out


class ProgressiveEviction:
    """Reference for per-step eviction: at every forward, layer K-1's eager attention
    weights of the step's query (last row, head-averaged) rank the image tokens still
    kept (or, with ``progressive=False``, all of them); the top ``keep`` stay and the
    rest are masked out of layers >= K (for good when progressive, for this step only
    otherwise). ``keep_per_step`` is a list of counts per step, or a function
    (row, step, weights (heads, keys)) -> count deciding from the step's attention."""

    def __init__(self, model, K, image_positions_per_row, keep_per_step, progressive=True):
        self.kept = [positions.clone() for positions in image_positions_per_row]
        self.all_images = image_positions_per_row
        self.decide = keep_per_step if callable(keep_per_step) else (
            lambda row, step, weights: keep_per_step[min(step, len(keep_per_step) - 1)]
        )
        self.progressive = progressive
        self.chosen = [[] for _ in image_positions_per_row]  # the keep decided per row and step
        self.step = 0
        layers = model.model.language_model.layers
        self.handles = [layers[K - 1].self_attn.register_forward_hook(self._select)]
        self.masking = MaskedKeys(model, K, [positions[:0] for positions in image_positions_per_row])

    def _select(self, module, args, output):
        weights = output[1]  # (B, H, q, kv): eager attention returns its weights
        for row in range(weights.shape[0]):
            keep = self.decide(row, self.step, weights[row, :, -1, :])
            self.chosen[row].append(keep)
            pool = self.kept[row] if self.progressive else self.all_images[row]
            if keep < len(pool) or not self.progressive:
                scores = weights[row, :, -1, :].mean(0)[pool]
                self.kept[row] = pool[scores.topk(min(keep, len(pool))).indices].sort().values
            self.masking.dropped[row] = self.all_images[row][~torch.isin(self.all_images[row], self.kept[row])]
        self.step += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.masking.remove()


def group_shares(weights, image_positions, prompt_length):
    """(heads, 4) a query's attention per head on the system, image, instruction and
    response tokens, from its eager weights (heads, keys)."""
    positions = torch.arange(weights.shape[-1])
    is_image = torch.isin(positions, image_positions)
    system = positions < image_positions.min()
    response = positions >= prompt_length
    instruction = ~is_image & ~system & ~response
    return torch.stack([weights[:, group].sum(-1) for group in (system, is_image, instruction, response)], dim=-1)


class PolicyMaskedReference:
    """Any policy run on the unmodified eager model by masking instead of removing.

    Before decoder layer l >= 1 of every forward it asks the policy how many image
    tokens to keep, as the core applies a count (a progressive policy only drops, from
    what layer l still sees; one that re-selects chooses among all image tokens), ranks
    the candidates by the policy's own ``score`` over signals taken here from the eager
    model (the layer before's attention weights, cached keys, layer l's input), applies
    the merges the policy asks for to layer l's input, and masks the others out of layer
    l and the layers after it: for good when progressive, until the next selection
    otherwise. Batch rows must be left padded, so that each row's last position is its query.

    With the policy's positions=renumber, the layers that lost image tokens at the
    prefill get new rotary tables: at the prefill each token its rank among the tokens
    that layer still attends to (``prompt_mask`` (B, S) tells padding from tokens), and
    at every decode step the new token the id after the layer's previous one."""

    def __init__(self, model, policy, image_positions_per_row, prompt_length, prompt_mask=None):
        from dyrate_eval.core.policy import Ranking, RankingSignals, StepView

        self.policy, self.positions, self.prompt_length = policy, image_positions_per_row, prompt_length
        self.prompt_mask = prompt_mask
        self.rotary = model.model.language_model.rotary_emb
        self.next_position = {}  # per renumbered layer, (B,): the id its next token takes
        self.step, self.weights, self.hidden = -1, {}, {}
        layers = model.model.language_model.layers
        self.num_layers = len(layers)
        self.kept = None  # per layer, per row: the image positions that layer attends to
        self.handles = []
        for index, layer in enumerate(layers):
            self.handles.append(layer.self_attn.register_forward_hook(self._keep_weights(index)))
            self.handles.append(layer.register_forward_pre_hook(self._select_and_merge(index), with_kwargs=True))
            self.handles.append(layer.self_attn.register_forward_pre_hook(self._mask(index), with_kwargs=True))
        reference = self

        class Signals(RankingSignals):
            def __init__(self, layer, cache, candidates):
                super().__init__(layer, reference.step, candidates, torch.stack(reference.positions))
                self._cache = cache

            def attention(self):
                weights = reference.weights[self.layer - 1]  # (B, H, q, keys)
                return torch.stack([weights[row, :, -1, positions].float().mean(0)
                                    for row, positions in enumerate(reference.positions)])

            def keys(self):
                keys = self._cache.layers[self.layer - 1].keys  # (B, kv heads, keys, head dim)
                return torch.stack([keys[row][:, positions] for row, positions in enumerate(reference.positions)])

            def hidden(self):
                states = reference.hidden[self.layer]
                return torch.stack([states[row, positions] for row, positions in enumerate(reference.positions)])

            def instruction_attention(self):
                weights = reference.weights[self.layer - 1]
                rows = [weights[row, :, int(positions[-1]) + 1:, positions].float().mean(0)  # (T, N)
                        for row, positions in enumerate(reference.positions)]
                longest = max(len(rows_of) for rows_of in rows)
                padded = torch.stack([torch.cat([rows_of.new_zeros(longest - len(rows_of), rows_of.shape[1]), rows_of])
                                      for rows_of in rows])
                valid = torch.stack([torch.arange(longest) >= longest - len(rows_of) for rows_of in rows])
                return padded, valid

            def add_flops(self, flops):
                pass

        self.Signals, self.StepView, self.Ranking = Signals, StepView, Ranking

    def _keep_weights(self, index):
        def hook(module, args, output):
            self.weights[index] = output[1]
        return hook

    def _select_and_merge(self, index):
        def hook(module, args, kwargs):
            if index == 0:
                self.step += 1
                if self.kept is None:
                    self.kept = [[positions.clone() for positions in self.positions] for _ in range(self.num_layers)]
            hidden = args[0] if args else kwargs["hidden_states"]
            self.hidden[index] = hidden
            if index == 0:
                return None
            merged = self._select(index, kwargs.get("cache", kwargs.get("past_key_values")), hidden)
            if merged is None:
                return None
            if args:
                return (merged, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": merged}
        return hook

    def _mask(self, index):
        def hook(module, args, kwargs):
            mask = kwargs["attention_mask"].clone()
            blocked = torch.finfo(mask.dtype).min if mask.dtype.is_floating_point else False
            for row, positions in enumerate(self.positions):
                mask[row, :, :, positions[~torch.isin(positions, self.kept[index][row])]] = blocked
            kwargs["attention_mask"] = mask
            if self.policy.positions == "renumber":
                ids = self._renumbered_ids(index)
                if ids is not None:
                    kwargs["position_embeddings"] = self.rotary(kwargs["hidden_states"], ids)
            return args, kwargs
        return hook

    def _renumbered_ids(self, layer):
        """(B, queries) the position ids of layer ``layer``'s queries, or None where it
        keeps the model's own (it lost no image token at the prefill)."""
        if self.step == 0:
            dropped = [len(kept) < len(positions) for kept, positions in zip(self.kept[layer], self.positions)]
            if not any(dropped):
                return None
            attended = self.prompt_mask.bool().clone()
            for row, positions in enumerate(self.positions):
                attended[row, positions[~torch.isin(positions, self.kept[layer][row])]] = False
            self.next_position[layer] = attended.sum(1)
            return (attended.long().cumsum(1) - 1).clamp(min=0)
        if layer not in self.next_position:
            return None
        ids = self.next_position[layer][:, None]
        self.next_position[layer] = self.next_position[layer] + 1
        return ids

    def _select(self, layer, cache, hidden):
        """Update the kept sets before ``layer``; returns its input with the policy's merges applied, if any."""
        policy, rows = self.policy, range(len(self.positions))
        n_img = torch.tensor([len(positions) for positions in self.positions])
        view = self.StepView(n_img=n_img)
        if policy.observes(layer, self.step):
            weights = self.weights[layer - 1]
            view.group_attention = torch.stack([group_shares(weights[row, :, -1, :].float(), self.positions[row],
                                                             self.prompt_length) for row in rows])
        asked = policy.keep_before_layer(layer, self.step, view)
        if asked is None:
            return None
        slots = [torch.isin(positions, self.kept[layer][row]) for row, positions in enumerate(self.positions)]
        candidates = torch.stack(slots) if policy.progressive else torch.ones(len(rows), int(n_img.max()), dtype=torch.bool)
        keep = torch.minimum(asked, candidates.sum(1))
        if policy.progressive and torch.equal(keep, candidates.sum(1)):
            return None
        ranking = policy.score(self.Signals(layer, cache, candidates))
        if not isinstance(ranking, self.Ranking):
            ranking = self.Ranking(ranking)
        scores = ranking.scores.masked_fill(~candidates, float("-inf"))
        merged = None if ranking.merge_weights is None else hidden.clone()
        for row, positions in enumerate(self.positions):
            chosen_slots = scores[row].topk(int(keep[row])).indices if int(keep[row]) else torch.zeros(0, dtype=torch.long)
            chosen = positions[chosen_slots]
            if merged is not None:
                states = hidden[row, positions].float()  # (N, D): every image slot's state entering the layer
                for slot in chosen_slots.tolist():
                    merged[row, positions[slot]] = (ranking.merge_weights[row, slot] @ states).to(hidden.dtype)
            for later in range(layer, self.num_layers):
                current = self.kept[later][row]
                self.kept[later][row] = (current[torch.isin(current, chosen)] if policy.progressive else chosen).sort().values
        return merged

    def remove(self):
        for handle in self.handles:
            handle.remove()


def tower_signals(model, pixel_values):
    """From the unmodified model's own vision tower (eager, so it returns attention
    weights): per image the class token's head-averaged attention on each patch at the
    feature layer, that layer's keys averaged over heads, and the projector's features."""
    config = model.config
    tower = model.model.vision_tower
    layer = config.vision_feature_layer % (len(tower.encoder.layers) + 1) - 1  # hidden state h is layer h - 1's output
    attention = tower.encoder.layers[layer].self_attn
    kept = {}
    handle = attention.k_proj.register_forward_hook(lambda module, args, output: kept.update(keys=output))
    with torch.no_grad():
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
        features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    handle.remove()
    images, tokens, _ = kept["keys"].shape
    cls = out.attentions[layer][:, :, 0, 1:].mean(1)
    keys = kept["keys"].view(images, tokens, attention.num_heads, attention.head_dim).mean(2)[:, 1:]
    return cls, keys, torch.stack(list(features))


def reduced_prompt_generation(model, inputs, reduce, new_tokens):
    """(tokens, logits) of the unmodified model fed, as inputs_embeds, each prompt without
    the image tokens ``reduce`` drops and with the features it gives the kept ones.
    ``reduce(cls, keys, features)`` (one image's, see ``tower_signals``) returns the kept
    patch indices, ascending, and their features. Rows are re-padded on the left."""
    cls, keys, features = tower_signals(model, inputs["pixel_values"])
    embed = model.get_input_embeddings()
    rows = []
    for row, ids in enumerate(inputs["input_ids"]):
        ids = ids[inputs["attention_mask"][row].bool()]
        kept, kept_features = reduce(cls[row], keys[row], features[row])
        with torch.no_grad():
            text = embed(ids)
        image = (ids == model.config.image_token_id).nonzero().flatten()
        first = int(image[0])
        rows.append(torch.cat([text[:first], kept_features.to(text.dtype), text[int(image[-1]) + 1:]]))
    longest = max(len(row) for row in rows)
    embeds = torch.stack([torch.cat([row.new_zeros(longest - len(row), row.shape[1]), row]) for row in rows])
    mask = torch.stack([torch.cat([torch.zeros(longest - len(row), dtype=torch.long), torch.ones(len(row), dtype=torch.long)])
                        for row in rows])
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -new_tokens:], torch.stack(out.logits, dim=1)


def visionzip_reference(tokens, contextual):
    """VisionZip's reduction of one image, written plainly (see ``reduced_prompt_generation``)."""

    def reduce(cls, keys, features):
        slots = cls.shape[0]
        dominant = cls.argsort(descending=True, stable=True)[: tokens - contextual].tolist()
        remaining = [slot for slot in range(slots) if slot not in dominant]
        step = max(1, len(remaining) // contextual) if contextual else 1
        targets = [remaining[index] for index in range(0, len(remaining), step)][:contextual]
        others = [slot for slot in remaining if slot not in targets] if targets else []
        normed = torch.nn.functional.normalize(keys, dim=-1)
        joined = {target: [] for target in targets}
        for other in others:
            similarity = torch.stack([normed[other] @ normed[target] for target in targets])
            joined[targets[int(similarity.argmax())]].append(other)
        merged = {target: features[target] + (features[members].mean(0) if members else 0) for target, members in joined.items()}
        kept = sorted(dominant + targets)
        return kept, torch.stack([merged.get(slot, features[slot]) for slot in kept])

    return reduce


def prumerge_reference(plus, neighbours):
    """PruMerge's (and PruMerge+'s) reduction of one image, written plainly."""

    def reduce(cls, keys, features):
        slots = cls.shape[0]
        low, high = torch.quantile(cls, 0.25), torch.quantile(cls, 0.75)
        kept = [slot for slot in range(slots) if cls[slot] > high + 1.5 * (high - low)]
        if plus:
            stride = int(slots / max(len(kept), 1))
            kept = sorted(set(kept) | set(range(stride // 6, slots - 1, max(1, stride // 3))))
        normed = torch.nn.functional.normalize(keys, dim=-1)
        merged = []
        for slot in kept:
            similarity = normed @ normed[slot]
            similarity[slot] = float("-inf")
            nearest = similarity.topk(neighbours).indices
            merged.append(features[slot] + (cls[nearest, None] * features[nearest]).sum(0))
        return kept, torch.stack(merged) if merged else features[:0]

    return reduce


class StagedDropsRenumbered:
    """PyramidDrop's way, on the unmodified eager model without a KV cache: every forward
    runs the whole sequence (the prompt and the tokens generated so far), and before each
    stage layer l of ``keeps`` ({layer: image tokens kept}) the image tokens ranked lowest
    by the last prompt token's head-averaged attention at layer l-1 are cut out of the
    hidden states; layers l and after then number what is left 0..n-1. Which tokens a
    stage keeps is decided at the first forward (the prefill) and holds. Batch 1."""

    def __init__(self, model, keeps, image_positions, prompt_length):
        language_model = model.model.language_model
        self.rotary, self.keeps = language_model.rotary_emb, keeps
        self.image_positions, self.prompt_length = image_positions, prompt_length
        self.chosen = {}  # stage layer -> the prompt positions of the image tokens it keeps
        self.rows = None  # the timeline positions of the rows this forward still runs
        self.weights = None
        self.handles = []
        for index, layer in enumerate(language_model.layers):
            self.handles.append(layer.register_forward_pre_hook(self._cut(index), with_kwargs=True))
            if index + 1 in keeps:
                self.handles.append(layer.self_attn.register_forward_hook(self._keep_weights))

    def _keep_weights(self, module, args, output):
        self.weights = output[1]  # (1, heads, rows, rows)

    def _cut(self, index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                self.rows = torch.arange(hidden.shape[1])
            if index in self.keeps:
                if index not in self.chosen:
                    query = int((self.rows == self.prompt_length - 1).nonzero())
                    is_image = torch.isin(self.rows, self.image_positions)
                    scores = self.weights[0, :, query, is_image].float().mean(0)
                    self.chosen[index] = self.rows[is_image][scores.topk(self.keeps[index]).indices]
                staying = ~torch.isin(self.rows, self.image_positions) | torch.isin(self.rows, self.chosen[index])
                hidden, self.rows = hidden[:, staying], self.rows[staying]
            if index >= min(self.keeps):
                length = len(self.rows)
                kwargs["position_embeddings"] = self.rotary(hidden, torch.arange(length)[None])
                causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)
                kwargs["attention_mask"] = causal[None, None]
            return (hidden,), kwargs
        return hook

    def greedy(self, model, inputs, new_tokens):
        """(tokens (1, new_tokens), logits (1, new_tokens, vocab)), each step a full forward."""
        ids, logits = inputs["input_ids"], []
        with torch.no_grad():
            for _ in range(new_tokens):
                step_logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], use_cache=False).logits[:, -1]
                logits.append(step_logits)
                ids = torch.cat([ids, step_logits.argmax(-1, keepdim=True)], dim=1)
        return ids[:, inputs["input_ids"].shape[1]:], torch.stack(logits, dim=1)

    def remove(self):
        for handle in self.handles:
            handle.remove()
