"""G-Search (arXiv 2412.00556): per layer, from the shallowest, the smallest count of a
grid that keeps the calibration criterion within tolerance, every deeper layer at that count."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tqdm import tqdm

from .calibration import Calibration, FlopsShare, KLCriterion, ScoreCriterion, schedule_policy, write_log, write_schedule

# G-Search's default grid: the shares of the image tokens a layer may drop to. Keeping
# the previous layer's count (no drop) is always possible and needs no evaluation.
DEFAULT_GRID = (0.0, 0.0625, 0.125, 0.25, 0.375, 0.5, 0.75)


def greedy_search(num_layers: int, n_img: int, grid: list[int],
                  within: Callable[[int, tuple[int, ...]], bool]) -> tuple[int, ...]:
    """G-Search's rule. From the shallowest prunable layer (layer 0 is never pruned) to
    the deepest: the smallest grid count, below the previous layer's, for which
    ``within(layer, candidate)`` holds, where the candidate keeps the layers fixed so far
    and sets this and every deeper layer to that count; then that layer is fixed. Counts
    are tried from the smallest up, so the first that holds is taken. When none holds,
    the layer keeps the previous layer's count (the schedule accepted before it)."""
    schedule = (n_img,) * num_layers
    for layer in range(1, num_layers):
        for count in sorted(count for count in set(grid) if count < schedule[layer - 1]):
            candidate = schedule[:layer] + (count,) * (num_layers - layer)
            if within(layer, candidate):
                schedule = candidate
                break
    return schedule


def gsearch(calibration: Calibration, criterion: KLCriterion | ScoreCriterion, tolerance: float,
            grid_shares: tuple[float, ...], flops_share: FlopsShare, out: Path, pretrained: str) -> dict:
    """Run G-Search and write the schedule to ``out`` and every candidate tried, with its
    criterion value and FLOPs share, to ``<out stem>.search.json`` beside it."""
    arch = calibration.arch
    grid = sorted({round(share * arch.n_img) for share in grid_shares})
    candidates = []
    progress = tqdm(desc="G-Search", unit="candidate")

    def within(layer: int, candidate: tuple[int, ...]) -> bool:
        value = criterion.value(schedule_policy(arch, candidate))
        accepted = criterion.within(value, tolerance)
        share = flops_share.of_schedule(candidate)
        candidates.append({"layer": layer, "keep": candidate[layer], "schedule": list(candidate), "value": value,
                           "within_tolerance": accepted, "flops_share": share})
        progress.update()
        progress.write(f"layer {layer} keeps {candidate[layer]:>4}: {criterion.name} {value:.4g} "
                       f"({'within' if accepted else 'outside'} tolerance), FLOPs share {share:.1%}")
        return accepted

    schedule = greedy_search(arch.layers, arch.n_img, grid, within)
    progress.close()
    accepted = [entry for entry in candidates if entry["within_tolerance"]]  # the last one is the schedule
    result = {
        "flops_share": flops_share.of_schedule(schedule),
        "value": accepted[-1]["value"] if accepted else criterion.baseline,
        "settings": {
            "pretrained": pretrained, "calibration": calibration.describe(), **criterion.describe(),
            "tolerance": tolerance, "grid_shares": list(grid_shares), "grid": grid,
            "flops_share": flops_share.definition(),
        },
    }
    log_file = out.with_name(f"{out.stem}.search.json")
    label = f"criterion={criterion.name},tolerance={tolerance:g},task={calibration.task}"
    write_log(log_file, {"searched_by": "gsearch", "schedule": list(schedule), **result, "candidates": candidates})
    write_schedule(out, schedule, "gsearch", label, {**result, "log": log_file.name})
    return {"schedule": schedule, **result, "log": str(log_file)}
