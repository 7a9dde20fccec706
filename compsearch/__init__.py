"""compsearch: automated compression search and benchmarking for causal language models.

Subpackages: `compsearch.spaces` (plans and search spaces), `compsearch.compress` (applying plans),
`compsearch.evaluators` (measuring models), `compsearch.search` (the job: Optuna, Ray, Parquet, CLI).
"""
__version__ = "0.1.0"
