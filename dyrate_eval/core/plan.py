"""The plan a generation actually executed, recorded by the executor step by step.

FLOPs, memory and the figures are computed from this record, never from the
settings, so what is reported is what ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


GROUPS = ("system", "image", "instruction", "response")


@dataclass
class ExecutedPlan:
    """Per batch row: image tokens, and per step and decoder layer the kept image
    tokens, the keys attended over, the query rows computed, and the keys of the
    scoring row computed at that layer to rank image tokens (0 where none was).

    Policies that decide from the attention (DyRate) also leave, per step, the keep
    count they chose, the share of the step's attention on each token group
    (``GROUPS``, head-averaged at the observation layer) and the FLOPs of the decision
    itself; steps without such a decision hold -1, NaN and 0.

    Step 0 is the prefill; step t >= 1 is the t-th decode forward. Counts exclude
    padding and filler entries, so a row's numbers are those of a batch-1 run. With
    beam search the rows are beams, and reordering keeps each row's history with its
    beam.
    """

    n_img: torch.Tensor  # (B,)
    kept_image: list[torch.Tensor] = field(default_factory=list)  # per step, (B, layers)
    keys: list[torch.Tensor] = field(default_factory=list)  # per step, (B, layers)
    queries: list[torch.Tensor] = field(default_factory=list)  # per step, (B, layers)
    scored_keys: list[torch.Tensor] = field(default_factory=list)  # per step, (B, layers)
    chosen_keep: list[torch.Tensor] = field(default_factory=list)  # per step, (B,)
    group_attention: list[torch.Tensor] = field(default_factory=list)  # per step, (B, len(GROUPS))
    decision_flops: list[torch.Tensor] = field(default_factory=list)  # per step, (B,)
    # per step, (B, image slots): which image tokens the last layer still sees (for the
    # kept-token figure); recorded by the executor, absent from simulated plans
    last_layer_slots: list[torch.Tensor] = field(default_factory=list)
    # batch size -> (chosen_keep, group_attention) of a step without a decision, shared by those steps
    _undecided: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def add_step(self, kept_image: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor, scored_keys: torch.Tensor,
                 last_layer_slots: torch.Tensor | None = None, chosen_keep: torch.Tensor | None = None,
                 group_attention: torch.Tensor | None = None, decision_flops: torch.Tensor | None = None) -> None:
        batch = kept_image.shape[0]
        if batch not in self._undecided:  # a step without a decision: placeholders, made once per batch size
            self._undecided[batch] = (torch.full((batch,), -1), torch.full((batch, len(GROUPS)), float("nan")))
        no_keep, no_shares = self._undecided[batch]
        self.kept_image.append(kept_image)
        self.keys.append(keys)
        self.queries.append(queries)
        self.scored_keys.append(scored_keys)
        self.chosen_keep.append(no_keep if chosen_keep is None else chosen_keep)
        self.group_attention.append(no_shares if group_attention is None else group_attention)
        self.decision_flops.append(decision_flops if decision_flops is not None else torch.zeros(batch, dtype=torch.long))
        if last_layer_slots is not None:
            self.last_layer_slots.append(last_layer_slots)

    def reorder(self, rows: torch.Tensor) -> None:
        """Follow a beam-search reordering of the batch rows."""
        self.n_img = self.n_img.index_select(0, rows.to(self.n_img.device))
        histories = (self.kept_image, self.keys, self.queries, self.scored_keys, self.chosen_keep, self.group_attention,
                     self.decision_flops, self.last_layer_slots)
        for history in histories:
            history[:] = [step.index_select(0, rows.to(step.device)) for step in history]

    @property
    def num_steps(self) -> int:
        return len(self.kept_image)

    @property
    def batch_size(self) -> int:
        return int(self.n_img.shape[0])

    def kept_image_tokens(self) -> torch.Tensor:
        """(B, steps, layers) kept image tokens."""
        return torch.stack(self.kept_image, dim=1).cpu()

    def kept_slots(self, row: int, num_steps: int | None = None) -> torch.Tensor:
        """(steps, image slots) bool: the image tokens the row's last layer saw at each step."""
        steps = self.last_layer_slots[: num_steps or len(self.last_layer_slots)]
        return torch.stack([step[row] for step in steps]).cpu()

    def for_row(self, row: int, num_steps: int | None = None) -> dict:
        """One row's plan as plain lists, truncated to ``num_steps`` forwards (a row
        that stopped early keeps running in the batch; its later steps are not its own)."""
        steps = self.num_steps if num_steps is None else min(num_steps, self.num_steps)
        return {
            "n_img": int(self.n_img[row]),
            "kept_image": [self.kept_image[t][row].tolist() for t in range(steps)],
            "keys": [self.keys[t][row].tolist() for t in range(steps)],
            "queries": [self.queries[t][row].tolist() for t in range(steps)],
            "scored_keys": [self.scored_keys[t][row].tolist() for t in range(steps)],
            "chosen_keep": [int(self.chosen_keep[t][row]) for t in range(steps)],
            "group_attention": [self._shares(t, row) for t in range(steps)],
            "decision_flops": [int(self.decision_flops[t][row]) for t in range(steps)],
        }

    def _shares(self, step: int, row: int) -> list[float] | None:
        shares = self.group_attention[step][row]
        return None if bool(shares.isnan().any()) else shares.tolist()


def chosen_rates(record: dict) -> list[float | None]:
    """Per step of a row's plan record (``ExecutedPlan.for_row``), the rate a deciding
    policy chose, 1 - kept / image tokens; None where no decision was made."""
    return [None if keep < 0 else round(1 - keep / record["n_img"], 4) for keep in record["chosen_keep"]]
