"""Summaries of runs on the embedded shapes tasks (``dyrate-eval summarize``): scores per
method setting, per question kind, per objects in a scene, and what captions get right."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import pandas as pd

from ..errors import PruningConfigError
from .runs import RUN_KEY, parse_model_args, read_samples, results_table, samples_file
from .tables import method_sorted, write_table

# The headline score columns of the embedded shapes tasks: (task, metric) -> column.
SHAPES_SCORES = {
    ("shapes_caption", "shapes_CIDEr"): "caption CIDEr",
    ("shapes_caption", "shapes_Bleu_4"): "caption BLEU-4",
    ("shapes_vqa", "exact_match"): "vqa EM",
    ("shapes_pope", "accuracy"): "pope acc",
    ("shapes_pope", "f1"): "pope F1",
    ("shapes_pope", "yes_ratio"): "pope yes-ratio",
    ("shapes_mcq", "accuracy"): "mcq acc",
}


def _object_count(doc: dict) -> str:
    count = len(doc["things"])
    return f"{count} object" + ("s" if count > 1 else "")


def _per_sample(metric: str):
    def scores(path: Path) -> list[float]:
        values = [sample[metric] for sample in read_samples(path)]
        # pope keeps the prediction for its aggregate metrics
        return [float(v["prediction"] == v["truth"]) if isinstance(v, dict) else float(v) for v in values]

    return scores


def caption_cider_per_sample(samples: list[dict]) -> list[float]:
    """Each caption's CIDEr-D, from the references and prediction the caption task logs.
    pycocoevalcap takes its document frequencies from the references alone, so these
    average to the run's CIDEr and a group's mean is its share of it."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    entries = [sample["shapes_CIDEr"] for sample in samples]
    tokenizer = PTBTokenizer()
    references = tokenizer.tokenize({i: [{"caption": c} for c in e["references"]] for i, e in enumerate(entries)})
    predictions = tokenizer.tokenize({i: [{"caption": e["prediction"]}] for i, e in enumerate(entries)})
    _, scores = Cider().compute_score(references, predictions)
    by_index = dict(zip(references, scores))  # Cider scores in the order of the references' keys
    return [float(by_index[i]) for i in range(len(entries))]


@functools.lru_cache(maxsize=64)
def _caption_ciders(path: Path, modified_ns: int) -> list[float]:
    return caption_cider_per_sample(read_samples(path))


def caption_ciders(path: Path) -> list[float]:
    """``caption_cider_per_sample`` of a caption samples log, computed once per version
    of the file (the tokenizer starts a JVM)."""
    return _caption_ciders(path, path.stat().st_mtime_ns)


# Per-item breakdowns: task -> (what groups an item, from its doc; the items' scores,
# from the samples log's path). Captions group by how many objects the scene has.
SHAPES_BREAKDOWN = {
    "shapes_caption": (_object_count, caption_ciders),
    "shapes_vqa": (lambda doc: doc["kind"], _per_sample("exact_match")),
    "shapes_mcq": (lambda doc: doc["kind"], _per_sample("accuracy")),
    "shapes_pope": (lambda doc: doc["split"], _per_sample("accuracy")),
}


def shapes_scores(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model and method setting, the shapes tasks' headline scores as columns
    (missing cells stay empty)."""
    columns = {}
    for (task, metric), label in SHAPES_SCORES.items():
        rows = table[table["task"] == task]
        if metric in rows:
            columns[label] = rows.set_index(RUN_KEY)[metric]
    wide = pd.DataFrame(columns).reset_index()
    return method_sorted(wide, ["settings", "decoding"])[[*RUN_KEY, *[c for c in SHAPES_SCORES.values() if c in wide]]]


def _logged_samples_path(results_file: str, task: str, table_name: str) -> Path:
    """The samples log of ``task`` beside a results file, which ``table_name`` reads."""
    path = samples_file(Path(results_file), task)
    if not path.exists():
        raise PruningConfigError(f"{path} is missing: run lmms-eval with --log_samples for the {table_name}")
    return path


@functools.lru_cache(maxsize=None)
def _task_docs(task: str) -> dict[int, dict]:
    """The docs of an embedded task ("shapes_caption", ...) by doc_id, generated once:
    every per-item table joins its samples with them."""
    from ..embedded.tasks import BUILDERS

    return {doc["doc_id"]: doc for doc in BUILDERS[task.removeprefix("shapes_")]()}


def shapes_breakdown(table: pd.DataFrame) -> pd.DataFrame:
    """Scores per question kind (vqa, mcq), per negative-sampling split (pope) and caption
    CIDEr per number of objects in the scene, from the samples logs (runs need
    --log_samples) joined with the tasks' docs."""
    records = []
    for key, rows in table.groupby(RUN_KEY, sort=False):
        record = dict(zip(RUN_KEY, key))
        for file, task in zip(rows["file"], rows["task"]):
            if task not in SHAPES_BREAKDOWN:
                continue
            group_of, scores_of = SHAPES_BREAKDOWN[task]
            samples_path = _logged_samples_path(file, task, "per-kind table")
            scores: dict[str, list[float]] = {}
            for sample, score in zip(read_samples(samples_path), scores_of(samples_path)):
                scores.setdefault(group_of(_task_docs(task)[sample["doc_id"]]), []).append(score)
            short = task.removeprefix("shapes_")
            for group in sorted(scores):
                record[f"{short} {group}"] = sum(scores[group]) / len(scores[group])
        records.append(record)
    return method_sorted(pd.DataFrame(records), ["settings", "decoding"])


def caption_content_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per run, what its captions say right (``embedded.world.caption_content``, averaged): the
    share whose object count is right and the mean count error (positive: too many),
    the share of each scene's objects named, wrong objects per caption and the share
    naming the background right (of the captions that name one). Read from the caption
    samples logs and the task's docs."""
    from ..embedded.tasks import scene_from_doc
    from ..embedded.world import caption_content

    scenes = {doc_id: scene_from_doc(doc) for doc_id, doc in _task_docs("shapes_caption").items()}
    records = []
    for key, rows in table[table["task"] == "shapes_caption"].groupby(RUN_KEY, sort=False):
        samples_path = _logged_samples_path(rows["file"].iloc[0], "shapes_caption", "caption content table")
        contents = pd.DataFrame([caption_content(scenes[s["doc_id"]], s["shapes_CIDEr"]["prediction"]) for s in read_samples(samples_path)])
        counted = contents["count_error"].dropna()
        records.append({
            **dict(zip(RUN_KEY, key)),
            "captions": len(contents),
            "count right": float((counted == 0).mean()),
            "count error": float(counted.mean()),
            "objects named": float(contents["objects_recalled"].mean()),
            "wrong objects": float(contents["wrong_objects"].mean()),
            "background right": float(contents["background_right"].dropna().astype(float).mean()),
        })
    return method_sorted(pd.DataFrame(records, columns=[*RUN_KEY, "captions", "count right", "count error", "objects named", "wrong objects",
                                                 "background right"]), ["settings", "decoding"])


def _caption_costs_by_objects(file: str) -> pd.DataFrame:
    """Per number of objects: the captions' summed CIDEr, count, and language-model
    TFLOPs pruned and unpruned (from the wrappers' per-sample measurements)."""
    path = _logged_samples_path(file, "shapes_caption", "per-objects table")
    docs = _task_docs("shapes_caption")
    rows = []
    for sample, cider in zip(read_samples(path), caption_ciders(path)):
        measured = next(c["dyrate"] for c in sample["token_counts"] if isinstance(c, dict) and "dyrate" in c)
        tflops = measured["tflops_language_model"]
        rows.append({"objects": _object_count(docs[sample["doc_id"]]), "cider": cider, "count": 1,
                     "tflops": tflops, "tflops_original": tflops / measured["flops_ratio_language_model"]})
    return pd.DataFrame(rows).groupby("objects").sum()


def caption_rate_by_objects(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """What one FastV rate per kind of scene could buy over one rate for all.

    From the greedy caption runs of the original model and of attention-ranked FastV at
    one K with several R: every assignment of those R to the scenes by their number of
    objects, scored with the runs' own per-caption CIDEr and FLOPs. For the FLOPs share
    of each single-R run, the best assignment spending no more: a ceiling for any policy
    that sets the prefill rate from how many objects an image holds, as a learned
    per-image rate (DyRate) might. Returns the table (empty without such runs) and the
    run files it read."""
    captions = table[(table["task"] == "shapes_caption") & (table["decoding"] == "greedy")]
    original: dict[float, str] = {}  # R = 0
    fastv: dict[str, dict[float, str]] = {}  # K -> R -> file
    for method, settings, file in zip(captions["method"], captions["settings"], captions["file"]):
        args = parse_model_args(settings)
        if method == "original":
            original[0.0] = file
        elif method == "fastv" and args.get("selection", "attention") == "attention" and {"K", "R"} <= set(args):
            fastv.setdefault(args["K"], {})[float(args["R"])] = file
    rows, files = [], []
    for k, by_rate in fastv.items():
        by_rate = dict(sorted({**original, **by_rate}.items()))
        if len(by_rate) < 2:
            continue
        costs = {rate: _caption_costs_by_objects(file) for rate, file in by_rate.items()}
        if len({tuple(c["count"].items()) for c in costs.values()}) > 1:
            raise PruningConfigError(
                f"the caption runs of the original and FastV K={k} ({', '.join(by_rate.values())}) did not caption "
                "the same scenes (another --limit?): the per-objects table compares them sample for sample"
            )
        files += by_rate.values()
        rates = list(costs)
        groups = list(costs[rates[0]].index)
        count = costs[rates[0]]["count"].sum()

        def total(assignment):
            parts = [costs[rate].loc[group] for group, rate in zip(groups, assignment)]
            return sum(p["cider"] for p in parts) / count, 100 * sum(p["tflops"] for p in parts) / sum(p["tflops_original"] for p in parts)

        assignments = [(a, *total(a)) for a in itertools.product(rates, repeat=len(groups))]
        for rate in rates:
            cider, share = total([rate] * len(groups))
            best, best_cider, best_share = max((a for a in assignments if a[2] <= share + 1e-9), key=lambda a: a[1])
            rows.append({
                "K": k, "R": rate, "TFLOPs %": share, "caption CIDEr": cider,
                "best per-objects CIDEr": best_cider, "its TFLOPs %": best_share,
                "its R by objects": ", ".join(f"{g}: {r:g}" for g, r in zip(groups, best)),
            })
    return pd.DataFrame(rows), files


def write_summary(paths: list[str | Path], out_dir: str | Path, name: str = "summary") -> pd.DataFrame:
    """``<name>.csv`` and ``<name>.md``: scores per run and task, with the files read.
    Runs of the shapes tasks also get ``<name>_scores`` (a row per method setting) and
    ``<name>_by_kind`` (per question kind, yes/no split and objects per captioned scene),
    ``<name>_caption_content`` (what the captions get right) and, with FastV caption runs
    at several R, ``<name>_caption_rate_by_objects``."""
    table = results_table(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(table.drop(columns=["file"]), out_dir, name, table["file"].tolist())
    shapes = table[table["task"].isin({task for task, _ in SHAPES_SCORES})]
    if not shapes.empty:
        write_table(shapes_scores(shapes), out_dir, f"{name}_scores", shapes["file"].tolist())
        write_table(shapes_breakdown(shapes), out_dir, f"{name}_by_kind", shapes["file"].tolist())
        captions = shapes[shapes["task"] == "shapes_caption"]
        if not captions.empty:
            write_table(caption_content_table(captions), out_dir, f"{name}_caption_content", captions["file"].tolist())
        headroom, files = caption_rate_by_objects(shapes)
        if not headroom.empty:
            write_table(headroom, out_dir, f"{name}_caption_rate_by_objects", files)
    return table
