"""Key layouts: which timeline positions each decoder layer's keys hold, per batch row.

Every token of a generation has a timeline position: prompt positions 0..S-1, then one
per generated token. Each decoder layer has a key layout, the positions its KV cache
holds. Layers that saw the same drops share one layout object. Rows of a batch may keep
different counts; shorter rows are padded at the front with filler entries that are
masked out as keys (exact, like left padding). Plain tensor bookkeeping: nothing here
knows the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .plan import GROUPS

RESPONSE = GROUPS.index("response")


@dataclass
class KeyLayout:
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
    # (B,) with positions=renumber, once a prefill drop renumbered the entries: the
    # position id the next appended token takes. None: tokens keep the timeline's own ids
    next_position: torch.Tensor | None = None
    # (B, >= L, len(GROUPS)) the group one-hot of the entries (generated ones: response),
    # made at the first ``group_sums`` with rows to spare and handed on to the layouts
    # appended from this one: a deciding policy sums its observation row by groups at every
    # decode step
    _group_matrix: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # (B,) image slots kept per row, counted once and handed on to appended layouts
    _kept_count: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # the entries made ahead for the tokens appended to this layout (``_Ahead``)
    _ahead: "_Ahead | None" = field(default=None, repr=False, compare=False)

    @classmethod
    def of_prompt(cls, is_image: torch.Tensor, img_pos: torch.Tensor, img_present: torch.Tensor) -> "KeyLayout":
        """Every position of (B, S) prompts whose image tokens are ``is_image``."""
        batch, length = is_image.shape
        device = is_image.device
        return cls(
            torch.arange(length, device=device).expand(batch, -1),
            torch.ones(batch, length, dtype=torch.bool, device=device),
            img_present.clone(),
            slot_table(img_pos, img_present, length),
            token_groups(is_image, torch.full((batch,), length, device=device)),
        )

    def appended(self, position: int, count: int) -> "KeyLayout":
        """The layout after a step that appended ``count`` tokens at timeline positions
        ``position``, ``position + 1``, ...: its index and validity are views of entries made
        ahead (``_Ahead``), so that a decode step extends them without copying (hidden
        entries, at mask-mode steps only, are still concatenated)."""
        length = self.index.shape[1]
        ahead = self._ahead
        if ahead is None or not ahead.extends(self, position, count):
            ahead = _Ahead.after(self, position, count)
        end = length + count
        return KeyLayout(
            ahead.index[:, :end],
            ahead.valid[:, :end],
            self.img_kept,
            self.entry_slot,
            self.entry_group,
            None if self.hidden is None else torch.cat([self.hidden, self.hidden.new_zeros(self.hidden.shape[0], count)], dim=1),
            self.filler,
            None if self.next_position is None else self.next_position + count,
            self._group_matrix,
            self._kept_count,
            ahead,
        )

    def select_rows(self, rows: torch.Tensor) -> "KeyLayout":
        hidden = None if self.hidden is None else self.hidden[rows]
        next_position = None if self.next_position is None else self.next_position[rows]
        return KeyLayout(self.index[rows], self.valid[rows], self.img_kept[rows], self.entry_slot[rows],
                         self.entry_group[rows], hidden, self.filler, next_position,
                         None if self._group_matrix is None else self._group_matrix[rows],
                         None if self._kept_count is None else self._kept_count[rows])

    def hiding(self, img_kept: torch.Tensor) -> "KeyLayout":
        """The layout with the image entries not in ``img_kept`` hidden (still cached)."""
        slot = self.entry_slot
        hidden = (slot >= 0) & ~img_kept.gather(1, slot.clamp(min=0))
        hidden = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], self.generated)], dim=1)
        return replace(self, img_kept=img_kept, hidden=hidden, _kept_count=None)

    def without(self, img_kept: torch.Tensor) -> tuple["KeyLayout", torch.Tensor]:
        """The layout without the image slots that are not in ``img_kept``, and the
        local indices of its entries in this one."""
        slot = self.entry_slot
        prompt = slot.shape[1]
        keep_prompt = self.valid[:, :prompt] & ((slot < 0) | img_kept.gather(1, slot.clamp(min=0)))
        local, valid = compact(torch.cat([keep_prompt, self.valid[:, prompt:]], dim=1))
        # generated entries are never dropped: they stay the last ones
        prompt_local = local[:, : local.shape[1] - self.generated]
        # the numbering carries over (positions=renumber): a prefill drop is renumbered
        # afterwards by the executor, while a drop at a decode step closes no gap, as the
        # keys cached after the dropped ones keep the rotation they were cached with
        kept = KeyLayout(self.index.gather(1, local), valid, img_kept, slot.gather(1, prompt_local),
                         self.entry_group.gather(1, prompt_local), filler=not bool(valid.all()),
                         next_position=self.next_position)
        return kept, local

    def renumbered(self, timeline_mask: torch.Tensor | None) -> tuple["KeyLayout", torch.Tensor]:
        """Contiguous position ids for the entries of a prompt layout (positions=renumber):
        each real entry (neither filler nor masked by ``timeline_mask``, (B, timeline)) takes
        its rank among the real entries of its row, as an unpruned row's prompt is numbered.
        Returns the layout, which records the id its next token takes, and the ids (B, L)."""
        real = self.valid if timeline_mask is None else self.valid & timeline_mask.gather(1, self.index)
        ids = (real.long().cumsum(1) - 1).clamp(min=0)  # filler and padding take a neighbour's id: they are never attended
        return replace(self, next_position=real.sum(1)), ids

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

    def by_slot(self, per_entry: torch.Tensor, slots: int) -> torch.Tensor:
        """(B, slots, ...) the values (B, P, ...) of the prompt entries placed at their
        image slots (zeros for slots this layout does not hold)."""
        index = (self.entry_slot + 1).reshape(*self.entry_slot.shape, *([1] * (per_entry.dim() - 2)))
        # slot -1 (not an image token) lands in a spare first row
        placed = per_entry.new_zeros(per_entry.shape[0], slots + 1, *per_entry.shape[2:])
        return placed.scatter_(1, index.expand_as(per_entry), per_entry * self._valid_prompt(per_entry))[:, 1:]

    def _valid_prompt(self, per_entry: torch.Tensor) -> torch.Tensor:
        valid = self.valid[:, : self.entry_slot.shape[1]]
        return valid.reshape(*valid.shape, *([1] * (per_entry.dim() - 2))).to(per_entry.dtype)

    def kept_count(self) -> torch.Tensor:
        """(B,) the image slots the layers attend to, per row."""
        if self._kept_count is None:
            self._kept_count = self.img_kept.sum(1)
        return self._kept_count

    def group_sums(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, heads, len(GROUPS)) attention rows ``probs`` (B, heads, L) summed per token
        group: the prompt entries by their groups, the generated ones all in the response group."""
        length = probs.shape[-1]
        matrix = self._group_matrix
        if matrix is None or matrix.shape[1] < length or matrix.dtype != probs.dtype:
            prompt = self.entry_group.shape[1]
            generated = self.entry_group.new_full((self.entry_group.shape[0], length - prompt + _AHEAD), RESPONSE)
            groups = torch.cat([self.entry_group, generated], dim=1)
            matrix = self._group_matrix = torch.nn.functional.one_hot(groups, len(GROUPS)).to(probs.dtype)
        # one product (B, heads, L) x (B, L, groups): fewer operations than ``sum_by_group``'s
        # scatter at every DyRate step, the same sums up to rounding
        return torch.matmul(probs, matrix[:, :length])


# tokens a layout makes room for at once (``_Ahead``)
_AHEAD = 64


@dataclass
class _Ahead:
    """Entries made ahead for the tokens later steps append to a layout: ``index`` and
    ``valid`` (B, C) start with the layout's own L entries, then hold the next timeline
    positions from ``position`` on, valid. Appended layouts are views of them until the
    room runs out; nothing writes to them."""

    index: torch.Tensor
    valid: torch.Tensor
    first: int  # the first entry made ahead (the layout's length when it was made)
    position: int  # the timeline position of that entry

    @classmethod
    def after(cls, layout: KeyLayout, position: int, count: int) -> "_Ahead":
        batch, length = layout.index.shape
        room = max(count, _AHEAD)
        positions = torch.arange(position, position + room, device=layout.index.device).expand(batch, -1)
        return cls(torch.cat([layout.index, positions], dim=1),
                   torch.cat([layout.valid, layout.valid.new_ones(batch, room)], dim=1), length, position)

    def extends(self, layout: KeyLayout, position: int, count: int) -> bool:
        """Whether ``layout``'s entries are the first of these and its next ``count``
        tokens, from timeline position ``position`` on, the ones made ahead."""
        length = layout.index.shape[1]
        return (length + count <= self.index.shape[1] and position == self.position + length - self.first
                and layout.index.data_ptr() == self.index.data_ptr() and layout.valid.data_ptr() == self.valid.data_ptr())


def token_groups(is_image: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
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


def sum_by_group(probs: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(..., len(GROUPS)): attention rows ``probs`` (..., L) summed over the keys of each
    token group; ``groups`` (L positions' group indices) broadcasts to ``probs``."""
    summed = probs.new_zeros(*probs.shape[:-1], len(GROUPS))
    return summed.scatter_add_(-1, groups.expand_as(probs), probs)


def slot_table(img_pos: torch.Tensor, img_present: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) image slot of each position, -1 for non-image positions."""
    batch, slots = img_pos.shape
    table = torch.full((batch, length), -1, dtype=torch.long, device=img_pos.device)
    slot_ids = torch.arange(slots, device=img_pos.device).expand(batch, -1)
    rows = torch.arange(batch, device=img_pos.device)[:, None].expand(-1, slots)
    table[rows[img_present], img_pos[img_present]] = slot_ids[img_present]
    return table


def image_slots(is_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the positions of its image tokens in ascending order, padded to the row
    with the most (positions 0 there), and which slots are real: ((B, N), (B, N))."""
    slots = int(is_image.sum(1).max())
    img_pos = torch.sort((~is_image).to(torch.int8), dim=1, stable=True).indices[:, :slots]
    img_present = is_image.gather(1, img_pos)
    return img_pos * img_present, img_present


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Local indices of the True entries of each row, in order, front-padded with
    filler to the longest row; returns (local (B, L'), valid (B, L'))."""
    longest = int(keep.sum(1).max())
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices  # dropped first, kept after
    local = order[:, order.shape[1] - longest :]
    return local, keep.gather(1, local)


def gather_rows(tensor: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Gather along dim 1 of a (B, L, ...) tensor (expanded over batch if needed)."""
    tensor = tensor.expand(local.shape[0], *tensor.shape[1:])
    index = local.reshape(*local.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
    return tensor.gather(1, index)


def on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, itself when it is there already (without a call into torch)."""
    return tensor if tensor.device == device else tensor.to(device)
