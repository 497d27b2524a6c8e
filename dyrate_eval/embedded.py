"""The embedded default shipped in the package: a small LLaVA-1.5-architecture model
trained on the shapes world (``dyrate-eval train-embedded``, fp16 safetensors) and the
DyRate predictors trained for it (``dyrate-eval train-predictor``)."""

from pathlib import Path

EMBEDDED_MODEL_DIR = Path(__file__).parent / "embedded_llava"
EMBEDDED_PREDICTORS_DIR = Path(__file__).parent / "predictors"
# dyrate's default predictor on the embedded model
EMBEDDED_PREDICTOR = EMBEDDED_PREDICTORS_DIR / "embedded-flops0.6"
