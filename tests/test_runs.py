"""Runs in the real world, as real processes: SIGTERM, one run per folder, the plain torchrun
command, and stops coordinated across torchrun's processes."""
import csv
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, TINY_TRAIN_OPTIONS

LLM = str(ROOT / "llm.py")
UNBUFFERED = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def start(command, cwd=None):
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=UNBUFFERED, cwd=cwd)


def wait_for_line(process, prefix, seconds=120):
    """Read the process's output until a line starts with `prefix`; the lines read."""
    seen, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        seen.append(line)
        if line.startswith(prefix) or (not line and process.poll() is not None):
            return seen
    raise AssertionError(f"no line starting with {prefix!r} in {seconds} s: {seen[-5:]}")


def history(path):
    with open(path / "history.csv", encoding="utf-8") as f:
        return [(row["step"], row["train_loss"], row["val_loss"]) for row in csv.DictReader(f)]


def train_command(data, out_dir, *options):
    return [sys.executable, LLM, "train", "--data", str(data), "--out-dir", str(out_dir),
            *TINY_TRAIN_OPTIONS, *options]


def test_sigterm_saves_and_resume_is_bit_exact(tmp_path, tiny_text_file):
    options = ["--max-iters", "1500", "--eval-interval", "100", "--dropout", "0.1"]
    straight = subprocess.run(train_command(tiny_text_file, tmp_path / "straight", *options),
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    process = start(train_command(tiny_text_file, tmp_path / "stopped", *options))
    wait_for_line(process, "step   200/")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "Traceback" not in err and "SIGTERM" in err
    assert "python llm.py train --resume --out-dir" in err
    step = torch.load(tmp_path / "stopped" / "latest.pt", weights_only=True)["step"]
    assert 200 <= step < 1500  # saved at the step it stopped, not at the last evaluation
    resumed = subprocess.run([sys.executable, LLM, "train", "--data", str(tiny_text_file),
                              "--out-dir", str(tmp_path / "stopped"), "--resume"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert history(tmp_path / "stopped") == history(tmp_path / "straight")


def test_a_second_train_into_a_busy_folder_stops_at_once(tmp_path, tiny_text_file):
    first = start(train_command(tiny_text_file, tmp_path, "--max-iters", "1000000",
                                "--eval-interval", "100"))
    wait_for_line(first, "step   100/")
    # (the progress line comes just before the step's checkpoint is saved: its temporary file
    # may exist at this moment, renamed an instant later, so it is not one of the files kept)
    files = {p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")}
    second = subprocess.run(train_command(tiny_text_file, tmp_path, "--max-iters", "5"),
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "another `train` is writing into --out-dir" in second.stderr
    assert str(tmp_path) in second.stderr and second.stdout == ""
    first.send_signal(signal.SIGTERM)  # the first run goes on, undisturbed, until stopped
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err
    assert set(files) <= {p.name for p in tmp_path.iterdir()}
    sample = subprocess.run([sys.executable, LLM, "sample", "--out-dir", str(tmp_path),
                             "--num-chars", "5"], capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0, sample.stderr  # (the lock is gone with the first process)


def test_the_plain_torchrun_command_matches_one_process(tmp_path, tiny_text_file):
    """Without --grad-accum-steps, 2 processes run one batch each: one process accumulating 2."""
    one = subprocess.run(train_command(tiny_text_file, tmp_path / "one", "--grad-accum-steps", "2"),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*TORCHRUN, LLM, "train", "--data", str(tiny_text_file), "--out-dir",
                          str(tmp_path / "two"), *TINY_TRAIN_OPTIONS],
                         capture_output=True, text=True, timeout=300, env=UNBUFFERED)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    assert "2 processes" in two.stdout and "--grad-accum-steps 2" in two.stdout
    for (step_a, *a), (step_b, *b) in zip(history(tmp_path / "one"), history(tmp_path / "two"),
                                          strict=True):
        assert step_a == step_b
        assert all(abs(float(x) - float(y)) < 1e-4 for x, y in zip(a, b))


def test_a_bad_share_under_torchrun_is_one_line_from_rank_0(tmp_path, tiny_text_file):
    result = subprocess.run([*TORCHRUN, LLM, "train", "--data", str(tiny_text_file), "--out-dir",
                             str(tmp_path), *TINY_TRAIN_OPTIONS, "--grad-accum-steps", "3"],
                            capture_output=True, text=True, timeout=300, env=UNBUFFERED)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "multiple of the number of processes (2)" in ours[0]


def stop_torchrun_with(sig, tmp_path, tiny_text_file):
    process = start([*TORCHRUN, LLM, "train", "--data", str(tiny_text_file), "--out-dir",
                     str(tmp_path), *TINY_TRAIN_OPTIONS, "--max-iters", "1000000",
                     "--eval-interval", "100"])
    wait_for_line(process, "step   100/")
    process.send_signal(sig)  # to torchrun, which passes a SIGTERM on to both processes
    _, err = process.communicate(timeout=120)  # no hang: both stop after the same step
    assert err.count("Continue with: python llm.py train --resume") == 1, err[-3000:]
    assert "llm.py\", line" not in err  # no traceback from our processes (torchrun has its own)
    checkpoint = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert checkpoint["step"] >= 100
    return process.returncode


def test_sigterm_to_torchrun_stops_both_processes_after_the_same_step(tmp_path,
                                                                      tiny_text_file):
    assert stop_torchrun_with(signal.SIGTERM, tmp_path, tiny_text_file) != 0


def test_ctrl_c_to_torchrun_stops_both_processes_after_the_same_step(tmp_path, tiny_text_file):
    assert stop_torchrun_with(signal.SIGINT, tmp_path, tiny_text_file) != 0


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


def test_sample_checks_its_options_before_printing(tmp_path, tiny_text_file):
    trained = subprocess.run(train_command(tiny_text_file, tmp_path, "--max-iters", "5"),
                             capture_output=True, text=True, timeout=120)
    assert trained.returncode == 0, trained.stderr
    result = subprocess.run([sys.executable, LLM, "sample", "--out-dir", str(tmp_path),
                             "--top-k", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--top-k" in result.stderr
    assert result.stdout == ""  # the prompt is not printed before the error


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
