"""DyRate's rate predictor: one linear layer from what the step's query attends to (the
share of its attention on the system, image, instruction and response tokens, per head
of the observation layer K-1) to logits over a discrete set of pruning rates. The
features are standardised first with statistics fixed at the start of training, so
that the heads whose shares vary carry weight from the first step.

A predictor is saved as a folder: ``predictor.safetensors`` (the layer) and
``predictor.json`` (its settings: the model shape it was trained for, K, the rates,
the features, and how it was trained). Loading it for a model of another shape is a
clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..arch import Arch
from ..errors import PruningConfigError
from ..core.plan import GROUPS
from ..core.selection import top_slots

WEIGHTS_FILE = "predictor.safetensors"
SETTINGS_FILE = "predictor.json"
FILE_FORMAT = "dyrate-predictor/1"
DEFAULT_RATES = (0.0, 0.25, 0.5, 0.75, 1.0)
FEATURES = "attention share per head and token group (system, image, instruction, response) at layer K-1"
# The shape fields a predictor must agree on with the model it runs in: its input is
# per head, its K a layer, its rates shares of the image tokens.
_FIT_FIELDS = ("layers", "heads", "kv_heads", "hidden", "head_dim", "n_img")


def _shape(arch: Arch) -> dict:
    return {name: getattr(arch, name) for name in _FIT_FIELDS}


class RatePredictor(torch.nn.Module):
    def __init__(self, model_name: str, model_shape: dict, K: int, rates: tuple[float, ...] = DEFAULT_RATES,
                 training: dict | None = None):
        super().__init__()
        if not 1 <= K < model_shape["layers"]:
            raise PruningConfigError(f"K={K} is not allowed: K must be an integer in 1..{model_shape['layers'] - 1}")
        if not rates or any(not 0.0 <= r <= 1.0 for r in rates) or list(rates) != sorted(set(rates)):
            raise PruningConfigError(f"rates={list(rates)} are not allowed: rates must be distinct increasing numbers in [0, 1]")
        self.model_name = model_name
        self.model_shape = dict(model_shape)
        self.K = K
        self.rates = tuple(float(r) for r in rates)
        self.training_log = training or {}
        self.source = "(not saved)"  # the folder it was loaded from
        features = model_shape["heads"] * len(GROUPS)
        self.linear = torch.nn.Linear(features, len(rates))
        # start undecided: every rate equally likely
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.register_buffer("feature_mean", torch.zeros(features))
        self.register_buffer("feature_scale", torch.ones(features))

    @classmethod
    def for_model(cls, arch: Arch, K: int, rates: tuple[float, ...] = DEFAULT_RATES) -> "RatePredictor":
        return cls(arch.name, _shape(arch), K, rates)

    @property
    def flops(self) -> int:
        """One decision: standardising the features and the linear layer (the group sums
        are additions over the scoring row)."""
        features, rates = self.linear.in_features, self.linear.out_features
        return 2 * features + 2 * features * rates + rates

    def standardize(self, group_attention: torch.Tensor) -> None:
        """Fix the feature statistics from observed steps (N, heads, groups)."""
        features = group_attention.flatten(-2).to(self.feature_mean.dtype)
        self.feature_mean.copy_(features.mean(0))
        self.feature_scale.copy_(1.0 / features.std(0).clamp_min(1e-3))

    def forward(self, group_attention: torch.Tensor) -> torch.Tensor:
        """(..., heads, groups) attention shares -> (..., rates) logits."""
        features = group_attention.flatten(-2).to(self.linear.weight.dtype)
        return self.linear((features - self.feature_mean) * self.feature_scale)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (features, rates), bias (rates)): the linear layer with the
        standardisation folded in, so that ``features @ weight + bias`` gives ``forward``'s
        logits (up to rounding) in one product, as a decision at every generation step wants;
        in float32, the precision of the observations."""
        weight = self.linear.weight.float() * self.feature_scale.float()
        bias = self.linear.bias.float() - weight @ self.feature_mean.float()
        return weight.t().contiguous(), bias

    def keep_counts(self, n_img: torch.Tensor) -> torch.Tensor:
        """(B, rates): the image tokens each rate keeps, round((1 - r) * N)."""
        rates = torch.tensor(self.rates, dtype=torch.float64, device=n_img.device)
        return torch.round((1.0 - rates[None]) * n_img[:, None].double()).long()

    def check_fits(self, arch: Arch, source: str) -> None:
        if _shape(arch) != self.model_shape:
            mine = ", ".join(f"{k}={v}" for k, v in self.model_shape.items())
            theirs = ", ".join(f"{k}={getattr(arch, k)}" for k in _FIT_FIELDS)
            raise PruningConfigError(
                f"predictor={source} does not fit this model: it was trained for {self.model_name} ({mine}), "
                f"this model is {arch.name} ({theirs}); train one for it with "
                f"`dyrate-eval train-predictor --pretrained MODEL --out DIR` and pass predictor=DIR"
            )

    def settings(self) -> dict:
        return {
            "format": FILE_FORMAT,
            "model": self.model_name,
            "model_shape": self.model_shape,
            "K": self.K,
            "rates": list(self.rates),
            "features": FEATURES,
            "training": self.training_log,
        }

    def save(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()},
                  out_dir / WEIGHTS_FILE)
        (out_dir / SETTINGS_FILE).write_text(json.dumps(self.settings(), indent=1) + "\n")
        return out_dir

    @classmethod
    def load(cls, path: str | Path) -> "RatePredictor":
        folder = Path(path)
        try:
            settings = json.loads((folder / SETTINGS_FILE).read_text())
            weights = load_file(folder / WEIGHTS_FILE)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PruningConfigError(
                f"predictor={path} is not a predictor folder ({SETTINGS_FILE} and {WEIGHTS_FILE}, written by "
                f"`dyrate-eval train-predictor`): {error}"
            ) from None
        if not isinstance(settings, dict) or settings.get("format") != FILE_FORMAT:
            raise PruningConfigError(f"predictor={path}: {SETTINGS_FILE} is not a {FILE_FORMAT} file")
        shape = settings.get("model_shape")
        if (not isinstance(settings.get("model"), str) or not isinstance(shape, dict)
                or not all(isinstance(shape.get(name), int) for name in _FIT_FIELDS)
                or not isinstance(settings.get("K"), int) or not isinstance(settings.get("rates"), list)):
            raise PruningConfigError(
                f"predictor={path}: {SETTINGS_FILE} must give model (a name), model_shape (whole numbers "
                f"{', '.join(_FIT_FIELDS)}), K (a layer) and rates (a list); it gives "
                f"{ {key: settings.get(key) for key in ('model', 'model_shape', 'K', 'rates')} }"
            )
        predictor = cls(settings["model"], shape, settings["K"], tuple(settings["rates"]), settings.get("training"))
        expected = {name: tuple(tensor.shape) for name, tensor in predictor.state_dict().items()}
        found = {name: tuple(tensor.shape) for name, tensor in weights.items()}
        if found != expected:
            raise PruningConfigError(
                f"predictor={path}: {WEIGHTS_FILE} holds tensors {found}, but {SETTINGS_FILE} ({shape['heads']} heads, "
                f"{len(settings['rates'])} rates) needs {expected}: the two files are not from one training"
            )
        predictor.load_state_dict(weights)
        predictor.source = str(path)
        return predictor.eval()


def kept_masks(scores: torch.Tensor, candidates: torch.Tensor, choice: torch.Tensor, keep_per_rate: torch.Tensor,
               step_valid: torch.Tensor, progressive: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image tokens each step keeps, as in generation, for teacher-forced training.

    ``scores`` (B, T, N): each step's attention per image slot; ``candidates`` (B, N):
    the prompt's image slots; ``choice`` (B, T, rates): a one-hot rate per step (the
    straight-through Gumbel-Softmax sample, so that gradients reach it);
    ``keep_per_rate`` (B, rates). Step t keeps the top keep(r_t) by its scores among
    the slots step t-1 kept (``progressive``) or among all slots. Returns the
    differentiable keep weights, sum over rates of choice x that rate's kept set
    (B, T, N); the hard kept sets (B, T, N); and what each rate would keep at each step
    (B, T, rates). Steps past a row's answer (``step_valid`` False) repeat its last
    kept set.
    """
    batch, steps, _ = scores.shape
    weights, hard, counts = [], [], []
    kept = candidates
    for t in range(steps):
        pool = kept if progressive else candidates
        keep = torch.minimum(keep_per_rate, pool.sum(1, keepdim=True))  # (B, rates)
        per_rate = torch.stack([top_slots(scores[:, t], pool, keep[:, r]) for r in range(keep.shape[1])], dim=1)
        weights.append(torch.einsum("br,brn->bn", choice[:, t], per_rate.to(choice.dtype)))
        chosen = per_rate[torch.arange(batch, device=scores.device), choice[:, t].argmax(-1)]
        kept = torch.where(step_valid[:, t, None], chosen, kept)
        hard.append(kept)
        counts.append(keep)
    return torch.stack(weights, dim=1), torch.stack(hard, dim=1), torch.stack(counts, dim=1)
