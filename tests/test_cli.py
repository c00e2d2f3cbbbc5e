"""Appendix I, the command line: in-process through llm.main (the exact lines a user sees and the
exit status), and twice as a real process (train then sample; importing llm does nothing)."""
import os
import subprocess
import sys

import pytest
import torch

import llm
from conftest import (ROOT, TINY_TEXT, TINY_TRAIN_OPTIONS, assert_one_clear_line, read_history,
                      run_main)


def run_process(*args, cwd=None):
    """Run `python llm.py ARGS` as a real process; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "llm.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=300)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A tiny model trained once through llm.main, shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("trained")
    data = tmp / "tiny.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    assert llm.main(["train", "--data", str(data), "--out-dir", str(tmp / "out"), *TINY_TRAIN_OPTIONS]) == 0
    return tmp / "out"


def test_train_writes_checkpoint_and_history(trained_dir):
    assert (trained_dir / "ckpt.pt").is_file()
    rows = read_history(trained_dir)
    assert list(rows[0]) == ["step", "train_loss", "val_loss", "val_bpb", "val_bpc", "lr", "elapsed_s"]
    assert [int(r["step"]) for r in rows] == [0, 10, 20]
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])  # it learned something
    assert [p.name for p in trained_dir.iterdir() if p.suffix == ".tmp"] == []


def test_checkpoint_holds_what_is_needed_and_loads_with_weights_only(trained_dir):
    checkpoint = torch.load(trained_dir / "ckpt.pt", weights_only=True)
    assert {"model", "optimizer", "step", "config", "tokenizer", "rng", "val_loss"} <= set(checkpoint)
    assert {"python", "torch", "batches"} <= set(checkpoint["rng"])
    assert checkpoint["config"]["n_embd"] == 16


def test_sample_prints_the_requested_number_of_characters(trained_dir, capsys):
    assert llm.main(["sample", "--out-dir", str(trained_dir), "--prompt", "The ", "--num-chars", "37"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The ") and out.endswith("\n")
    assert len(out) == len("The ") + 37 + 1


def test_sample_is_reproducible_with_a_seed(trained_dir, capsys):
    outputs = []
    for seed in (1, 1, 2):
        llm.main(["sample", "--out-dir", str(trained_dir), "--num-chars", "50", "--seed", str(seed)])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


@pytest.mark.slow
def test_train_and_sample_as_real_subprocesses(tmp_path, tiny_text_file):
    out = tmp_path / "out"
    train = run_process("train", "--data", tiny_text_file, "--out-dir", out, *TINY_TRAIN_OPTIONS)
    assert train.returncode == 0, train.stderr
    assert "done: final val loss" in train.stdout
    sample = run_process("sample", "--out-dir", out, "--prompt", "How", "--num-chars", "25")
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("How") and len(sample.stdout) == 3 + 25 + 1


def test_help_is_useful():
    result = run_main("train", "--help")
    assert result.returncode == 0
    for option in ("--n-layer", "--learning-rate", "--data", "--out-dir"):
        assert option in result.stdout
    assert "number of transformer blocks" in result.stdout


# --- bad input: one clear line on stderr, exit status 2, no traceback, nothing damaged --------------

@pytest.mark.parametrize("options, line", [
    (["--n-embd", "30", "--n-head", "4"], "--n-embd (30) must be divisible by --n-head (4): each "
                                          "head gets an equal slice of the channels"),
    (["--block-size", "0"], "--block-size must be positive, got 0"),
    (["--learning-rate", "-1"], "--learning-rate must be positive, got -1.0"),
    (["--max-iters", "0"], "--max-iters must be positive, got 0"),
    (["--block-size", "200"], "a split has 148 tokens, fewer than block_size + 1 = 201: use a "
                              "longer text or a smaller --block-size"),  # the val split: 148 chars
    (["--device", "tpu"], "unknown device 'tpu': use auto, cpu, cuda or mps"),
    (["--pos-encoding", "rotary"], "--pos-encoding must be one of learned, sinusoidal, rope, got "
                                   "'rotary'"),
    (["--beta2", "1.5"], "--beta2 must be in [0, 1), got 1.5"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--eval-iters", "0"], "--eval-iters must be positive, got 0"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be positive, got 0"),
    (["--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size must be at least 256 (the byte "
                                                    "values), got 100"),
    (["--n-kv-head", "-1"], "--n-kv-head must be 0 (same as --n-head) or positive, got -1"),
    (["--n-head", "2", "--n-kv-head", "3"], "--n-head (2) must be a multiple of --n-kv-head (3): "
                                            "each key/value head serves an equal group of query heads"),
    (["--weight-decay", "nan"], "--weight-decay must not be negative, got nan"),
    (["--threads", "-1"], "--threads must be 0 (PyTorch's default, one per core) or positive, "
                          "got -1"),
])
def test_a_bad_train_option_is_one_exact_line_and_damages_no_earlier_file(tmp_path, tiny_text_file,
                                                                        options, line):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {name: f"an earlier run's {name}".encode() for name in ("ckpt.pt", "latest.pt", "history.csv")}
    for name, content in earlier.items():
        (out / name).write_bytes(content)
    args = ["train", "--data", tiny_text_file, "--out-dir", out, "--overwrite", *TINY_TRAIN_OPTIONS]
    result = run_main(*args, *options)  # later options override the tiny ones
    assert (result.returncode, result.stderr) == (2, f"error: {line}\n")
    for name, content in earlier.items():  # no earlier file damaged
        assert (out / name).read_bytes() == content


@pytest.mark.parametrize("options, line", [
    (["--no-such-option", "1"], "llm.py: error: unrecognized arguments: --no-such-option 1"),
    (["--n-layer", "two"], "llm.py train: error: argument --n-layer: invalid int value: 'two'"),
    (["--bias", "maybe"], "llm.py train: error: argument --bias: expected true or false, got 'maybe'"),
])
def test_an_option_that_cannot_be_parsed_shows_the_usage_and_one_error_line(tmp_path, options,
                                                                            line):
    result = run_main("train", "--out-dir", tmp_path, *options)
    assert result.returncode == 2 and result.stderr.startswith("usage: llm.py")
    assert result.stderr.splitlines()[-1] == line and "Traceback" not in result.stderr


def test_resume_refuses_a_new_configuration_and_a_folder_without_a_checkpoint(tmp_path,
                                                                              tiny_text_file):
    result = run_main("train", "--data", tiny_text_file, "--out-dir", tmp_path, "--resume",
                      "--n-layer", "3")
    assert (result.returncode, result.stderr) == (2, "error: --resume continues a run with its "
                                                     "saved configuration; drop --n-layer\n")
    result = run_main("train", "--data", tiny_text_file, "--out-dir", tmp_path, "--resume")
    assert (result.returncode, result.stderr) == (
        2, f"error: no checkpoint at {tmp_path / 'latest.pt'}: run `python llm.py train` first "
           "(or pass the --out-dir you trained with)\n")


def test_sample_with_a_checkpoint_whose_vocabulary_does_not_match(trained_dir, tmp_path):
    checkpoint = torch.load(trained_dir / "ckpt.pt", weights_only=True)
    checkpoint["tokenizer"]["chars"] = checkpoint["tokenizer"]["chars"][:-3]  # 3 characters fewer than the model
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    before = (tmp_path / "ckpt.pt").read_bytes()
    result = run_main("sample", "--out-dir", tmp_path)
    assert (result.returncode, result.stderr) == (
        2, f"error: {tmp_path / 'ckpt.pt'} holds a tokenizer of 31 tokens but a model of 34: the "
           "file was altered or mixed up; train again\n")
    assert (tmp_path / "ckpt.pt").read_bytes() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message shown when no GPU exists")
def test_cuda_without_a_gpu(tmp_path, tiny_text_file):
    result = run_main("train", "--data", tiny_text_file, "--out-dir", tmp_path, "--device", "cuda")
    assert (result.returncode, result.stderr) == (
        2, "error: --device cuda was asked for, but PyTorch sees no CUDA GPU: use --device cpu\n")


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.write_text("", encoding="utf-8"), "is empty: give a file with some text in it"),
    (lambda p: p.write_bytes(b"\xff\xfeabc\x80"), "is not UTF-8 text (byte 0): convert it to UTF-8 "
                                                 "or choose another file"),
    (lambda p: p.mkdir(), "is a directory: give a UTF-8 text file"),
    (lambda p: None, "does not exist: give a UTF-8 text file"),
])
def test_bad_data_is_one_exact_line(tmp_path, make, problem):
    data = tmp_path / "input.txt"
    make(data)
    result = run_main("train", "--data", data, "--out-dir", tmp_path / "out")
    assert (result.returncode, result.stderr) == (2, f"error: --data {data} {problem}\n")


def test_unwritable_out_dir(tmp_path, tiny_text_file):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a directory", encoding="utf-8")
    result = run_main("train", "--data", tiny_text_file, "--out-dir", blocker / "out", *TINY_TRAIN_OPTIONS)
    assert (result.returncode, result.stderr) == (
        2, f"error: cannot write to --out-dir {blocker / 'out'} (Not a directory): choose another "
           "directory\n")


def test_a_missing_default_corpus_is_one_line_saying_how_to_restore_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ in this directory
    result = run_main("train", "--max-iters", "1")
    assert (result.returncode, result.stderr) == (
        2, "error: --data data/tinyshakespeare.txt does not exist: give a UTF-8 text file (restore "
           "it with `git checkout data`)\n")


def test_sample_without_a_checkpoint(tmp_path):
    result = run_main("sample", "--out-dir", tmp_path)
    assert (result.returncode, result.stderr) == (
        2, f"error: no checkpoint at {tmp_path / 'ckpt.pt'}: run `python llm.py train` first (or "
           "pass the --out-dir you trained with)\n")


def test_sample_with_a_corrupt_checkpoint(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"definitely not a checkpoint")
    result = run_main("sample", "--out-dir", tmp_path)
    assert_one_clear_line(result)  # (the line names the exception, which depends on PyTorch)
    assert result.stderr.startswith(f"error: {tmp_path / 'ckpt.pt'} is not a readable llm.py "
                                    "checkpoint (")
    assert result.stderr.endswith("): train again with `python llm.py train`\n")


def test_sample_with_weights_of_another_version(tmp_path, trained_dir):
    checkpoint = torch.load(trained_dir / "ckpt.pt", weights_only=True)
    weights = checkpoint["model"]
    weights["blocks.0.renamed.weight"] = weights.pop(next(k for k in weights if k.startswith("blocks.0.")))
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    result = run_main("sample", "--out-dir", tmp_path)
    assert (result.returncode, result.stderr) == (
        2, f"error: {tmp_path / 'ckpt.pt'} holds weights that do not fit this version of llm.py's "
           "model: train again with `python llm.py train`\n")


def test_threads_option_sets_pytorch_threads(tmp_path):
    result = run_main("bench", "--threads", "1", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                     "--block-size", "16", "--batch-size", "2", "--device", "cpu", "--steps", "2",
                     "--sample-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "cpu (1 threads training, 1 sampling)" in result.stdout


@pytest.mark.parametrize("options, line", [
    (["--temperature", "-1"], "--temperature must be 0 (greedy) or positive, got -1.0"),
    (["--temperature", "nan"], "--temperature must be 0 (greedy) or positive, got nan"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-k", "0"], "--top-k must be at least 1 and at most the vocabulary size 34, got 0"),
    (["--top-k", "1000"], "--top-k must be at least 1 and at most the vocabulary size 34, got 1000"),
    (["--num-chars", "-5"], "--num-chars must not be negative, got -5"),
    (["--prompt", ""], "--prompt is empty: give at least one character"),
    (["--threads", "-1"], "--threads must be 0 (PyTorch's default, one per core) or positive, "
                          "got -1"),
])
def test_a_bad_sample_option_is_one_exact_line_before_anything_is_printed(trained_dir, options,
                                                                          line):
    result = run_main("sample", "--out-dir", trained_dir, *options)
    assert (result.returncode, result.stderr) == (2, f"error: {line}\n")
    assert result.stdout == ""  # the prompt is not printed before the error


def test_a_prompt_outside_the_vocabulary_names_the_characters(trained_dir):
    result = run_main("sample", "--out-dir", trained_dir, "--prompt", "Zebra ☃")
    assert (result.returncode, result.stderr) == (
        2, "error: characters not in the vocabulary: 'Z', '☃'; use only characters that occur in "
           "the training text\n")


@pytest.mark.slow
def test_import_has_no_side_effects(tmp_path):
    code = ("import sys, llm; "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; "
            "assert not llm.IN_NOTEBOOK")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing downloaded


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_each_preset_trains_and_samples(tmp_path, tiny_text_file, capsys, arch):
    out = tmp_path / arch
    args = ["train", "--arch", arch, "--data", str(tiny_text_file), "--out-dir", str(out), *TINY_TRAIN_OPTIONS]
    assert llm.main(args) == 0
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["config"]["norm"] == llm.ARCHITECTURES[arch]["norm"]
    capsys.readouterr()
    assert llm.main(["sample", "--out-dir", str(out), "--num-chars", "20"]) == 0
    assert len(capsys.readouterr().out) == 1 + 20 + 1  # the default prompt is a newline


def test_switches_mix_on_top_of_a_preset(tmp_path, tiny_text_file):
    out = tmp_path / "mixed"
    args = ["train", "--arch", "llama", "--norm", "layernorm", "--bias", "true", "--data", str(tiny_text_file),
            "--out-dir", str(out), *TINY_TRAIN_OPTIONS]
    assert llm.main(args) == 0
    config = torch.load(out / "ckpt.pt", weights_only=True)["config"]
    assert (config["norm"], config["bias"], config["pos_encoding"]) == ("layernorm", True, "rope")
