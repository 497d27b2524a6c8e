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

    tables = write_report(args.runs, args.out)
    print(f"wrote {', '.join(tables)}, pareto.png to {args.out}")


def _cmd_trace(args) -> None:
    from transformers import AutoConfig

    from .methods import make_policy
    from .trace import write_trace

    config = AutoConfig.from_pretrained(args.pretrained)
    policy = make_policy(args.method, config.text_config.num_hidden_layers, **parse_settings(args.set))
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

    from .flops import load_arch, paper_convention, plan_flops, simulate_plan
    from .methods import make_policy

    if len(extra) % 2 or not all(name.startswith("--") for name in extra[::2]):
        raise PruningConfigError(f"method settings must come as --NAME VALUE pairs, e.g. --K 2 --R 0.5; got {' '.join(extra)}")
    settings = {name[2:]: value for name, value in zip(extra[::2], extra[1::2])}
    arch = load_arch(args.arch)
    policy = make_policy(args.method, arch.layers, **settings)
    plan = simulate_plan(policy, arch, args.text_tokens, args.new_tokens)
    baseline = simulate_plan(make_policy("original", arch.layers), arch, args.text_tokens, args.new_tokens)
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


def _cmd_bench(args) -> None:
    import torch

    from .bench import load_bench_model, parse_methods, run_bench, summarize_bench
    from .pruning import resolve_dtype

    if args.arch and args.pretrained:
        raise PruningConfigError("give --pretrained or --arch, not both")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, torch.device(device))
    pretrained = None if args.arch else (args.pretrained or str(EMBEDDED_MODEL_DIR))
    model, arch = load_bench_model(pretrained, args.arch, args.random_weights, device, dtype)
    methods = parse_methods(args.methods, arch.layers)
    rows = run_bench(model, arch, methods, args.samples, args.new_tokens, args.text_tokens, args.warmup)
    if args.out:
        rows.to_csv(args.out, index=False)
    weights = "random weights" if args.arch or args.random_weights else "weights from the folder"
    print(f"{arch.name} ({weights}), {device}, {dtype}, {args.samples} samples (+{args.warmup} warm-up), "
          f"{arch.n_img} image + {args.text_tokens} text tokens, {args.new_tokens} new tokens; medians")
    print(summarize_bench(rows).to_markdown(index=False, floatfmt=".4g"))


def _cmd_make_shapes_tasks(args) -> None:
    from .shapes_tasks import write_task_data

    for name, count in write_task_data(args.out).items():
        print(f"{args.out}/{name}.jsonl: {count} items")


def _cmd_summarize(args) -> None:
    from .results import write_summary

    table = write_summary(args.runs, args.out, args.name)
    print(f"{len(table)} rows from {table['file'].nunique()} run files -> {args.out}/{args.name}.md")


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
    flops.add_argument("--text-tokens", type=int, default=40, help="prompt tokens besides the image")
    flops.add_argument("--new-tokens", type=int, default=1, help="generated tokens (1: the prefill alone)")
    flops.add_argument("--json", action="store_true", help="print one JSON object")
    flops.set_defaults(run=_cmd_flops, takes_extra=True)

    bench = commands.add_parser("bench", help="time methods side by side on the same inputs (TTFT, decode, FLOPs, KV bytes)")
    bench.add_argument("--pretrained", help="a model folder (default: the embedded model)")
    bench.add_argument(
        "--arch", help="a named shape with random weights: llava-1.5-7b, llava-1.5-13b (GPU) or llava-1.5-7b-cpu (the 7B at a sixteenth of its width)"
    )
    bench.add_argument("--random-weights", action="store_true", help="random weights from --pretrained's config")
    bench.add_argument("--methods", default="original,fastv:K=2:R=0.5,vtw", help="comma-separated, settings after colons")
    bench.add_argument("--samples", type=int, default=10)
    bench.add_argument("--warmup", type=int, default=1, help="samples run first and not reported")
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--text-tokens", type=int, default=40)
    bench.add_argument("--device", help="default: cuda when available, else cpu")
    bench.add_argument("--dtype", default="auto", help="auto (float16 on a GPU, float32 on a CPU), float32, float16 or bfloat16")
    bench.add_argument("--out", help="CSV of every measured sample")
    bench.set_defaults(run=_cmd_bench)

    shapes = commands.add_parser("make-shapes-tasks", help="regenerate the embedded tasks' held-out data")
    shapes.add_argument("--out", default="tasks/shapes/data")
    shapes.set_defaults(run=_cmd_make_shapes_tasks)

    report = commands.add_parser("report", help="the paper's tables and figures from lmms-eval runs and traces")
    report.add_argument("runs", nargs="+", help="lmms-eval output folders or results files (and trace folders)")
    report.add_argument("--out", default="results")
    report.set_defaults(run=_cmd_report)

    summarize = commands.add_parser("summarize", help="scores of lmms-eval runs as CSV and markdown")
    summarize.add_argument("runs", nargs="+", help="lmms-eval output folders or results files")
    summarize.add_argument("--out", default="results")
    summarize.add_argument("--name", default="summary")
    summarize.set_defaults(run=_cmd_summarize)
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
