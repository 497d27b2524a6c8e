"""Layer schedules found by search (SPEC section 4 "Schedule"; arXiv 2412.00556) and
VTW's choice of K: ``dyrate-eval gsearch``, ``psigmoid`` and ``find-vtw-k``.

Every search evaluates candidate policies on a calibration subset of one lmms-eval task:
``limit`` docs from ``offset`` on, of the split lmms-eval evaluates the task on (so the
calibration docs are among the evaluation docs unless ``offset`` moves them past those).
The model is loaded once, as the project's lmms-eval model, and its policy is swapped in
place between candidates. Two criteria:

- ``score``: the task's own metric (the first of its ``metric_list`` unless named),
  computed by lmms-eval's evaluator on the calibration docs; a candidate is within
  tolerance when it loses at most ``tolerance`` (in the metric's units) against the
  unpruned model on the same docs;
- ``kl``: the mean KL divergence KL(unpruned || pruned) between the next-token
  distributions at the first generated token (the prefill's last position), on the
  prompts and images the task builds for the same docs (VTW's proxy: one forward per
  batch instead of a generation); within tolerance when at most ``tolerance`` nats.

A schedule's FLOPs share is the project's (see ``flops``): the language model's FLOPs,
scoring rows included, against the unpruned model's, for one sample with ``text_tokens``
prompt tokens besides its image that generates ``new_tokens`` tokens, from the plan the
executor runs (``flops.simulate_plan``). The commands default ``text_tokens`` to the
calibration prompts' mean and ``new_tokens`` to 1 (the prefill, where a schedule acts;
decode steps save only the attention over the dropped keys).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import optuna
import torch
from lmms_eval.api.task import Task
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager, get_task_dict
from tqdm import tqdm

from model_wrappers.llava_pruned import DyRateLlava

from .arch import Arch
from .errors import PruningConfigError
from .flops import plan_flops, simulate_plan
from .hf_llava import image_token_id, install
from .measure import original_flops
from .methods import PruningPolicy, make_policy

# G-Search's default grid: the shares of the image tokens a layer may drop to. Keeping
# the previous layer's count (no drop) is always possible and needs no evaluation.
DEFAULT_GRID = (0.0, 0.0625, 0.125, 0.25, 0.375, 0.5, 0.75)
# P-Sigmoid's default search space. k (steepness, per layer) on a log scale; a (the
# layer where the share is halfway between 1 and b) anywhere in the depth; b (the share
# the deepest layers tend to) up to the budget, since with b above it every layer keeps
# more than the budget's share of the image tokens and the FLOPs share cannot meet it.
DEFAULT_K_RANGE = (0.1, 10.0)
# Over-budget proposals cost only a FLOPs simulation and do not count as trials; P-Sigmoid
# gives up after this many proposals per trial asked for.
PROPOSALS_PER_TRIAL = 100
DEFAULT_NEW_TOKENS = 1
CRITERIA = ("score", "kl")


def schedule_policy(arch: Arch, counts: tuple[int, ...]) -> PruningPolicy:
    return make_policy("schedule", arch, schedule=list(counts))


def default_first_vtw_layer(num_layers: int) -> int:
    """VTW's first candidate K: 5 for LLaVA-1.5's 32 and 40 layers, as VTW searches; a
    quarter of the depth (at least 1) for shallow models such as the embedded one."""
    return max(1, min(5, num_layers // 4))


@dataclass(frozen=True)
class FlopsShare:
    """The FLOPs share of a policy: the language model's FLOPs (scoring rows included)
    against the unpruned model's, for one sample of ``text_tokens`` prompt tokens
    besides its image generating ``new_tokens`` tokens, from the simulated plan."""

    arch: Arch
    text_tokens: int
    new_tokens: int

    def __call__(self, policy: PruningPolicy) -> float:
        pruned = plan_flops(simulate_plan(policy, self.arch, self.text_tokens, self.new_tokens), self.arch)
        return pruned["language_model"] / original_flops(self.arch, self.text_tokens, self.new_tokens)[1]

    def of_schedule(self, counts: tuple[int, ...]) -> float:
        return self(schedule_policy(self.arch, counts))

    def definition(self) -> dict:
        return {
            "flops": "language model (scoring included) against the unpruned model, from the simulated plan",
            "text_tokens": self.text_tokens,
            "image_tokens": self.arch.n_img,
            "new_tokens": self.new_tokens,
        }


class SearchModel(DyRateLlava):
    """The project's lmms-eval model, loaded once for a whole search; its policy is
    swapped in place between evaluations."""

    def clean(self) -> None:
        """Keep the weights: lmms-eval's evaluate() ends by deleting a model's modules (to
        free memory for a judge model), and a search evaluates this model again."""

    def use_policy(self, policy: PruningPolicy) -> None:
        install(self.model, policy)
        self.policy = policy

    def encode(self, contexts: list[str], visuals: list[list]) -> dict:
        """Inputs for requests' contexts and images, prompted as ``generate_until`` prompts them."""
        prompts = [self._prompt(context, images) for context, images in zip(contexts, visuals)]
        return self._encode(prompts, [image for images in visuals for image in images])


def _task_manager(task: str, include_path: str) -> TaskManager:
    """lmms-eval's task index: the local tasks alone when they hold ``task`` (indexing
    lmms-eval's own few hundred tasks takes about 20 s), else lmms-eval's too."""
    local = TaskManager("WARNING", include_path=include_path, include_defaults=False)
    if task in local.all_tasks:
        return local
    everything = TaskManager("WARNING", include_path=include_path)
    if task not in everything.all_tasks:
        raise PruningConfigError(
            f"--task {task!r} is not an lmms-eval task (looked in lmms-eval's tasks and {include_path})"
        )
    return everything


class Calibration:
    """The calibration docs of one lmms-eval task and the model a search evaluates on them."""

    def __init__(self, pretrained: str, task: str, limit: int, offset: int = 0, include_path: str = "tasks",
                 batch_size: int = 8, metric: str | None = None):
        """``metric`` is the score criterion's (default: the task's first); it is checked
        here, with the task, before the model loads."""
        self.task, self.limit, self.offset = task, limit, offset
        self.task_manager = _task_manager(task, include_path)
        task_object = get_task_dict([task], self.task_manager).get(task)
        if not isinstance(task_object, Task) or task_object.OUTPUT_TYPE != "generate_until":
            raise PruningConfigError(
                f"--task {task!r} must be one lmms-eval task that generates answers (output_type generate_until), "
                "not a group or a likelihood task"
            )
        metrics = {entry["metric"]: bool(entry.get("higher_is_better", True)) for entry in task_object.config.metric_list}
        self.metric = metric or next(iter(metrics))
        if self.metric not in metrics:
            raise PruningConfigError(f"--metric {metric!r} is not a metric of {task}: it has {', '.join(metrics)}")
        self.higher_is_better = metrics[self.metric]
        self.model = SearchModel(pretrained=pretrained, method="original", batch_size=batch_size)
        self.arch = self.model.arch
        task_object.build_all_requests(limit=limit, offset=offset)
        requests = [instance.arguments for instance in task_object.instances]
        if not requests:
            raise PruningConfigError(f"--offset {offset} leaves no docs of {task} to calibrate on")
        # generate_until arguments: (context, generation settings, doc_to_visual, doc_id, task, split)
        self.split = requests[0][5]
        self.num_docs = len(requests)
        self.batches = []
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            visuals = [list(doc_to_visual(task_object.dataset[split][doc_id]))
                       for _, _, doc_to_visual, doc_id, _, split in chunk]
            self.batches.append(self.model.encode([arguments[0] for arguments in chunk], visuals))
        image_token = image_token_id(self.model.model.config)
        text_tokens = [int(mask.sum()) - int((ids == image_token).sum())
                       for inputs in self.batches for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        self.mean_text_tokens = round(sum(text_tokens) / len(text_tokens))

    def describe(self) -> dict:
        return {"task": self.task, "split": self.split, "offset": self.offset, "limit": self.limit, "docs": self.num_docs}

    def score(self, policy: PruningPolicy) -> float:
        """The task's metric on the calibration docs, by lmms-eval's evaluator."""
        self.model.use_policy(policy)
        results = simple_evaluate(
            model=self.model, tasks=[self.task], limit=self.limit, offset=self.offset, task_manager=self.task_manager,
            log_samples=False, bootstrap_iters=0, verbosity="WARNING",
        )
        values = results["results"][self.task]
        return float(next(value for key, value in values.items() if key.partition(",")[0] == self.metric))

    def _next_token_log_probs(self, policy: PruningPolicy) -> list[torch.Tensor]:
        """Per batch, (docs, vocabulary) log-probabilities of the first generated token."""
        self.model.use_policy(policy)
        with torch.inference_mode():
            return [self.model.model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].double().log_softmax(-1)
                    for inputs in self.batches]

    @cached_property
    def unpruned_log_probs(self) -> list[torch.Tensor]:
        return self._next_token_log_probs(make_policy("original", self.arch))

    def first_token_kl(self, policy: PruningPolicy) -> float:
        """Mean KL(unpruned || policy) of the next-token distributions at the first
        generated token, over the calibration docs."""
        divergence = 0.0
        for reference, pruned in zip(self.unpruned_log_probs, self._next_token_log_probs(policy)):
            divergence += float((reference.exp() * (reference - pruned)).sum())
        return divergence / self.num_docs


class KLCriterion:
    """Mean first-token KL divergence from the unpruned model, in nats; within tolerance
    when at most ``tolerance``."""

    name = "kl"
    baseline = 0.0  # the unpruned model's own divergence

    def __init__(self, calibration: Calibration):
        self.calibration = calibration

    def describe(self) -> dict:
        return {"criterion": self.name, "unit": "nats"}

    def value(self, policy: PruningPolicy) -> float:
        return self.calibration.first_token_kl(policy)

    def objective(self, value: float) -> float:
        """Larger is better (what P-Sigmoid maximises)."""
        return -value

    def within(self, value: float, tolerance: float) -> bool:
        return value <= tolerance


class ScoreCriterion:
    """The task's metric on the calibration docs; within tolerance when it loses at most
    ``tolerance`` (in the metric's units) against the unpruned model on the same docs."""

    name = "score"

    def __init__(self, calibration: Calibration):
        self.calibration = calibration
        self.baseline = self.value(make_policy("original", calibration.arch))

    def describe(self) -> dict:
        return {"criterion": self.name, "metric": self.calibration.metric,
                "higher_is_better": self.calibration.higher_is_better, "unpruned": self.baseline}

    def value(self, policy: PruningPolicy) -> float:
        return self.calibration.score(policy)

    def objective(self, value: float) -> float:
        return value if self.calibration.higher_is_better else -value

    def within(self, value: float, tolerance: float) -> bool:
        # scores are means over docs: a loss of exactly the tolerance must not fail on rounding
        return self.objective(self.baseline) - self.objective(value) <= tolerance + 1e-9


def make_criterion(name: str, calibration: Calibration) -> KLCriterion | ScoreCriterion:
    if name not in CRITERIA:
        raise PruningConfigError(f"--criterion {name!r} is not allowed: criterion must be {' or '.join(CRITERIA)}")
    return KLCriterion(calibration) if name == "kl" else ScoreCriterion(calibration)


def _write_log(path: Path, log: dict) -> None:
    """A search's log, written before its schedule: a schedule file on disk means a
    finished search (run_all.sh skips a search whose file exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(log, indent=1) + "\n")


def _write_schedule(out: Path, counts: tuple[int, ...], searched_by: str, label: str, details: dict) -> None:
    """The schedule file ``method=schedule,schedule=FILE`` reads (counts, and the search
    and label the report shows it as), with what produced it."""
    written = {"schedule": list(counts), "searched_by": searched_by, "label": label, **details}
    out.write_text(json.dumps(written, indent=1) + "\n")


# -- G-Search -----------------------------------------------------------------------------


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
    _write_log(log_file, {"searched_by": "gsearch", "schedule": list(schedule), **result, "candidates": candidates})
    _write_schedule(out, schedule, "gsearch", label, {**result, "log": log_file.name})
    return {"schedule": schedule, **result, "log": str(log_file)}


# -- P-Sigmoid ----------------------------------------------------------------------------


def sigmoid_schedule(k: float, a: float, b: float, num_layers: int, n_img: int) -> tuple[int, ...]:
    """Layer 0 keeps every image token (the executor never prunes it); layer l >= 1 keeps
    round(n_img * s(l)) with s(l) = b + (1 - b) / (1 + exp(k (l - a))), non-increasing
    in l for k > 0."""
    def share(layer: int) -> float:
        # 1 / (1 + exp(x)) written with tanh, which cannot overflow
        return b + (1 - b) * 0.5 * (1 - math.tanh(k * (layer - a) / 2))

    return (n_img, *(round(n_img * share(layer)) for layer in range(1, num_layers)))


def psigmoid(calibration: Calibration, criterion: KLCriterion | ScoreCriterion, budget: float, trials: int,
             flops_share: FlopsShare, out: Path, pretrained: str, k_range: tuple[float, float] | None = None,
             a_range: tuple[float, float] | None = None, b_range: tuple[float, float] | None = None,
             seed: int = 0) -> dict:
    """Tune P-Sigmoid's (k, a, b) with Optuna's TPE sampler to maximise the criterion's
    objective subject to FLOPs share <= ``budget``, over ``trials`` evaluated trials;
    write the best schedule to ``out`` and every trial to ``<out stem>.trials.json``
    beside it.

    Over-budget proposals are not evaluated (the FLOPs share is known before the model
    runs) and not counted: TPE ranks infeasible trials by how far over the budget they
    are, not by an objective value, so they need none. The best trial is the evaluated
    one with the best objective, the lower FLOPs share breaking ties (then the earlier
    trial)."""
    arch = calibration.arch
    k_range = k_range or DEFAULT_K_RANGE
    a_range = a_range or (0.0, float(arch.layers))
    b_range = b_range or (0.0, budget)
    floor = flops_share.of_schedule((arch.n_img,) + (0,) * (arch.layers - 1))
    if floor > budget:
        raise PruningConfigError(
            f"--budget {budget:g} is below the smallest FLOPs share a schedule reaches on this model ({floor:.3f}: "
            "layer 0 always sees every image token)"
        )
    progress = tqdm(total=trials, desc="P-Sigmoid", unit="trial")
    over_budget = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal over_budget
        k = trial.suggest_float("k", *k_range, log=True)
        a = trial.suggest_float("a", *a_range)
        b = trial.suggest_float("b", *b_range)
        counts = sigmoid_schedule(k, a, b, arch.layers, arch.n_img)
        share = flops_share.of_schedule(counts)
        trial.set_user_attr("schedule", list(counts))
        trial.set_user_attr("flops_share", share)
        trial.set_constraint("flops_share_over_budget", share - budget)
        if share > budget:
            over_budget += 1
            progress.set_postfix(over_budget=over_budget)
            raise optuna.TrialPruned()
        value = criterion.value(schedule_policy(arch, counts))
        trial.set_user_attr("value", value)
        progress.update()
        progress.write(f"trial {trial.number}: k={k:.3g} a={a:.3g} b={b:.3g} keeps {'/'.join(map(str, counts))}: "
                       f"{criterion.name} {value:.4g}, FLOPs share {share:.1%}")
        return criterion.objective(value)

    def stop_after_enough_trials(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if progress.n == trials:
            study.stop()

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=PROPOSALS_PER_TRIAL * trials, callbacks=[stop_after_enough_trials])
    progress.close()
    history = [
        {"trial": trial.number, **trial.params, "schedule": trial.user_attrs["schedule"],
         "flops_share": trial.user_attrs["flops_share"], "evaluated": trial.state == optuna.trial.TrialState.COMPLETE,
         "value": trial.user_attrs.get("value")}
        for trial in study.trials
    ]
    evaluated = [trial for trial in history if trial["evaluated"]]
    if not evaluated:
        raise PruningConfigError(
            f"none of {len(history)} proposals met --budget {budget:g}: widen --b-range or --a-range downwards"
        )
    best = max(evaluated, key=lambda trial: (criterion.objective(trial["value"]), -trial["flops_share"], -trial["trial"]))
    result = {
        "flops_share": best["flops_share"],
        "value": best["value"],
        "parameters": {name: best[name] for name in ("k", "a", "b")},
        "trial": best["trial"],
        "settings": {
            "pretrained": pretrained, "calibration": calibration.describe(), **criterion.describe(),
            "budget": budget, "trials": trials, "proposals": len(history),
            "sampler": f"optuna {optuna.__version__} TPESampler(seed={seed})",
            "ranges": {"k": list(k_range), "a": list(a_range), "b": list(b_range)},
            "share": "layer 0: 1; layer l >= 1: b + (1 - b) / (1 + exp(k (l - a))), times the image tokens, rounded",
            "flops_share": flops_share.definition(),
        },
    }
    log_file = out.with_name(f"{out.stem}.trials.json")
    label = f"criterion={criterion.name},budget={budget:g},task={calibration.task}"
    _write_log(log_file, {"searched_by": "psigmoid", "schedule": best["schedule"], **result, "trials": history})
    _write_schedule(out, tuple(best["schedule"]), "psigmoid", label, {**result, "log": log_file.name})
    return {"schedule": tuple(best["schedule"]), **result, "log": str(log_file)}


# -- VTW's K ------------------------------------------------------------------------------


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
