"""Appendix F: exact resume, Ctrl-C, crash-safe checkpoints, runs that fail, one run per folder."""
import errno
import os
import shlex
import signal

import pytest
import torch

import llm
from conftest import (TINY_TEXT, TINY_TRAIN_OPTIONS, interrupt_when, losses, quiet, read_history,
                      tiny_run_cfg)


def test_resume_after_ctrl_c_at_an_evaluation_is_bit_identical(tmp_path):
    straight = llm.run_training(tiny_run_cfg(), TINY_TEXT, tmp_path / "straight", log=quiet)
    with pytest.raises(llm.Interrupted, match="--resume"):
        llm.run_training(tiny_run_cfg(), TINY_TEXT, tmp_path / "resumed",
                         log=interrupt_when(lambda l: l.startswith("step    10/")))
    assert torch.load(tmp_path / "resumed" / "latest.pt", weights_only=True)["step"] == 10
    resumed = llm.run_training(tiny_run_cfg(), TINY_TEXT, tmp_path / "resumed", log=quiet, resume=True)
    assert losses(resumed.history) == losses(straight.history)  # exact: not approximately
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert [int(r["step"]) for r in read_history(tmp_path / "resumed")] == [0, 5, 10, 15, 20]


def test_resume_after_ctrl_c_between_evaluations_is_bit_identical(tmp_path, monkeypatch):
    straight = llm.run_training(tiny_run_cfg(), TINY_TEXT, tmp_path / "straight", log=quiet)
    calls = {"n": 0}
    real_step = llm.train_step

    def step_then_ctrl_c(model, optimizer, batches, lr, grad_clip=0.0):  # train_step's signature
        calls["n"] += 1
        if calls["n"] == 7:
            signal.raise_signal(signal.SIGINT)  # arrives in the middle of step 6
        return real_step(model, optimizer, batches, lr, grad_clip)

    monkeypatch.setattr(llm, "train_step", step_then_ctrl_c)
    with pytest.raises(llm.Interrupted):
        llm.run_training(tiny_run_cfg(), TINY_TEXT, tmp_path / "resumed", log=quiet)
    monkeypatch.setattr(llm, "train_step", real_step)
    assert torch.load(tmp_path / "resumed" / "latest.pt", weights_only=True)["step"] == 7  # step 6 finished
    resumed = llm.run_training(tiny_run_cfg(), TINY_TEXT, tmp_path / "resumed", log=quiet, resume=True)
    assert losses(resumed.history) == losses(straight.history)


def test_resume_refuses_other_data(tmp_path):  # (and a folder without a checkpoint: test_cli)
    llm.run_training(tiny_run_cfg(max_iters=5), TINY_TEXT, tmp_path, log=quiet)
    with pytest.raises(llm.UserError, match="--data"):
        llm.run_training(tiny_run_cfg(), TINY_TEXT.upper(), tmp_path, log=quiet, resume=True)


def test_sample_uses_the_best_checkpoint_and_resume_the_latest(tmp_path):
    llm.run_training(tiny_run_cfg(), TINY_TEXT, tmp_path, log=quiet)
    best = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    latest = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert latest["step"] == 20
    assert best["val_loss"] == min(r["val_loss"] for r in latest["history"] if r["step"] > 0)


def test_a_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    llm.run_training(tiny_run_cfg(max_iters=5), TINY_TEXT, tmp_path, log=quiet)
    before = (tmp_path / "ckpt.pt").read_bytes()

    def half_written(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(llm.torch, "save", half_written)
    with pytest.raises(llm.UserError, match="previous version is untouched"):
        llm.run_training(tiny_run_cfg(max_iters=5), TINY_TEXT, tmp_path, log=quiet)
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    llm.load_checkpoint(tmp_path / "ckpt.pt")  # still loads
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_disk_full_during_a_save_is_one_exact_line_and_keeps_the_previous_checkpoint(tmp_path, tiny_text_file, monkeypatch, capsys):
    args = ["train", "--data", str(tiny_text_file), "--out-dir", str(tmp_path / "out"),
            *TINY_TRAIN_OPTIONS, "--max-iters", "5"]
    assert llm.main(args) == 0
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    capsys.readouterr()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(llm.os, "fsync", disk_full)
    assert llm.main([*args, "--overwrite"]) == 2  # a new run, replacing the first
    assert capsys.readouterr().err == (
        f"error: could not write {tmp_path / 'out' / 'history.csv'} (No space left on device); the "
        "previous version is untouched: free some disk space or choose another --out-dir\n")
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before


def test_a_new_run_never_silently_replaces_another(tmp_path, tiny_text_file, capsys):
    args = ["train", "--data", str(tiny_text_file), "--out-dir", str(tmp_path),
            *TINY_TRAIN_OPTIONS, "--max-iters", "5"]
    assert llm.main(args) == 0
    before = (tmp_path / "ckpt.pt").read_bytes()
    capsys.readouterr()
    assert llm.main(args) == 2
    assert capsys.readouterr().err == (
        f"error: --out-dir {tmp_path} holds another run (latest.pt): continue it with --resume, "
        "replace it with --overwrite, or choose another --out-dir\n")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert llm.main([*args, "--overwrite"]) == 0
    assert (tmp_path / "ckpt.pt").read_bytes() != before


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_step = llm.train_step

    def diverging(model, optimizer, batches, lr, grad_clip=0.0):  # train_step's signature
        calls["n"] += 1
        return float("nan") if calls["n"] == 13 else real_step(model, optimizer, batches, lr, grad_clip)

    monkeypatch.setattr(llm, "train_step", diverging)
    with pytest.raises(llm.UserError, match="became nan at step 12"):
        llm.run_training(tiny_run_cfg(), TINY_TEXT, tmp_path, log=quiet)
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] == 10


def test_weights_that_evaluate_to_nan_are_never_saved(tmp_path, monkeypatch):
    real_estimate, calls = llm.estimate_loss, [0]

    def nan_from_the_third_evaluation(model, batches):  # two calls (train, val) per evaluation
        calls[0] += 1
        return float("nan") if calls[0] > 4 else real_estimate(model, batches)

    monkeypatch.setattr(llm, "estimate_loss", nan_from_the_third_evaluation)
    with pytest.raises(llm.UserError, match="became nan at step 10"):
        llm.run_training(tiny_run_cfg(), TINY_TEXT, tmp_path, log=quiet)
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] == 5  # the good one
    assert "nan" not in (tmp_path / "history.csv").read_text(encoding="utf-8")


def test_the_continue_command_works_when_pasted(tmp_path, monkeypatch, capsys):
    data, out = tmp_path / "my texts" / "tiny's.txt", tmp_path / "my runs" / "first"
    data.parent.mkdir()
    data.write_text(TINY_TEXT, encoding="utf-8")
    real_step, calls = llm.train_step, {"n": 0}

    def stopped_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` would, mid-step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(llm, "train_step", stopped_at_step_3)
    args = ["train", "--data", str(data), "--out-dir", str(out), *TINY_TRAIN_OPTIONS]
    assert llm.main(args) == 143
    hint = capsys.readouterr().err.split("Continue with: ")[1].strip()
    python, script, *pasted = shlex.split(hint)
    assert (python, script) == ("python", "llm.py") and pasted[:2] == ["train", "--resume"]
    assert llm.main(pasted) == 0
    assert torch.load(out / "latest.pt", weights_only=True)["step"] == 20


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        llm.write_history(tmp_path / "history.csv", [])
        (tmp_path / "plain.txt").write_text("")
    finally:
        os.umask(previous)
    mode = (tmp_path / "history.csv").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_signal_during_the_first_evaluation_never_promises_a_save(tmp_path, tiny_text_file,
                                                                    monkeypatch, capsys):
    real_estimate, calls = llm.estimate_loss, {"n": 0}

    def signalled(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # a long first evaluation, stopped by `kill`
        return real_estimate(*args)

    monkeypatch.setattr(llm, "estimate_loss", signalled)
    args = ["train", "--data", str(tiny_text_file), "--out-dir", str(tmp_path), *TINY_TRAIN_OPTIONS]
    assert llm.main(args) == 143
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "saving" not in err, err
    assert not (tmp_path / "latest.pt").exists()
