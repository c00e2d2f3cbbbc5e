"""Shared fixtures and helpers: the repository root on sys.path, a tiny corpus, tiny
configurations, the command line run in this process, and the few real processes."""
import contextlib
import csv
import io
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llm  # noqa: E402

# The models here are tiny: one thread runs them as fast as several, and a machine shared with
# other work (or with the real processes some tests start) is not oversubscribed.
torch.set_num_threads(1)

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
    return llm.RunConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=4, dropout=0.0,
                      device="cpu")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def device(request):
    """Run the test on the CPU, and again on a CUDA GPU when there is one (ids end in [cuda])."""
    return torch.device(request.param)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_main(*args) -> Result:
    """`python llm.py ARGS` in this process (no new Python, no new `import torch`): the exit
    status and what it printed. An uncaught exception is a test failure, as a traceback would be."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = llm.main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, or an option it cannot parse
            status = e.code
    return Result(status, out.getvalue(), err.getvalue())


def assert_one_clear_line(result: Result, *fragments, status: int = 2) -> None:
    """A failure the user sees as one line on stderr, naming what the fragments name."""
    assert result.returncode == status, (result.returncode, result.stderr)
    message = result.stderr.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message


def tiny_run_cfg(**overrides) -> "llm.RunConfig":
    """A whole run's configuration, small enough to train 20 steps in well under a second, with
    dropout (so that resuming must restore its random state too). Unlike the `tiny_cfg` fixture,
    a function: tests call it with overrides, several times."""
    settings = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=20,
                    eval_interval=5, eval_iters=2, warmup_iters=3, dropout=0.1, device="cpu")
    return llm.RunConfig(**{**settings, **overrides})


def losses(history):
    """(step, train loss, val loss) of each evaluation: what two runs compare, exactly."""
    return [(row["step"], row["train_loss"], row["val_loss"]) for row in history]


def read_history(out_dir):
    """The rows of a run's history.csv, as written: a dict of strings per evaluation."""
    with open(out_dir / "history.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def quiet(*_):
    pass


def interrupt_when(condition):
    """A log function that presses Ctrl-C (a real SIGINT) when `condition(line)` holds."""
    def log(line):
        if condition(line):
            signal.raise_signal(signal.SIGINT)
    return log


# --- real processes: only for what a process of its own is needed to show -----------------------

LLM = str(ROOT / "llm.py")
UNBUFFERED = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def train_command(data, out_dir, *options):
    """`python llm.py train` on `data` into `out_dir`, tiny and on the CPU, as a command line."""
    return [sys.executable, LLM, "train", "--data", str(data), "--out-dir", str(out_dir),
            *TINY_TRAIN_OPTIONS, *options]


def start(command, cwd=None):
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=UNBUFFERED, cwd=cwd)


def wait_for_line(process, prefix, seconds=120):
    """Read the process's output until a line starts with `prefix`; the lines read."""
    seen, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        seen.append(line)
        if line.startswith(prefix):
            return seen
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"no line starting with {prefix!r}: {seen[-5:]}")
