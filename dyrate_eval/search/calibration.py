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

A schedule's FLOPs share is the project's (see ``measure.flops``): the language model's FLOPs,
scoring rows included, against the unpruned model's, for one sample with ``text_tokens``
prompt tokens besides its image that generates ``new_tokens`` tokens, from the plan the
executor runs (``core.simulate.simulate_plan``). The commands default ``text_tokens`` to the
calibration prompts' mean and ``new_tokens`` to 1 (the prefill, where a schedule acts;
decode steps save only the attention over the dropped keys).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from lmms_eval.api.task import Task
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import get_task_dict

from ..arch import Arch
from ..core.hf_llava import image_token_id
from ..core.policy import PruningPolicy
from ..core.simulate import simulate_plan
from ..errors import PruningConfigError
from ..harness import lmms_model_class, task_manager
from ..measure.flops import plan_flops
from ..measure.timing import original_flops
from ..methods import make_policy

DEFAULT_NEW_TOKENS = 1
CRITERIA = ("score", "kl")


def schedule_policy(arch: Arch, counts: tuple[int, ...]) -> PruningPolicy:
    return make_policy("schedule", arch, schedule=list(counts))


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


class Calibration:
    """The calibration docs of one lmms-eval task and the model a search evaluates on them."""

    def __init__(self, pretrained: str, task: str, limit: int, offset: int = 0, include_path: str = "tasks",
                 batch_size: int = 8, metric: str | None = None):
        """``metric`` is the score criterion's (default: the task's first); it is checked
        here, with the task, before the model loads."""
        self.task, self.limit, self.offset = task, limit, offset
        self.task_manager = task_manager(task, include_path)
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
        # the project's lmms-eval model, loaded once for the whole search: its policy is
        # swapped in place between evaluations, and it keeps its weights after each
        self.model = lmms_model_class("dyrate_llava")(pretrained=pretrained, method="original", batch_size=batch_size)
        self.model.keep_weights = True
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
            self.batches.append(self.model.encode_requests([arguments[0] for arguments in chunk], visuals))
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


def write_log(path: Path, log: dict) -> None:
    """A search's log, written before its schedule: a schedule file on disk means a
    finished search (run_all.sh skips a search whose file exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(log, indent=1) + "\n")


def write_schedule(out: Path, counts: tuple[int, ...], searched_by: str, label: str, details: dict) -> None:
    """The schedule file ``method=schedule,schedule=FILE`` reads (counts, and the search
    and label the report shows it as), with what produced it."""
    written = {"schedule": list(counts), "searched_by": searched_by, "label": label, **details}
    out.write_text(json.dumps(written, indent=1) + "\n")
