"""The pruning core: the policy API, the executor and its bookkeeping, the plan it records,
and the one boundary to transformers (``hf_llava``)."""
