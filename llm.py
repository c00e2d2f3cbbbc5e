# %% [markdown]
# # llm.py — a GPT-style language model, built from an empty file
#
# This file is a book, a notebook and a program at once.
#
# * **Read it** top to bottom: every piece of a GPT is introduced before it is used, with the idea
#   and the reason first, then the smallest code that does it, then a cell that shows it working.
# * **Run it** as a notebook: `llm.ipynb` is this very file, mirrored by jupytext.
# * **Use it** from the command line: `python llm.py train` trains a small model on the complete
#   works of Shakespeare (about a megabyte of text) in about two minutes on a laptop CPU, and
#   `python llm.py sample` makes it write.
#
# The plan of the file, which is also the path of one character through the model:
#
# 1. **Setup** — one `Config` that holds every number, seeding, and the choice of device.
# 2. **Data** — the text we learn from, split into a training and a validation part.
# 3. **Tokenizer** — text becomes a list of integers (and back).
# 4. **Batches** — random windows of those integers, each paired with "what comes next".
# 5. **Embeddings** — integers become vectors that carry *what* a token is (and, in the classic
#    model, *where* it is).
# 6. **Attention** — each position gathers information from the positions before it (and, in
#    the modern model, learns where they are, by rotating queries and keys).
# 7. **Transformer block** — attention and a small MLP, wrapped in normalisation and residuals.
# 8. **Model** — embeddings, a stack of blocks, and a layer that scores every possible next token.
# 9. **Training** — make the scores of the true next tokens high, one small step at a time.
# 10. **Classic versus modern** — GPT-2's choices against Llama's, measured on the same budget.
# 11. **Sampling** — use the scores to write new text, one token at a time.
# 12. **Command line** — the same pieces behind `python llm.py train` and `python llm.py sample`.
#
# Notation used in the shape comments throughout: **B** batch size (how many sequences at once),
# **T** time (how many tokens in a sequence), **C** channels (the width of a token's vector,
# `n_embd`), **H** attention heads, **D** the width of one head (`C / H`), **V** vocabulary size.
#
# The notebook is regenerated from this file (never edited by hand) with:
#
#     jupytext --to ipynb --update llm.py
#     jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.record_timing=False llm.ipynb

# %% [markdown]
# ## 1. Setup
#
# The model needs nothing but the Python standard library and PyTorch. The plots need
# matplotlib, which is imported only inside the functions that draw, so `import llm` stays light.

# %%
from __future__ import annotations

import argparse
import codecs
import collections
import contextlib
import csv
import dataclasses
import hashlib
import http.client
import io
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# %% [markdown]
# The same file runs in three ways: imported (by the tests), as a script (`python llm.py ...`) and
# inside a Jupyter kernel. Cells that only *demonstrate* something — printing a shape, training a
# small model for the plots — should run in the notebook and nowhere else, so that `import llm`
# trains nothing, downloads nothing and writes nothing. Inside a kernel `__name__` is
# `"__main__"`, just as for a script, so we also ask IPython: a real kernel has a `kernel`
# attribute. Both must hold — this file is the notebook being run (`__main__`) *and* it runs in a
# kernel — so that `import llm` from some other notebook runs no demonstrations either. (We look
# IPython up in `sys.modules` rather than importing it: if it was never imported, we are
# certainly not in a kernel.)

# %%
def running_in_notebook() -> bool:
    """True inside a Jupyter kernel, False when imported or run as a script."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and hasattr(shell, "kernel")


IN_NOTEBOOK = __name__ == "__main__" and running_in_notebook()

# %% [markdown]
# Mistakes a user can make — a missing file, a bad option — should end in one clear line that
# says what is wrong and how to fix it, not in a traceback. Every such problem is raised as a
# `UserError`; the command line prints its message and exits with status 2. It subclasses
# `ValueError`, so code that calls these functions directly can catch it as the ordinary error
# it is.

# %%
class UserError(ValueError):
    """A problem with the user's input; its message names the problem and the fix."""


# %% [markdown]
# ### One configuration
#
# Every hyperparameter lives in one dataclass, each with a one-line explanation that doubles as
# its `--help` text on the command line (`python llm.py train --n-layer 6` overrides one). Why
# each number is what it is gets explained where the number is used.
#
# The defaults are the quick CPU run, tuned by measurement on a 2-core laptop-class machine for
# the lowest validation loss in about two minutes. The model shape (4 layers, 4 heads, 128
# channels, 64-character context) is that of nanoGPT's well-known CPU recipe, under a million
# parameters; at that size the machine processes about 20,000 tokens a second, so two minutes
# buy about 2.3 million tokens of training. How to spend them was measured with the classic
# GPT-2 architecture (one run each, seed 1337; differences of 0.01 are within noise):
#
# | batch × steps | tokens | peak learning rate | validation loss |
# |---|---|---|---|
# | 32 × 1200 | 2.46M | 2e-3 | 1.78 |
# | 24 × 1600 | 2.46M | 2e-3 | 1.74 |
# | 16 × 2400 | 2.46M | 2e-3 | 1.72 |
# | 16 × 2400 | 2.46M | 3e-3 | 1.69 |
# | 16 × 2400 | 2.46M | 4e-3 | 1.69 |
# | **12 × 3000** | **2.30M** | **3e-3** | **1.68** |
#
# (These runs used the hand-written attention; with the fused path that came later, the last run
# ends at 1.70 — a different order of floating-point operations, a different last digit.)
# Within the same time, more and smaller steps won, and 3e-3 was as good as any higher rate
# while leaving a margin against instability. The architecture switches (positions, norm, MLP,
# key/value heads, biases) default to the modern `llama` set, which beat the classic `gpt2` set
# in the same two minutes; section 8 explains the two and the measurement.

# %%
def param(default, help: str):
    """A Config field with a default and a one-line explanation (shown by --help)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- data ---
    block_size: int = param(64, "context length: how many tokens the model sees at once")
    batch_size: int = param(12, "sequences per micro-batch")
    grad_accum_steps: int = param(1, "micro-batches per optimizer step (shared out among torchrun processes)")
    tokenizer: str = param("char", "'char' (a token per character) or 'bpe' (byte-pair encoding)")
    vocab_size: int = param(512, "vocabulary size of the bpe tokenizer (char uses the text's characters)")
    # --- model ---
    n_layer: int = param(4, "number of transformer blocks")
    n_head: int = param(4, "attention heads per block")
    n_embd: int = param(128, "width C of every token's vector")
    dropout: float = param(0.0, "probability of zeroing an activation during training")
    pos_encoding: str = param("rope", "position information: 'learned', 'sinusoidal' or 'rope'")
    norm: str = param("rmsnorm", "normalisation: 'layernorm' (GPT-2) or 'rmsnorm' (Llama)")
    mlp: str = param("swiglu", "feed-forward network: 'gelu' (GPT-2) or 'swiglu' (Llama)")
    n_kv_head: int = param(2, "key/value heads for grouped-query attention; 0 means n_head")
    bias: bool = param(False, "learned biases in linear layers and LayerNorm")
    # --- optimisation ---
    max_iters: int = param(3000, "number of optimizer steps")
    learning_rate: float = param(3e-3, "peak learning rate, reached after the warmup")
    min_lr: float = param(3e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = param(100, "steps of linear learning-rate warmup")
    weight_decay: float = param(0.1, "AdamW weight decay, applied to matrices only")
    beta1: float = param(0.9, "AdamW momentum coefficient")
    beta2: float = param(0.99, "AdamW second-moment coefficient")
    grad_clip: float = param(1.0, "clip the gradient norm to this (0 turns clipping off)")
    # --- evaluation and run ---
    eval_interval: int = param(250, "evaluate (and maybe checkpoint) every this many steps")
    eval_iters: int = param(20, "batches per split in each evaluation")
    seed: int = param(1337, "seed for every random number generator")
    compile: bool = param(False, "compile the model with torch.compile (opt-in: slow to start, faster on GPUs)")
    device: str = param("auto", "'auto' (cuda, then mps, then cpu), 'cpu', 'cuda' or 'mps'")

    def validate(self) -> None:
        """Raise UserError naming the first setting that cannot work."""
        positive = ["block_size", "batch_size", "grad_accum_steps", "n_layer", "n_head", "n_embd",
                    "max_iters", "eval_interval", "eval_iters"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (self.learning_rate > 0):  # also catches NaN
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not (0 <= self.min_lr <= self.learning_rate):
            raise UserError(f"--min-lr must be between 0 and --learning-rate, got {self.min_lr}")
        if not (0 <= self.dropout < 1):
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        for name in ("warmup_iters", "weight_decay", "grad_clip"):
            if not (getattr(self, name) >= 0):  # also catches NaN
                raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not (0 <= getattr(self, name) < 1):
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise UserError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head}): "
                            "each head gets an equal slice of the channels")
        choices = {"pos_encoding": ("learned", "sinusoidal", "rope"), "norm": ("layernorm", "rmsnorm"),
                   "mlp": ("gelu", "swiglu"), "tokenizer": ("char", "bpe")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, name)!r}")
        if self.tokenizer == "bpe" and self.vocab_size < 256:
            raise UserError(f"--vocab-size must be at least 256 (the byte values), got {self.vocab_size}")
        if self.n_kv_head < 0:
            raise UserError(f"--n-kv-head must be 0 (same as --n-head) or positive, got {self.n_kv_head}")
        if self.n_head % self.kv_heads != 0:
            raise UserError(f"--n-head ({self.n_head}) must be a multiple of --n-kv-head ({self.n_kv_head}): "
                            "each key/value head serves an equal group of query heads")
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2 != 0:
            raise UserError(f"rope rotates pairs of channels, so the head width n_embd / n_head "
                            f"({self.n_embd // self.n_head}) must be even: change --n-embd or --n-head")

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads: n_kv_head, or n_head when it is 0 (plain multi-head)."""
        return self.n_kv_head or self.n_head


# %% [markdown]
# ### Seeds and devices
#
# Training draws random numbers in three places: the initial weights, the choice of batches, and
# dropout. Seeding every generator makes a CPU run repeatable to the last digit. The batch
# sampler and the text sampler also get their *own* `torch.Generator`, so that drawing a batch
# never shifts the random stream of anything else.
#
# The device is chosen in order of speed: an NVIDIA GPU (`cuda`), an Apple GPU (`mps`), then
# the CPU. `--device` overrides the choice.
#
# On a CPU, PyTorch splits each large enough operation into one share per thread, one thread
# per core by default, and the operation is done only when its last share is. That is the right
# choice on an idle machine: a training step of the quick run took 33 ms on both cores of the
# 2-core machine where this file was written, 52 ms on one. But if another program is using a
# thread's core, every operation waits for that thread: with a second program keeping one core
# busy, the same step took 75 ms on two threads and 55 ms on one. The commands (section 12) take
# `--threads`; 0 keeps PyTorch's default of one per core. It is a property of the machine, not
# of the model, so it is not part of the configuration.

# %%
def set_seed(seed: int) -> None:
    """Seed Python's and PyTorch's global generators (CPU and all GPUs).

    Nothing here draws from Python's `random`; it is seeded so that code you add that does
    stays repeatable too."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(name: str = "auto") -> torch.device:
    """The device to run on: 'auto' picks cuda, then mps, then cpu."""
    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU: use --device cpu")
    if name == "mps" and not has_mps:
        raise UserError("--device mps was asked for, but no Apple GPU is available: use --device cpu")
    return torch.device(name)


@contextmanager
def using_threads(n: int):
    """PyTorch's CPU operations run on n threads inside the block; 0 leaves the number as it is
    (PyTorch's default of one per core, unless something changed it)."""
    if n < 0:
        raise UserError(f"--threads must be 0 (PyTorch's default, one per core) or positive, got {n}")
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# %%
if IN_NOTEBOOK:
    print(Config())
    print("device:", pick_device())

# %% [markdown]
# ### Pictures
#
# Many ideas in this file are easier to see than to read, so some sections end with a plot. The
# plotting functions live here too, shared by the notebook and by `python llm.py train` (which
# saves its loss curve and attention maps as PNG files). Matplotlib is imported only when a plot
# is drawn, and fonts are set large enough to read on a projector.

# %%
def new_figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """(figure, axes) from matplotlib; pyplot is imported here, at the first plot, not at import."""
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 12, "axes.titlesize": 14, "axes.labelsize": 12})
    return plt.subplots(nrows, ncols, **kwargs)


def visible(ch: str) -> str:
    """A printable stand-in for characters that would be invisible on a plot's axis."""
    return {"\n": "↵", " ": "␣", "\t": "⇥"}.get(ch, ch)


# %%
if IN_NOTEBOOK:
    import matplotlib.pyplot as plt  # for plt.show() in the notebook's plot cells

# %% [markdown]
# ## 2. Data
#
# A language model learns from nothing but text. Our default text is *tiny Shakespeare*: 40,000
# lines of his plays in one 1,115,394-character file, first published with Andrej Karpathy's
# char-rnn. It is small enough to train on a laptop and large enough that the model must learn
# real structure (words, names, the layout of a play) to do well. Because many projects use it,
# our losses can be compared with theirs.
#
# If the file is not in `data/`, we download it once. A SHA-256 checksum proves that the bytes
# are exactly the published ones, and the file is written *atomically* — to a temporary file
# that is renamed into place only when complete — so an interrupted download never leaves half a
# file behind that would later be mistaken for the whole one. Checkpoints and the plots that
# `train` saves are written the same way, so this one helper serves them all.

# %%
SHAKESPEARE_URL = os.environ.get(  # LLM_SHAKESPEARE_URL names a mirror (the checksum still applies)
    "LLM_SHAKESPEARE_URL", "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATA = Path("data") / "tinyshakespeare.txt"


def atomic_write(path: Path, write: Callable) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it into place.

    The rename is atomic, so readers see either the old file or the complete new one. The data
    is flushed and fsynced first, so a power cut cannot leave a renamed but empty file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig, path: Path) -> None:
    """Write a figure to a PNG file (atomically) and free its memory."""
    import matplotlib.pyplot as plt
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def download(url: str, dest: Path, sha256: str, timeout: float = 30) -> None:
    """Download `url` to `dest`, checking its SHA-256; nothing is written unless it matches."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = response.read()
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
        raise UserError(f"could not download {url} ({e}); if you are offline, "
                        "pass a UTF-8 text file with --data FILE") from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != sha256:
        raise UserError(f"the download from {url} has checksum {digest[:12]}..., "
                        f"expected {sha256[:12]}...; try again, or pass --data FILE")
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda f: f.write(payload))


# %% [markdown]
# Any UTF-8 text file can replace Shakespeare (`--data FILE`). Every file is opened with an
# explicit `encoding="utf-8"`: the platform default differs between machines (Windows often
# uses a legacy code page), and a model trained on mis-decoded text learns the wrong characters.

# %%
def load_text(path: Path = DEFAULT_DATA) -> str:
    """The text at `path`; the default corpus is downloaded when it is missing."""
    path = Path(path)
    if not path.exists() and path == DEFAULT_DATA:
        print(f"downloading tiny Shakespeare to {path} ...", file=sys.stderr)
        download(SHAKESPEARE_URL, path, SHAKESPEARE_SHA256)
    if path.is_dir():
        raise UserError(f"--data {path} is a directory: give a UTF-8 text file")
    if not path.exists():
        raise UserError(f"--data {path} does not exist: give a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--data {path} is not UTF-8 text (byte {e.start}): "
                        "convert it to UTF-8 or choose another file") from None
    except OSError as e:
        raise UserError(f"cannot read --data {path} ({e.strerror}): check the file's permissions") from None
    if not text:
        raise UserError(f"--data {path} is empty: give a file with some text in it")
    return text


# %% [markdown]
# We hold back the last 10% of the text for **validation**. The model never trains on it, so the
# loss there tells us how well the model predicts text it has not seen — memorising the
# training text would lower the training loss but not this one. Splitting by position (first
# 90%, last 10%), not at random, keeps the validation text a continuous stretch of plays the
# model has never read, and matches the split other projects report their numbers on.

# %%
def split_train_val(items, train_fraction: float = 0.9):
    """First `train_fraction` of a sequence for training, the rest for validation."""
    n = int(len(items) * train_fraction)
    return items[:n], items[n:]


# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    text = load_text()
    train_text, val_text = split_train_val(text)
    print(f"{len(text):,} characters: {len(train_text):,} for training, {len(val_text):,} for validation")
    print(text[:250])

# %% [markdown]
# ## 3. Tokenizer
#
# A neural network computes with numbers, so text must become a sequence of integers, called
# **tokens**. The simplest tokenizer gives every distinct character its own number. Its
# vocabulary is tiny (65 characters for Shakespeare), every string over those characters can be
# encoded, and each token is easy to read — at the price of long sequences, because a word of
# six letters costs six tokens. (Production models merge frequent character sequences into one
# token; the idea stays the same.)
#
# The vocabulary is sorted so that the same text always gives the same numbering. A character the
# tokenizer has never seen has no number: rather than silently dropping it, `encode` raises an
# error that lists every such character.

# %%
class CharTokenizer:
    """Maps each character of a fixed vocabulary to an integer and back."""

    def __init__(self, chars: list[str]):
        self.chars = list(chars)  # token id -> character
        self.ids = {c: i for i, c in enumerate(self.chars)}  # character -> token id

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.ids.keys())
        if unknown:
            raise UserError(f"characters not in the vocabulary: {', '.join(map(repr, unknown))}; "
                            "use only characters that occur in the training text")
        return [self.ids[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self.chars[token_id].encode("utf-8")

    def state(self) -> dict:
        """Everything needed to rebuild this tokenizer, as plain values (saved in checkpoints)."""
        return {"kind": "char", "chars": self.chars}


# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    tokenizer = CharTokenizer.from_text(text)
    print("vocabulary size:", tokenizer.vocab_size)
    print("vocabulary:", repr("".join(tokenizer.chars)))
    ids = tokenizer.encode("To be, or not to be")
    print(ids)
    print(repr(tokenizer.decode(ids)))
    try:
        tokenizer.encode("naïve ☃")
    except ValueError as e:
        print("ValueError:", e)

# %% [markdown]
# ### Byte-pair encoding (BPE)
#
# Real LLMs read **subword** tokens: frequent strings such as `" the"` or `"ing"` become a single
# token, rare words are spelled out in pieces. Sequences get shorter (more text fits in the
# context, and each step of the model covers more of it), at the price of a bigger vocabulary.
#
# **Byte-level BPE** (used by GPT-2 and most models since) builds such a vocabulary from data:
#
# 1. Start from the 256 possible byte values of the text's UTF-8 encoding. Every string can be
#    written in bytes, so — unlike the character tokenizer — there are no unknown characters.
# 2. Count every pair of adjacent tokens in the training text; the most frequent pair becomes a
#    new token (id 256, then 257, ...), and every occurrence of the pair is replaced by it.
# 3. Repeat until the vocabulary has the size we asked for. The list of merges *is* the
#    tokenizer.
#
# Ties between equally frequent pairs are broken by the smaller pair of ids (first id, then
# second), so the same text always gives the same merges.
#
# **Pre-splitting.** Before counting, the text is cut into word-like chunks — a word with its
# leading space, a number, a run of punctuation, a run of whitespace — and merges never cross a
# chunk boundary. Otherwise the most frequent pairs would glue the end of one word to the start of
# the next (`"e t"` in `"the tree"`), wasting vocabulary on accidents of adjacency. GPT-2 cuts with
# the regular expression class `\p{L}` ("any letter"), which Python's `re` lacks; we write
# "letter" as `[^\W\d_]`: a word character (`\w`) that is neither a digit nor `_`, which covers
# letters of every script.
#
# **Counting incrementally.** Recounting all pairs after every merge costs a pass over the whole
# text per merge. Instead we count the pairs once, remember which chunks contain each pair, and
# after a merge update only the counts of those chunks: subtract their old pairs, add their new
# ones. Identical chunks (every `" the"`) are stored once, with a count. Training 512 tokens on
# tiny Shakespeare then takes about a second instead of minutes.
#
# **Encoding** new text applies the merges in the order they were learned: within each chunk,
# repeatedly merge the adjacent pair that was learned *earliest*, until no learned pair is left.
# Each distinct chunk is encoded once and remembered.

# %%
CHUNK_PATTERN = re.compile(r" ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")  # words, numbers, punctuation, spaces


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids` (left to right) by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def count_pairs(words: list[list[int]], counts: list[int]):
    """How often each adjacent pair occurs (weighted by chunk count), and in which chunks."""
    pair_counts, where = collections.Counter(), collections.defaultdict(set)
    for w, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += counts[w]
            where[pair].add(w)
    return pair_counts, where


class BPETokenizer:
    """Byte-level byte-pair encoding: bytes 0..255, then one token per learned merge."""

    def __init__(self, merges: list[tuple[int, int]]):
        self.merges = [tuple(pair) for pair in merges]
        self.ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}  # pair -> its new id
        self.vocab = [bytes([b]) for b in range(256)]  # token id -> the bytes it stands for
        for a, b in self.merges:
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.cache = {}  # chunk -> token ids, filled as text is encoded

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        if vocab_size < 256:
            raise UserError(f"--vocab-size must be at least 256 (the byte values), got {vocab_size}")
        chunk_counts = collections.Counter(CHUNK_PATTERN.findall(text))
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # each distinct chunk once
        counts = list(chunk_counts.values())
        pair_counts, where = count_pairs(words, counts)
        merges = []
        for new_id in range(256, vocab_size):
            if not pair_counts:
                break  # every chunk is a single token: nothing left to merge
            best = max(pair_counts, key=lambda pair: (pair_counts[pair], -pair[0], -pair[1]))
            merges.append(best)
            for w in where.pop(best):  # only the chunks that contain the pair change
                for pair in zip(words[w], words[w][1:]):  # forget the chunk's old pairs...
                    pair_counts[pair] -= counts[w]
                    if pair_counts[pair] == 0:
                        del pair_counts[pair]
                words[w] = merge_pair(words[w], best, new_id)
                for pair in zip(words[w], words[w][1:]):  # ...and count its new ones
                    pair_counts[pair] += counts[w]
                    where[pair].add(w)
        return cls(merges)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode_chunk(self, chunk: str) -> list[int]:
        ids = list(chunk.encode("utf-8"))
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, math.inf))  # learned earliest
            if pair not in self.ranks:
                break
            ids = merge_pair(ids, pair, self.ranks[pair])
        return ids

    def encode(self, text: str) -> list[int]:
        ids = []
        for chunk in CHUNK_PATTERN.findall(text):
            if chunk not in self.cache:
                self.cache[chunk] = self.encode_chunk(chunk)
            ids.extend(self.cache[chunk])
        return ids

    def decode(self, ids) -> str:
        # A single token can end inside a multi-byte character; "replace" shows that as "�".
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.vocab[token_id]

    def state(self) -> dict:
        return {"kind": "bpe", "merges": [list(pair) for pair in self.merges]}


# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    example = BPETokenizer.train("aaabdaaabac", vocab_size=259)
    print("merges of the classic example 'aaabdaaabac':",
          [(example.vocab[a], example.vocab[b]) for a, b in example.merges])
    print("its tokens:", [example.vocab[i] for i in example.encode("aaabdaaabac")])

# %%
if IN_NOTEBOOK:
    started = time.perf_counter()
    bpe = BPETokenizer.train(train_text, vocab_size=512)
    print(f"trained {len(bpe.merges)} merges in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    bpe_ids = bpe.encode(text)
    print(f"encoded {len(text):,} characters into {len(bpe_ids):,} tokens in {time.perf_counter() - started:.1f} s")

# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    print("the first 24 merges:", [bpe.vocab[256 + i].decode() for i in range(24)])
    line = "First Citizen:\nBefore we proceed any further, hear me speak."
    print([bpe.decode([i]) for i in bpe.encode(line)])
    print("round trip of text it never saw:", bpe.decode(bpe.encode("Naïve café, 東京 🙂")) == "Naïve café, 東京 🙂")

# %% [markdown]
# Drawn with alternating colours (spaces shown as ␣), the token boundaries show what the merges
# learned: common words with their leading space are single tokens, rarer words come in pieces.

# %%
def plot_token_boundaries(tokenizer, line: str, title: str):
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(line)]
    fig, ax = new_figure(figsize=(14, 1.6))
    ax.set_axis_off()
    x = 0.0
    for n, piece in enumerate(pieces):
        label = ax.text(x, 0.5, "".join(map(visible, piece)), fontsize=18, family="monospace", va="center",
                        bbox={"facecolor": ("#cfe2f3" if n % 2 == 0 else "#f9cb9c"), "edgecolor": "none", "pad": 2})
        fig.canvas.draw()  # measure the drawn text so the next token starts where this one ends
        box = label.get_window_extent().transformed(ax.transData.inverted())
        x = box.x1 + 0.004
    ax.set_xlim(0, max(x, 1.0))
    ax.set_title(f"{title}: {len(pieces)} tokens for {len(line)} characters", fontsize=14)
    return fig


# %%
if IN_NOTEBOOK:
    plot_token_boundaries(bpe, "Before we proceed any further, hear me speak.", "BPE with 512 tokens")
    plt.show()

# %% [markdown]
# How much shorter do sequences get? The **compression** — UTF-8 bytes per token on the
# validation text, which none of these tokenizers was trained on — grows with the vocabulary,
# fast at first and then slowly: the most frequent pairs are merged first, and every further
# merge saves less.

# %%
def plot_compression(train_text: str, val_text: str, sizes=(256, 320, 384, 512, 768, 1024)):
    n_bytes = len(val_text.encode("utf-8"))
    ratios = [n_bytes / len(BPETokenizer.train(train_text, size).encode(val_text)) for size in sizes]
    fig, ax = new_figure(figsize=(8, 4.5))
    ax.plot(sizes, ratios, marker="o")
    ax.set(title="BPE compression on unseen text", xlabel="vocabulary size", ylabel="bytes per token")
    ax.grid(alpha=0.3)
    return fig


# %%
if IN_NOTEBOOK:
    plot_compression(train_text, val_text)
    plt.show()

# %% [markdown]
# Both tokenizers can be rebuilt from a few plain values (`state`), which checkpoints store, so
# a model is always decoded with exactly the tokenizer it was trained with. The character
# vocabulary is taken from the whole text — a character that occurs only in the validation part
# would otherwise have no id — while BPE is trained on the training part alone: it can encode any
# text anyway, and its merges should not be tuned on the text that measures the model.

# %%
Tokenizer = CharTokenizer | BPETokenizer  # either: encode, decode, token_bytes, vocab_size, state


def tokenizer_from_state(state: dict) -> Tokenizer:
    if state["kind"] == "char":
        return CharTokenizer(state["chars"])
    return BPETokenizer(state["merges"])


def make_tokenizer(kind: str, vocab_size: int, text: str, train_text: str) -> Tokenizer:
    """The character tokenizer of the whole text, or BPE trained on the training part."""
    if kind == "bpe":
        return BPETokenizer.train(train_text, vocab_size)
    return CharTokenizer.from_text(text)


# %% [markdown]
# ## 4. Batches
#
# The model learns one thing: given some tokens, predict the next. A window of `block_size + 1`
# consecutive tokens holds `block_size` such lessons at once: from the first token predict the
# second, from the first two predict the third, and so on. So the **inputs** are the first
# `block_size` tokens of the window and the **targets** are the same tokens shifted left by one.
#
# A batch is `batch_size` windows starting at random places. We draw them from one split at a
# time — the training tokens or the validation tokens, held in separate tensors — so no window
# can straddle the boundary and leak validation text into training.
#
# `Tensor.unfold` gives a *view* of every possible window without copying anything: row `i` is
# `data[i : i + block_size + 1]`. Picking random rows of it is the whole batch sampler.

# %%
def get_batch(data: torch.Tensor, block_size: int, batch_size: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows from a 1-D tensor of token ids: inputs (B, T) and next-token targets (B, T)."""
    if len(data) < block_size + 1:
        raise UserError(f"a split has {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}: "
                        "use a longer text or a smaller --block-size")
    windows = data.unfold(0, block_size + 1, 1)  # (N - T, T + 1) for N tokens: a view, no copy
    rows = torch.randint(len(windows), (batch_size,), generator=generator)
    batch = windows[rows]  # (B, T + 1)
    return batch[:, :-1], batch[:, 1:]  # inputs (B, T), targets (B, T)


# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    data = torch.tensor(tokenizer.encode(text))
    train_data, val_data = split_train_val(data)
    x, y = get_batch(train_data, block_size=8, batch_size=2, generator=torch.Generator().manual_seed(0))
    print("inputs ", tuple(x.shape), x[0].tolist())
    print("targets", tuple(y.shape), y[0].tolist())
    for t in range(4):
        print(f"after {tokenizer.decode(x[0, :t + 1].tolist())!r:12} comes {tokenizer.decode([y[0, t].item()])!r}")

# %% [markdown]
# ## 5. Embeddings
#
# A token id is only a name; `5` is not "more" than `4`. The model gives each token a learned
# vector of `n_embd` numbers — its **embedding** — looked up in a table of shape (V, C). Training
# moves these vectors so that tokens that behave alike end up close together.
#
# Attention, which comes next, compares tokens by their content alone: without its causal mask it
# would treat the input as an unordered *set* (shuffle the positions and each output is shuffled
# the same way, unchanged otherwise), and the mask only leaks a weak sense of order. Yet order is
# everything in language ("dog bites man"). So we add to each token's vector a second vector
# that depends only on its **position**. Two classic choices:
#
# * **Sinusoidal** (from "Attention Is All You Need", 2017): fixed waves of different
#   frequencies, nothing to learn. Pair $i$ of channels at position $p$ holds
#   $\sin(p/10000^{2i/C})$ and $\cos(p/10000^{2i/C})$. Fast waves tell neighbours apart, slow
#   waves tell the start of a text from its end, and the offset between two positions becomes a
#   fixed rotation of each (sin, cos) pair, which the model can learn to detect.
# * **Learned** (GPT-2): a second table of shape (block_size, C), trained like the token table.
#   It is free to find whatever works, but knows nothing about positions beyond `block_size`.
#
# A third, modern choice, **rotary** embeddings (`rope`, used by Llama), adds nothing here: it
# works inside attention, and comes with it in the next section. `--pos-encoding` selects one.
#
# The angles $p/10000^{2i/C}$ are computed by one helper, because rotary embeddings reuse them.
# The base 10000 comes from the 2017 paper: it makes the slowest wave's period ($2\pi \cdot
# 10000$ positions) far longer than any text the model will read, so no two positions collide.
#
# The embeddings end with **dropout**, a regulariser explained with the block in section 7. It
# is off by default (probability 0), and then `make_dropout` puts an `nn.Identity` in its
# place, which returns its input untouched and skips the dropout call's own cost.

# %%
def position_angles(n_positions: int, dim: int, base: float = 10000.0, start: int = 0) -> torch.Tensor:
    """Angle p / base^(2i/dim) for positions p = start, start+1, ... and channel pairs i: (T, ceil(dim/2))."""
    position = torch.arange(start, start + n_positions, dtype=torch.float64)[:, None]  # (T, 1)
    frequency = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (ceil(dim/2),)
    return (position * frequency).float()  # (T, ceil(dim/2)); float64 first keeps large p exact


def sinusoidal_positions(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed sinusoidal encodings of positions 0..n_positions-1, shape (n_positions, dim)."""
    angle = position_angles(n_positions, dim)  # (T, ceil(C/2))
    encoding = torch.zeros(n_positions, dim)
    encoding[:, 0::2] = torch.sin(angle)  # even channels
    encoding[:, 1::2] = torch.cos(angle[:, : dim // 2])  # odd channels
    return encoding


def make_dropout(p: float) -> nn.Module:
    """Dropout with probability p (see section 7), or an identity when p is 0: a Dropout(0)
    changes nothing, yet each call costs microseconds, which add up when generating (section 11)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Embeddings(nn.Module):
    """Token ids (B, T) -> vectors (B, T, C): what each token is, plus where it stands."""

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.token = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos_encoding = cfg.pos_encoding
        if cfg.pos_encoding == "learned":
            self.position = nn.Embedding(cfg.block_size, cfg.n_embd)
        elif cfg.pos_encoding == "sinusoidal":  # a fixed table: recomputed, never saved or trained
            self.register_buffer("sinusoids", sinusoidal_positions(cfg.block_size, cfg.n_embd),
                                 persistent=False)
        self.dropout = make_dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """`start` is the position of idx's first token (0, except when generating with a cache)."""
        T = idx.shape[1]
        x = self.token(idx)  # (B, T, C)
        if self.pos_encoding == "learned":
            x = x + self.position(torch.arange(start, start + T, device=idx.device))  # (T, C) broadcasts over B
        elif self.pos_encoding == "sinusoidal":
            x = x + self.sinusoids[start:start + T]  # (T, C)
        # rope: positions enter inside attention instead
        return self.dropout(x)  # (B, T, C)


# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    demo_cfg = Config(n_embd=16, block_size=8)
    embed = Embeddings(demo_cfg, tokenizer.vocab_size)
    print("token ids", tuple(x.shape), "-> vectors", tuple(embed(x).shape))
    pe = sinusoidal_positions(8, 16)
    print("sinusoidal encodings of positions 0-3, first 6 channels:")
    print(pe[:4, :6].numpy().round(3))

# %% [markdown]
# Drawn as a picture, each row of the sinusoidal table is the code of one position. The left
# channels oscillate quickly from one position to the next, the right ones so slowly that they
# barely change over 64 positions: together they give every position a distinct pattern.

# %%
def plot_positional_encodings(n_positions: int = 64, dim: int = 64, channels=(0, 2, 10, 20, 40)):
    pe = sinusoidal_positions(n_positions, dim)  # (T, C)
    fig, (left, right) = new_figure(1, 2, figsize=(15, 5))
    image = left.imshow(pe.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    left.set(title="Sinusoidal positional encodings", xlabel="channel", ylabel="position")
    fig.colorbar(image, ax=left)
    for c in channels:
        right.plot(pe[:, c], label=f"channel {c}")
    right.set(title="A few channels along the positions", xlabel="position", ylabel="value")
    right.legend(loc="lower left", fontsize=10)
    return fig


# %%
if IN_NOTEBOOK:
    plot_positional_encodings()
    plt.show()

# %% [markdown]
# ## 6. Attention
#
# Until now every token's vector knows only about itself. **Attention** lets each position
# collect information from earlier positions, with weights that depend on the content. Every
# position makes three vectors from its own, each with a learned linear map:
#
# * a **query** $q$: what am I looking for?
# * a **key** $k$: what do I contain?
# * a **value** $v$: what do I pass on to whoever attends to me?
#
# Position $t$ scores every position $s$ by the dot product $q_t \cdot k_s$, turns the scores
# into weights with a softmax, and outputs the weighted average of the values:
#
# $$\text{Attention}(Q, K, V) = \text{softmax}\!\left(\frac{QK^\top}{\sqrt{D}} + M\right) V$$
#
# **Why divide by $\sqrt{D}$.** If the $D$ components of $q$ and $k$ are independent with
# variance 1, their dot product is a sum of $D$ terms and has variance $D$. With $D = 32$ the
# scores would spread over roughly ±6, the softmax would put almost all weight on one position,
# and its gradient would vanish. Dividing by $\sqrt{D}$ brings the variance back to 1.
#
# **The causal mask $M$.** When predicting the token after position $t$, the model must not see
# it — or any later token — otherwise it could copy the answer. $M$ is 0 where $s \le t$ and
# $-\infty$ where $s > t$. Since $e^{-\infty} = 0$, the softmax gives future positions weight
# exactly zero, and the remaining weights still sum to one.
#
# One function does this for any number of heads; the leading dimensions just come along.

# %%
def causal_mask(T: int, T_keys: int | None = None, device=None) -> torch.Tensor:
    """(T, T_keys) boolean mask, True where a query would look into the future (key after query).

    The queries are the *last* T of the T_keys positions (T_keys > T only when generating with a
    cache of earlier keys); by default T_keys = T."""
    T_keys = T if T_keys is None else T_keys
    return torch.ones(T, T_keys, dtype=torch.bool, device=device).triu(diagonal=T_keys - T + 1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     dropout: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention with a causal mask. q: (..., T, D); k, v: (..., T_keys, D).

    Returns the outputs (..., T, D) and the attention weights (..., T, T_keys)."""
    T, D = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (..., T, T_keys): query t vs key s
    scores = scores.masked_fill(causal_mask(T, k.shape[-2], q.device), float("-inf"))
    weights = F.softmax(scores, dim=-1)  # (..., T, T_keys), each row sums to 1
    if dropout is not None:
        weights = dropout(weights)
    return weights @ v, weights  # (..., T, D), (..., T, T_keys)


# %% [markdown]
# ### One head
#
# A single **head** projects the C-wide input to D-wide queries, keys and values and attends.
# This class is here to make the idea concrete; the model uses the batched version below.

# %%
class Head(nn.Module):
    """One head of causal self-attention: (B, T, C) -> (B, T, D)."""

    def __init__(self, n_embd: int, head_dim: int):
        super().__init__()
        self.query = nn.Linear(n_embd, head_dim, bias=False)
        self.key = nn.Linear(n_embd, head_dim, bias=False)
        self.value = nn.Linear(n_embd, head_dim, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.query(x), self.key(x), self.value(x)  # each (B, T, D)
        return causal_attention(q, k, v)  # (B, T, D), (B, T, T)


# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    torch.manual_seed(0)
    head = Head(n_embd=16, head_dim=4)
    out, weights = head(torch.randn(1, 5, 16))
    print("output", tuple(out.shape), " weights", tuple(weights.shape))
    print("attention weights (row = query position, column = key position):")
    print(weights[0].detach().numpy().round(2))
    print("rows sum to", weights[0].sum(-1).detach().numpy().round(6))
    q, k = torch.randn(2, 10_000, 32)
    print(f"variance of q·k with D=32: {(q * k).sum(-1).var():.1f} raw, "
          f"{((q * k).sum(-1) / math.sqrt(32)).var():.2f} after dividing by sqrt(32)")

# %% [markdown]
# Seen as pictures: the mask lets each row (a query position) look only at columns (key
# positions) on or left of the diagonal. On the right, one head — with random, untrained weights
# — attends over a real line of Shakespeare: the weights already respect the mask, but their
# pattern is arbitrary. After training, the same kind of map will show heads with a purpose.

# %%
def plot_attention_heatmap(ax, weights: torch.Tensor, tokens: list[str], title: str, fontsize: int = 10) -> None:
    """Draw one (T, T) attention matrix on `ax`, with the tokens' text along both axes."""
    T = len(tokens)
    ax.imshow(weights.detach().cpu().numpy(), cmap="viridis", vmin=0)
    labels = ["".join(visible(c) for c in token) for token in tokens]
    ax.set_xticks(range(T), labels, fontsize=fontsize)
    ax.set_yticks(range(T), labels, fontsize=fontsize)
    ax.tick_params(length=0)
    ax.set_title(title)


def plot_mask_and_head(head: Head, embed: Embeddings, tokenizer: Tokenizer, line: str):
    ids = torch.tensor([tokenizer.encode(line)])  # (1, T)
    with torch.no_grad():
        _, weights = head(embed(ids))  # (1, T, T)
    fig, (left, right) = new_figure(1, 2, figsize=(15, 7))
    allowed = (~causal_mask(len(line))).float()
    plot_attention_heatmap(left, allowed, list(line), "Causal mask (yellow = may attend)")
    plot_attention_heatmap(right, weights[0], list(line), "One untrained head's weights")
    for ax in (left, right):
        ax.set(xlabel="key position (attended to)", ylabel="query position (attending)")
    return fig


# %%
if IN_NOTEBOOK:
    torch.manual_seed(0)
    line = "First Citizen:\nSpeak, speak."
    plot_mask_and_head(Head(n_embd=32, head_dim=8), Embeddings(Config(n_embd=32), tokenizer.vocab_size),
                       tokenizer, line)
    plt.show()

# %% [markdown]
# ### Rotary position embeddings (RoPE)
#
# Adding a position vector to the input (section 5) mixes *what* and *where* into one vector
# and leaves the model to untangle them. Yet attention mostly cares about *relative* position:
# how far back is that key? **Rotary embeddings** (Su et al., 2021; used by Llama and most open
# models since) build exactly that into the attention score. Each query and key is rotated, pair
# of channels by pair of channels, by an angle proportional to its position: pair $i$ of a
# vector at position $p$ turns by $p\,\theta_i$ with $\theta_i = 10000^{-2i/D}$ — the formula of
# the sinusoidal encoding's frequencies, with the head width D in place of C, from the same
# `position_angles` helper:
#
# $$(a, b) \mapsto (a\cos p\theta_i - b\sin p\theta_i,\; a\sin p\theta_i + b\cos p\theta_i)$$
#
# A rotation keeps a vector's length, and the dot product of two rotated vectors depends only on
# the *difference* of their angles: writing $R_p$ for the rotation at position $p$,
# $(R_m q)\cdot(R_n k) = q \cdot R_{n-m}\,k$, a rotation that depends only on the offset. So the
# score between a query at $m$ and a key at $n$ depends on their contents and on the offset
# $m - n$ (how far back the key is), never on where the pair sits in the text. Nothing is
# learned and nothing is added to the residual stream.
#
# **In code, three operations rotate every pair at once.** Regroup the formula as
#
# $$(a, b) \mapsto (a, b)\cos p\theta_i + (b, a) \odot (-\sin p\theta_i,\; \sin p\theta_i)$$
#
# that is: the vector times the cosines, plus the vector with each pair swapped times the sines
# (with a minus sign on the first member of each pair). The cosines and signed sines of every
# position are computed once, as two tables of width D, each pair's angle written twice; then
# rotating is two products and a sum, for all pairs, heads and positions together — where the
# formula written pair by pair takes seven operations, and generation runs it for every token
# in every layer. (With complex numbers the same rotation is a multiplication of $a + ib$ by
# $e^{ip\theta_i}$; the cell below checks that the two agree.)

# %%
def rope_tables(n_positions: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosines and signed sines of every position's angles, (n_positions, dim) each."""
    angles = position_angles(n_positions, dim)  # (P, D/2): one angle per pair
    cos = angles.cos().repeat_interleave(2, dim=-1)  # (P, D): cos, cos for the pair's two members
    sin = torch.stack([-angles.sin(), angles.sin()], dim=-1).flatten(-2)  # (P, D): -sin, +sin
    return cos, sin


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (2i, 2i+1) of x (..., D); the tables (..., D) broadcast against
    x's leading dimensions (typically one row per position)."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (..., D): each pair (a, b) becomes (b, a)
    rotated = x * cos + swapped * sin  # (a cos - b sin, b cos + a sin)
    return rotated.type_as(x)  # under a GPU's bfloat16 autocast, x is bfloat16 and the tables float32


# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 32)  # one query and one key of width D = 32
    cos, sin = rope_tables(100, 32)  # (100, 32) each
    rotated_q = rope_rotate(q, cos, sin)  # (100, 32): the same query placed at positions 0..99
    print("length before / after rotation:", round(q.norm().item(), 4), round(rotated_q[37].norm().item(), 4))

    def score(m, n):  # query at position m, key at position n
        return (rope_rotate(q, cos[m], sin[m]) @ rope_rotate(k, cos[n], sin[n]).T).item()

    print(f"score(query at 10, key at 7) = {score(10, 7):.4f}")
    print(f"score(query at 60, key at 57) = {score(60, 57):.4f}   (same offset, same score)")
    a, b, angle = q[0, 0::2], q[0, 1::2], position_angles(100, 32)[37]  # the formula, pair by pair
    by_formula = torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1).flatten()
    print("equal to the rotation formula:", torch.allclose(rotated_q[37], by_formula, atol=1e-6))
    as_complex = torch.view_as_complex(q.reshape(16, 2))  # pairs (a, b) as complex numbers a + ib
    turned = torch.view_as_real(as_complex * torch.polar(torch.ones(16), angle)).flatten()
    print("equal to multiplying by e^(i*angle):", torch.allclose(rotated_q[37], turned, atol=1e-6))

# %% [markdown]
# The picture: a query and a key with identical content, scored at every offset. The curve is
# the same wherever the query stands (three query positions, one curve), and it tends to fall as
# the offset grows, because the fast-turning pairs stop agreeing — a gentle built-in preference
# for nearby tokens.

# %%
def plot_rope_scores(dim: int = 32, max_offset: int = 60, query_positions=(60, 90, 120)):
    cos, sin = rope_tables(max(query_positions) + 1, dim)  # (P, D) each
    vector = torch.ones(dim) / math.sqrt(dim)  # the same content for query and key
    rotated = rope_rotate(vector, cos, sin)  # (P, D): the vector at each position
    fig, ax = new_figure(figsize=(9, 4.5))
    offsets = range(max_offset + 1)
    for m in query_positions:
        scores = [(rotated[m] @ rotated[m - o]).item() for o in offsets]
        ax.plot(offsets, scores, label=f"query at position {m}", linewidth=5 - query_positions.index(m) * 1.5)
    ax.set(title="RoPE: query·key score depends only on the offset", xlabel="offset m - n (key before query)",
           ylabel="query · key")
    ax.legend()
    return fig


# %%
if IN_NOTEBOOK:
    plot_rope_scores()
    plt.show()

# %% [markdown]
# ### Many heads at once
#
# One head computes one weighted average, so it can follow one kind of relation at a time
# ("the previous character", "the start of this word"). **Multi-head attention** runs H heads
# side by side, each of width D = C / H, and concatenates their outputs, so the total cost is
# that of one C-wide head. A final linear layer mixes what the heads found.
#
# Instead of H small `Head` modules we use one matrix that makes all queries, keys and values in
# a single matrix multiply, then reshape the channels into heads of width D. The heads then
# ride along as an extra batch dimension through `causal_attention`. Setting
# `return_weights=True` hands back the (B, H, T, T) attention weights for plotting.
#
# **Grouped-query attention** (GQA; Ainslie et al., 2023; used by Llama 2 70B and Llama 3) gives
# the H query heads only `n_kv_head` key/value heads, each shared by a group of H / `n_kv_head`
# query heads. The projection shrinks from (C, 3C) to (C, C + 2·n_kv_head·D), and — what matters
# most in big models — so does the memory that fast generation spends on keeping every past key
# and value around (a "KV cache"). `n_kv_head = n_head` is ordinary multi-head attention;
# `n_kv_head = 1` is *multi-query* attention (Shazeer, 2019). Before attending, each key/value
# head is simply repeated for every query head in its group.
#
# **Fused attention.** PyTorch's `F.scaled_dot_product_attention` computes exactly what
# `causal_attention` does, in one optimised kernel (in training on a GPU, a FlashAttention
# kernel that never even stores the T × T weights). The class uses it whenever the weights are
# not requested. The hand-written `causal_attention` stays the definition: it runs whenever
# weights are asked for (the plots), and a test checks that the two agree.
#
# **A cache for generation.** When the model writes, every new token attends to all the tokens
# before it, whose keys and values never change: in a causal model, earlier positions never see
# later ones. So instead of recomputing them at every step we keep them in a **KV cache** and
# compute queries, keys and values for the one new token only. `KVCache` holds, per layer, the
# keys and values seen so far — before the grouped heads are repeated, which is how grouped-query
# attention saves memory — and the position the next token will have. Section 11 uses it.

# %%
class LayerCache:
    """One attention layer's keys and values for every position seen so far."""

    def __init__(self):
        self.k = self.v = None  # (B, Hkv, T_seen, D) once filled

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys and values (B, Hkv, T, D); return all of them so far."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """The caches of all layers, and the position the next token will have."""

    def __init__(self, n_layer: int):
        self.layers = [LayerCache() for _ in range(n_layer)]
        self.position = 0


class MultiHeadAttention(nn.Module):
    """H causal attention heads batched together: (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.kv_heads
        self.head_dim = cfg.n_embd // cfg.n_head  # D
        kv_width = self.n_kv_head * self.head_dim  # equals C unless keys/values are grouped
        self.qkv = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * kv_width, bias=cfg.bias)  # q, k, v at once
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)  # mixes the heads' outputs
        self.dropout_p = cfg.dropout  # the fused kernel takes the probability, not a layer
        self.attn_dropout = make_dropout(cfg.dropout)
        self.resid_dropout = make_dropout(cfg.dropout)
        self.rope = cfg.pos_encoding == "rope"
        if self.rope:  # the rotation tables of every position: fixed, so recomputed rather than saved
            cos, sin = rope_tables(cfg.block_size, self.head_dim)  # (block_size, D) each
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, return_weights: bool = False, cache: LayerCache | None = None,
                start: int = 0):
        """x: (B, T, C), the tokens at positions start, start+1, ...; with a cache, the keys and
        values of earlier positions come from it. Returns (B, T, C), and also the (B, H, T, T_keys)
        weights if asked."""
        B, T, C = x.shape
        heads = self.qkv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H + 2Hkv, T, D): q, k, v heads
        qk, v = heads.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)  # queries and keys; values
        if self.rope:  # queries and keys turn by the same angles, so one rotation does both
            qk = rope_rotate(qk, self.rope_cos[start:start + T], self.rope_sin[start:start + T])  # tables (T, D)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)  # (B, H, T, D), (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, Hkv, T_keys, D): all positions so far
        if return_weights:  # the teaching path: every step visible
            if self.n_kv_head != self.n_head:  # grouped-query: repeat each key/value head for its group
                group = self.n_head // self.n_kv_head
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, T_keys, D)
            out, weights = causal_attention(q, k, v, self.attn_dropout)  # (B, H, T, D), (B, H, T, T_keys)
        else:  # the same maths in one fused kernel, which also does the repeating
            out, weights = self.fused_attention(q, k, v), None
        out = out.transpose(1, 2).reshape(B, T, C)  # (B, T, H*D): heads side by side
        out = self.resid_dropout(self.proj(out))  # (B, T, C)
        return (out, weights) if return_weights else out

    def fused_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T, T_keys = q.shape[-2], k.shape[-2]
        # Without a cache the mask is the plain causal one. With one, the queries come after
        # T_keys - T cached keys: a single newest query may see every key (no mask at all, the
        # common case when generating); several need the shifted mask.
        allowed = None if T in (1, T_keys) else ~causal_mask(T, T_keys, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=1 < T == T_keys,
                                              dropout_p=self.dropout_p if self.training else 0.0,
                                              enable_gqa=self.n_kv_head != self.n_head)


# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    torch.manual_seed(0)
    mha = MultiHeadAttention(Config(n_embd=16, n_head=4))
    out, weights = mha(torch.randn(2, 5, 16), return_weights=True)
    print("output", tuple(out.shape), " weights (B, H, T, T)", tuple(weights.shape))
    print("weights above the diagonal are exactly zero:", bool((weights.triu(1) == 0).all()))

# %% [markdown]
# ## 7. The transformer block
#
# A block does two things in turn: **attention** (tokens talk to each other) and an **MLP**
# (each token thinks on its own). Two devices make a deep stack of blocks trainable.
#
# **Residual connections.** Each sub-layer *adds* its output to its input: `x = x + f(x)`. The
# sum gives gradients a straight path from the loss to every layer, and a freshly initialised
# block, whose output is small (see the initialisation in section 8), barely changes its input,
# so stacking more blocks hardly disturbs the initial model. The vector that flows through the
# additions is called the *residual stream*.
#
# **Layer normalisation.** Each token's vector is rescaled to mean 0 and variance 1 across its C
# channels, then given a learned gain $\gamma$ and bias $\beta$:
#
# $$\text{LayerNorm}(x) = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta$$
#
# This keeps the inputs of every layer on the same scale however the weights drift in training.
# $\epsilon = 10^{-5}$ (PyTorch's default) only guards against dividing by zero; the variance is
# the biased one (divide by C), as in the LayerNorm paper.

# %%
class LayerNorm(nn.Module):
    """Normalise each vector over its last dimension, then scale and shift (learned)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # gamma, starts as "no change"
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None  # beta (optional)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)  # (B, T, 1)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)  # (B, T, 1), the biased variance
        x = self.weight * (x - mean) / torch.sqrt(var + self.eps)  # (B, T, C)
        return x + self.bias if self.bias is not None else x


# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    torch.manual_seed(0)
    x_demo = torch.randn(2, 3, 8) * 5 + 3
    ln = LayerNorm(8)
    ours, theirs = ln(x_demo), F.layer_norm(x_demo, (8,), ln.weight, ln.bias)
    print("input:  mean", x_demo.mean(-1)[0].numpy().round(2), " std", x_demo.std(-1, unbiased=False)[0].numpy().round(2))
    print("output: mean", ours.mean(-1)[0].detach().abs().numpy().round(4), " std", ours.std(-1, unbiased=False)[0].detach().numpy().round(4))
    print("equal to F.layer_norm:", torch.allclose(ours, theirs, atol=1e-6))

# %% [markdown]
# **RMSNorm** (Zhang & Sennrich, 2019; used by Llama) drops the centring and the bias and only
# rescales each vector by its root mean square:
#
# $$\text{RMSNorm}(x) = \gamma \odot \frac{x}{\sqrt{\tfrac{1}{C}\sum_j x_j^2 + \epsilon}}$$
#
# The paper argued, and showed in experiments, that the re-scaling, not the re-centring, is what
# stabilises training; RMSNorm is one reduction instead of two and has fewer parameters.
# `--norm` chooses between the two.

# %%
class RMSNorm(nn.Module):
    """Divide each vector by its root mean square, then scale (learned)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_square = (x * x).mean(-1, keepdim=True)  # (B, T, 1)
        return self.weight * x / torch.sqrt(mean_square + self.eps)  # (B, T, C)


def make_norm(cfg: Config) -> nn.Module:
    """The normalisation layer the configuration asks for."""
    return RMSNorm(cfg.n_embd) if cfg.norm == "rmsnorm" else LayerNorm(cfg.n_embd, bias=cfg.bias)


# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    rms = RMSNorm(8)
    out = rms(x_demo)
    print("root mean square after RMSNorm:", (out * out).mean(-1).sqrt()[0].detach().numpy().round(4))
    print("equal to F.rms_norm:", torch.allclose(out, F.rms_norm(x_demo, (8,), rms.weight, eps=1e-5), atol=1e-6))

# %% [markdown]
# **The MLP** widens each vector to 4C, applies a non-linearity, and projects back to C. The
# factor 4 is the ratio used by the original Transformer (2048 = 4 × 512) and kept by GPT-2.
# The non-linearity is **GELU**, $x \cdot \Phi(x)$ with $\Phi$ the standard normal CDF: a smooth
# version of ReLU, whose gradient is not exactly zero for negative inputs. (GPT-2 computed it with
# a tanh approximation; PyTorch's `F.gelu` computes it exactly.)
#
# **SwiGLU** (Shazeer, 2020; used by Llama) replaces "widen, non-linearity, narrow" with a
# *gated* unit: two widening matrices, one passed through the SiLU non-linearity
# ($\text{SiLU}(x) = x \cdot \sigma(x)$), the other left linear, multiplied element by element
# so that one decides how much of the other passes:
#
# $$\text{SwiGLU}(x) = W_{\text{proj}}\,\big(\text{SiLU}(W_{\text{gate}}\,x) \odot W_{\text{up}}\,x\big)$$
#
# It has three matrices instead of two. To keep the parameter count of the 4C-wide GELU MLP
# ($2 \cdot 4C \cdot C = 8C^2$), its hidden width is $\tfrac{2}{3} \cdot 4C = 8C/3$, since
# $3 \cdot C \cdot 8C/3 = 8C^2$ — the rule from the SwiGLU paper that Llama follows. (Rounded
# down to a whole number of channels: 341 for C = 128, so the count falls short by 0.1%.) In code,
# $W_{\text{gate}}$ and $W_{\text{up}}$ are stacked into one layer, as queries, keys and values
# are in attention: one matrix product instead of two, split in half afterwards.
#
# **Pre-norm.** The original Transformer normalised *after* each residual addition
# (`x = norm(x + f(x))`). GPT-2 adopted the norm at the *input* of each sub-layer
# (`x = x + f(norm(x))`), which trains more stably in deep stacks because the residual stream
# itself is never squeezed. The price: the stream is never normalised either, and its scale
# grows as blocks add to it. So a pre-norm model needs one **final norm** after the last
# block, before the output layer — we add it in the model below.
#
# **Dropout** (`--dropout`, Srivastava et al., 2014) zeroes a random fraction of activations in
# training — here the summed embeddings, the attention weights, and each sub-layer's output
# before it joins the residual stream — so that no unit can rely on another always being there.
# It fights overfitting. The quick run sees each character of the corpus only about twice and
# does not overfit, so its dropout is 0; raise it for long runs on small texts.

# %%
class MLP(nn.Module):
    """Position-wise feed-forward network: (B, T, C) -> (B, T, 4C) -> (B, T, C)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = make_dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU ("swish"): x * sigmoid(x), a smooth ReLU that dips slightly below zero."""
    return x * torch.sigmoid(x)


class SwiGLU(nn.Module):
    """Gated feed-forward network: (B, T, C) -> 2 x (B, T, 8C/3) -> (B, T, C)."""

    def __init__(self, cfg: Config):
        super().__init__()
        hidden = 8 * cfg.n_embd // 3  # two-thirds of 4C: same parameter count as the GELU MLP
        self.gate_up = nn.Linear(cfg.n_embd, 2 * hidden, bias=cfg.bias)  # W_gate and W_up stacked: one multiply
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = make_dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, 8C/3) each
        return self.dropout(self.proj(silu(gate) * up))


def make_mlp(cfg: Config) -> nn.Module:
    """The feed-forward network the configuration asks for."""
    return SwiGLU(cfg) if cfg.mlp == "swiglu" else MLP(cfg)


class Block(nn.Module):
    """A pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = MultiHeadAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = make_mlp(cfg)

    def forward(self, x: torch.Tensor, return_weights: bool = False, cache: LayerCache | None = None,
                start: int = 0):
        attended = self.attn(self.norm1(x), return_weights, cache, start)
        attn_out, weights = attended if return_weights else (attended, None)  # (B, T, C), (B, H, T, T)
        x = x + attn_out  # tokens talk
        x = x + self.mlp(self.norm2(x))  # each token thinks
        return (x, weights) if return_weights else x


# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    block = Block(Config(n_embd=16, n_head=4))
    print("block keeps the shape:", tuple(block(torch.randn(2, 5, 16)).shape))

# %% [markdown]
# ## 8. The model
#
# The whole GPT: embed the tokens, run them through `n_layer` blocks, normalise, and map every
# position's vector to V scores (**logits**), one per possible next token. A softmax of the
# logits is the model's probability distribution over the next token.
#
# **Weight tying.** The output layer is a (V, C) matrix, the same shape as the token embedding
# table, and the two do mirror-image jobs: one turns a token into a vector, the other scores how
# well a vector matches each token. Press & Wolf (2017) showed that using one matrix for both
# works as well or better with fewer parameters, and GPT-2 does it. We make the output layer's
# weight *the same tensor* as the embedding's, so the parameter count counts it once.
#
# **Initialisation.** Weights start from a normal distribution with standard deviation 0.02, the
# value GPT-1 and GPT-2 used: small enough that the initial logits are all near zero. Biases
# start at zero. The two layers of each block that write into the residual stream (attention's
# `proj` and the MLP's `proj`) get their std scaled by $1/\sqrt{2 \cdot n_{layer}}$, as in the
# GPT-2 paper: the stream is a sum of $2 \cdot n_{layer}$ such contributions (two per block),
# and the variance of a sum of N independent terms grows like N, so shrinking each term's std by
# $\sqrt{N}$ keeps the stream's scale independent of depth.
#
# **Loss.** Training minimises the cross-entropy: the average of $-\ln p(\text{true next
# token})$. With logits near zero at initialisation, the softmax is nearly uniform, every token
# gets $p \approx 1/V$, and the loss is $-\ln(1/V) = \ln V$ — about 4.17 for 65 characters. A
# loss far above that at step 0 means a broken initialisation; it is the first thing to check.

# %%
class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, V), and the loss when targets are given."""

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg, vocab_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)  # the final norm that pre-norm blocks require
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.embed.token.weight  # weight tying: one tensor, two roles
        self.apply(self._init_weights)
        for block in self.blocks:  # residual projections, scaled for depth
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Trainable parameters; the tied embedding/output matrix counts once."""
        return sum(p.numel() for p in self.parameters())  # parameters() skips duplicates

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                return_weights: bool = False, cache: KVCache | None = None):
        """Returns (logits, loss), plus a list of per-layer (B, H, T, T) weights if asked.

        With a cache, idx holds only the new tokens; the earlier ones are in the cache."""
        T = idx.shape[1]
        start = cache.position if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"{start + T} positions are more than block_size={self.cfg.block_size}")
        x = self.embed(idx, start)  # (B, T, C)
        all_weights = []
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            if return_weights:
                x, weights = block(x, True, layer_cache, start)  # (B, T, C), (B, H, T, T)
                all_weights.append(weights)
            else:
                x = block(x, False, layer_cache, start)  # (B, T, C)
        if cache is not None:
            cache.position += T
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # mean over B*T
        return (logits, loss, all_weights) if return_weights else (logits, loss)


# %%
if IN_NOTEBOOK:
    set_seed(1337)
    model = GPT(Config(), tokenizer.vocab_size)
    x, y = get_batch(train_data, 64, 32, torch.Generator().manual_seed(0))
    logits, loss = model(x, y)
    print(f"{model.num_parameters():,} parameters")
    print("logits", tuple(logits.shape))
    print(f"loss at initialisation {loss.item():.3f}; ln(vocab size) = ln({tokenizer.vocab_size}) = "
          f"{math.log(tokenizer.vocab_size):.3f}")

# %% [markdown]
# ### Classic and modern: two presets
#
# Each switch met so far has a GPT-2 (2019) setting and a Llama (2023) setting. Today's open
# models differ from GPT-2 in just these few, well-understood places:
#
# | switch | `gpt2` (classic) | `llama` (modern) |
# |---|---|---|
# | `pos_encoding` | learned table added to the input | rotary, inside attention |
# | `norm` | LayerNorm | RMSNorm |
# | `mlp` | GELU, 4C wide | SwiGLU, 8C/3 wide |
# | `n_kv_head` | one per query head | grouped: 2 for our 4 query heads |
# | `bias` | in every linear layer and norm | none |
#
# `--arch gpt2` or `--arch llama` selects a whole set, and any switch can still be flipped on top
# (`--arch llama --norm layernorm`). Llama drops biases because they cost memory and bring
# nothing measurable at scale. For grouping, Llama 3 shares each key/value head among 4 query
# heads (32 query, 8 key/value); with only 4 query heads we use groups of 2, so the model keeps
# more than one key/value head.
#
# **Which is better here?** Measured on a 2-core CPU with the quick-run defaults (3000 steps,
# `python llm.py train --arch gpt2` and `--arch llama`): `gpt2` reached a validation loss of
# 1.70 in 108 s, `llama` 1.61 in 106 s — better, and no slower. So `llama` is the default.
# Section 10 repeats the comparison in the notebook, on equal time, and flips the switches one
# at a time.

# %%
ARCHITECTURES = {
    "gpt2": dict(pos_encoding="learned", norm="layernorm", mlp="gelu", n_kv_head=0, bias=True),
    "llama": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
}
DEFAULT_ARCH = "llama"  # measured: the lower validation loss in the quick run (see above)

# A larger model for a GPU, the size of nanoGPT's Shakespeare GPU run (about 10M parameters,
# 256 characters of context), which reaches a validation loss of about 1.47 there. Dropout 0.2:
# a model this size sees the 1M training characters about 80 times and would overfit without it.
SIZES = {
    "cpu": {},  # the quick-run defaults of Config
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2,
                learning_rate=1e-3, min_lr=1e-4, max_iters=5000, warmup_iters=100, eval_interval=250,
                eval_iters=200),
}


def preset(arch: str, size: str = "cpu", **overrides) -> Config:
    """A Config with the switches of architecture `arch` and the shape of `size`, then any overrides."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown --arch {arch!r}: use {' or '.join(ARCHITECTURES)}")
    if size not in SIZES:
        raise UserError(f"unknown --size {size!r}: use {' or '.join(SIZES)}")
    return Config(**{**ARCHITECTURES[arch], **SIZES[size], **overrides})


# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    for arch in ARCHITECTURES:
        set_seed(1337)
        arch_model = GPT(preset(arch), tokenizer.vocab_size)
        _, arch_loss = arch_model(x, y)
        print(f"{arch:5}: {arch_model.num_parameters():,} parameters, loss at initialisation {arch_loss.item():.2f}")

# %% [markdown]
# ## 9. Training
#
# Training repeats one step: take a batch, compute the loss, compute its gradient with respect
# to every parameter (backpropagation), and move each parameter a little downhill.
#
# ### The optimiser: AdamW
#
# Adam keeps, per parameter, a running average of the gradient (momentum, `beta1` = 0.9) and of
# its square (`beta2`), and divides the first by the square root of the second, so every
# parameter moves at a similar pace whatever the scale of its gradient. We use `beta2` = 0.99
# rather than the textbook 0.999: the average then forgets within about 100 steps instead of
# 1000, which suits a run of only a few thousand steps.
#
# **Weight decay** pulls weights gently towards zero, which fights overfitting. AdamW applies it
# directly to the weights rather than through the gradient (Loshchilov & Hutter, 2019). We decay
# only the *matrices* (linear layers and embeddings, everything with 2 dimensions). Biases and
# the norm gains are vectors: decaying a gain towards zero would just shrink a layer's output,
# and biases hold too few numbers to overfit with. The strength, 0.1, is GPT-3's setting (Brown
# et al., 2020, appendix B), as are the clipping and the final learning rate below.

# %%
def configure_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) and none on vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_gpu = params[0].device.type == "cuda"  # one fused kernel updates every parameter at once
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=on_gpu or None)


# %% [markdown]
# ### The learning-rate schedule
#
# The learning rate is the size of each step. Early on Adam's running averages are estimated
# from only a handful of gradients and are unreliable, so we **warm up**: grow the rate linearly
# from nearly zero to its peak over `warmup_iters` steps — 100 here, which is about the memory
# of the `beta2` = 0.99 average (1 / (1 − 0.99) = 100 steps). Then a **cosine decay** lowers it
# smoothly to `min_lr` at the last step: big steps while the loss falls fast, small steps at the
# end to settle into a minimum. `min_lr` is a tenth of the peak, as in GPT-3 and Chinchilla. The
# schedule is a plain function of the step number, with no hidden state, so it is easy to plot
# and to test, and a run stopped at any step could pick it up again exactly.

# %%
def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    decay_steps = max(1, cfg.max_iters - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / decay_steps)  # 0 -> 1
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


# %%
def plot_lr_schedule(cfg: Config):
    steps = range(cfg.max_iters)
    fig, ax = new_figure(figsize=(9, 4))
    ax.plot(steps, [lr_at(s, cfg) for s in steps])
    ax.axvline(cfg.warmup_iters, color="gray", linestyle=":", label=f"end of warmup ({cfg.warmup_iters} steps)")
    ax.set(title="Learning rate: linear warmup, then cosine decay", xlabel="step", ylabel="learning rate")
    ax.legend()
    return fig


# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    cfg = Config()
    for s in (0, 49, 99, 100, cfg.max_iters // 2, cfg.max_iters - 1):
        print(f"step {s:4}: lr {lr_at(s, cfg):.2e}")

# %%
if IN_NOTEBOOK:
    plot_lr_schedule(Config())
    plt.show()

# %% [markdown]
# ### Measuring progress
#
# A loss measured on one random batch is noisy, so we average over `eval_iters` batches per
# split. The batches are drawn **once**, from a generator with a fixed seed, and reused at every
# evaluation: differences between two evaluations then come from the model alone, not from
# which text happened to be drawn. The two splits' batches and the training batches use three
# different seeds (`seed`, `seed + 1`, `seed + 2`), so the training stream never starts with the
# very windows the evaluation measures. With 20 batches of 12 × 64 characters, each estimate
# reads about 15,000 characters, enough to pin the loss to about ±0.01; evaluating every 250
# steps costs about 5% of the run.
#
# Besides the loss in nats per token, each evaluation reports the validation loss in **bits per
# byte**: converted to bits (divided by ln 2) and spread over the UTF-8 bytes that the validation
# tokens stand for — and likewise **bits per character**. Unlike the loss per token, these do not
# depend on the tokenizer, so a character model and a BPE model can be compared (section 10).
#
# Evaluation switches the model to **eval mode** (dropout off, so the answer is deterministic)
# and turns off gradient tracking (nothing to backpropagate, and it saves memory and time), then
# puts the model back the way it found it. The sampler needs the same, so it is one context
# manager.

# %%
@contextmanager
def evaluating(model: nn.Module):
    """Eval mode and no gradients inside the block; the previous mode is restored after.

    `inference_mode` is `no_grad` plus a promise that the results never meet autograd later,
    which lets PyTorch skip some bookkeeping on every operation (it matters when sampling)."""
    was_training = model.training
    if was_training:  # (switching walks every module: skip it when there is nothing to switch)
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def fixed_batches(data: torch.Tensor, cfg: Config, seed: int) -> list:
    """`eval_iters` batches drawn with their own seeded generator, reused at every evaluation."""
    generator = torch.Generator().manual_seed(seed)
    return [get_batch(data, cfg.block_size, cfg.batch_size, generator) for _ in range(cfg.eval_iters)]


def estimate_loss(model: nn.Module, batches: list, device: torch.device) -> float:
    """Mean loss of the model over a fixed list of (inputs, targets) batches."""
    with evaluating(model):
        losses = [model(x.to(device), y.to(device))[1].item() for x, y in batches]
    return sum(losses) / len(losses)


# %% [markdown]
# ### Checkpoints
#
# A run keeps two checkpoints in its `out_dir`:
#
# * `ckpt.pt`, the **best** model so far (lowest validation loss), which `sample` uses;
# * `latest.pt`, the state at the **latest** evaluation (or at Ctrl-C), which `--resume` continues.
#
# Each holds what is needed to use the model and everything a continuation needs to be *exactly*
# the run that was interrupted: the weights, the optimiser's running averages, the step (and so
# the position in the learning-rate schedule), the configuration, the tokenizer, the loss
# history, a checksum of the training text, and the states of the random generators — Python's,
# PyTorch's on the CPU and on CUDA GPUs, and the batch sampler's. Nothing is saved before the
# first training step: an untrained model is not worth replacing an older checkpoint with. It is
# written atomically (the helper from the data section), so a crash during the save leaves the
# previous checkpoint intact. The file holds only tensors and plain Python values, so it can be
# loaded with `torch.load(weights_only=True)`, which refuses to run code hidden in a malicious
# file.

# %%
def rng_states(batch_generator: torch.Generator) -> dict:
    states = {"python": random.getstate(), "torch": torch.get_rng_state(), "batches": batch_generator.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict, batch_generator: torch.Generator) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    batch_generator.set_state(states["batches"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, model: GPT, optimizer, tokenizer: Tokenizer, step: int, val_loss: float,
                    batch_generator: torch.Generator, history: list = (), data_sha256: str = "") -> None:
    """Write everything needed to sample from the model or to resume the run, atomically."""
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "step": step, "val_loss": val_loss, "config": dataclasses.asdict(model.cfg),
                  "tokenizer": tokenizer.state(), "rng": rng_states(batch_generator),
                  "history": list(history), "data_sha256": data_sha256}
    write_output(path, lambda f: torch.save(checkpoint, f))


def write_output(path: Path, write: Callable) -> None:
    """atomic_write for the run's outputs: a failure (a full disk, say) becomes one clear line."""
    try:
        atomic_write(path, write)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); the previous version is untouched: "
                        "free some disk space or choose another --out-dir") from None


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """The raw checkpoint dictionary, or a UserError saying why there is none."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: run `python llm.py train` first "
                        "(or pass the --out-dir you trained with)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        checkpoint["config"], checkpoint["tokenizer"], checkpoint["model"]  # the keys every checkpoint has
        return checkpoint
    except Exception as e:  # truncated file, not a checkpoint, or one from another version
        raise UserError(f"{path} is not a readable llm.py checkpoint ({type(e).__name__}): "
                        "train again with `python llm.py train`") from None


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """The model (in eval mode), its tokenizer, and the raw checkpoint dictionary."""
    checkpoint = read_checkpoint(path, device)
    try:
        cfg = Config(**checkpoint["config"])
        tokenizer = tokenizer_from_state(checkpoint["tokenizer"])
        model_vocab = checkpoint["model"]["embed.token.weight"].shape[0]
    except Exception as e:  # a checkpoint of another version, or an edited one
        raise UserError(f"{path} is not a readable llm.py checkpoint ({type(e).__name__}): "
                        "train again with `python llm.py train`") from None
    if tokenizer.vocab_size != model_vocab:
        raise UserError(f"{path} holds a tokenizer of {tokenizer.vocab_size} tokens but a model of "
                        f"{model_vocab}: the file was altered or mixed up; train again")
    model = GPT(cfg, tokenizer.vocab_size).to(device)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:  # weights named or shaped for another version of the model
        raise UserError(f"{path} holds weights that do not fit this version of llm.py's model: "
                        "train again with `python llm.py train`") from None
    return model.eval(), tokenizer, checkpoint


# %% [markdown]
# ### Beyond one machine: data parallelism
#
# One process can only be so fast. **Data parallelism** runs N copies of the same model, one per
# process (a GPU each, or CPU cores), launched by `torchrun --nproc_per_node=N llm.py train`.
# Each copy computes gradients on *different* batches; then an **all-reduce** — every process
# sends its gradients and receives the average of all of them — leaves identical averaged
# gradients everywhere, so every copy takes the identical optimiser step and the copies never
# drift apart. PyTorch's `DistributedDataParallel` (DDP) does the all-reduce during the backward
# pass, overlapping communication with computation.
#
# To keep results comparable with a single process, the **global batch** stays the same: a step
# averages gradients over `grad_accum_steps` micro-batches of `batch_size` sequences. One process
# runs them one after another (gradient accumulation: backpropagate each, sum the gradients, step
# once); with N processes each runs its share of `grad_accum_steps / N`. Every process draws the
# same micro-batches from the same seeded generator and keeps only its share, so the union of
# what the processes train on is exactly what one process would have trained on. Only process 0
# ("rank 0") evaluates, prints and writes files. The backend is `gloo` on CPUs and `nccl` on
# NVIDIA GPUs.

# %%
@dataclass
class Distributed:
    """Where this process stands among the torchrun processes (one process: rank 0 of 1)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_distributed(cfg: Config) -> Distributed:
    """Join the process group when launched by torchrun (which sets RANK); else a single process."""
    if "RANK" not in os.environ:
        return Distributed()
    import torch.distributed as dist
    env = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if cfg.grad_accum_steps % env.world_size != 0:
        raise UserError(f"--grad-accum-steps ({cfg.grad_accum_steps}) must be a multiple of the number of "
                        f"processes ({env.world_size}), so that each gets an equal share")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if pick_device(cfg.device).type == "cuda" else "gloo")
    return env


def process_device(cfg: Config, env: Distributed) -> torch.device:
    device = pick_device(cfg.device)
    if device.type == "cuda" and env.world_size > 1:
        device = torch.device("cuda", env.local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    return device


# %% [markdown]
# ### The training loop
#
# Each step: look up the learning rate, draw the micro-batches, compute the loss, backpropagate,
# clip the gradient, update. **Gradient clipping** rescales the whole gradient whenever its norm
# exceeds `grad_clip` (1.0, GPT-3's setting, kept by most models since), so one unlucky batch
# cannot throw the weights far off course. A loss that is not a finite number stops the run at
# once, before the broken weights can reach a checkpoint.
#
# Every `eval_interval` steps (and after the last) we measure both losses, print a progress line,
# append a row to `history.csv`, save `latest.pt`, and save `ckpt.pt` if the validation loss is
# the best so far. The `lr` column holds the learning rate of the step about to be taken (at the
# end: of the last).
#
# **On an NVIDIA GPU** three things change, none of which alters the maths. The forward and
# backward passes run under bfloat16 **autocast**: matrix multiplications use the GPU's tensor
# cores at many times the float32 rate, while the weights and the optimiser's averages stay in
# float32 (bfloat16 keeps float32's range, so no loss scaling is needed). AdamW updates all
# parameters in one **fused** kernel instead of one small kernel per tensor. And batches are
# copied from **pinned** (page-locked) memory, which the GPU can read without a staging copy.
# `--compile` additionally hands the model to `torch.compile`, which fuses operations into fewer,
# larger kernels. It is opt-in: on the 2-core CPU it made a step about 20% faster (26 ms instead
# of 33) but first spent about 20 s compiling, as much as the whole quick run's 3000 steps save.
#
# **Ctrl-C** does not kill the run in the middle of an update. It only raises a flag; the loop
# finishes the current step, saves `latest.pt`, and stops with a message saying how to resume.
# `--resume` then restores everything the checkpoint holds and continues: the resumed run's
# losses are bit-for-bit those of an uninterrupted one (on the CPU; GPU kernels are not always
# deterministic). A second Ctrl-C abandons the current step at once, and `latest.pt` keeps the
# state of the last evaluation.

# %%
@dataclass
class TrainResult:
    model: GPT
    tokenizer: Tokenizer
    history: list  # one dict per evaluation: the columns of HISTORY_FIELDS
    seconds: float


HISTORY_FIELDS = ["step", "train_loss", "val_loss", "val_bpb", "val_bpc", "lr", "elapsed_s"]


class TrainingInterrupted(Exception):
    """Raised when Ctrl-C stopped training after the latest checkpoint was saved."""


def train_step(model: nn.Module, optimizer, batches: list, lr: float, cfg: Config) -> float:
    """One optimizer step on a list of (inputs, targets) micro-batches; returns their mean loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1  # DDP averages gradients across processes after the last one only
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):  # bf16 maths on GPUs only
                _, loss = model(x, y)
            (loss / len(batches)).backward()  # gradients add up: the mean over micro-batches
        total += loss.item()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return total / len(batches)


@contextmanager
def stop_flag_on_ctrl_c():
    """Inside the block, the first Ctrl-C sets flag["stop"] instead of raising KeyboardInterrupt."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield flag
        return

    def request_stop(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        flag["stop"] = True
        print("\nCtrl-C: finishing this step and saving (press again to abandon it)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s"


def progress_line(row: dict, cfg: Config, seconds_per_step: float) -> str:
    """One line of progress: step, losses, learning rate, speed and time left."""
    losses = (f"step {row['step']:>5}/{cfg.max_iters} | train {row['train_loss']:.4f} | "
              f"val {row['val_loss']:.4f} ({row['val_bpb']:.3f} bits/byte) | lr {row['lr']:.2e}")
    if not seconds_per_step:  # nothing timed yet
        return losses
    tokens_per_s = cfg.batch_size * cfg.grad_accum_steps * cfg.block_size / seconds_per_step
    eta = (cfg.max_iters - row["step"]) * seconds_per_step  # training steps only, not evaluations
    return (f"{losses} | {1000 * seconds_per_step:5.1f} ms/iter | {tokens_per_s:7,.0f} tok/s | "
            f"ETA {format_duration(eta)}")


def prepare_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"  # one per process: torchrun starts several
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out-dir {out_dir} ({e.strerror}): choose another directory") from None
    return out_dir


def write_history(path: Path, history: list) -> None:
    """Write the whole loss history as CSV (atomically: a reader never sees half a file)."""
    def write(f):
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in history)
        text.detach()  # flush into f, and leave f open for atomic_write to close
    write_output(path, write)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to the device; to a GPU through pinned memory, without waiting for the copy."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def resume_checkpoint(out_dir: Path, text: str) -> dict:
    """The latest checkpoint of the run in out_dir, checked against the training text."""
    checkpoint = read_checkpoint(Path(out_dir) / "latest.pt")
    if checkpoint.get("data_sha256") != hashlib.sha256(text.encode("utf-8")).hexdigest():
        raise UserError(f"the training text differs from the one the run in {out_dir} was trained on: "
                        "pass the same --data, or start a new run without --resume")
    return checkpoint


def train(cfg: Config, text: str, out_dir: Path = Path("out"), log: Callable = print,
          resume: bool = False) -> TrainResult:
    """Train a GPT on `text` (or continue the run in out_dir); writes history.csv, ckpt.pt, latest.pt."""
    out_dir = prepare_out_dir(out_dir)
    checkpoint = resume_checkpoint(out_dir, text) if resume else None
    if checkpoint is not None:
        try:
            cfg = Config(**checkpoint["config"])  # a resumed run keeps its configuration
        except TypeError:
            raise UserError(f"{out_dir / 'latest.pt'} comes from another version of llm.py: "
                            "start a new run without --resume") from None
    cfg.validate()
    env = start_distributed(cfg)
    device = process_device(cfg, env)
    set_seed(cfg.seed)
    log = log if env.is_main else (lambda *_: None)

    train_text, val_text = split_train_val(text)
    if checkpoint is not None:
        tokenizer = tokenizer_from_state(checkpoint["tokenizer"])
    else:
        tokenizer = make_tokenizer(cfg.tokenizer, cfg.vocab_size, text, train_text)
    train_data, val_data = (torch.tensor(tokenizer.encode(t), dtype=torch.long) for t in (train_text, val_text))
    val_bytes_per_token = len(val_text.encode("utf-8")) / len(val_data)
    val_chars_per_token = len(val_text) / len(val_data)
    eval_batches = {"train": fixed_batches(train_data, cfg, cfg.seed + 1),
                    "val": fixed_batches(val_data, cfg, cfg.seed + 2)}
    batch_generator = torch.Generator().manual_seed(cfg.seed)

    model = GPT(cfg, tokenizer.vocab_size).to(device)
    optimizer = configure_optimizer(model, cfg)
    history, best_val, first_step = [], float("inf"), 0
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            restore_rng_states(checkpoint["rng"], batch_generator)
            history, first_step = checkpoint["history"], checkpoint["step"]
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise UserError(f"{out_dir / 'latest.pt'} cannot be resumed ({type(e).__name__}): it comes from "
                            "another version or was edited; start a new run without --resume") from None
        best_val = min((row["val_loss"] for row in history if row["step"] > 0), default=float("inf"))
        log(f"resuming {out_dir / 'latest.pt'} at step {first_step}")
    trained = torch.compile(model) if cfg.compile else model
    if env.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    log(f"{model.num_parameters():,} parameters, vocabulary of {tokenizer.vocab_size}, "
        f"{len(train_data):,} training tokens, device {device}"
        + (f", {env.world_size} processes" if env.world_size > 1 else ""))

    data_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()

    def save(path: Path, step: int) -> None:
        save_checkpoint(path, model, optimizer, tokenizer, step, best_val, batch_generator, history, data_sha256)

    seconds_before = history[-1]["elapsed_s"] if history else 0.0
    start = time.perf_counter()
    train_seconds, steps_timed = 0.0, 0
    with stop_flag_on_ctrl_c() as ctrl_c:
        for step in range(first_step, cfg.max_iters + 1):
            due = step % cfg.eval_interval == 0 or step == cfg.max_iters
            if due and env.is_main and not (history and history[-1]["step"] == step):  # (done before a resume)
                val_loss = estimate_loss(model, eval_batches["val"], device)
                history.append({"step": step, "train_loss": estimate_loss(model, eval_batches["train"], device),
                                "val_loss": val_loss, "val_bpb": val_loss / math.log(2) / val_bytes_per_token,
                                "val_bpc": val_loss / math.log(2) / val_chars_per_token,
                                "lr": lr_at(min(step, cfg.max_iters - 1), cfg),
                                "elapsed_s": seconds_before + time.perf_counter() - start})
                write_history(out_dir / "history.csv", history)
                log(progress_line(history[-1], cfg, train_seconds / max(1, steps_timed)))
                if step > 0:
                    if val_loss < best_val:
                        best_val = val_loss
                        save(out_dir / "ckpt.pt", step)
                    save(out_dir / "latest.pt", step)
            if step == cfg.max_iters:
                break
            if ctrl_c["stop"]:
                if step == 0:
                    raise TrainingInterrupted("stopped before the first training step; nothing was saved")
                if env.is_main and not due:  # (if an evaluation was due, it has just saved)
                    save(out_dir / "latest.pt", step)
                raise TrainingInterrupted(f"stopped at step {step}; saved {out_dir / 'latest.pt'}. Continue with: "
                                          f"python llm.py train --resume --out-dir {out_dir}")
            t0 = time.perf_counter()
            micro = [get_batch(train_data, cfg.block_size, cfg.batch_size, batch_generator)
                     for _ in range(cfg.grad_accum_steps)]  # every process draws all of them...
            mine = [(to_device(x, device), to_device(y, device)) for x, y in micro[env.rank::env.world_size]]  # ...and keeps its share
            loss = train_step(trained, optimizer, mine, lr_at(step, cfg), cfg)
            if not math.isfinite(loss):
                saved = f"the last good checkpoint is {out_dir / 'latest.pt'}" if (out_dir / "latest.pt").exists() \
                    else "nothing was saved yet"
                raise UserError(f"the training loss became {loss} at step {step}; {saved}: "
                                "lower --learning-rate or --grad-clip and train again")
            train_seconds, steps_timed = train_seconds + time.perf_counter() - t0, steps_timed + 1
    return TrainResult(model, tokenizer, history, seconds_before + time.perf_counter() - start)


# %% [markdown]
# Now we train for real. The notebook trains the default model for 1000 steps, a third of the
# command line's quick run (about 40 seconds on a laptop CPU), so that the whole notebook runs in a few
# minutes; `python llm.py train` trains the full default configuration.

# %%
if IN_NOTEBOOK:
    notebook_cfg = Config(max_iters=1000, eval_interval=100)
    result = train(notebook_cfg, text, out_dir=Path("out") / "notebook")
    print(f"trained in {result.seconds:.0f} s; final validation loss {result.history[-1]['val_loss']:.3f}")

# %% [markdown]
# ### What training did
#
# **The loss curves.** Both losses start at ln(65) ≈ 4.17 and fall fast while the model learns
# which characters are common, then which follow which, then whole words. The validation loss
# stays above the training loss: the validation text is unseen, so it measures generalisation.
# A widening gap between the two would mean memorisation (overfitting).

# %%
def plot_losses(history: list, title: str = "Training and validation loss"):
    steps = [row["step"] for row in history]
    fig, ax = new_figure(figsize=(9, 5))
    ax.plot(steps, [row["train_loss"] for row in history], marker=".", label="train")
    ax.plot(steps, [row["val_loss"] for row in history], marker=".", label="validation")
    ax.set(title=title, xlabel="step", ylabel="cross-entropy loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


# %%
if IN_NOTEBOOK:
    plot_losses(result.history)
    plt.show()

# %% [markdown]
# **Attention after training.** Below is every head of every layer reading the first line of the
# validation text, which the model has never seen. Each row is a query position and shows where
# that character looked. Look for heads with a bright stripe just left of the diagonal: they
# attend to the *previous* character, the most useful single fact for guessing the next one.
# Other heads light up columns at spaces (␣) and line breaks (↵): they track where the current
# word or line began. Which head does which job changes from run to run; the kinds recur.

# %%
def plot_attention_maps(model: GPT, tokenizer: Tokenizer, line: str):
    """Every head of every layer (rows: layers, columns: heads) attending over `line`."""
    device = next(model.parameters()).device
    token_ids = tokenizer.encode(line)[:model.cfg.block_size]
    tokens = [tokenizer.decode([i]) for i in token_ids]
    with evaluating(model):
        _, _, weights = model(torch.tensor([token_ids], device=device), return_weights=True)  # n_layer x (1, H, T, T)
    n_layer, n_head = len(weights), weights[0].shape[1]
    fig, axes = new_figure(n_layer, n_head, figsize=(4 * n_head, 4 * n_layer), squeeze=False)
    for layer in range(n_layer):
        for head in range(n_head):
            plot_attention_heatmap(axes[layer][head], weights[layer][0, head], tokens,
                                   f"layer {layer + 1}, head {head + 1}", fontsize=7)
    fig.suptitle("Attention weights after training (row: query, column: key)", fontsize=16)
    fig.tight_layout()
    return fig


def attention_demo_line(val_text: str, block_size: int, max_chars: int = 40) -> str:
    """The first whole line(s) of the validation text, short enough to label every character."""
    start = val_text.find("\n") + 1  # skip the partial line the 90% cut may leave at the start
    line = val_text[start:].lstrip("\n") or val_text  # (a text with no later line: use it all)
    return line[:min(block_size, max_chars)]


# %%
if IN_NOTEBOOK:
    plot_attention_maps(result.model, result.tokenizer, attention_demo_line(val_text, notebook_cfg.block_size))
    plt.show()

# %% [markdown]
# **The embeddings.** Each character's learned vector has 128 numbers; projecting them onto their
# two directions of greatest variance (principal components) gives a map. Characters the model
# treats alike end up near each other: typically upper-case letters separate from lower-case
# ones (they occur in different places: names and line starts), the lower-case vowels sit
# together, and rare symbols such as `$` and `&` drift off on their own.

# %%
def plot_embeddings_2d(model: GPT, tokenizer: Tokenizer):
    table = model.embed.token.weight.detach().cpu()  # (V, C)
    centered = table - table.mean(0)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)
    xy = centered @ v[:2].T  # (V, 2): coordinates along the two main directions
    kinds = {"vowel": "aeiouAEIOU", "upper": "BCDFGHJKLMNPQRSTVWXYZ", "lower": "bcdfghjklmnpqrstvwxyz"}
    fig, ax = new_figure(figsize=(9, 8))
    tokens = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    for i, ch in enumerate(tokens):
        kind = next((k for k, members in kinds.items() if ch in members), "other")
        color = {"vowel": "tab:red", "upper": "tab:blue", "lower": "tab:green", "other": "tab:gray"}[kind]
        ax.text(xy[i, 0].item(), xy[i, 1].item(), visible(ch), color=color, fontsize=14, ha="center", va="center")
    ax.set_xlim(xy[:, 0].min() - 0.05, xy[:, 0].max() + 0.05)
    ax.set_ylim(xy[:, 1].min() - 0.05, xy[:, 1].max() + 0.05)
    ax.set(title="Character embeddings, first two principal components\n"
                 "(red: vowels, blue: upper-case consonants, green: lower-case consonants)",
           xlabel="component 1", ylabel="component 2")
    return fig


# %%
if IN_NOTEBOOK:
    plot_embeddings_2d(result.model, result.tokenizer)
    plt.show()

# %% [markdown]
# ## 10. Classic versus modern, measured
#
# Section 8 claimed that the `llama` switches beat the `gpt2` ones in the quick run. Here the
# notebook measures it again, on whatever machine runs it. A fair race gives both the same
# **time**, not the same number of steps: a slower architecture should pay for its slowness. So
# we first time a few training steps of each configuration, give it as many steps as fit in the
# budget, and scale its learning-rate schedule to that length (warmup for the first 1/30 of the
# steps, as in the quick run). The budget covers the training steps; evaluations come on top.

# %%
def synchronize(device: torch.device) -> None:
    """Wait for the device to finish its queued work, so that timings measure the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seconds_per_step(cfg: Config, vocab_size: int, probe_steps: int = 20) -> tuple[float, GPT]:
    """Median time of one training step of `cfg` on this machine (random tokens of the real
    shapes: speed does not depend on the text), and the model it was measured with."""
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    model = GPT(cfg, vocab_size).to(device)
    optimizer = configure_optimizer(model, cfg)
    x = torch.randint(vocab_size, (cfg.batch_size, cfg.block_size), device=device)
    batches = [(x, x)] * cfg.grad_accum_steps
    for _ in range(3):  # untimed: the first steps allocate memory and pick kernels
        train_step(model, optimizer, batches, cfg.learning_rate, cfg)
    times = []
    for _ in range(probe_steps):
        synchronize(device)
        start = time.perf_counter()
        train_step(model, optimizer, batches, cfg.learning_rate, cfg)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], model  # the median resists the odd slow step


def train_for(cfg: Config, text: str, seconds: float, out_dir: Path, n_evals: int = 8) -> dict:
    """Train `cfg` for about `seconds` of training steps; returns a summary row for a table."""
    vocab_size = cfg.vocab_size if cfg.tokenizer == "bpe" else len(set(text))
    per_step, _ = seconds_per_step(cfg, vocab_size)
    steps = max(10, int(seconds / per_step))
    cfg = dataclasses.replace(cfg, max_iters=steps, warmup_iters=max(1, steps // 30),
                              eval_interval=max(1, steps // n_evals))
    result = train(cfg, text, out_dir, log=lambda *_: None)  # quiet: the table says it all
    return {"parameters": result.model.num_parameters(), "steps": steps,
            "tokens_per_s": cfg.batch_size * cfg.grad_accum_steps * cfg.block_size / per_step,
            "val_loss": result.history[-1]["val_loss"], "val_bpb": result.history[-1]["val_bpb"],
            "history": result.history}


def print_table(rows: dict) -> None:
    print(f"{'':24} {'parameters':>10} {'steps':>6} {'tokens/s':>9} {'val loss':>9} {'bits/byte':>9}")
    for name, row in rows.items():
        print(f"{name:24} {row['parameters']:>10,} {row['steps']:>6} {row['tokens_per_s']:>9,.0f} "
              f"{row['val_loss']:>9.3f} {row['val_bpb']:>9.3f}")


def plot_val_curves(rows: dict, title: str, metric: str = "val_loss", ylabel: str = "validation loss (nats)"):
    fig, ax = new_figure(figsize=(9, 5))
    for name, row in rows.items():
        history = row["history"]
        ax.plot([r["elapsed_s"] for r in history], [r[metric] for r in history], marker=".", label=name)
    ax.set(title=title, xlabel="seconds (training and evaluation)", ylabel=ylabel)
    ax.set_ylim(top=min(ax.get_ylim()[1], 1.5 * min(r[metric] for row in rows.values() for r in row["history"])))
    # (the cap keeps the first evaluations, far above the rest, from squashing the interesting part)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


# %%
if IN_NOTEBOOK:
    race = {arch: train_for(preset(arch), text, 15, Path("out") / "notebook" / arch) for arch in ARCHITECTURES}
    print_table(race)
    plot_val_curves(race, "gpt2 and llama presets, 15 seconds of training each")
    plt.show()

# %% [markdown]
# **One switch at a time.** Which of the five changes matters? Starting from the classic `gpt2`
# set, we flip one switch at a time and train each variant for the same short budget. Eight
# seconds is only a couple of hundred steps, so this measures how fast each variant learns early
# on, and differences of a few hundredths are within run-to-run noise; the full quick run is the
# final word. In our runs on a 2-core machine, rotary positions gave the one consistent gain
# (0.15–0.2 lower loss in earlier runs with 10- and 12-second budgets). The other switches moved
# the loss up or down by about as much as the noise between runs; what they buy shows elsewhere
# — grouped keys/values and dropped biases in memory and speed, SwiGLU at larger scale (where
# the Llama and PaLM papers measured it).

# %%
ABLATION = {"gpt2 (classic)": {}, "+ rope": {"pos_encoding": "rope"}, "+ rmsnorm": {"norm": "rmsnorm"},
            "+ swiglu": {"mlp": "swiglu"}, "+ 2 key/value heads": {"n_kv_head": 2}, "+ no biases": {"bias": False}}

# %%
if IN_NOTEBOOK:
    ablation = {}
    for i, (name, switch) in enumerate(ABLATION.items()):
        ablation[name] = train_for(preset("gpt2", **switch), text, 8, Path("out") / "notebook" / f"ablation{i}", n_evals=1)
    print_table(ablation)

# %% [markdown]
# **Characters or BPE?** A loss in nats *per token* cannot compare the two tokenizers: a BPE
# token carries about two characters, so predicting it is harder, and its loss is higher even
# when the model is better. The fair unit is **bits per byte**: the loss per token, converted to
# bits (divide by ln 2), divided by the number of UTF-8 bytes per token of the validation text.
# It is the number of bits the model would need to compress the text, per byte — whatever the
# tokenizer. (Bits per character divides by characters instead; for plain English text the two
# are equal.) Both models train for the same time with the default architecture. In our run BPE
# reached the lower bits per byte: each of its steps covers about twice as much text, which
# outweighs the harder prediction and the larger output layer; the curves below are this run's.

# %%
if IN_NOTEBOOK:
    tokenizers = {"char": train_for(Config(tokenizer="char"), text, 15, Path("out") / "notebook" / "char"),
                  "bpe, 512 tokens": train_for(Config(tokenizer="bpe"), text, 15, Path("out") / "notebook" / "bpe")}
    print_table(tokenizers)
    plot_val_curves(tokenizers, "Character vs BPE tokenizer, 15 seconds of training each",
                    metric="val_bpb", ylabel="validation bits per byte")
    plt.show()

# %% [markdown]
# ## 11. Sampling
#
# A trained model gives, for any context, a probability for every possible next token. To write,
# we pick one token, append it to the context, and repeat. *How* we pick changes the text a lot,
# so the choice is made by small functions over the logits that compose:
#
# * **Temperature** $\tau$ divides the logits before the softmax: $p_i \propto e^{z_i/\tau}$.
#   $\tau < 1$ sharpens the distribution (safer, more repetitive), $\tau > 1$ flattens it (more
#   surprising, more mistakes). As $\tau \to 0$ all the probability goes to the largest logit, so
#   we define $\tau = 0$ as **greedy** decoding: always take the most likely token.
# * **Top-k** keeps only the k most likely tokens, so the long tail of unlikely tokens — each
#   improbable, but many of them — can never be drawn.
# * **Top-p** (nucleus sampling, Holtzman et al. 2019) keeps the smallest set of most likely
#   tokens whose probabilities add up to at least p. Unlike top-k it adapts: few candidates when
#   the model is sure, many when it is not. The most likely token is always kept.
#
# Filtered-out tokens get logit $-\infty$, hence probability exactly 0.

# %%
def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None,
                        vocab_size: int | None = None) -> None:
    if not (temperature >= 0):  # also rejects NaN
        raise UserError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k is not None and (top_k < 1 or (vocab_size is not None and top_k > vocab_size)):
        limit = f" and at most the vocabulary size {vocab_size}" if vocab_size else ""
        raise UserError(f"--top-k must be at least 1{limit}, got {top_k}")
    if top_p is not None and not (0 < top_p <= 1):
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits in the last dimension (and any tied with the k-th); -inf the rest."""
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to at least p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = F.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of all more likely tokens
    drop_sorted = mass_before >= p  # already reached p without this token; never the first one
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token id from logits (..., V): greedy when temperature is 0."""
    check_sampling_args(temperature, top_k, top_p, logits.shape[-1])
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(probs.shape[:-1])


# %%
if IN_NOTEBOOK:
    # NBVAL_CHECK_OUTPUT
    toy = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    for p in (0.6, 0.85, 1.0):
        print(f"top-p {p}: keeps", F.softmax(top_p_filter(toy, p), -1).numpy().round(3))
    print("top-k 2 :  keeps", F.softmax(top_k_filter(toy, 2), -1).numpy().round(3))
    print("temperature 0 picks token", sample_next(toy, temperature=0).item())

# %% [markdown]
# Generation feeds the model its own output, one token at a time. With the **KV cache** from
# section 6, the prompt is run through the model once (the *prefill*), filling the cache; after
# that each step runs only the one new token, whose query attends to all the cached keys: the
# projections and the MLP no longer grow with the context, only the (small) attention does.
#
# **Past `block_size`.** The model knows positions 0 to `block_size − 1` only. When the context is
# full we keep its last half and **prefill again** from there, so the window starts at position 0
# once more, then continue step by step until it is full again. Simply dropping the oldest cached
# entry would not be the same thing: every cached key was computed while its token could still
# see tokens that have now left the window (through the layers below), and with learned or
# sinusoidal encodings every position would shift by one. Re-prefilling is exact for every
# positional scheme, and costs one prefill per `block_size / 2` tokens. Without the cache
# (`use_cache=False`) the model recomputes the same window at every step; a test checks that the
# two give the same logits at every position.
#
# `generate` is a Python generator that *yields* each new token as soon as it exists, so the
# command line can print text as it comes. Sampling uses its own seeded `torch.Generator`: the
# same seed gives the same text.

# %%
def generate(model: GPT, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[int]:
    """An iterator over `max_new_tokens` token ids, each sampled after the prompt and the tokens
    before it. The arguments are checked here, at the call, not at the first token."""
    check_sampling_args(temperature, top_k, top_p, model.lm_head.out_features)
    if not prompt_ids:
        raise UserError("the prompt is empty: give at least one character with --prompt")
    if max_new_tokens < 0:
        raise UserError(f"the number of tokens to generate must not be negative, got {max_new_tokens}")
    return _generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator, use_cache)


def next_token_logits(model: GPT, ids: list[int], window_start: int, cache: KVCache | None) -> torch.Tensor:
    """Logits (1, V) for the token after ids[window_start:]; with a cache, only the newest token
    is run (a prefill happens when the cache is empty)."""
    device = next(model.parameters()).device
    if cache is None:
        context = ids[window_start:]
    else:
        context = ids[window_start + cache.position:]  # the tokens the cache has not seen yet
    logits, _ = model(torch.tensor([context], device=device), cache=cache)  # (1, T, V)
    return logits[:, -1, :]


def _generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator, use_cache):
    ids = list(prompt_ids)
    block_size = model.cfg.block_size
    window_start = max(0, len(ids) - block_size)  # the context is ids[window_start:]
    cache = KVCache(model.cfg.n_layer) if use_cache else None
    for _ in range(max_new_tokens):
        if len(ids) - window_start > block_size:  # the window is full: keep its last half
            window_start = len(ids) - max(1, block_size // 2)
            cache = KVCache(model.cfg.n_layer) if use_cache else None  # and prefill again
        with evaluating(model):  # per token, so that nothing leaks to the caller between tokens
            logits = next_token_logits(model, ids, window_start, cache)  # (1, V)
            next_id = sample_next(logits, temperature, top_k, top_p, generator).item()
        ids.append(next_id)
        yield next_id


def seeded_generator(model: nn.Module, seed: int) -> torch.Generator:
    """A random generator on the model's device, seeded: the same seed gives the same text."""
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed)


def stream_text(model: GPT, tokenizer: Tokenizer, prompt: str, num_chars: int, seed: int = 1337,
                **sampling) -> Iterator[str]:
    """Yield the continuation of `prompt`, piece by piece, until it has `num_chars` characters.

    A BPE token may end in the middle of a multi-byte character, so bytes go through an
    incremental UTF-8 decoder, which holds a partial character back until the rest arrives.
    Each token adds at least one byte and a character has at most 4, so 4 * num_chars tokens
    always suffice; we stop as soon as there are enough characters."""
    if num_chars < 0:
        raise UserError(f"--num-chars must not be negative, got {num_chars}")
    new_ids = generate(model, tokenizer.encode(prompt), 4 * num_chars, generator=seeded_generator(model, seed),
                       **sampling)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    remaining = num_chars
    while remaining > 0:
        piece = decoder.decode(tokenizer.token_bytes(next(new_ids)))[:remaining]
        remaining -= len(piece)
        yield piece


def generate_text(model: GPT, tokenizer: Tokenizer, prompt: str, num_chars: int,
                  seed: int = 1337, **sampling) -> str:
    """The prompt followed by `num_chars` sampled characters (seeded)."""
    return prompt + "".join(stream_text(model, tokenizer, prompt, num_chars, seed, **sampling))


# %% [markdown]
# Here is what the filters do to the trained model's real prediction. Given the context below,
# the bars show the probability of the most likely next characters: low temperature piles the
# mass onto the favourite, high temperature spreads it over more candidates, and top-k and top-p
# cut the tail off completely.

# %%
def plot_next_token_distributions(model: GPT, tokenizer: Tokenizer, context: str,
                                  top_k: int = 3, top_p: float = 0.9, n_bars: int = 12):
    device = next(model.parameters()).device
    with evaluating(model):
        logits, _ = model(torch.tensor([tokenizer.encode(context)], device=device))
    logits = logits[0, -1].cpu()  # (V,) scores for the character after the context
    shown = torch.topk(logits, n_bars).indices  # the most likely characters, best first
    panels = [("temperature 0.5", logits / 0.5), ("temperature 1", logits), ("temperature 2", logits / 2),
              (f"top-k, k = {top_k}", top_k_filter(logits, top_k)),
              (f"top-p, p = {top_p}", top_p_filter(logits, top_p)),
              ("greedy (temperature 0)", top_k_filter(logits, 1))]
    fig, axes = new_figure(2, 3, figsize=(16, 8), sharey=True)
    for ax, (title, panel_logits) in zip(axes.flat, panels):
        probs = F.softmax(panel_logits, dim=-1)[shown]
        ax.bar(range(n_bars), probs, color="tab:blue")
        ax.set_xticks(range(n_bars), [visible(tokenizer.decode([i])) for i in shown], fontsize=13)
        ax.set_title(title)
        ax.set_ylim(0, 1)
    for ax in axes[:, 0]:
        ax.set_ylabel("probability")
    fig.suptitle(f"Next-character probabilities after {context!r}", fontsize=16)
    fig.tight_layout()
    return fig


# %%
if IN_NOTEBOOK:
    plot_next_token_distributions(result.model, result.tokenizer, "ROMEO:\nWhat say")
    plt.show()

# %% [markdown]
# And finally, the trained model writes:

# %%
if IN_NOTEBOOK:
    print(generate_text(result.model, result.tokenizer, "ROMEO:\n", 400, temperature=0.8))

# %% [markdown]
# **One thread for one token.** One token's operations are too small to gain much from being
# split across threads, yet each split operation still waits for its slowest thread, and on a
# busy core that wait is long (section 1). Measured on the 2-core machine (the quick-run model,
# 2000 tokens with the KV cache): on an idle machine, two threads gave 1,165 tokens/s and one
# thread 1,143; with another program keeping one core busy, two threads fell to 330 tokens/s
# while one thread kept 1,106. A second thread buys a few percent at best and costs a factor of
# three at worst, so `sample` uses one thread unless `--threads` says otherwise.

# %%
SAMPLING_THREADS = 1  # the thread count of `python llm.py sample` (and of bench's sampling figures)


# %% [markdown]
# ### Measuring speed
#
# `python llm.py bench` measures this machine running this model (any `--arch`, `--size`,
# `--device`, `--threads` or configuration option applies, except `--compile`) and prints:
#
# * **training ms/iter and tokens/s**: the time of one optimiser step on random tokens of the
#   configured shape (speed does not depend on the text), median of several timed runs;
# * **FLOPs per token**: training costs about $6N$ floating-point operations per token for the
#   $N$ parameters that take part in matrix multiplications (2 per multiply-add in the forward
#   pass, twice that in the backward pass), plus $12 \cdot L \cdot C \cdot T$ for attention
#   itself (queries times keys and weights times values, forward and backward; the formula of
#   the PaLM paper). Lookup tables such as learned positions cost no multiplications;
# * **achieved GFLOP/s** = FLOPs per token × tokens/s, and that as a fraction of the **matmul
#   peak**, measured by the same command as the speed of one large (2048 × 2048) matrix product:
#   the most this machine does with PyTorch on ideal work;
# * **sampling tokens/s** with and without the KV cache, generating 2000 tokens from a single
#   token, on the threads `sample` uses;
# * **peak memory** of the process (resident set on a CPU, allocated tensors on a GPU), and the
#   device with its thread counts (`--threads` sets both).

# %%
def matmul_peak_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the best of a few n x n matrix products (float32; bfloat16 on a GPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource  # the largest resident set of this process so far (not on Windows)
    except ImportError:
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # macOS: bytes; Linux: KiB


def benchmark(cfg: Config, vocab_size: int, steps: int = 20, sample_tokens: int = 2000, threads: int = 0) -> dict:
    """Training and sampling speed of `cfg` on this machine; see the list above. With threads 0,
    each part runs on the threads its command uses by default."""
    device = pick_device(cfg.device)
    with using_threads(threads):
        per_step, model = seconds_per_step(cfg, vocab_size, steps)
        training_threads = torch.get_num_threads()
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.block_size
    matmul_params = model.num_parameters() - (cfg.block_size * cfg.n_embd if cfg.pos_encoding == "learned" else 0)
    flops_per_token = 6 * matmul_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    model.eval()  # as `sample` loads it
    sampling = {}
    with using_threads(threads or SAMPLING_THREADS):
        sampling_threads = torch.get_num_threads()
        for use_cache in (True, False):
            tokens = generate(model, [0], sample_tokens, generator=seeded_generator(model, 0), use_cache=use_cache)
            synchronize(device)
            start = time.perf_counter()
            for _ in tokens:
                pass
            synchronize(device)
            sampling[use_cache] = sample_tokens / (time.perf_counter() - start)
    with using_threads(threads):
        peak = matmul_peak_gflops(device)
    achieved = flops_per_token * tokens_per_step / per_step / 1e9
    threads_used = f" ({training_threads} threads training, {sampling_threads} sampling)"
    return {"device": f"{device}{threads_used if device.type == 'cpu' else ''}",
            "parameters": f"{model.num_parameters():,}",
            "training ms/iter": f"{1000 * per_step:.1f}",
            "training tokens/s": f"{tokens_per_step / per_step:,.0f}",
            "FLOPs per token (6N + 12LCT)": f"{flops_per_token / 1e6:.2f} M",
            "achieved GFLOP/s": f"{achieved:.1f}",
            "matmul peak GFLOP/s (2048^2)": f"{peak:.1f}",
            "fraction of matmul peak": f"{achieved / peak:.0%}",
            "sampling tokens/s, KV cache": f"{sampling[True]:,.0f}",
            "sampling tokens/s, no cache": f"{sampling[False]:,.0f}",
            "KV cache speed-up": f"{sampling[True] / sampling[False]:.1f}x",
            "peak memory": f"{peak_memory_mib(device):,.0f} MiB"}


# %% [markdown]
# **Where the time of a sampled token goes.** On one thread of the 2-core machine, a token of the
# quick-run model takes about 0.9 ms with the KV cache. Its arithmetic is tiny: a forward pass
# costs about $2N \approx 1.5$ million floating-point operations per token, under 10 µs even at
# one core's share of the matmul peak that `bench` measures (about 330 GFLOP/s on both cores).
# The rest is overhead. One token passes through about 165 separate tensor operations (counted
# by intercepting every call to a torch function during one step): 17 matrix products, 4
# attentions, and the small multiplications, additions, reshapes and splits around them.
# PyTorch spends microseconds launching each one — about 8 µs for a linear layer applied to one
# token, 1 to 2 µs for an element-wise product — plus Python's cost for every module call. So
# generation gets faster by doing *fewer* operations, not faster ones. Measured one after
# another (tokens/s on one thread, median of three runs of five), each change in the code above
# that removes operations:
#
# | change | tokens/s |
# |---|---|
# | before: a mask even for one new query; RoPE pair by pair, queries and keys apart | 918 |
# | no mask for a single new query (section 6) | 994 |
# | RoPE with precomputed tables, queries and keys in one call (section 6) | 1,095 |
# | SwiGLU's two widening matrices as one (section 7) | 1,071 (no measurable change) |
# | an identity instead of `Dropout(0)` (section 5) | 1,161 |
#
# `torch.compile` of the one-token step (with fixed shapes) reached about 2,000 tokens/s, after
# 8 s of compiling — longer than generating 2000 characters takes without it, so the sampler
# does not use it. The cache itself saves recomputing the whole window at every step: about 2×
# faster here, with 64 tokens of context, and more with longer contexts, since recomputing grows
# with the context and a cached step barely does.

# %% [markdown]
# ## 12. The command line
#
# `python llm.py train` and `python llm.py sample` drive the same functions as the notebook.
# Every `Config` field becomes an option of `train` (`n_layer` → `--n-layer`), typed like its
# default and documented by its one-line explanation, so the help can never drift from the code.

# %%
def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "yes", "1", "on"):
        return True
    if text.lower() in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Config):
        kind = type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                            type=parse_bool if kind is bool else kind, metavar=kind.__name__.upper(),
                            help=f"{f.metadata['help']} (default: {f.default})")


def add_threads_option(parser: argparse.ArgumentParser, default: int, note: str = "") -> None:
    parser.add_argument("--threads", type=int, default=default,
                        help=f"CPU threads for PyTorch; 0: one per core{note} (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm.py", description="Train a small GPT on text, then sample from it.",
        epilog="Quick start: `python llm.py train` (about two minutes on a CPU), then `python llm.py sample`.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,tokenize,bench}")

    train_p = commands.add_parser("train", help="train a model and save it to OUT_DIR/ckpt.pt",
                                  description="Train a GPT; every Config field is an option.")
    train_p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                         help=f"UTF-8 text file to learn from (default: {DEFAULT_DATA}, downloaded if missing)")
    train_p.add_argument("--out-dir", type=Path, default=Path("out"),
                         help="where ckpt.pt and history.csv are written (default: out)")
    train_p.add_argument("--resume", action="store_true",
                         help="continue the run saved in OUT_DIR/latest.pt (its configuration is kept)")
    train_p.add_argument("--size", choices=list(SIZES), default="cpu",
                         help="cpu: the quick run (default); gpu: a 10M-parameter model for a GPU")
    train_p.add_argument("--arch", choices=list(ARCHITECTURES), default=DEFAULT_ARCH,
                         help="a preset of architecture switches, applied before the options below "
                              f"(default: {DEFAULT_ARCH})")
    add_threads_option(train_p, 0)
    add_config_options(train_p)

    sample_p = commands.add_parser("sample", help="generate text from OUT_DIR/ckpt.pt",
                                   description="Generate text with a model trained by `train`.")
    sample_p.add_argument("--out-dir", type=Path, default=Path("out"),
                          help="directory holding ckpt.pt (default: out)")
    sample_p.add_argument("--prompt", default=None,
                          help="text to continue (default: a newline, or the first vocabulary character)")
    sample_p.add_argument("--num-chars", type=int, default=500, help="characters to generate (default: 500)")
    sample_p.add_argument("--temperature", type=float, default=0.8,
                          help="below 1 is safer, above 1 wilder, 0 is greedy (default: 0.8)")
    sample_p.add_argument("--top-k", type=int, default=None, help="sample only from the K most likely tokens")
    sample_p.add_argument("--top-p", type=float, default=None,
                          help="sample only from the most likely tokens that cover probability P")
    sample_p.add_argument("--seed", type=int, default=1337, help="seed of the sampler (default: 1337)")
    sample_p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    add_threads_option(sample_p, SAMPLING_THREADS)

    tokenize_p = commands.add_parser("tokenize", help="show how a text splits into tokens",
                                     description="Print the tokens of TEXT: with the tokenizer of a trained "
                                                 "model (--out-dir), or with BPE trained on --data.")
    tokenize_p.add_argument("text", help="the text to split")
    tokenize_p.add_argument("--out-dir", type=Path, default=None,
                            help="use the tokenizer saved in OUT_DIR/ckpt.pt")
    tokenize_p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                            help=f"text to train a BPE tokenizer on (default: {DEFAULT_DATA})")
    tokenize_p.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size (default: 512)")

    bench_p = commands.add_parser("bench", help="measure training and sampling speed on this machine",
                                  description="Print training and sampling speed, FLOP/s against this "
                                              "machine's matmul peak, and memory. Config options apply.")
    bench_p.add_argument("--size", choices=list(SIZES), default="cpu", help="model size preset (default: cpu)")
    bench_p.add_argument("--arch", choices=list(ARCHITECTURES), default=DEFAULT_ARCH,
                         help=f"a preset of architecture switches (default: {DEFAULT_ARCH})")
    bench_p.add_argument("--steps", type=int, default=20, help="timed training steps (default: 20)")
    add_threads_option(bench_p, 0, f"; with 0, sampling uses {SAMPLING_THREADS} as `sample` does")
    bench_p.add_argument("--sample-tokens", type=int, default=2000,
                         help="tokens generated for each sampling figure (default: 2000)")
    add_config_options(bench_p)
    return parser


def config_overrides(args: argparse.Namespace) -> dict:
    """The Config fields given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}


def command_train(args: argparse.Namespace) -> None:
    overrides = config_overrides(args)
    if args.resume and overrides:
        names = ", ".join(f"--{name.replace('_', '-')}" for name in overrides)
        raise UserError(f"--resume continues a run with its saved configuration; drop {names}")
    cfg = preset(args.arch, args.size, **overrides)
    cfg.validate()  # before reading data, so a bad option fails fast
    with using_threads(args.threads):
        text = load_text(args.data)
        result = train(cfg, text, args.out_dir, resume=args.resume)
    if "RANK" in os.environ:  # under torchrun: leave the process group; only rank 0 reports
        import torch.distributed as dist
        dist.barrier()  # wait until rank 0 has finished its last evaluation and checkpoint
        dist.destroy_process_group()
        if os.environ["RANK"] != "0":
            return
    final = result.history[-1]
    best = min(row["val_loss"] for row in result.history)
    print(f"done: final val loss {final['val_loss']:.4f} ({final['val_bpb']:.3f} bits/byte; best {best:.4f}) "
          f"after {final['step']} steps "
          f"in {result.seconds:.0f} s; checkpoint {args.out_dir / 'ckpt.pt'}, "
          f"history {args.out_dir / 'history.csv'}")
    write_training_plots(result, split_train_val(text)[1], args.out_dir)
    print("a sample from the final model (temperature 0.8):")
    with using_threads(args.threads or SAMPLING_THREADS):
        print(generate_text(result.model, result.tokenizer, default_prompt(result.tokenizer), 200, temperature=0.8))


def write_training_plots(result: TrainResult, val_text: str, out_dir: Path) -> None:
    """Save loss.png and attention.png to out_dir, drawing off-screen (never opens a window)."""
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return
    matplotlib.use("Agg")  # render to files only, whatever display the machine has
    line = attention_demo_line(val_text, result.model.cfg.block_size)
    save_figure(plot_losses(result.history), out_dir / "loss.png")
    save_figure(plot_attention_maps(result.model, result.tokenizer, line), out_dir / "attention.png")
    print(f"plots: {out_dir / 'loss.png'}, {out_dir / 'attention.png'}")


def default_prompt(tokenizer: Tokenizer) -> str:
    """A newline (the start of a speech, in a play) when the tokenizer knows it, else token 0."""
    try:
        tokenizer.encode("\n")
        return "\n"
    except UserError:
        return tokenizer.decode([0])


def command_sample(args: argparse.Namespace) -> None:
    model, tokenizer, _ = load_checkpoint(args.out_dir / "ckpt.pt", pick_device(args.device))
    prompt = default_prompt(tokenizer) if args.prompt is None else args.prompt
    with using_threads(args.threads):
        pieces = stream_text(model, tokenizer, prompt, args.num_chars, args.seed,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        print(prompt, end="", flush=True)
        for piece in pieces:  # stream: print each piece of text as soon as it is sampled
            print(piece, end="", flush=True)
        print()


def command_tokenize(args: argparse.Namespace) -> None:
    if args.out_dir is not None:
        _, tokenizer, _ = load_checkpoint(args.out_dir / "ckpt.pt")
    else:
        tokenizer = BPETokenizer.train(split_train_val(load_text(args.data))[0], args.vocab_size)
    ids = tokenizer.encode(args.text)
    print(" ".join(repr(tokenizer.decode([i])) for i in ids))
    print(f"{len(ids)} tokens for {len(args.text)} characters ({len(args.text.encode('utf-8'))} bytes); ids: {ids}")


def command_bench(args: argparse.Namespace) -> None:
    cfg = preset(args.arch, args.size, **config_overrides(args))
    cfg.validate()
    if args.steps < 1 or args.sample_tokens < 1:
        raise UserError("--steps and --sample-tokens must be at least 1")
    vocab_size = cfg.vocab_size if cfg.tokenizer == "bpe" else 65  # 65: tiny Shakespeare's characters
    for name, value in benchmark(cfg, vocab_size, args.steps, args.sample_tokens, args.threads).items():
        print(f"{name:30} {value}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the command line; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        commands = {"train": command_train, "sample": command_sample, "tokenize": command_tokenize,
                    "bench": command_bench}
        commands[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one while sampling
        latest = Path(args.out_dir) / "latest.pt" if args.command == "train" else None
        where = f"; the latest checkpoint is {latest}" if latest is not None and latest.exists() else ""
        print(f"\ninterrupted{where}", file=sys.stderr)
        return 130
    return 0


# %%
if __name__ == "__main__" and not IN_NOTEBOOK:
    sys.exit(main())
