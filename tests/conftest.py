"""Shared pytest fixtures (keep small; add yours below)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before rlxf is imported: rlxf.rollout.kernels then run in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_random_model_dir(tmp_path_factory):
    """Random-init Llama (hidden 64, 2 layers, vocab 103, tied) + the char tokenizer, in HF format."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlxf.zoo.tokenizer import build_tokenizer

    config = LlamaConfig(
        vocab_size=103, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-random") / "model"
    model.save_pretrained(str(path))
    build_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture
def tokenizer():
    """A fresh copy of the embedded character tokenizer (vocab 103, pad 0, bos 1, eos 2)."""
    from rlxf.zoo.tokenizer import build_tokenizer

    return build_tokenizer()


def _session_threads() -> int:
    import torch

    return torch.get_num_threads()


_DEFAULT_THREADS = _session_threads()  # read at start-up, before any test or fixture changes it


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Recipes given ``threads: 1`` (and some module fixtures) set torch's global thread count;
    put back the count the session started with after every test, so later (slow) tests keep
    every core."""
    import torch

    yield
    torch.set_num_threads(_DEFAULT_THREADS)
