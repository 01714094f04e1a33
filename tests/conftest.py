"""Shared fixtures: tiny models built and saved once per session (no downloads)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from pluribus.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", size=1, seed=0, arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """A tiny Qwen2 with the char tokenizer: the ids must survive transformers' Qwen2 tokenizer handling."""
    from pluribus.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen2", size=1, seed=0, arch="qwen2")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core machine they lose a lot to spinning."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
