"""``dyrate-eval gsearch``, ``psigmoid`` and ``find-vtw-k``: the layer-schedule searches
(``dyrate_eval/search/``) and their arguments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..embedded import EMBEDDED_MODEL_DIR
from ..errors import PruningConfigError


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _budget(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a FLOPs share in (0, 1]")
    return value


def _grid(text: str) -> tuple[float, ...]:
    shares = tuple(float(share) for share in text.split(","))
    if not all(0 <= share < 1 for share in shares):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of keep shares in [0, 1)")
    return shares


def _check_range(name: str, bounds: list[float] | None, lowest: float) -> tuple[float, float] | None:
    if bounds is not None and not lowest <= bounds[0] < bounds[1]:
        raise PruningConfigError(f"{name} {bounds[0]:g} {bounds[1]:g} is not allowed: it must be LOW HIGH with {lowest:g} <= LOW < HIGH")
    return tuple(bounds) if bounds is not None else None


def _search_calibration(args):
    """The calibration docs and the loaded model, with the harness's per-run log lines
    (lmms-eval's evaluator and Optuna log every candidate) held to warnings."""
    import optuna
    from loguru import logger

    from ..search.calibration import Calibration

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return Calibration(args.pretrained, args.task, args.limit, args.offset, args.include_path, args.batch_size,
                       getattr(args, "metric", None))


def _search_flops_share(args, calibration):
    from ..search.calibration import FlopsShare

    text_tokens = calibration.mean_text_tokens if args.text_tokens is None else args.text_tokens
    return FlopsShare(calibration.arch, text_tokens, args.new_tokens)


def _check_criterion(args) -> None:
    if args.criterion == "kl" and args.metric:
        raise PruningConfigError("--metric goes with --criterion score: the kl criterion compares next-token distributions")


def gsearch_command(args) -> None:
    from ..search.calibration import make_criterion
    from ..search.gsearch import DEFAULT_GRID, gsearch

    _check_criterion(args)
    calibration = _search_calibration(args)
    criterion = make_criterion(args.criterion, calibration)
    result = gsearch(calibration, criterion, args.tolerance, args.grid or DEFAULT_GRID,
                     _search_flops_share(args, calibration), Path(args.out), args.pretrained)
    print(f"G-Search: keeps {'/'.join(map(str, result['schedule']))}, FLOPs share {result['flops_share']:.1%}, "
          f"{criterion.name} {result['value']:.4g} (unpruned {criterion.baseline:.4g}) -> {args.out}, log {result['log']}")


def psigmoid_command(args) -> None:
    from ..search.calibration import make_criterion
    from ..search.psigmoid import psigmoid

    _check_criterion(args)
    ranges = {name: _check_range(f"--{name}-range", getattr(args, f"{name}_range"), lowest)
              for name, lowest in (("k", 1e-9), ("a", float("-inf")), ("b", 0.0))}
    if ranges["b"] is not None and ranges["b"][1] > 1:
        raise PruningConfigError(f"--b-range {ranges['b'][0]:g} {ranges['b'][1]:g} is not allowed: b is a share in [0, 1]")
    calibration = _search_calibration(args)
    criterion = make_criterion(args.criterion, calibration)
    result = psigmoid(calibration, criterion, args.budget, args.trials, _search_flops_share(args, calibration),
                      Path(args.out), args.pretrained, ranges["k"], ranges["a"], ranges["b"], args.seed)
    parameters = ", ".join(f"{name}={value:.3g}" for name, value in result["parameters"].items())
    print(f"P-Sigmoid: {parameters} keeps {'/'.join(map(str, result['schedule']))}, FLOPs share "
          f"{result['flops_share']:.1%}, {criterion.name} {result['value']:.4g} (unpruned {criterion.baseline:.4g}) "
          f"-> {args.out}, trials {result['log']}")


def find_vtw_k_command(args) -> None:
    from ..arch import load_arch
    from ..search.vtw_k import default_first_vtw_layer, find_vtw_k

    layers = load_arch(args.pretrained).layers
    first_layer = default_first_vtw_layer(layers) if args.first_layer is None else args.first_layer
    if not 1 <= first_layer <= layers - 1:
        raise PruningConfigError(f"--first-layer {first_layer} is not allowed: it must be an integer in 1..{layers - 1} "
                                 f"(this model has {layers} decoder layers)")
    calibration = _search_calibration(args)
    result = find_vtw_k(calibration, args.eta, first_layer, _search_flops_share(args, calibration), args.pretrained,
                        Path(args.out) if args.out else None)
    print(f"mean KL of the first generated token, image tokens withdrawn from layer K on "
          f"({calibration.task}, {calibration.num_docs} docs):")
    print("   K    mean KL  FLOPs share")
    for point in result["curve"]:
        print(f"{point['K']:4d} {point['kl']:10.5f} {point['flops_share']:11.1%}")
    if result["K"] is None:
        print(f"no K from {first_layer} on has a mean KL <= {args.eta:g}")
    else:
        print(f"K = {result['K']}: the first layer with a mean KL <= {args.eta:g}")
    if args.out:
        print(f"-> {args.out}")


def add_schedule_commands(commands) -> None:
    def calibration_arguments(parser, limit: int) -> None:
        parser.add_argument("--pretrained", default=str(EMBEDDED_MODEL_DIR), help="default: the embedded model")
        parser.add_argument("--task", required=True, help="one lmms-eval task that generates answers, e.g. shapes_vqa")
        parser.add_argument("--limit", type=positive_int, default=limit, help=f"calibration docs (default {limit})")
        parser.add_argument("--offset", type=non_negative_int, default=0,
                            help="first calibration doc in the task's evaluation split (default 0: the calibration "
                                 "docs are the first --limit docs the task is evaluated on)")
        parser.add_argument("--include-path", default="tasks", help="folder of local lmms-eval tasks (default tasks)")
        parser.add_argument("--batch-size", type=positive_int, default=8)
        parser.add_argument("--text-tokens", type=non_negative_int,
                            help="prompt tokens besides the image for the FLOPs share (default: the calibration prompts' mean)")
        parser.add_argument("--new-tokens", type=positive_int, default=1,
                            help="generated tokens for the FLOPs share (default 1: the prefill, where a schedule acts)")

    def criterion_arguments(parser) -> None:
        parser.add_argument("--criterion", choices=("score", "kl"), default="score",
                            help="score: the task's metric through lmms-eval (default); kl: mean KL divergence of the "
                                 "first generated token from the unpruned model (far cheaper)")
        parser.add_argument("--metric", help="the score criterion's metric (default: the task's first)")

    gsearch = commands.add_parser("gsearch", help="G-Search: a per-layer keep schedule, greedily from the shallowest layer")
    calibration_arguments(gsearch, limit=20)
    criterion_arguments(gsearch)
    gsearch.add_argument("--tolerance", type=_non_negative_float, required=True,
                         help="score: the largest loss against the unpruned model (metric units); kl: the largest mean KL (nats)")
    gsearch.add_argument("--grid", type=_grid,
                         help="keep shares a layer may drop to, comma-separated (default 0,0.0625,0.125,0.25,0.375,0.5,0.75)")
    gsearch.add_argument("--out", required=True, help="schedule JSON; the search log goes beside it (<stem>.search.json)")
    gsearch.set_defaults(run=gsearch_command)

    psigmoid = commands.add_parser(
        "psigmoid", help="P-Sigmoid: keep share b + (1-b)/(1+exp(k(l-a))) per layer, (k, a, b) tuned by Optuna under a FLOPs budget"
    )
    calibration_arguments(psigmoid, limit=20)
    criterion_arguments(psigmoid)
    psigmoid.add_argument("--budget", type=_budget, required=True, help="the largest FLOPs share, e.g. 0.4")
    psigmoid.add_argument("--trials", type=positive_int, default=30,
                          help="evaluated trials (default 30); over-budget proposals are neither evaluated nor counted")
    psigmoid.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    psigmoid.add_argument("--k-range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="steepness, log scale (default 0.1 10)")
    psigmoid.add_argument("--a-range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="midpoint layer (default 0 to the depth)")
    psigmoid.add_argument("--b-range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="deepest share (default 0 to the budget)")
    psigmoid.add_argument("--out", required=True, help="schedule JSON; the trial history goes beside it (<stem>.trials.json)")
    psigmoid.set_defaults(run=psigmoid_command)

    vtw_k = commands.add_parser("find-vtw-k", help="VTW's K: the first layer whose withdrawal keeps the first token's mean KL <= eta")
    calibration_arguments(vtw_k, limit=20)
    vtw_k.add_argument("--eta", type=_non_negative_float, default=0.003, help="VTW's threshold (default 0.003, its 7B value)")
    vtw_k.add_argument("--first-layer", type=int,
                       help="the first candidate K (default: 5 for 32- or 40-layer models, a quarter of the depth for shallower ones)")
    vtw_k.add_argument("--out", help="JSON of the KL curve and K")
    vtw_k.set_defaults(run=find_vtw_k_command)
