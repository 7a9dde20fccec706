"""Evaluator tests keep Hugging Face's caches (datasets built from task files) in a throw-away folder."""
import os
import tempfile

os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="compsearch-hf-home-"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
