"""Every registered method with the settings the method matrix (test_method_matrix.py)
runs it at on the tiny model (4 decoder layers, 64 image tokens). A method added to the
registry without an entry here fails the matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from dyrate_eval.arch import Arch
from dyrate_eval.dyrate.predictor import RatePredictor

from .reference import prumerge_reference, visionzip_reference
from .test_dyrate import K as DYRATE_K, staircase_predictor


def _zero_rate_predictor(arch: Arch) -> RatePredictor:
    """A predictor whose only rate is 0: DyRate's every decision keeps every image token."""
    return RatePredictor.for_model(arch, DYRATE_K, rates=(0.0,))


DECIDES_FROM_INPUT = "decides how many tokens to keep from what each input.s attention shows"


def _staircase_from_the_prefill(arch: Arch) -> RatePredictor:
    """DyRate's staircase predictor one rate up: it drops already at the prefill (rate
    0.25), then more as the answer grows."""
    predictor = staircase_predictor(arch)
    with torch.no_grad():
        predictor.linear.bias.copy_(-(torch.arange(len(predictor.rates), dtype=torch.float32) - 1) ** 2)
    return predictor


@dataclass(frozen=True)
class Case:
    """One setting of a method: ``pruning`` drops tokens, ``unpruned`` (where the method
    has one) is the same method at R = 0, which must be the original model exactly."""

    pruning: Callable[[Arch], dict]
    unpruned: Callable[[Arch], dict] | None
    # whether the method drops image tokens inside the decoder (the masked reference applies)
    drops_in_decoder: bool = True
    # the reduction before the decoder written plainly (tests/reference.py), given the
    # model's shape: the reduced-prompt reference runs it on the unmodified model
    reference_reduction: Callable | None = None
    # what the plan simulation says when it cannot know the plan before the run (a regex), or None
    unsimulated: str | None = None


RENUMBER = {"positions": "renumber"}

# Every method that drops inside the decoder has a case with positions=renumber (SPEC
# section 3 rule 3), pdrop's default.
CASES: dict[str, list[Case]] = {
    "original": [Case(lambda arch: {}, lambda arch: {}, drops_in_decoder=False)],
    "fastv": [
        Case(lambda arch: {"K": 2, "R": 0.5}, lambda arch: {"K": 2, "R": 0.0}),
        Case(lambda arch: {"K": 2, "R": 0.5, **RENUMBER}, lambda arch: {"K": 2, "R": 0.0, **RENUMBER}),
    ],
    "vtw": [  # withdraws every image token: no setting keeps them
        Case(lambda arch: {"K": 2}, None),
        Case(lambda arch: {"K": 2, **RENUMBER}, None),
    ],
    "knorm": [
        Case(lambda arch: {"K": 1, "R": 0.75}, lambda arch: {"K": 1, "R": 0.0}),
        Case(lambda arch: {"K": 1, "R": 0.75, **RENUMBER}, lambda arch: {"K": 1, "R": 0.0, **RENUMBER}),
    ],
    "dyrate": [
        Case(lambda arch: {"predictor": staircase_predictor(arch)}, lambda arch: {"predictor": _zero_rate_predictor(arch)},
             unsimulated=DECIDES_FROM_INPUT),
        Case(lambda arch: {"predictor": staircase_predictor(arch), "mode": "mask"},
             lambda arch: {"predictor": _zero_rate_predictor(arch), "mode": "mask"}, unsimulated=DECIDES_FROM_INPUT),
        # drops at the prefill, renumbered, and again at decode steps
        Case(lambda arch: {"predictor": _staircase_from_the_prefill(arch), **RENUMBER},
             lambda arch: {"predictor": _zero_rate_predictor(arch), **RENUMBER}, unsimulated=DECIDES_FROM_INPUT),
    ],
    "fixed_prune": [
        Case(lambda arch: {"K": 2, "R": 0.5}, lambda arch: {"K": 2, "R": 0.0}),
        Case(lambda arch: {"K": 1, "R": 0.75, "mode": "mask"}, lambda arch: {"K": 1, "R": 0.0, "mode": "mask"}),
        Case(lambda arch: {"K": 1, "R": 0.75, **RENUMBER}, lambda arch: {"K": 1, "R": 0.0, **RENUMBER}),
    ],
    "depth_prune": [
        Case(lambda arch: {"K": 1, "R": 0.5}, lambda arch: {"K": 1, "R": 0.0}),
        Case(lambda arch: {"K": 1, "R": 0.5, **RENUMBER}, lambda arch: {"K": 1, "R": 0.0, **RENUMBER}),
    ],
    "schedule": [
        Case(lambda arch: {"schedule": "64/48/16/16"}, lambda arch: {"schedule": "64/64/64/64"}),
        Case(lambda arch: {"schedule": "64/48/16/16", **RENUMBER}, lambda arch: {"schedule": "64/64/64/64", **RENUMBER}),
    ],
    "pdrop": [
        # stages at layers 1/2/3 of 4, lambda 0.5, renumbered: 32, 16 and 8 of 64 kept
        Case(lambda arch: {}, lambda arch: {"lambda": 1.0}),
        Case(lambda arch: {"layers": "1/3", "lambda": 0.25, "positions": "original"},
             lambda arch: {"layers": "1/3", "lambda": 1.0, "positions": "original"}),
    ],
    "dart": [
        Case(lambda arch: {"K": 1, "R": 0.75, "pivots": 3}, lambda arch: {"K": 1, "R": 0.0, "pivots": 3}),
        Case(lambda arch: {"similarity": "hidden", **RENUMBER}, lambda arch: {"R": 0.0, "similarity": "hidden", **RENUMBER}),
    ],
    "sparsevlm": [
        Case(lambda arch: {}, None, unsimulated="a scoring row per instruction token"),
        Case(lambda arch: {"tokens": 64, "layers": "1/2/3", "positions": "original"}, None,
             unsimulated="a scoring row per instruction token"),
    ],
    "visionzip": [
        Case(lambda arch: {}, lambda arch: {"tokens": arch.n_img, "contextual": 0}, drops_in_decoder=False,
             reference_reduction=lambda arch: visionzip_reference(round(arch.n_img / 3), round(round(arch.n_img / 3) * 10 / 64))),
        Case(lambda arch: {"tokens": 10, "contextual": 6}, None, drops_in_decoder=False,
             reference_reduction=lambda arch: visionzip_reference(10, 6)),
    ],
    # on the tiny model's near-uniform attention no patch is an outlier: PruMerge alone keeps none
    "prumerge": [
        Case(lambda arch: {"plus": True}, None, drops_in_decoder=False, unsimulated=DECIDES_FROM_INPUT,
             reference_reduction=lambda arch: prumerge_reference(True, round(32 * arch.n_img / 576))),
        Case(lambda arch: {"plus": True, "neighbours": 0}, None, drops_in_decoder=False, unsimulated=DECIDES_FROM_INPUT,
             reference_reduction=lambda arch: prumerge_reference(True, 0)),
        Case(lambda arch: {}, None, drops_in_decoder=False, unsimulated=DECIDES_FROM_INPUT,
             reference_reduction=lambda arch: prumerge_reference(False, round(32 * arch.n_img / 576))),
    ],
}


def matrix(filter_case: Callable[[Case], bool] = lambda case: True) -> list:
    """pytest parameters: (method, case) for every case that ``filter_case`` keeps."""
    import pytest

    return [pytest.param(method, case, id=f"{method}-{index}")
            for method, cases in CASES.items() for index, case in enumerate(cases) if filter_case(case)]


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def same_plan(a: dict, b: dict) -> None:
    """Two rows' plan records (``ExecutedPlan.for_row``): counts equal, attention shares close."""
    shares_a, shares_b = a.pop("group_attention"), b.pop("group_attention")
    assert a == b
    assert [s is None for s in shares_a] == [s is None for s in shares_b]
    for x, y in zip(shares_a, shares_b):
        if x is not None:
            assert x == pytest.approx(y, abs=1e-5)
