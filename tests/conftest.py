"""Shared fixtures: the repository root on sys.path, a tiny corpus and a tiny configuration."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llm  # noqa: E402

# A small text written for the tests (not the corpus): enough characters for both splits.
TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog.\n"
    "Pack my box with five dozen liquor jugs!\n"
    "How vexingly quick daft zebras jump?\n"
) * 12

# Options for `train` that make a run take about a second.
TINY_TRAIN_OPTIONS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                      "--batch-size", "4", "--max-iters", "20", "--eval-interval", "10",
                      "--eval-iters", "2", "--warmup-iters", "5", "--device", "cpu"]


@pytest.fixture
def tiny_text_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def tiny_cfg():
    return llm.Config(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=4, dropout=0.0,
                      device="cpu")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def device(request):
    """Run the test on the CPU, and again on a CUDA GPU when there is one (ids end in [cuda])."""
    return torch.device(request.param)
