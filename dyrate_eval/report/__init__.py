"""The aggregator (``dyrate-eval report`` and ``summarize``): one run reader, one table
writer, the paper's tables, the embedded summaries and the figures."""
