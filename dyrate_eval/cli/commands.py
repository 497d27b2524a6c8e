"""The ``dyrate-eval`` subcommands other than the searches: each builds what it needs
from the library and prints where its output went."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from .. import EMBEDDED_MODEL_DIR
from ..errors import PruningConfigError
from ..methods import parse_settings
from ..dyrate.train import PredictorTrainConfig


def methods(args) -> None:
    from ..methods import METHODS

    for name, policy in METHODS.items():
        settings = ", ".join(f"{s.name} ({s.allowed})" for s in policy.settings) or "no settings"
        summary = " ".join(policy.__doc__.strip().split("\n\n")[0].split())
        print(f"{name:10s} {settings}\n{'':10s} {summary}")


def make_tiny_model(args) -> None:
    from ..embedded.model import save_tiny_llava

    print(save_tiny_llava(args.out, num_layers=args.layers, image_size=args.image_size, seed=args.seed))


def train_embedded(args) -> None:
    import dataclasses

    from ..embedded.train import TrainConfig, train_embedded

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


def train_predictor(args) -> None:
    from ..dyrate.train import train_predictor

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


def match_rate(args) -> None:
    from ..arch import load_arch
    from ..measure.flops import rate_for_share
    from ..report.runs import load_runs

    measured = load_runs([args.run_dir]).measured
    rows = measured[measured["task"] == args.task] if not measured.empty else measured
    if rows.empty:
        raise PruningConfigError(f"{args.run_dir} holds no measured samples of task {args.task!r} (run it with --log_samples)")
    share = rows["tflops_language_model"].sum() / (rows["tflops_language_model"] / rows["flops_ratio_language_model"]).sum()
    samples = list(zip(rows["text_tokens"].astype(int), rows["new_tokens"].astype(int)))
    rate = rate_for_share(args.method, load_arch(args.arch), share, samples, **parse_settings(args.set))
    print(rate)
    print(f"{args.method} {' '.join(args.set)} R={rate} spends the {share:.2%} of the FLOPs that {args.run_dir} spent on "
          f"{len(samples)} samples of {args.task}", file=sys.stderr)


def generate(args) -> None:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from .. import apply_pruning, executed_plan
    from ..prompts import llava_prompt

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


def report(args) -> None:
    from ..report.paper import write_report

    tables = write_report(args.runs, args.out, args.source)
    print(f"wrote {', '.join(tables)}, pareto.png to {args.out}")


def trace(args) -> None:
    from ..arch import load_arch
    from ..methods import make_policy
    from ..measure.trace import write_trace

    policy = make_policy(args.method, load_arch(args.pretrained), **parse_settings(args.set))
    if args.images:
        from PIL import Image

        images = [Image.open(path).convert("RGB") for path in args.images]
        names = [Path(path).name for path in args.images]
    else:  # held-out scenes of the embedded caption task
        from ..embedded.tasks import BUILDERS, scene_from_doc
        from ..embedded.world import render

        docs = list(itertools.islice(BUILDERS["caption"](), args.examples))
        images = [render(scene_from_doc(doc))[0] for doc in docs]
        names = [f"shapes_caption doc {doc['doc_id']}" for doc in docs]
    path = write_trace(args.out, args.pretrained, policy, images, names, args.prompt, args.max_new_tokens)
    print(f"wrote {path}")


def flops(args, extra: list[str]) -> None:
    import json

    from ..arch import load_arch
    from ..core.simulate import simulate_plan
    from ..measure.flops import paper_convention, plan_flops
    from ..methods import make_policy

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


def bench(args) -> None:
    import torch

    from ..core.hf_llava import own_attention
    from ..measure.bench import load_bench_model, parse_methods, run_bench, summarize_bench
    from ..report.tables import paired_latency_shown
    from ..harness import resolve_dtype

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
        from ..report.paper import write_bench_summary

        Path(args.report).mkdir(parents=True, exist_ok=True)
        write_bench_summary(Path(args.out), Path(args.report))
    weights = "random weights" if random_weights else "weights from the folder"
    attention = own_attention(model)
    print(f"{arch.name} ({weights}), {device}, {dtype}, {attention} attention, batch {args.batch}, {args.samples} samples "
          f"(+{args.warmup} warm-up), {arch.n_img} image + {args.text_tokens} text tokens, {args.new_tokens} new tokens; medians, and the "
          f"medians of the per-sample ratios to the original [interquartile range]")
    print(paired_latency_shown(summarize_bench(rows)).to_markdown(index=False, floatfmt=".4g"))


def latency(args) -> None:
    import torch

    from ..measure.latency import latency_pass, summarize_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    for path, pairs in latency_pass(args.runs, args.samples, args.warmup, args.batch, args.include_path, args.device,
                                    args.force):
        if pairs is None:
            print(f"{path}: measured earlier, kept (--force measures again)")
            continue
        summary = summarize_pairs(pairs)
        ratios = ", ".join(f"{label} {summary[f'{label} ratio']:.3f} [{summary[f'{label} ratio q1']:.3f}-"
                           f"{summary[f'{label} ratio q3']:.3f}]" for label in ("TTFT", "decode", "latency"))
        print(f"{path}: {len(pairs)} pairs; ratios to the original, median [IQR]: {ratios}", flush=True)


def make_shapes_tasks(args) -> None:
    from ..embedded.tasks import write_task_data

    for name, count in write_task_data(args.out).items():
        print(f"{args.out}/{name}.jsonl: {count} items")


def make_rehearsal(args) -> None:
    from ..embedded import rehearsal

    if args.docs < 2:
        raise PruningConfigError(f"--docs {args.docs} is not allowed: at least 2 (MME pairs its questions)")
    out = Path(args.out)
    checkpoint = rehearsal.write_checkpoint(out / "llava-1.5-7b-rehearsal")
    print(f"{checkpoint}: the embedded model in the llava-hf LLaVA-1.5 layout")
    for task, count in rehearsal.write_benchmarks(out / "hf_home", args.docs).items():
        print(f"{out / 'hf_home'}: {task}, {count} items")
    data = rehearsal.write_caption_training_data(out / "predictor-data", args.captions)
    print(f"{data}: {args.captions} captions for train-predictor")


def summarize(args) -> None:
    from ..report.shapes import write_summary

    table = write_summary(args.runs, args.out, args.name)
    print(f"{len(table)} rows from {table['file'].nunique()} run files -> {args.out}/{args.name}.md")
