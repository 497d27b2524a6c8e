"""lmms-eval models of dyrate-eval, registered through the ``lmms_eval.models`` entry points."""
