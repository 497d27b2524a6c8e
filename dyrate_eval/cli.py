"""The ``dyrate-eval`` command."""

from __future__ import annotations

import argparse
import sys

from . import EMBEDDED_MODEL_DIR
from .errors import PruningConfigError


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
    for key, value in _method_settings(args.set).items():
        if key not in fields:
            raise PruningConfigError(f"train-embedded has no setting {key!r}; it has: {', '.join(fields)}")
        kind = float if fields[key] in (float, "float") else int
        try:
            overrides[key] = kind(value)
        except ValueError:
            raise PruningConfigError(f"{key}={value!r} is not allowed: {key} must be a {kind.__name__}") from None
    log = train_embedded(args.out, dataclasses.replace(config, **overrides))
    print(f"{args.out}: {log['parameters']:,} parameters, trained in {log['seconds'] / 60:.1f} min")


def _method_settings(pairs: list[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        if "=" not in pair:
            raise PruningConfigError(f"setting {pair!r} must look like NAME=VALUE, e.g. K=2")
        key, value = pair.split("=", 1)
        settings[key] = value
    return settings


def _cmd_generate(args) -> None:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from . import apply_pruning, executed_plan
    from .prompts import llava_prompt

    settings = _method_settings(args.set)
    model = LlavaForConditionalGeneration.from_pretrained(args.pretrained).eval()
    apply_pruning(model, method=args.method, **settings)
    processor = AutoProcessor.from_pretrained(args.pretrained)
    inputs = processor(images=[Image.open(args.image).convert("RGB")], text=[llava_prompt(args.prompt)], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    plan = executed_plan(model).for_row(0)
    print(f"image tokens: {plan['n_img']}; kept per layer at prefill: {plan['kept_image'][0]}", file=sys.stderr)


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

    shapes = commands.add_parser("make-shapes-tasks", help="regenerate the embedded tasks' held-out data")
    shapes.add_argument("--out", default="tasks/shapes/data")
    shapes.set_defaults(run=_cmd_make_shapes_tasks)

    summarize = commands.add_parser("summarize", help="scores of lmms-eval runs as CSV and markdown")
    summarize.add_argument("runs", nargs="+", help="lmms-eval output folders or results files")
    summarize.add_argument("--out", default="results")
    summarize.add_argument("--name", default="summary")
    summarize.set_defaults(run=_cmd_summarize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except PruningConfigError as error:
        print(f"dyrate-eval: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
