"""Runs in the real world, as real processes: signals, one run per folder, closed pipes, the
plain torchrun command, and stops coordinated across torchrun's processes. Each test here needs a
process of its own (a signal from outside, a lock another process holds, a pipe its reader
closes, torchrun's processes); everything else is tested in-process."""
import signal
import subprocess
import sys

import pytest
import torch

from conftest import (LLM, ROOT, TINY_TRAIN_OPTIONS, TORCHRUN, UNBUFFERED, read_history, run_main,
                      start, train_command, wait_for_line)

pytestmark = pytest.mark.slow

ENDLESS = ["--max-iters", "1000000", "--eval-interval", "5"]  # stopped by a signal, never done
TRAINED = "step     5/1000000"  # the first progress line after step 0: it has trained


@pytest.mark.parametrize("sig, status, name", [
    (signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM"),
    (getattr(signal, "SIGHUP", None), 129, "SIGHUP")], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_to_a_real_run_saves_the_step_it_reached_and_exits_with_its_status(
        tmp_path, tiny_text_file, sig, status, name):
    if sig is None:
        pytest.skip("no SIGHUP on this system")
    process = start(train_command(tiny_text_file, tmp_path, *ENDLESS))
    wait_for_line(process, TRAINED)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    assert "Traceback" not in err and name in err
    assert f"Continue with: python llm.py train --resume --out-dir {tmp_path}" in err
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] >= 5  # (resuming it
    # bit for bit is test_reliability's, in-process)


def test_a_second_train_into_a_busy_folder_stops_at_once(tmp_path, tiny_text_file):
    first = start(train_command(tiny_text_file, tmp_path, *ENDLESS))
    wait_for_line(first, TRAINED)
    # (the progress line comes just before the step's checkpoint is saved: its temporary file
    # may exist at this moment, renamed an instant later, so it is not one of the files kept)
    files = {p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")}
    second = run_main("train", "--data", tiny_text_file, "--out-dir", tmp_path,
                      *TINY_TRAIN_OPTIONS, "--max-iters", "5")  # the lock is the first process's
    assert (second.returncode, second.stdout) == (2, "")
    assert second.stderr == (f"error: another `train` is writing into --out-dir {tmp_path}: wait "
                             "for it to finish, or choose another --out-dir\n")
    first.send_signal(signal.SIGTERM)  # the first run goes on, undisturbed, until stopped
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err
    assert files <= {p.name for p in tmp_path.iterdir()}
    sample = run_main("sample", "--out-dir", tmp_path, "--num-chars", "5")
    assert sample.returncode == 0, sample.stderr  # (the lock is gone with the first process)


def read_one_line_then_close(command):
    """Run `command` as `command | head -1` would: read one line, close the pipe, wait."""
    process = start(command)
    first = process.stdout.readline()
    process.stdout.close()
    err = process.stderr.read()
    return first, process.wait(timeout=120), err


def test_a_closed_pipe_ends_sample_quietly_and_train_loses_nothing(tmp_path, tiny_text_file):
    first, status, err = read_one_line_then_close(train_command(tiny_text_file, tmp_path))
    assert first and status == 0 and "Traceback" not in err, err  # it trained on, quietly
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] == 20
    assert (tmp_path / "ckpt.pt").exists() and (tmp_path / "loss.png").exists()
    first, status, err = read_one_line_then_close(
        [sys.executable, LLM, "sample", "--out-dir", str(tmp_path), "--num-chars", "1000000"])
    assert first == "\n" and status == 141 and err == "", err  # it stopped at once


# --- torchrun --------------------------------------------------------------------------------

def test_the_plain_torchrun_command_matches_one_process_accumulating_two_batches(tmp_path,
                                                                                 tiny_text_file):
    """Without --grad-accum-steps, 2 CPU processes (gloo) run one batch each: the same global
    batch as one process accumulating 2."""
    one = run_main("train", "--data", tiny_text_file, "--out-dir", tmp_path / "one",
                   *TINY_TRAIN_OPTIONS, "--grad-accum-steps", "2")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*TORCHRUN, LLM, "train", "--data", str(tiny_text_file), "--out-dir",
                          str(tmp_path / "two"), *TINY_TRAIN_OPTIONS],
                         capture_output=True, text=True, timeout=300, env=UNBUFFERED)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    assert "2 processes" in two.stdout and "--grad-accum-steps 2" in two.stdout
    assert two.stdout.count("done: final val loss") == 1  # printed by rank 0 only
    for a, b in zip(read_history(tmp_path / "one"), read_history(tmp_path / "two"), strict=True):
        assert a["step"] == b["step"]  # same batches, same maths; only the summation order differs
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), abs=1e-4)
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), abs=1e-4)


def test_sigterm_to_torchrun_stops_both_processes_after_the_same_step(tmp_path, tiny_text_file):
    process = start([*TORCHRUN, LLM, "train", "--data", str(tiny_text_file), "--out-dir",
                     str(tmp_path), *TINY_TRAIN_OPTIONS, *ENDLESS])
    wait_for_line(process, TRAINED)
    process.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both processes
    _, err = process.communicate(timeout=120)  # no hang: both stop after the same step
    assert process.returncode != 0
    assert err.count("Continue with: python llm.py train --resume") == 1, err[-3000:]
    assert "llm.py\", line" not in err  # no traceback from our processes (torchrun has its own)
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] >= 5


def test_a_broken_loss_on_one_process_stops_both(tmp_path, tiny_text_file):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import llm\n"
        "real_step, calls = llm.train_step, [0]\n"
        "def step(*args, **kwargs):\n"
        "    loss = real_step(*args, **kwargs)\n"
        "    calls[0] += 1\n"
        "    return float('nan') if os.environ['RANK'] == '1' and calls[0] == 13 else loss\n"
        "llm.train_step = step\n"
        "sys.exit(llm.main(sys.argv[1:]))\n", encoding="utf-8")
    result = subprocess.run([*TORCHRUN, str(script), "train", "--data", str(tiny_text_file),
                             "--out-dir", str(tmp_path / "out"), *TINY_TRAIN_OPTIONS],
                            capture_output=True, text=True, timeout=300, env=UNBUFFERED)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1, result.stderr[-3000:]
    assert "not finite in another process at step 12" in ours[0]  # said by rank 0, once
    assert "llm.py\", line" not in result.stderr
