"""Shared fixtures: a tiny Llama model and tokenizer built locally, and one Ray instance per session."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Converted models and sensitivity profiles go to a throw-away cache, never the user's.
if "COMPSEARCH_CACHE" not in os.environ:
    os.environ["COMPSEARCH_CACHE"] = tempfile.mkdtemp(prefix="compsearch-test-cache-")
    atexit.register(shutil.rmtree, os.environ["COMPSEARCH_CACHE"], ignore_errors=True)

TINY_VOCAB = 384


def build_tiny_model(folder: Path, hidden: int = 64, layers: int = 2, seed: int = 0, kv_heads: int = 2) -> Path:
    """A Llama model with a byte-level BPE tokenizer trained on pydoc text, saved to `folder`."""
    from pydoc_data import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(topics.topics.values())[:200], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_wide_dir(tmp_path_factory) -> Path:
    """A tiny Llama 256 wide: rows every GGUF type can hold."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-256"), hidden=256)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()
