"""The policy API: what a method tells the pruning core (``core/executor.py``).

A policy answers two questions between two decoder layers of a generation step:
- how many image tokens each sample keeps from ``layer`` on (``keep_before_layer``;
  None means "no change"),
- when that count drops, which ones (``score``: a ranking of the candidate image
  tokens from the ``RankingSignals`` the executor hands it; by default the step's
  attention, as FastV ranks).
The executor does the rest (removing or hiding tokens, the KV cache, recording the
plan), so a policy holds no tensors of the model and touches no transformers code. The
plan simulation (``core/simulate.py``) asks the same policy objects, so what FLOPs a
method is predicted to cost follows from the same decisions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..arch import Arch
from ..errors import PruningConfigError
from .settings import Setting


@dataclass
class StepView:
    """What a policy may look at when deciding how many: per-sample image counts, and
    for a policy that observes this layer, what the step's query attends to."""

    n_img: torch.Tensor  # (B,) image tokens in each sample's prompt
    # (B, heads, len(plan.GROUPS)): the step's attention at the previous layer, per head,
    # summed over the system, image, instruction and response tokens
    group_attention: torch.Tensor | None = None


class RankingSignals(ABC):
    """What a policy may rank the candidate image tokens by, before decoder layer
    ``layer`` at generation step ``step`` (0 is the prefill). Each signal is computed
    only when asked for, and what it costs goes into the plan. The executor's signals
    come from the model; the simulation's are zeros of the same shapes with the same
    costs, so a policy's ranking may not change how many it keeps."""

    def __init__(self, layer: int, step: int, candidates: torch.Tensor, image_positions: torch.Tensor):
        self.layer = layer
        self.step = step
        self.candidates = candidates  # (B, N) bool: the image slots that may be kept
        self.image_positions = image_positions  # (B, N) prompt position of each image slot

    @abstractmethod
    def attention(self) -> torch.Tensor:
        """(B, N) the step's query's attention at layer ``layer - 1`` on each image
        slot, averaged over heads (0 for slots that layer does not attend to). Costs one
        scoring row: the query's projection and its scores over that layer's keys."""

    @abstractmethod
    def keys(self) -> torch.Tensor:
        """(B, kv_heads, N, head_dim) the post-rotary keys of the image slots at layer
        ``layer - 1``, read from its KV cache (zeros for slots it no longer holds)."""

    @abstractmethod
    def hidden(self) -> torch.Tensor:
        """(B, N, hidden) the hidden states of the image slots entering ``layer``; at
        the prefill only (a decode step holds the image tokens as cached keys alone)."""

    @abstractmethod
    def instruction_attention(self) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, T, N), (B, T)): the attention of each instruction token (the prompt's
        tokens after the image) at layer ``layer - 1`` on each image slot, averaged over
        heads, and which of the T rows are real (rows hold different counts); at the
        prefill only. Costs a scoring row per instruction token."""

    @abstractmethod
    def add_flops(self, flops: int | torch.Tensor) -> None:
        """Count the matrix products a policy computes on these signals (per sample,
        as a batch-1 run; FLOPs count matrix products only)."""


class VisionSignals(ABC):
    """What a policy may select and merge the image tokens by before decoder layer 0,
    from the vision tower's feature layer (the layer whose output the projector reads)
    and the projector's output. Computed only when asked for; costs go into the plan as
    for ``RankingSignals``."""

    def __init__(self, image_tokens: int, grid: int):
        self.image_tokens = image_tokens  # N, the projector's features per image
        self.grid = grid  # the patches per side: slot i is patch (i // grid, i % grid)

    @abstractmethod
    def cls_attention(self) -> torch.Tensor:
        """(B, N) the class token's attention on each patch at the feature layer,
        averaged over heads (the softmax runs over the class token and every patch).
        Costs the class token's scores over those keys."""

    @abstractmethod
    def keys(self) -> torch.Tensor:
        """(B, N, head_dim) the patches' keys at the feature layer, averaged over heads."""

    @abstractmethod
    def features(self) -> torch.Tensor:
        """(B, N, hidden) the projector's image features, what the decoder would see."""

    @abstractmethod
    def add_flops(self, flops: int | torch.Tensor) -> None:
        """Count the matrix products a policy computes on these signals."""


@dataclass
class Ranking:
    """What ``score`` may return instead of bare scores: the scores, and at the prefill
    the merge weights (B, N, N) of the image slots' hidden states entering the layer
    (row i: the coefficient of each slot's state in kept slot i's; see ``core.merging``)."""

    scores: torch.Tensor
    merge_weights: torch.Tensor | None = None


@dataclass
class ImageReduction:
    """What enters the decoder in place of an image's N projector features: the slots
    ``kept`` (B, N), each carrying the combination of features ``merge_weights`` (B, N,
    N) gives it (row i: the coefficient of each slot's feature in slot i's; see
    ``core.merging``); None keeps the features as they are. Dropped slots leave the
    sequence before layer 0."""

    kept: torch.Tensor
    merge_weights: torch.Tensor | None = None


class PruningPolicy:
    """Base of every method. Subclasses set ``name`` and ``settings`` and override
    ``keep_before_layer``, and ``score`` where they rank by a signal of their own."""

    name: ClassVar[str]
    settings: ClassVar[tuple[Setting, ...]] = ()
    # A progressive policy's drops are for good: the dropped tokens leave the KV cache of
    # the later layers. Otherwise every image token stays cached and each selection is
    # made among all of them, the others hidden from attention for that step (mode=mask).
    progressive: bool = True
    # FLOPs of one observed decision beyond the scoring row (DyRate's predictor)
    decision_flops: int = 0
    # Whether every prompt must hold an image: a method that selects image tokens has
    # nothing to select from in a text-only prompt
    needs_image: ClassVar[bool] = True
    # Whether ``reduce_before_decoder`` acts: the vision tower's feature layer is then
    # watched while it runs, for the ``VisionSignals``
    reduces_before_decoder: ClassVar[bool] = False
    # The position ids of the tokens after a drop (settings.POSITIONS_SETTING, which the
    # methods that drop take): "original" keeps the prompt's, "renumber" numbers them
    # contiguously in the layers that no longer see the dropped ones (docs/methods.md)
    positions: str = "original"

    def __init__(self, arch: Arch, values: dict[str, Any]):
        self.arch = arch
        self.num_layers = arch.layers
        for setting in self.settings:
            setattr(self, setting.name, values[setting.name])
        if self.positions == "renumber" and not self.progressive:
            raise PruningConfigError(
                f"positions='renumber' is not allowed for method {self.name!r} with mode='mask': the image tokens it "
                "hides stay cached with the positions they were cached at; renumbering needs mode='progressive'"
            )

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **{s.name: getattr(self, s.name) for s in self.settings}}

    def keep_before_layer(self, layer: int, step: int, view: StepView) -> torch.Tensor | None:
        """Image tokens to keep per sample from ``layer`` on, or None to keep the current set."""
        return None

    def observes(self, layer: int, step: int) -> bool:
        """Whether ``keep_before_layer`` at this layer and step looks at
        ``StepView.group_attention`` (the executor computes it only then)."""
        return False

    def reduce_before_decoder(self, signals: VisionSignals) -> ImageReduction | None:
        """Which image tokens enter the decoder, and what they carry (merging), before
        layer 0 of the prefill; None (the default) leaves the projector's features as
        they are. Positions are then contiguous: the decoder sees a shorter prompt, as
        when the vision side hands over fewer tokens."""
        return None

    def score(self, signals: RankingSignals) -> torch.Tensor | Ranking:
        """(B, N) scores of the image slots; the top ``keep`` of the candidates are kept
        (ties go to the lower slot). By default the step's attention. A ``Ranking`` also
        says what the kept slots absorb of the others (at the prefill)."""
        return signals.attention()
