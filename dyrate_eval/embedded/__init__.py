"""The embedded default: a small LLaVA-1.5-architecture model trained on a procedural
world of coloured shapes (``world``, ``tasks``, ``model``, ``train``), the DyRate
predictors trained for it, and the offline rehearsal of the paper grid (``rehearsal``).

The shipped files sit beside this package: the model (``dyrate-eval train-embedded``,
fp16 safetensors) in ``dyrate_eval/embedded_llava`` and the predictors
(``dyrate-eval train-predictor``) in ``dyrate_eval/predictors``, the paths runs and
tables name them by."""

from pathlib import Path

_PACKAGE = Path(__file__).parent.parent
EMBEDDED_MODEL_DIR = _PACKAGE / "embedded_llava"
EMBEDDED_PREDICTORS_DIR = _PACKAGE / "predictors"
# dyrate's default predictor on the embedded model
EMBEDDED_PREDICTOR = EMBEDDED_PREDICTORS_DIR / "embedded-flops0.6"
