"""The ``dyrate-eval`` command."""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from . import EMBEDDED_MODEL_DIR
from .errors import PruningConfigError
from .methods import parse_settings
from .shapes_tasks import CAPTION_PROMPT
from .train_predictor import PredictorTrainConfig


def _cmd_methods(args) -> None:
    from .methods import METHODS

    for name, policy in METHODS.items():
        settings = ", ".join(f"{s.name} ({s.allowed})" for s in policy.settings) or "no settings"
        summary = " ".join(policy.__doc__.strip().split("\n\n")[0].split())
        print(f"{name:10s} {settings}\n{'':10s} {summary}")


def _cmd_make_tiny_model(args) -> None:
    from .tiny_model import save_tiny_llava

    print(save_tiny_llava(args.out, num_layers=args.layers, image_size=args.image_size, seed=args.seed))


def _cmd_train_embedded(args) -> None:
    import dataclasses

    from .train_embedded import TrainConfig, train_embedded

    config = TrainConfig.tiny() if args.tiny else TrainConfig()
    fields = {field.name: field.type for field in dataclasses.fields(TrainConfig)}
    overrides = {}
    for key, value in parse_settings(args.set).items():
        if key not in fields:
            raise PruningConfigError(f"train-embedded has no setting {key!r}; it has: {', '.join(fields)}")
        kind = float if fields[key] in (float, "float") else int
        try:
            overrides[key] = kind(value)
        except ValueError:
            raise PruningConfigError(f"{key}={value!r} is not allowed: {key} must be a {kind.__name__}") from None
    log = train_embedded(args.out, dataclasses.replace(config, **overrides))
    print(f"{args.out}: {log['parameters']:,} parameters, trained in {log['seconds'] / 60:.1f} min")


def _cmd_train_predictor(args) -> None:
    from .train_predictor import train_predictor

    rates = tuple(float(rate) for rate in args.rates.split(","))
    config = PredictorTrainConfig(
        target_flops=args.target_flops, flops_weight=args.flops_weight, temperature=args.temperature,
        temperature_final=args.temperature_final, flops_constraint=args.flops_constraint, K=args.K,
        rates=rates, mode=args.mode, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        max_answer_tokens=args.max_answer_tokens, seed=args.seed,
    )
    columns = {"image": args.image_column, "prompt": args.prompt_column, "answer": args.answer_column}
    predictor = train_predictor(args.pretrained, args.data, args.out, config, resume=args.resume, device=args.device,
                                dtype=args.dtype, columns=columns)
    final = predictor.training_log["final"]
    print(f"{args.out}: K={predictor.K}, rates {list(predictor.rates)}, trained in {predictor.training_log['seconds'] / 60:.1f} min; "
          f"last tenth of the steps: cross-entropy {final['cross_entropy']:.3f}, FLOPs share {final['flops_share_sampled']:.3f} "
          f"(target {config.target_flops})")


def _cmd_match_rate(args) -> None:
    from .arch import load_arch
    from .flops import rate_for_share
    from .report import load_runs

    _, measured = load_runs([args.run_dir])
    rows = measured[measured["task"] == args.task] if not measured.empty else measured
    if rows.empty:
        raise PruningConfigError(f"{args.run_dir} holds no measured samples of task {args.task!r} (run it with --log_samples)")
    share = rows["tflops_language_model"].sum() / (rows["tflops_language_model"] / rows["flops_ratio_language_model"]).sum()
    samples = list(zip(rows["text_tokens"].astype(int), rows["new_tokens"].astype(int)))
    rate = rate_for_share(args.method, load_arch(args.arch), share, samples, **parse_settings(args.set))
    print(rate)
    print(f"{args.method} {' '.join(args.set)} R={rate} spends the {share:.2%} of the FLOPs that {args.run_dir} spent on "
          f"{len(samples)} samples of {args.task}", file=sys.stderr)


def _cmd_generate(args) -> None:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from . import apply_pruning, executed_plan
    from .prompts import llava_prompt

    settings = parse_settings(args.set)
    model = LlavaForConditionalGeneration.from_pretrained(args.pretrained).eval()
    apply_pruning(model, method=args.method, **settings)
    processor = AutoProcessor.from_pretrained(args.pretrained)
    inputs = processor(images=[Image.open(args.image).convert("RGB")], text=[llava_prompt(args.prompt)], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    plan = executed_plan(model).for_row(0)
    print(f"image tokens: {plan['n_img']}; kept per layer at prefill: {plan['kept_image'][0]}", file=sys.stderr)


def _cmd_report(args) -> None:
    from .report import write_report

    tables = write_report(args.runs, args.out, args.source)
    print(f"wrote {', '.join(tables)}, pareto.png to {args.out}")


def _cmd_trace(args) -> None:
    from .arch import load_arch
    from .methods import make_policy
    from .trace import write_trace

    policy = make_policy(args.method, load_arch(args.pretrained), **parse_settings(args.set))
    if args.images:
        from PIL import Image

        images = [Image.open(path).convert("RGB") for path in args.images]
        names = [Path(path).name for path in args.images]
    else:  # held-out scenes of the embedded caption task
        from .shapes_tasks import BUILDERS, scene_from_doc
        from .world import render

        docs = list(itertools.islice(BUILDERS["caption"](), args.examples))
        images = [render(scene_from_doc(doc))[0] for doc in docs]
        names = [f"shapes_caption doc {doc['doc_id']}" for doc in docs]
    path = write_trace(args.out, args.pretrained, policy, images, names, args.prompt, args.max_new_tokens)
    print(f"wrote {path}")


def _cmd_flops(args, extra: list[str]) -> None:
    import json

    from .arch import load_arch
    from .flops import paper_convention, plan_flops, simulate_plan
    from .methods import make_policy

    if len(extra) % 2 or not all(name.startswith("--") for name in extra[::2]):
        raise PruningConfigError(f"method settings must come as --NAME VALUE pairs, e.g. --K 2 --R 0.5; got {' '.join(extra)}")
    settings = {name[2:]: value for name, value in zip(extra[::2], extra[1::2])}
    arch = load_arch(args.arch)
    policy = make_policy(args.method, arch, **settings)
    plan = simulate_plan(policy, arch, args.text_tokens, args.new_tokens)
    baseline = simulate_plan(make_policy("original", arch), arch, args.text_tokens, args.new_tokens)
    counted, original = plan_flops(plan, arch), plan_flops(baseline, arch)
    report = {
        "arch": arch.name,
        **policy.describe(),
        "image_tokens": arch.n_img,
        "text_tokens": args.text_tokens,
        "new_tokens": args.new_tokens,
        "flops": counted["total"],
        "flops_original": original["total"],
        "ratio": counted["total"] / original["total"],
        "flops_language_model": counted["language_model"],
        "flops_vision": counted["vision"],
        "flops_projector": counted["projector"],
        "flops_scoring": counted["scoring"],
        "prefill_ratio": counted["prefill"] / original["prefill"],
        "ratio_paper_convention": paper_convention(plan, arch) / paper_convention(baseline, arch),
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{arch.name}, {policy.describe()}, {arch.n_img} image + {args.text_tokens} text tokens, {args.new_tokens} new tokens")
    print(f"  total FLOPs (all parts):      {report['flops'] / 1e12:9.3f} T  ({report['ratio']:.1%} of original)")
    print(f"    language model:             {report['flops_language_model'] / 1e12:9.3f} T  (scoring {report['flops_scoring'] / 1e9:.3f} G)")
    print(f"    vision tower + projector:   {(report['flops_vision'] + report['flops_projector']) / 1e12:9.3f} T")
    print(f"  prefill, exact:               {report['prefill_ratio']:.1%} of original")
    print(f"  prefill, paper convention:    {report['ratio_paper_convention']:.1%} of original (4nd^2 + 2n^2d + 2ndm per layer)")


def _check_writable(out: str) -> None:
    """A file written only at the end of a long command: its folder is made and the file
    opened first, so that an unwritable path fails before the work, not after it (a file
    made for the check is removed: until the work is done there is no output)."""
    path = Path(out)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as error:
        raise PruningConfigError(f"--out {out} is not allowed: it cannot be written ({error.strerror}: {error.filename}); allowed is a file path this user can write") from None
    if not existed:
        path.unlink()


def _cmd_bench(args) -> None:
    import torch

    from .bench import load_bench_model, parse_methods, run_bench, summarize_bench
    from .pruning import resolve_dtype

    if args.arch and args.pretrained:
        raise PruningConfigError("give --pretrained or --arch, not both")
    if args.out:
        _check_writable(args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, torch.device(device))
    pretrained = None if args.arch else (args.pretrained or str(EMBEDDED_MODEL_DIR))
    if args.report and not args.out:
        raise PruningConfigError("--report writes the summary of the --out CSV: give --out too")
    random_weights = bool(args.arch or args.random_weights)
    model, arch = load_bench_model(pretrained, args.arch, args.random_weights, device, dtype, args.attention)
    methods = parse_methods(args.methods, arch, random_weights)
    rows = run_bench(model, arch, methods, args.samples, args.new_tokens, args.text_tokens, args.warmup, args.peers,
                     args.batch)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        rows.to_csv(args.out, index=False)
    if args.report:
        from .report import write_bench_summary

        Path(args.report).mkdir(parents=True, exist_ok=True)
        write_bench_summary(Path(args.out), Path(args.report))
    weights = "random weights" if random_weights else "weights from the folder"
    attention = model.model.language_model.config._attn_implementation
    print(f"{arch.name} ({weights}), {device}, {dtype}, {attention} attention, batch {args.batch}, {args.samples} samples "
          f"(+{args.warmup} warm-up), {arch.n_img} image + {args.text_tokens} text tokens, {args.new_tokens} new tokens; medians")
    print(summarize_bench(rows).to_markdown(index=False, floatfmt=".4g"))


def _cmd_make_shapes_tasks(args) -> None:
    from .shapes_tasks import write_task_data

    for name, count in write_task_data(args.out).items():
        print(f"{args.out}/{name}.jsonl: {count} items")


def _cmd_make_rehearsal(args) -> None:
    from . import rehearsal

    if args.docs < 2:
        raise PruningConfigError(f"--docs {args.docs} is not allowed: at least 2 (MME pairs its questions)")
    out = Path(args.out)
    checkpoint = rehearsal.write_checkpoint(out / "llava-1.5-7b-rehearsal")
    print(f"{checkpoint}: the embedded model in the llava-hf LLaVA-1.5 layout")
    for task, count in rehearsal.write_benchmarks(out / "hf_home", args.docs).items():
        print(f"{out / 'hf_home'}: {task}, {count} items")
    data = rehearsal.write_caption_training_data(out / "predictor-data", args.captions)
    print(f"{data}: {args.captions} captions for train-predictor")


def _cmd_summarize(args) -> None:
    from .results import write_summary

    table = write_summary(args.runs, args.out, args.name)
    print(f"{len(table)} rows from {table['file'].nunique()} run files -> {args.out}/{args.name}.md")


# -- layer schedules: G-Search, P-Sigmoid, VTW's K (dyrate_eval/schedules.py) ---------------


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _non_negative_int(text: str) -> int:
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

    from .schedules import Calibration

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return Calibration(args.pretrained, args.task, args.limit, args.offset, args.include_path, args.batch_size,
                       getattr(args, "metric", None))


def _search_flops_share(args, calibration):
    from .schedules import FlopsShare

    text_tokens = calibration.mean_text_tokens if args.text_tokens is None else args.text_tokens
    return FlopsShare(calibration.arch, text_tokens, args.new_tokens)


def _check_criterion(args) -> None:
    if args.criterion == "kl" and args.metric:
        raise PruningConfigError("--metric goes with --criterion score: the kl criterion compares next-token distributions")


def _cmd_gsearch(args) -> None:
    from .schedules import DEFAULT_GRID, gsearch, make_criterion

    _check_criterion(args)
    calibration = _search_calibration(args)
    criterion = make_criterion(args.criterion, calibration)
    result = gsearch(calibration, criterion, args.tolerance, args.grid or DEFAULT_GRID,
                     _search_flops_share(args, calibration), Path(args.out), args.pretrained)
    print(f"G-Search: keeps {'/'.join(map(str, result['schedule']))}, FLOPs share {result['flops_share']:.1%}, "
          f"{criterion.name} {result['value']:.4g} (unpruned {criterion.baseline:.4g}) -> {args.out}, log {result['log']}")


def _cmd_psigmoid(args) -> None:
    from .schedules import make_criterion, psigmoid

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


def _cmd_find_vtw_k(args) -> None:
    from .arch import load_arch
    from .schedules import default_first_vtw_layer, find_vtw_k

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


def _add_schedule_commands(commands) -> None:
    def calibration_arguments(parser, limit: int) -> None:
        parser.add_argument("--pretrained", default=str(EMBEDDED_MODEL_DIR), help="default: the embedded model")
        parser.add_argument("--task", required=True, help="one lmms-eval task that generates answers, e.g. shapes_vqa")
        parser.add_argument("--limit", type=_positive_int, default=limit, help=f"calibration docs (default {limit})")
        parser.add_argument("--offset", type=_non_negative_int, default=0,
                            help="first calibration doc in the task's evaluation split (default 0: the calibration "
                                 "docs are the first --limit docs the task is evaluated on)")
        parser.add_argument("--include-path", default="tasks", help="folder of local lmms-eval tasks (default tasks)")
        parser.add_argument("--batch-size", type=_positive_int, default=8)
        parser.add_argument("--text-tokens", type=_non_negative_int,
                            help="prompt tokens besides the image for the FLOPs share (default: the calibration prompts' mean)")
        parser.add_argument("--new-tokens", type=_positive_int, default=1,
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
    gsearch.set_defaults(run=_cmd_gsearch)

    psigmoid = commands.add_parser(
        "psigmoid", help="P-Sigmoid: keep share b + (1-b)/(1+exp(k(l-a))) per layer, (k, a, b) tuned by Optuna under a FLOPs budget"
    )
    calibration_arguments(psigmoid, limit=20)
    criterion_arguments(psigmoid)
    psigmoid.add_argument("--budget", type=_budget, required=True, help="the largest FLOPs share, e.g. 0.4")
    psigmoid.add_argument("--trials", type=_positive_int, default=30,
                          help="evaluated trials (default 30); over-budget proposals are neither evaluated nor counted")
    psigmoid.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    psigmoid.add_argument("--k-range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="steepness, log scale (default 0.1 10)")
    psigmoid.add_argument("--a-range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="midpoint layer (default 0 to the depth)")
    psigmoid.add_argument("--b-range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="deepest share (default 0 to the budget)")
    psigmoid.add_argument("--out", required=True, help="schedule JSON; the trial history goes beside it (<stem>.trials.json)")
    psigmoid.set_defaults(run=_cmd_psigmoid)

    vtw_k = commands.add_parser("find-vtw-k", help="VTW's K: the first layer whose withdrawal keeps the first token's mean KL <= eta")
    calibration_arguments(vtw_k, limit=20)
    vtw_k.add_argument("--eta", type=_non_negative_float, default=0.003, help="VTW's threshold (default 0.003, its 7B value)")
    vtw_k.add_argument("--first-layer", type=int,
                       help="the first candidate K (default: 5 for 32- or 40-layer models, a quarter of the depth for shallower ones)")
    vtw_k.add_argument("--out", help="JSON of the KL curve and K")
    vtw_k.set_defaults(run=_cmd_find_vtw_k)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dyrate-eval", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("methods", help="list the pruning methods and their settings").set_defaults(run=_cmd_methods)

    tiny = commands.add_parser("make-tiny-model", help="save a tiny random-weight LLaVA (for smoke runs)")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--layers", type=int, default=4)
    tiny.add_argument("--image-size", type=int, default=112, help="pixels; patch 14, so 112 gives 64 image tokens")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_cmd_make_tiny_model)

    generate = commands.add_parser("generate", help="answer one image and prompt with a method, print its plan")
    generate.add_argument("--pretrained", default=str(EMBEDDED_MODEL_DIR), help="default: the embedded model")
    generate.add_argument("--image", required=True)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--method", default="original")
    generate.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="method settings, e.g. K=2 R=0.5")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.set_defaults(run=_cmd_generate)

    train = commands.add_parser(
        "train-embedded", help="train the embedded model from scratch on the shapes world (about an hour on 2 CPU cores)"
    )
    train.add_argument("--out", required=True, help="folder for the model, its processor and training_log.json")
    train.add_argument("--tiny", action="store_true", help="a few steps of a tiny model (checks the pipeline)")
    train.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override TrainConfig fields, e.g. stage2_steps=400")
    train.set_defaults(run=_cmd_train_embedded)

    predictor = commands.add_parser(
        "train-predictor", help="train DyRate's rate predictor for a model (the model stays frozen)"
    )
    predictor.add_argument("--pretrained", default=str(EMBEDDED_MODEL_DIR), help="default: the embedded model")
    predictor.add_argument(
        "--data", default="shapes",
        help="shapes (the shapes world's training scenes, every question kind and captions), shapes-captions, "
             'a JSON-lines file of {"image", "prompt", "answer"}, or hf:NAME[:SPLIT] (a Hugging Face data set)',
    )
    predictor.add_argument("--image-column", default="image", help="with hf:NAME (default image)")
    predictor.add_argument("--prompt-column", default="question", help="with hf:NAME (default question)")
    predictor.add_argument("--answer-column", default="answer", help="with hf:NAME; a list takes its first (default answer)")
    predictor.add_argument("--out", required=True, help="folder for predictor.safetensors, predictor.json and train_log.jsonl")
    defaults = PredictorTrainConfig()
    predictor.add_argument("--target-flops", type=float, default=defaults.target_flops,
                           help=f"language-model FLOPs share to aim at (default {defaults.target_flops})")
    predictor.add_argument("--flops-weight", type=float, default=defaults.flops_weight,
                           help=f"lambda of the FLOPs term (default {defaults.flops_weight:g})")
    predictor.add_argument("--flops-constraint", default=defaults.flops_constraint,
                           help="sample (default): each sample's FLOPs share is pulled to the target; batch: the batch's share")
    predictor.add_argument("--temperature", type=float, default=defaults.temperature,
                           help=f"tau dividing the predictor's logits at the start (default {defaults.temperature:g})")
    predictor.add_argument("--temperature-final", type=float, default=defaults.temperature_final,
                           help=f"tau at the last step, by exponential decay (default {defaults.temperature_final:g}; "
                                "equal to --temperature for a constant tau)")
    predictor.add_argument("--K", type=int, default=defaults.K,
                           help=f"the first pruned layer; the predictor observes layer K-1 (default {defaults.K})")
    rates = ",".join(f"{rate:g}" for rate in defaults.rates)
    predictor.add_argument("--rates", default=rates, help=f"the rates it chooses from (default {rates})")
    predictor.add_argument("--mode", default=defaults.mode, help="progressive (default) or mask: the selection rule it trains with")
    predictor.add_argument("--steps", type=int, default=defaults.steps, help=f"default {defaults.steps}")
    predictor.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"default {defaults.batch_size}")
    predictor.add_argument("--lr", type=float, default=defaults.lr, help=f"Adam's learning rate (default {defaults.lr:g})")
    predictor.add_argument("--max-answer-tokens", type=int, default=defaults.max_answer_tokens,
                           help=f"answers are cut to this many tokens (default {defaults.max_answer_tokens})")
    predictor.add_argument("--seed", type=int, default=defaults.seed)
    predictor.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    predictor.add_argument("--device", help="default: cuda when available, else cpu")
    predictor.add_argument("--dtype", default="auto", help="auto (float16 on a GPU, float32 on a CPU), float32, float16 or bfloat16")
    predictor.set_defaults(run=_cmd_train_predictor)

    match = commands.add_parser(
        "match-rate", help="the rate R at which a method spends the FLOPs share a run spent (a FLOPs-matched baseline)"
    )
    match.add_argument("run_dir", metavar="RUN", help="an lmms-eval output folder with samples logs (e.g. a dyrate run)")
    match.add_argument("--task", required=True, help="the task whose samples set the share and the lengths")
    match.add_argument("--method", default="fixed_prune", help="a method with a rate R: fastv, fixed_prune or depth_prune")
    match.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="its other settings, e.g. K=2")
    match.add_argument("--arch", default=str(EMBEDDED_MODEL_DIR), help="the run's model folder or shape (default: the embedded model)")
    match.set_defaults(run=_cmd_match_rate)

    trace = commands.add_parser(
        "trace", help="attention per token group and kept image tokens, step by step, on a few images (for the report's figures)"
    )
    trace.add_argument("--out", required=True, help="folder for trace.json and the example images")
    trace.add_argument("--pretrained", default=str(EMBEDDED_MODEL_DIR), help="default: the embedded model")
    trace.add_argument("--method", default="fastv")
    trace.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="method settings, e.g. K=2 R=0.5")
    trace.add_argument("--images", nargs="*", help="image files (default: held-out scenes of shapes_caption)")
    trace.add_argument("--examples", type=int, default=4, help="how many held-out scenes without --images")
    trace.add_argument("--prompt", default=CAPTION_PROMPT)
    trace.add_argument("--max-new-tokens", type=int, default=32)
    trace.set_defaults(run=_cmd_trace)

    flops = commands.add_parser(
        "flops",
        help="FLOPs of a method on a model shape, no weights needed; method settings as --NAME VALUE (e.g. --K 2 --R 0.5)",
    )
    flops.add_argument("--arch", default=str(EMBEDDED_MODEL_DIR), help="llava-1.5-7b, llava-1.5-13b or a model folder")
    flops.add_argument("--method", default="original")
    flops.add_argument("--text-tokens", type=_non_negative_int, default=40, help="prompt tokens besides the image")
    flops.add_argument("--new-tokens", type=_positive_int, default=1, help="generated tokens (1: the prefill alone)")
    flops.add_argument("--json", action="store_true", help="print one JSON object")
    flops.set_defaults(run=_cmd_flops, takes_extra=True)

    bench = commands.add_parser("bench", help="time methods side by side on the same inputs (TTFT, decode, FLOPs, KV bytes)")
    bench.add_argument("--pretrained", help="a model folder (default: the embedded model)")
    bench.add_argument(
        "--arch", help="a named shape with random weights: llava-1.5-7b, llava-1.5-13b (GPU), llava-1.5-7b-4layers "
        "(the 7B's width and heads, 4 decoder layers; for a CPU) or llava-1.5-7b-cpu (the 7B at a sixteenth of its width)"
    )
    bench.add_argument("--random-weights", action="store_true", help="random weights from --pretrained's config")
    bench.add_argument("--methods", default="original,fastv:K=2:R=0.5,vtw",
                       help="comma-separated, settings after colons; 'all' for every method at the paper's settings. "
                       "With random weights, dyrate without predictor= gets a predictor with random weights")
    bench.add_argument("--peers", action="store_true",
                       help="also time every FastV method as its peers run it: eager attention with layer K-1's weights "
                       "(FastV's reference code), layer K-1 rerun for its weights (LightCompress), masked instead of dropped")
    bench.add_argument("--attention", help="attention implementation: sdpa, flash_attention_2, eager (default: transformers' choice)")
    bench.add_argument("--batch", type=_positive_int, default=1, help="prompts per generate call")
    bench.add_argument("--samples", type=_positive_int, default=10)
    bench.add_argument("--warmup", type=_non_negative_int, default=1, help="samples run first and not reported")
    bench.add_argument("--new-tokens", type=_positive_int, default=32)
    bench.add_argument("--text-tokens", type=_non_negative_int, default=40)
    bench.add_argument("--device", help="default: cuda when available, else cpu")
    bench.add_argument("--dtype", default="auto", help="auto (float16 on a GPU, float32 on a CPU), float32, float16 or bfloat16")
    bench.add_argument("--out", help="CSV of every measured sample")
    bench.add_argument("--report", help="also write the report's benchmark table of --out (bench_<folder of --out>.csv/.md) here")
    bench.set_defaults(run=_cmd_bench)

    shapes = commands.add_parser("make-shapes-tasks", help="regenerate the embedded tasks' held-out data")
    shapes.add_argument("--out", default="tasks/shapes/data")
    shapes.set_defaults(run=_cmd_make_shapes_tasks)

    report = commands.add_parser("report", help="the paper's tables and figures from lmms-eval runs and traces")
    report.add_argument("runs", nargs="+", help="lmms-eval output folders or results files (and trace folders)")
    report.add_argument("--out", default="results")
    report.add_argument("--source", default="measured", help="how the runs' rows are labelled in the source column "
                        "(e.g. 'rehearsal' for ./run_all.sh --paper --rehearse)")
    report.set_defaults(run=_cmd_report)

    rehearsal = commands.add_parser(
        "make-rehearsal",
        help="the paper grid's offline rehearsal: a checkpoint in the llava-hf LLaVA-1.5 layout, the nine benchmarks "
        "in miniature where lmms-eval's tasks find them (HF_HOME), captions for train-predictor",
    )
    rehearsal.add_argument("--out", required=True)
    rehearsal.add_argument("--docs", type=int, default=24, help="items per benchmark")
    rehearsal.add_argument("--captions", type=int, default=200, help="captions to train DyRate's predictor on")
    rehearsal.set_defaults(run=_cmd_make_rehearsal)

    summarize = commands.add_parser("summarize", help="scores of lmms-eval runs as CSV and markdown")
    summarize.add_argument("runs", nargs="+", help="lmms-eval output folders or results files")
    summarize.add_argument("--out", default="results")
    summarize.add_argument("--name", default="summary")
    summarize.set_defaults(run=_cmd_summarize)

    _add_schedule_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "takes_extra", False):
            args.run(args, extra)
        else:
            args.run(args)
    except PruningConfigError as error:
        print(f"dyrate-eval: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
