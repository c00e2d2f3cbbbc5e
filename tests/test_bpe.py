"""The byte-level BPE tokenizer, and bits per byte."""
import collections
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llm
from conftest import TINY_TEXT, TINY_TRAIN_OPTIONS, read_history, run_main

SEEN = TINY_TEXT + "Naïve café — 東京タワー! 🙂 e\u0301 \t tab\r\n"


@pytest.fixture(scope="module")
def bpe():
    return llm.BPETokenizer.train(SEEN, vocab_size=400)


def test_the_classic_worked_example():
    tok = llm.BPETokenizer.train("aaabdaaabac", vocab_size=259)
    a, b = ord("a"), ord("b")
    assert tok.merges == [(a, a), (a, b), (256, 257)]  # aa -> Z, ab -> Y, ZY -> X
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, a, ord("c")]  # "XdXac"


def test_ties_go_to_the_smaller_pair():
    tok = llm.BPETokenizer.train("dcba", vocab_size=257)  # three pairs, each seen once
    assert tok.merges == [(ord("b"), ord("a"))]


def naive_train(text, vocab_size):
    """Reference: recount every pair of every chunk after each merge (slow, obviously right)."""
    words = [list(chunk.encode()) for chunk in llm.CHUNK_PATTERN.findall(text)]
    merges = []
    for new_id in range(256, vocab_size):
        counts = collections.Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        merges.append(best)
        words = [llm.merge_pair(w, best, new_id) for w in words]
    return merges


def test_incremental_counting_gives_the_same_merges_as_recounting():
    assert llm.BPETokenizer.train(SEEN, 330).merges == naive_train(SEEN, 330)


def test_training_stops_when_nothing_is_left_to_merge():
    tok = llm.BPETokenizer.train("ab ab", vocab_size=1000)
    assert tok.vocab_size < 1000 and tok.encode("ab ab") == [256, 257]


def test_chunks_cover_every_character():
    text = "a_b 12 x\u0301 — 東京\n\n  \t🙂!"
    assert "".join(llm.CHUNK_PATTERN.findall(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_of_arbitrary_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("text", [
    "🙂👍🏽 family: 👨‍👩‍👧", "e\u0301 a\u0308 combining marks", "東京タワー 漢字", "\x00\x01\x1b[31m control\x7f",
    "Text the tokenizer never saw: Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
])
def test_round_trip_of_text_never_seen(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_has_no_unknown_characters_but_char_does():
    assert llm.BPETokenizer([]).encode("☃") == list("☃".encode())
    with pytest.raises(ValueError, match="☃"):
        llm.CharTokenizer.from_text("abc").encode("a☃")


def test_merges_compress(bpe):
    assert len(bpe.encode(TINY_TEXT)) < 0.6 * len(TINY_TEXT.encode())


def test_state_round_trip(bpe):
    rebuilt = llm.tokenizer_from_state(llm.tokenizer_state(bpe))
    assert isinstance(rebuilt, llm.BPETokenizer) and rebuilt.merges == bpe.merges
    assert rebuilt.encode(SEEN) == bpe.encode(SEEN)
    char = llm.CharTokenizer.from_text("hello")
    assert llm.tokenizer_from_state(llm.tokenizer_state(char)).encode("hole") == char.encode("hole")


def test_vocab_size_below_256_is_rejected():
    with pytest.raises(AssertionError, match="256"):  # below the user-facing check: an invariant
        llm.BPETokenizer.train("abc", 100)
    with pytest.raises(llm.UserError, match="256"):
        llm.validate_config(llm.RunConfig(tokenizer="bpe", vocab_size=200))
    llm.validate_config(llm.RunConfig(tokenizer="bpe", vocab_size=256))  # the byte values alone are fine
    assert llm.BPETokenizer.train("abc", 256).merges == []


# --- through training, checkpoints and the CLI ---------------------------------------------------

@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpe")
    data = tmp / "tiny.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    out = tmp / "out"
    assert llm.main(["train", "--tokenizer", "bpe", "--vocab-size", "300", "--data", str(data),
                     "--out-dir", str(out), *TINY_TRAIN_OPTIONS]) == 0
    return out


def test_checkpoint_stores_the_merges_and_sample_decodes_with_them(bpe_run, capsys):
    _, tokenizer, checkpoint = llm.load_checkpoint(bpe_run / "ckpt.pt")
    assert checkpoint["tokenizer"]["kind"] == "bpe" and tokenizer.vocab_size == 300
    assert tokenizer.merges == llm.BPETokenizer.train(llm.split_train_val(TINY_TEXT)[0], 300).merges
    capsys.readouterr()
    assert llm.main(["sample", "--out-dir", str(bpe_run), "--prompt", "How ☃", "--num-chars", "41"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("How ☃") and len(out) == len("How ☃") + 41 + 1  # characters, not tokens


def test_mismatched_tokenizer_is_a_clear_error(bpe_run, tmp_path):
    checkpoint = torch.load(bpe_run / "ckpt.pt", weights_only=True)
    checkpoint["tokenizer"]["merges"] = checkpoint["tokenizer"]["merges"][:10]  # 266 tokens, model has 300
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    with pytest.raises(llm.UserError, match="tokenizer of 266 tokens but a model of 300"):
        llm.load_checkpoint(tmp_path / "ckpt.pt")


def test_bits_per_byte_for_bpe(bpe_run):
    val_text = llm.split_train_val(TINY_TEXT)[1]
    _, tokenizer, _ = llm.load_checkpoint(bpe_run / "ckpt.pt")
    bytes_per_token = len(val_text.encode()) / len(tokenizer.encode(val_text))
    for row in read_history(bpe_run):
        expected = float(row["val_loss"]) / math.log(2) / bytes_per_token
        assert float(row["val_bpb"]) == pytest.approx(expected, rel=1e-4)
        assert float(row["val_bpc"]) == pytest.approx(expected, rel=1e-4)  # ASCII text: a byte per character


def test_bits_per_byte_and_per_character_differ_for_non_ascii_text(tmp_path):
    text = ("Größe über Äpfel — naïve café. " * 40) + "\n"
    data = tmp_path / "umlauts.txt"
    data.write_text(text, encoding="utf-8")
    assert llm.main(["train", "--data", str(data), "--out-dir", str(tmp_path / "out"), *TINY_TRAIN_OPTIONS]) == 0
    row = read_history(tmp_path / "out")[-1]
    val_text = llm.split_train_val(text)[1]
    bits = float(row["val_loss"]) / math.log(2)
    assert float(row["val_bpc"]) == pytest.approx(bits, rel=1e-4)  # char tokenizer: a token is a character
    assert float(row["val_bpb"]) == pytest.approx(bits * len(val_text) / len(val_text.encode()), rel=1e-4)


def test_tokenize_command(tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    assert llm.main(["tokenize", "The quick fox ☃", "--data", str(data), "--vocab-size", "300"]) == 0
    out = capsys.readouterr().out
    assert "' quick'" in out and "tokens for 15 characters (17 bytes)" in out


def test_tokenize_rejects_a_small_vocabulary_in_one_exact_line():
    result = run_main("tokenize", "x", "--vocab-size", "10")
    assert (result.returncode, result.stderr) == (
        2, "error: --vocab-size must be at least 256 (the byte values), got 10\n")
