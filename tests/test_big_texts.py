"""Texts bigger than memory: streamed, tokenised once into a file, memory-mapped."""
import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import llm
from conftest import ROOT, TINY_TEXT, TINY_TRAIN_OPTIONS, losses, quiet, tiny_run_cfg

SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(llm, "TOKEN_CHUNK_BYTES", 40_000)  # many chunks, many cuts


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_the_token_file_holds_the_tokens_of_the_whole_text(tmp_path, small_chunks, kind):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    scan = llm.scan_text(SHAKESPEARE, llm.quiet)
    assert (scan.sha256, scan.n_chars) == (llm.text_sha256(text), len(text))
    cfg = llm.RunConfig(tokenizer=kind)
    tokenizer = llm.streamed_tokenizer(scan, cfg)
    in_memory = llm.encode_corpus(text, llm.make_tokenizer(kind, cfg.vocab_size, text,
                                                           llm.split_train_val(text)[0]), 64)
    streamed = llm.token_file_corpus(scan, tokenizer, tmp_path, llm.Distributed(), llm.quiet)
    assert streamed.train_data.dtype == torch.uint16
    assert torch.equal(streamed.train_data.long(), in_memory.train_data)
    assert torch.equal(streamed.val_data.long(), in_memory.val_data)
    assert streamed.bytes_per_token == in_memory.bytes_per_token
    assert streamed.val_sample == in_memory.val_sample
    generator = (torch.Generator().manual_seed(0), torch.Generator().manual_seed(0))
    for a, b in zip(llm.get_batch(streamed.train_data, 64, 8, generator[0]),
                    llm.get_batch(in_memory.train_data, 64, 8, generator[1])):
        assert torch.equal(a, b) and a.dtype == torch.long  # the same batches


def test_the_token_file_is_reused_and_rebuilt_when_the_text_changes(tmp_path, small_chunks):
    path = tmp_path / "text.txt"
    text = SHAKESPEARE.read_text(encoding="utf-8")[:300_000]
    path.write_text(text, encoding="utf-8")
    messages = []

    def corpus():
        scan = llm.scan_text(path, llm.quiet, tmp_path / "out")
        return llm.token_file_corpus(scan, llm.CharTokenizer(scan.chars), tmp_path / "out",
                                     llm.Distributed(), messages.append)

    (tmp_path / "out").mkdir()
    first = corpus()
    files = sorted((tmp_path / "out").iterdir())
    stamps = [p.stat().st_mtime_ns for p in files]
    again = corpus()
    assert any("reusing the tokens" in m for m in messages)
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "out").iterdir())] == stamps
    assert torch.equal(first.train_data, again.train_data)
    path.write_text(text[:-1] + ("!" if text[-1] != "!" else "?"), encoding="utf-8")  # one byte
    changed = corpus()
    assert len(files) == 3  # the scan, the tokens and their description
    now = {p.name for p in (tmp_path / "out").iterdir()}
    assert len(now) == 4  # new files, never the stale ones, and the stale tokens are gone
    assert [p.name for p in files if p.name.startswith("tokens-") and p.name in now] == []
    assert not torch.equal(changed.val_data, first.val_data)
    assert changed.val_data[-1] != first.val_data[-1]


@pytest.mark.slow
def test_a_big_text_trains_in_memory_that_does_not_grow_with_the_text(tmp_path):
    """Texts of 13 MB and then 40 MB, streamed in 2 MiB chunks (the limits lowered for the test),
    trained one after the other in one fresh process: the second, three times the first, may
    raise the process's peak memory by a few times the extra text, a quarter of what holding it
    in memory (as a string, token ids and Python integers) takes."""
    piece = SHAKESPEARE.read_text(encoding="utf-8")
    texts = []
    for copies in (12, 36):
        texts.append(tmp_path / f"copies-{copies}.txt")
        with open(texts[-1], "w", encoding="utf-8") as f:
            for i in range(copies):
                f.write(f"== copy {i} ==\n")
                f.write(piece)
    options = [*TINY_TRAIN_OPTIONS, "--max-iters", "10"]
    script = tmp_path / "train_streamed.py"
    script.write_text(
        "import contextlib, io, resource, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import llm\n"
        "llm.IN_MEMORY_BYTES, llm.TOKEN_CHUNK_BYTES = 2 ** 20, 2 * 2 ** 20\n"
        "for name in sys.argv[1:]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        f"        assert llm.main(['train', '--data', name, '--out-dir', name + '.out', *{options!r}]) == 0\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # the peak so far, KiB\n",
        encoding="utf-8")
    result = subprocess.run([sys.executable, str(script), *map(str, texts)], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    smaller, bigger = (int(kib) / 1024 for kib in result.stdout.split())
    extra_text = (texts[1].stat().st_size - texts[0].stat().st_size) / 2 ** 20
    # measured here: 1 to 2 MiB more per MiB of extra text; held in memory, about 16 (851 MiB
    # at 40 MB, against 475 streamed with the default chunks)
    assert bigger - smaller < 4 * extra_text, (smaller, bigger, extra_text)
    assert list(tmp_path.glob("copies-36.txt.out/tokens-*.bin"))  # it was streamed


def test_a_streamed_text_trains_exactly_as_in_memory(tmp_path, small_chunks):
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    in_memory = llm.run_training(tiny_run_cfg(), TINY_TEXT, tmp_path / "memory", log=quiet)
    streamed = llm.run_training(tiny_run_cfg(), path, tmp_path / "streamed", log=quiet)
    assert list((tmp_path / "streamed").glob("tokens-*.bin"))  # it was streamed
    assert losses(streamed.history) == losses(in_memory.history)  # the same tokens, batches


@pytest.mark.parametrize("streamed", [False, True])
def test_a_byte_order_mark_is_dropped_and_said(tmp_path, monkeypatch, capsys, streamed):
    if streamed:
        monkeypatch.setattr(llm, "IN_MEMORY_BYTES", 100)
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + TINY_TEXT.encode("utf-8"))
    out = tmp_path / "out"
    assert llm.main(["train", "--data", str(path), "--out-dir", str(out), *TINY_TRAIN_OPTIONS]) == 0
    assert "byte-order mark" in capsys.readouterr().out.splitlines()[1]  # after the recipe
    _, tokenizer, _ = llm.load_checkpoint(out / "ckpt.pt")
    assert tokenizer.chars == sorted(set(TINY_TEXT))  # no U+FEFF token


@pytest.mark.parametrize("streamed", [False, True])
def test_an_unreadable_text_is_one_line_at_any_size(tmp_path, monkeypatch, capsys, streamed):
    path = tmp_path / "secret.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads it anyway: refuse it as the system would
        real_open = open

        def refusing(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(llm, "open", refusing, raising=False)
    if streamed:
        monkeypatch.setattr(llm, "IN_MEMORY_BYTES", 100)  # a big text
    args = ["train", "--data", str(path), "--out-dir", str(tmp_path / "out"), *TINY_TRAIN_OPTIONS]
    assert llm.main(args) == 2
    err = capsys.readouterr().err
    assert err == f"error: --data cannot read {path} (Permission denied): check the file's " \
                  "permissions\n"


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero here")
@pytest.mark.parametrize("command", [["train", *TINY_TRAIN_OPTIONS], ["tokenize", "some text"]])
def test_a_device_that_never_ends_is_read_only_so_far(tmp_path, capsys, command):
    args = [*command, "--data", "/dev/zero"] + (["--out-dir", str(tmp_path)]
                                                if command[0] == "train" else [])
    assert llm.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data /dev/zero is not a regular file and gives more than "
                          "16 MiB")
    assert err.count("\n") == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_pipe_that_goes_on_is_read_only_so_far(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(llm, "IN_MEMORY_BYTES", 10_000)
    fifo = tmp_path / "text.fifo"
    os.mkfifo(fifo)

    def endless_writer():
        with open(fifo, "w", encoding="utf-8") as f:
            try:
                while True:
                    f.write(TINY_TEXT)
            except BrokenPipeError:  # the reader has had enough
                pass

    writer = threading.Thread(target=endless_writer, daemon=True)
    writer.start()
    assert llm.main(["tokenize", "quick fox", "--data", str(fifo)]) == 2
    assert "text.fifo is not a regular file and gives more than" in capsys.readouterr().err
    writer.join(timeout=10)


@pytest.mark.parametrize("pattern", ["ours", "gpt2"])
@pytest.mark.parametrize("line_end", ["\r\n", " "])  # Windows' line ends; one long line
def test_any_line_ends_are_cut_safely_with_a_bounded_carry(tmp_path, small_chunks, line_end,
                                                            pattern):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:300_000].replace("\n", line_end)
    path = tmp_path / "text.txt"
    path.write_bytes(text.encode("utf-8"))
    scan = llm.scan_text(path, llm.quiet)
    longest = max(len(piece) for _, piece in llm.split_pieces(scan, llm.quiet))
    assert longest <= llm.TOKEN_CHUNK_BYTES + 100  # a chunk's text, and about a word carried
    tokenizer = llm.BPETokenizer.train(text[:50_000], 300)
    if pattern == "gpt2":
        tokenizer.chunk_pattern = llm.gpt2_chunk_pattern()
    corpus = llm.token_file_corpus(scan, tokenizer, tmp_path, llm.Distributed(), llm.quiet)
    n_train = int(len(text) * 0.9)  # split_train_val's split
    assert corpus.train_data.tolist() == tokenizer.encode(text[:n_train])
    assert corpus.val_data.tolist() == tokenizer.encode(text[n_train:])
