"""VTW's choice of K: the first layer from which withdrawing the image tokens keeps the
first generated token's mean KL divergence from the unpruned model within eta."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from ..methods import make_policy
from .calibration import Calibration, FlopsShare


def default_first_vtw_layer(num_layers: int) -> int:
    """VTW's first candidate K: 5 for LLaVA-1.5's 32 and 40 layers, as VTW searches; a
    quarter of the depth (at least 1) for shallow models such as the embedded one."""
    return max(1, min(5, num_layers // 4))


def find_vtw_k(calibration: Calibration, eta: float, first_layer: int, flops_share: FlopsShare,
               pretrained: str, out: Path | None = None) -> dict:
    """VTW's choice of K: for K from ``first_layer`` to the last layer, the mean
    first-token KL divergence with image tokens withdrawn from layer K on; K is the
    first with a divergence of at most ``eta`` (None when no K is). Written to ``out``
    when given."""
    arch = calibration.arch
    curve = []
    for K in tqdm(range(first_layer, arch.layers), desc="VTW K", unit="layer"):
        policy = make_policy("vtw", arch, K=K)
        curve.append({"K": K, "kl": calibration.first_token_kl(policy), "flops_share": flops_share(policy)})
    chosen = next((point["K"] for point in curve if point["kl"] <= eta), None)
    result = {
        "K": chosen,
        "eta": eta,
        "curve": curve,
        "settings": {"pretrained": pretrained, "calibration": calibration.describe(), "first_layer": first_layer,
                     "criterion": "mean KL(unpruned || withdrawn) of the first generated token, nats",
                     "flops_share": flops_share.definition()},
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result
