"""The ``dyrate-eval`` command."""

from __future__ import annotations

import argparse
import sys

from ..embedded import EMBEDDED_MODEL_DIR
from ..errors import PruningConfigError
from ..dyrate.train import PredictorTrainConfig
from ..embedded.tasks import CAPTION_PROMPT
from . import commands as run
from .searches import add_schedule_commands, non_negative_int, positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dyrate-eval", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("methods", help="list the pruning methods and their settings").set_defaults(run=run.methods)

    tiny = commands.add_parser("make-tiny-model", help="save a tiny random-weight LLaVA (for smoke runs)")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--layers", type=int, default=4)
    tiny.add_argument("--image-size", type=int, default=112, help="pixels; patch 14, so 112 gives 64 image tokens")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=run.make_tiny_model)

    generate = commands.add_parser("generate", help="answer one image and prompt with a method, print its plan")
    generate.add_argument("--pretrained", default=str(EMBEDDED_MODEL_DIR), help="default: the embedded model")
    generate.add_argument("--image", required=True)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--method", default="original")
    generate.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="method settings, e.g. K=2 R=0.5")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.set_defaults(run=run.generate)

    train = commands.add_parser(
        "train-embedded", help="train the embedded model from scratch on the shapes world (about an hour on 2 CPU cores)"
    )
    train.add_argument("--out", required=True, help="folder for the model, its processor and training_log.json")
    train.add_argument("--tiny", action="store_true", help="a few steps of a tiny model (checks the pipeline)")
    train.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override TrainConfig fields, e.g. stage2_steps=400")
    train.set_defaults(run=run.train_embedded)

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
    predictor.set_defaults(run=run.train_predictor)

    match = commands.add_parser(
        "match-rate", help="the rate R at which a method spends the FLOPs share a run spent (a FLOPs-matched baseline)"
    )
    match.add_argument("run_dir", metavar="RUN", help="an lmms-eval output folder with samples logs (e.g. a dyrate run)")
    match.add_argument("--task", required=True, help="the task whose samples set the share and the lengths")
    match.add_argument("--method", default="fixed_prune", help="a method with a rate R: fastv, fixed_prune or depth_prune")
    match.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="its other settings, e.g. K=2")
    match.add_argument("--arch", default=str(EMBEDDED_MODEL_DIR), help="the run's model folder or shape (default: the embedded model)")
    match.set_defaults(run=run.match_rate)

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
    trace.set_defaults(run=run.trace)

    flops = commands.add_parser(
        "flops",
        help="FLOPs of a method on a model shape, no weights needed; method settings as --NAME VALUE (e.g. --K 2 --R 0.5)",
    )
    flops.add_argument("--arch", default=str(EMBEDDED_MODEL_DIR), help="llava-1.5-7b, llava-1.5-13b or a model folder")
    flops.add_argument("--method", default="original")
    flops.add_argument("--text-tokens", type=non_negative_int, default=40, help="prompt tokens besides the image")
    flops.add_argument("--new-tokens", type=positive_int, default=1, help="generated tokens (1: the prefill alone)")
    flops.add_argument("--json", action="store_true", help="print one JSON object")
    flops.set_defaults(run=run.flops, takes_extra=True)

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
    bench.add_argument("--batch", type=positive_int, default=1, help="prompts per generate call")
    bench.add_argument("--samples", type=positive_int, default=10)
    bench.add_argument("--warmup", type=non_negative_int, default=1, help="samples run first and not reported")
    bench.add_argument("--new-tokens", type=positive_int, default=32)
    bench.add_argument("--text-tokens", type=non_negative_int, default=40)
    bench.add_argument("--device", help="default: cuda when available, else cpu")
    bench.add_argument("--dtype", default="auto", help="auto (float16 on a GPU, float32 on a CPU), float32, float16 or bfloat16")
    bench.add_argument("--out", help="CSV of every measured sample")
    bench.add_argument("--report", help="also write the report's benchmark table of --out (bench_<folder of --out>.csv/.md) here")
    bench.set_defaults(run=run.bench)

    latency = commands.add_parser(
        "latency", help="time each run's method against the original, interleaved on the same prompts of its tasks "
        "(the report's latency columns)")
    latency.add_argument("runs", nargs="+", help="lmms-eval output folders or results files of this project's models")
    latency.add_argument("--samples", type=positive_int, default=8, help="pairs recorded per task (default 8)")
    latency.add_argument("--warmup", type=non_negative_int, default=2, help="samples per task run first and not recorded (default 2)")
    latency.add_argument("--batch", type=positive_int, default=1, help="prompts per generate call (default 1, as the paper)")
    latency.add_argument("--threads", type=positive_int, help="torch's CPU threads (default: torch's choice)")
    latency.add_argument("--device", help="default: cuda when available, else cpu")
    latency.add_argument("--include-path", default="tasks", help="local lmms-eval tasks, as the runs were given (default tasks)")
    latency.add_argument("--force", action="store_true", help="measure runs that have a latency file again")
    latency.set_defaults(run=run.latency)

    shapes = commands.add_parser("make-shapes-tasks", help="regenerate the embedded tasks' held-out data")
    shapes.add_argument("--out", default="tasks/shapes/data")
    shapes.set_defaults(run=run.make_shapes_tasks)

    report = commands.add_parser("report", help="the paper's tables and figures from lmms-eval runs and traces")
    report.add_argument("runs", nargs="+", help="lmms-eval output folders or results files (and trace folders)")
    report.add_argument("--out", default="results")
    report.add_argument("--source", default="measured", help="how the runs' rows are labelled in the source column "
                        "(e.g. 'rehearsal' for ./run_all.sh --paper --rehearse)")
    report.set_defaults(run=run.report)

    rehearsal = commands.add_parser(
        "make-rehearsal",
        help="the paper grid's offline rehearsal: a checkpoint in the llava-hf LLaVA-1.5 layout, the nine benchmarks "
        "in miniature where lmms-eval's tasks find them (HF_HOME), captions for train-predictor",
    )
    rehearsal.add_argument("--out", required=True)
    rehearsal.add_argument("--docs", type=int, default=24, help="items per benchmark")
    rehearsal.add_argument("--captions", type=int, default=200, help="captions to train DyRate's predictor on")
    rehearsal.set_defaults(run=run.make_rehearsal)

    summarize = commands.add_parser("summarize", help="scores of lmms-eval runs as CSV and markdown")
    summarize.add_argument("runs", nargs="+", help="lmms-eval output folders or results files")
    summarize.add_argument("--out", default="results")
    summarize.add_argument("--name", default="summary")
    summarize.set_defaults(run=run.summarize)

    add_schedule_commands(commands)
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
