"""PyramidDrop's stages and DART's selection, beyond the method matrix: their defaults
on the paper's model shapes, and DART's pivots and duplicates on keys made by hand."""

import pytest
import torch

from dyrate_eval.arch import ARCHS
from dyrate_eval.core.policy import RankingSignals
from dyrate_eval.core.simulate import simulate_plan
from dyrate_eval.methods import make_policy


@pytest.mark.parametrize("arch,stages", [("llava-1.5-7b", (8, 16, 24)), ("llava-1.5-13b", (10, 20, 30))])
def test_pdrop_defaults_halve_the_image_tokens_at_each_quarter_of_the_depth(arch, stages):
    arch = ARCHS[arch]
    policy = make_policy("pdrop", arch)
    assert policy.layers == stages and policy.positions == "renumber"
    kept = simulate_plan(policy, arch, text_tokens=40, new_tokens=2).for_row(0)["kept_image"]
    first, second, third = stages
    expected = [576] * first + [288] * (second - first) + [144] * (third - second) + [72] * (arch.layers - third)
    assert kept == [expected, expected]


def test_dart_defaults_keep_128_of_576_with_8_pivots():
    arch = ARCHS["llava-1.5-7b"]
    policy = make_policy("dart", arch)
    assert (policy.K, policy.pivots, policy.similarity, policy.positions) == (2, 8, "keys", "original")
    kept = simulate_plan(policy, arch, text_tokens=40, new_tokens=1).for_row(0)["kept_image"][0]
    assert kept == [576, 576] + [128] * 30


class HandMadeKeys(RankingSignals):
    """Signals of one sample whose image tokens' keys (one head) are given."""

    def __init__(self, keys):
        super().__init__(layer=1, step=0, candidates=torch.ones(1, len(keys), dtype=torch.bool),
                         image_positions=torch.arange(len(keys))[None])
        self._keys, self.flops = torch.tensor(keys, dtype=torch.float32), 0

    def keys(self):
        return self._keys[None, None]

    def attention(self):
        raise AssertionError("DART needs no attention map")

    def hidden(self):
        raise AssertionError("similarity=keys reads no hidden states")

    def instruction_attention(self):
        raise AssertionError("DART reads no instruction")

    def add_flops(self, flops):
        self.flops += int(flops)


def dart_keeps(keys, **settings):
    arch = ARCHS["llava-1.5-7b"]
    signals = HandMadeKeys(keys)
    policy = make_policy("dart", arch, **settings)
    scores = policy.score(signals)
    keep = int(policy.kept_count(torch.tensor([len(keys)]))[0])
    return set(scores[0].topk(keep).indices.tolist()), signals.flops


def test_dart_keeps_its_pivot_and_drops_what_duplicates_it():
    # token 2 has the largest L1 norm: the pivot; tokens 0, 1 and 3 point its way
    # (duplicates), 4..7 elsewhere, 7 the least like it
    keys = [[1.0, 0.1], [1.0, -0.1], [3.0, 0.0], [1.0, 0.2], [0.0, 1.0], [-0.5, 1.0], [-1.0, 0.5], [-1.0, 0.0]]
    kept, flops = dart_keeps(keys, R=0.5, pivots=1)  # 4 of 8
    assert kept == {2, 7, 6, 5}
    assert flops == 2 * 8 * 2 * 1  # the cosines of 8 tokens of 2 dimensions with 1 pivot


def test_dart_pivots_share_the_tokens_they_choose():
    # pivots 0 and 1 (largest norms) point along x and y; 2..5 lie between them
    keys = [[4.0, 0.0], [0.0, 4.0], [1.0, 0.1], [0.1, 1.0], [1.0, 0.9], [-1.0, 0.05]]
    # keep 4: the two pivots, then one token each: pivot 0 takes the one least like x
    # (5, pointing the other way), pivot 1 the one least like y among the rest (2)
    kept, _ = dart_keeps(keys, R=1 / 3, pivots=2)
    assert kept == {0, 1, 5, 2}
