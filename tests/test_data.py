"""Data loading, the shipped corpus, the tokenizer and the batch sampler."""
import hashlib

import pytest
import torch

import llm
from conftest import TINY_TEXT


# --- tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_round_trip():
    tok = llm.CharTokenizer.from_text(TINY_TEXT)
    assert tok.decode(tok.encode(TINY_TEXT)) == TINY_TEXT
    assert tok.vocab_size == len(set(TINY_TEXT))
    assert tok.chars == sorted(tok.chars)  # deterministic numbering


def test_unknown_characters_raise_value_error_naming_them():
    tok = llm.CharTokenizer.from_text("abc")
    with pytest.raises(ValueError) as info:
        tok.encode("abxcy☃")
    message = str(info.value)
    for ch in "xy☃":
        assert repr(ch) in message
    assert "'a'" not in message


# --- split and batches -------------------------------------------------------------------------

def test_split_is_first_90_percent_then_last_10():
    items = list(range(1000))
    train, val = llm.split_train_val(items)
    assert train == items[:900] and val == items[900:]


def test_batch_shapes_and_targets_are_inputs_shifted_by_one():
    data = torch.arange(500)  # token i sits at position i, so shifts are visible
    x, y = llm.get_batch(data, block_size=8, batch_size=5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 8) and y.shape == (5, 8)
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_windows_never_cross_the_train_val_boundary():
    data = torch.arange(1000)
    train, val = llm.split_train_val(data)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x, y = llm.get_batch(train, 16, 8, g)
        assert y.max() < len(train)  # targets never reach into validation
        xv, yv = llm.get_batch(val, 16, 8, g)
        assert xv.min() >= len(train)


def test_batches_reach_both_ends_of_the_split():
    data = torch.arange(20)
    g = torch.Generator().manual_seed(0)
    firsts = set()
    for _ in range(300):
        x, y = llm.get_batch(data, 4, 4, g)
        firsts.update(x[:, 0].tolist())
    assert firsts == set(range(20 - 4))  # every window start, including the last possible one


@pytest.mark.parametrize("short_split", ["train", "val"])
def test_split_shorter_than_block_size_is_a_clear_error(short_split):
    # 100 characters: the training split has 90 tokens, the validation split 10.
    text = "abcdefghij" * 10
    tok = llm.CharTokenizer.from_text(text)
    block_size = 90 if short_split == "train" else 10  # a split of exactly block_size tokens
    with pytest.raises(llm.UserError, match="fewer than block_size \\+ 1") as info:
        llm.encode_corpus(text, tok, block_size)
    assert "--block-size" in str(info.value)
    corpus = llm.encode_corpus(text, tok, 9)  # block_size + 1 tokens in each split: just enough
    assert (len(corpus.train_data), len(corpus.val_data)) == (90, 10)
    llm.get_batch(corpus.val_data, block_size=9, batch_size=1)
    with pytest.raises(AssertionError):  # below the user-facing check, too short is a bug
        llm.get_batch(torch.arange(8), block_size=8, batch_size=1)


def test_batches_are_reproducible_with_a_seeded_generator():
    data = torch.arange(1000)
    a = llm.get_batch(data, 8, 4, torch.Generator().manual_seed(7))
    b = llm.get_batch(data, 8, 4, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0])


# --- loading text ------------------------------------------------------------------------------

def test_load_text_reads_utf8(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("naïve café ☃\n", encoding="utf-8")
    assert llm.load_text(path) == "naïve café ☃\n"


@pytest.mark.parametrize("content, kind, expected", [
    (b"", "file", "empty"),
    (b"\xff\xfe\xfa not utf-8", "file", "not UTF-8"),
    (None, "dir", "directory"),
    (None, "missing", "does not exist"),
])
def test_a_bad_text_file_is_one_clear_message(tmp_path, content, kind, expected):
    path = tmp_path / "input"
    if kind == "file":
        path.write_bytes(content)
    elif kind == "dir":
        path.mkdir()
    with pytest.raises(llm.UserError, match=expected):
        llm.read_text(path)


# --- the corpus ships with the program ------------------------------------------------------------

def test_the_default_corpus_is_tiny_shakespeare_as_published():
    from conftest import ROOT
    data = (ROOT / llm.DEFAULT_DATA).read_bytes()
    assert len(data.decode("utf-8")) == 1_115_394
    assert hashlib.sha256(data).hexdigest() == (
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"previous good contents")

    def failing_write(f):
        f.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        llm.atomic_write(path, failing_write)
    assert path.read_bytes() == b"previous good contents"
    assert list(tmp_path.iterdir()) == [path]
