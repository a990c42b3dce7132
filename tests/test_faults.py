"""Fault injection: SIGKILL a training process at random instants, resume, compare with an unbroken run.

Each trial forks a child that runs ``allocation train --checkpoint-every 1`` on a simulated slow
disk (2 ms per fsync, so most instants fall inside a checkpoint write), kills it by PID with SIGKILL
at a uniformly random time within the reference run's duration, then resumes it (``--resume``; a
fresh run if no checkpoint was complete yet) in another child. The resumed run must end
bit-identical to the reference (SAE tensors, optimizer state, the SAELens export) with no staging
directory, temporary file or lock left behind. Children are forked from this process (torch already
imported, one thread), so a trial takes a fraction of a second on an idle machine.
"""

import json
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from allocation.cli import main as cli_main
from allocation.sae.atomic import stale_entries
from allocation.sae.rundir import LOCK_FILE, RUN_ENTRIES

TRIALS = 20
ARGS = [
    "train", "--rule", "mutual-choice", "--k", "3", "--n-features", "48", "--aux", "zipf",
    "--tokens", str(64 * 30), "--batch-size", "64", "--lr", "0.01", "--metrics-every", "7",
    "--data-option", "d_in=16", "--data-option", "n_true_features=32", "--checkpoint-every", "1",
    "--threads", "1", "--no-progress",
]  # fmt: skip


SLOW_DISK_SECONDS = 0.002  # added to every fsync in the children: a slow disk widens the write windows


def _child(argv):
    torch.set_num_threads(1)
    fsync = os.fsync

    def slow_fsync(handle):
        time.sleep(SLOW_DISK_SECONDS)
        fsync(handle)

    os.fsync = slow_fsync  # this child only (forked): most random instants then fall inside a write
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os._exit(cli_main(argv))


def _start(argv):
    process = multiprocessing.get_context("fork").Process(target=_child, args=(argv,))
    process.start()
    return process


def _run(argv):
    process = _start(argv)
    process.join(60)
    return process.exitcode


def _outputs(out):
    return {
        "sae": load_file(out / "checkpoint" / "sae.safetensors"),
        "trainer": load_file(out / "checkpoint" / "trainer.safetensors"),
        "saelens": load_file(out / "saelens" / "sae_weights.safetensors"),
        "saelens_cfg": (out / "saelens" / "cfg.json").read_bytes(),
    }


def _identical(a, b):
    for key in ("sae", "trainer", "saelens"):
        if a[key].keys() != b[key].keys() or not all(torch.equal(a[key][n], b[key][n]) for n in a[key]):
            return False
    return a["saelens_cfg"] == b["saelens_cfg"]


def _phase(out):
    """Where the kill landed, judged from what it left on disk."""
    if stale_entries(out, RUN_ENTRIES) or (out / ".checkpoint.old").exists():
        return "mid-write"
    if not (out / "checkpoint").exists():
        return "before the first checkpoint"
    if not (out / "summary.json").exists():
        return "between writes"
    return "after the run"


def test_sigkill_at_random_instants_then_resume_is_bit_identical(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the reference runs in this process: it also imports what training needs lazily, so the
        # forked children start with it loaded
        assert cli_main(ARGS + ["--out", str(tmp_path / "warm-up")]) == 0
        started = time.perf_counter()
        assert _run(ARGS + ["--out", str(tmp_path / "reference")]) == 0
        duration = time.perf_counter() - started
        reference = _outputs(tmp_path / "reference")
        assert _identical(_outputs(tmp_path / "warm-up"), reference)
        rng = random.Random(11)
        phases, identical = [], 0
        for trial in range(TRIALS):
            out = tmp_path / f"trial{trial}"
            process = _start(ARGS + ["--out", str(out)])
            time.sleep(rng.uniform(0.0, duration))
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join(60)
            phases.append(_phase(out) if process.exitcode == -signal.SIGKILL else "finished before the kill")
            resume = ["--resume"] if (out / "checkpoint").exists() or (out / ".checkpoint.old").exists() else []
            assert _run(ARGS + resume + ["--out", str(out)]) == 0, (trial, phases[-1])
            assert stale_entries(out, RUN_ENTRIES) == [] and not (out / ".checkpoint.old").exists()
            assert not (out / LOCK_FILE).exists()
            assert json.loads((out / "summary.json").read_text())["steps"] == 30
            identical += _identical(_outputs(out), reference)
        counts = {phase: phases.count(phase) for phase in sorted(set(phases))}
        print(f"\nfault suite: {TRIALS} trials in {time.perf_counter() - started:.1f} s, kills {counts}, "
              f"{identical}/{TRIALS} bit-identical to the uninterrupted run")
        assert identical == TRIALS
        assert phases.count("mid-write") >= 3  # the suite does exercise interrupted writes
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("victim", ["summary.json", "saelens"])
def test_sigkill_during_the_final_writes_leaves_a_loadable_run_that_export_repairs(tmp_path, victim):
    """A kill while writing the SAELens export or summary.json: the checkpoint still loads and
    `allocation export RUN` writes both again."""
    out = tmp_path / "run"
    assert _run(ARGS + ["--out", str(out)]) == 0
    expected = _outputs(out)
    # the state such a kill leaves: the final checkpoint, a staging sibling, no (or an old) victim
    (out / "summary.json").unlink()
    if victim == "saelens":
        (out / "saelens").rename(out / ".saelens.tmp-killed")
    else:
        (out / ".summary.json.killed.tmp").write_text('{"half": ')
    assert _run(["export", str(out)]) == 0
    assert _identical(_outputs(out), expected)
    assert json.loads((out / "summary.json").read_text())["steps"] == 30
    assert stale_entries(out, RUN_ENTRIES) == []
