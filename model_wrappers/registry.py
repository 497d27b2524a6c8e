"""Entry-point payloads for lmms-eval's model registry.

Kept free of heavy imports: lmms-eval loads every entry point at start-up, and one
that fails to import disables all of them.
"""

from lmms_eval.models.registry_v2 import ModelManifest

_CLASS_PATH = "model_wrappers.llava_pruned.{}"

dyrate_llava = ModelManifest("dyrate_llava", simple_class_path=_CLASS_PATH.format("DyRateLlava"))
original_llava = ModelManifest("original_llava", simple_class_path=_CLASS_PATH.format("OriginalLlava"))
fastv_llava = ModelManifest("fastv_llava", simple_class_path=_CLASS_PATH.format("FastVLlava"))
vtw_llava = ModelManifest("vtw_llava", simple_class_path=_CLASS_PATH.format("VTWLlava"))
