"""The command line, end to end: in-process through llm.main and as a real subprocess."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llm
from conftest import ROOT, TINY_TRAIN_OPTIONS, run_main


def run_process(*args, cwd=None):
    """Run `python llm.py ARGS` as a real process; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "llm.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=300)


run_cli = run_main  # the command line, in this process: what a user sees, without a new Python


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A tiny model trained once through llm.main, shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("trained")
    data = tmp / "tiny.txt"
    from conftest import TINY_TEXT
    data.write_text(TINY_TEXT, encoding="utf-8")
    assert llm.main(["train", "--data", str(data), "--out-dir", str(tmp / "out"), *TINY_TRAIN_OPTIONS]) == 0
    return tmp / "out"


def test_train_writes_checkpoint_and_history(trained_dir):
    assert (trained_dir / "ckpt.pt").is_file()
    with open(trained_dir / "history.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
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


def test_train_and_sample_as_real_subprocesses(tmp_path, tiny_text_file):
    out = tmp_path / "out"
    train = run_process("train", "--data", tiny_text_file, "--out-dir", out, *TINY_TRAIN_OPTIONS)
    assert train.returncode == 0, train.stderr
    assert "done: final val loss" in train.stdout
    sample = run_process("sample", "--out-dir", out, "--prompt", "How", "--num-chars", "25")
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("How") and len(sample.stdout) == 3 + 25 + 1


def test_help_is_useful():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    for option in ("--n-layer", "--learning-rate", "--data", "--out-dir"):
        assert option in result.stdout
    assert "number of transformer blocks" in result.stdout


# --- bad input: one clear line, non-zero exit, no traceback ---------------------------------------

def assert_clean_failure(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("options, fragments", [
    (["--n-embd", "30", "--n-head", "4"], ["--n-embd", "divisible"]),
    (["--block-size", "0"], ["--block-size", "positive"]),
    (["--learning-rate", "-1"], ["--learning-rate", "positive"]),
    (["--max-iters", "0"], ["--max-iters", "positive"]),
    (["--block-size", "200"], ["fewer than block_size + 1", "--block-size"]),  # val split: 148 chars
    (["--device", "tpu"], ["unknown device", "cpu"]),
    (["--pos-encoding", "rotary"], ["--pos-encoding"]),
    (["--no-such-option", "1"], ["unrecognized arguments"]),
    (["--n-layer", "two"], ["invalid int value"]),
])
def test_bad_train_options(tmp_path, tiny_text_file, options, fragments):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {name: f"an earlier run's {name}".encode() for name in ("ckpt.pt", "latest.pt", "history.csv")}
    for name, content in earlier.items():
        (out / name).write_bytes(content)
    args = ["train", "--data", tiny_text_file, "--out-dir", out, "--overwrite", *TINY_TRAIN_OPTIONS]
    result = run_cli(*args, *options)  # later options override the tiny ones
    assert_clean_failure(result, *fragments)
    for name, content in earlier.items():  # no earlier file damaged
        assert (out / name).read_bytes() == content


def test_sample_with_a_checkpoint_whose_vocabulary_does_not_match(trained_dir, tmp_path):
    checkpoint = torch.load(trained_dir / "ckpt.pt", weights_only=True)
    checkpoint["tokenizer"]["chars"] = checkpoint["tokenizer"]["chars"][:-3]  # 3 characters fewer than the model
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    before = (tmp_path / "ckpt.pt").read_bytes()
    assert_clean_failure(run_cli("sample", "--out-dir", tmp_path), "tokenizer of", "train again")
    assert (tmp_path / "ckpt.pt").read_bytes() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message shown when no GPU exists")
def test_cuda_without_a_gpu(tmp_path, tiny_text_file):
    result = run_cli("train", "--data", tiny_text_file, "--out-dir", tmp_path, "--device", "cuda")
    assert_clean_failure(result, "no CUDA GPU", "--device cpu")


@pytest.mark.parametrize("make, fragments", [
    (lambda p: p.write_text("", encoding="utf-8"), ["empty"]),
    (lambda p: p.write_bytes(b"\xff\xfeabc\x80"), ["not UTF-8"]),
    (lambda p: p.mkdir(), ["directory"]),
    (lambda p: None, ["does not exist", "--data"]),
])
def test_bad_data_files(tmp_path, make, fragments):
    data = tmp_path / "input.txt"
    make(data)
    assert_clean_failure(run_cli("train", "--data", data, "--out-dir", tmp_path / "out"), *fragments)


def test_unwritable_out_dir(tmp_path, tiny_text_file):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a directory", encoding="utf-8")
    result = run_cli("train", "--data", tiny_text_file, "--out-dir", blocker / "out", *TINY_TRAIN_OPTIONS)
    assert_clean_failure(result, "--out-dir")


def test_a_missing_default_corpus_is_one_line_naming_the_option(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/ in this directory
    assert llm.main(["train", "--max-iters", "1"]) == 2
    err = capsys.readouterr().err
    assert "--data data/tinyshakespeare.txt does not exist" in err and "git checkout" in err
    assert len(err.strip().splitlines()) == 1


def test_sample_without_a_checkpoint(tmp_path):
    assert_clean_failure(run_cli("sample", "--out-dir", tmp_path), "python llm.py train")


def test_sample_with_a_corrupt_checkpoint(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"definitely not a checkpoint")
    assert_clean_failure(run_cli("sample", "--out-dir", tmp_path), "not a readable", "train")


def test_sample_with_weights_of_another_version(tmp_path, trained_dir):
    checkpoint = torch.load(trained_dir / "ckpt.pt", weights_only=True)
    weights = checkpoint["model"]
    weights["blocks.0.renamed.weight"] = weights.pop(next(k for k in weights if k.startswith("blocks.0.")))
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    assert_clean_failure(run_cli("sample", "--out-dir", tmp_path), "do not fit", "python llm.py train")


def test_threads_option_sets_pytorch_threads(tmp_path):
    result = run_cli("bench", "--threads", "1", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                     "--block-size", "16", "--batch-size", "2", "--device", "cpu", "--steps", "2",
                     "--sample-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "cpu (1 threads training, 1 sampling)" in result.stdout


@pytest.mark.parametrize("options, fragments", [
    (["--prompt", "Zebra ☃"], ["not in the vocabulary", "'☃'"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--temperature", "nan"], ["--temperature"]),
    (["--top-p", "0"], ["--top-p"]),
    (["--top-p", "1.5"], ["--top-p"]),
    (["--top-k", "0"], ["--top-k"]),
    (["--top-k", "1000"], ["--top-k", "vocabulary size"]),
    (["--num-chars", "-5"], ["--num-chars"]),
    (["--prompt", ""], ["prompt is empty"]),
    (["--threads", "-1"], ["--threads"]),
])
def test_bad_sample_options(trained_dir, options, fragments):
    assert_clean_failure(run_cli("sample", "--out-dir", trained_dir, *options), *fragments)


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


def test_bad_bool_and_grouping_options(tmp_path, tiny_text_file):
    base = ["train", "--data", tiny_text_file, "--out-dir", tmp_path, *TINY_TRAIN_OPTIONS]
    assert_clean_failure(run_cli(*base, "--bias", "maybe"), "expected true or false")
    assert_clean_failure(run_cli(*base, "--n-head", "2", "--n-kv-head", "3"), "--n-kv-head")
