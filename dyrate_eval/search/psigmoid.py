"""P-Sigmoid (arXiv 2412.00556): a sigmoid keep schedule over depth whose (k, a, b) are
tuned by Bayesian optimisation (Optuna's TPE) under a FLOPs budget."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
from tqdm import tqdm

from ..errors import PruningConfigError
from .calibration import Calibration, FlopsShare, KLCriterion, ScoreCriterion, schedule_policy, write_log, write_schedule

# P-Sigmoid's default search space. k (steepness, per layer) on a log scale; a (the
# layer where the share is halfway between 1 and b) anywhere in the depth; b (the share
# the deepest layers tend to) up to the budget, since with b above it every layer keeps
# more than the budget's share of the image tokens and the FLOPs share cannot meet it.
DEFAULT_K_RANGE = (0.1, 10.0)
# Over-budget proposals cost only a FLOPs simulation and do not count as trials; P-Sigmoid
# gives up after this many proposals per trial asked for.
PROPOSALS_PER_TRIAL = 100


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
    write_log(log_file, {"searched_by": "psigmoid", "schedule": best["schedule"], **result, "trials": history})
    write_schedule(out, tuple(best["schedule"]), "psigmoid", label, {**result, "log": log_file.name})
    return {"schedule": tuple(best["schedule"]), **result, "log": str(log_file)}
