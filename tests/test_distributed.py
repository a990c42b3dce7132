"""Distributed training and global allocation on 2 CPU ranks (gloo), spawned by the tests.

Global allocation (``allocation.distributed``) is the single-process rule on the concatenated batch:
the same kept values per slice (so the same objective), exactly the budget under ties, and the same
mask when no two scores tie.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from allocation import AllocationError, Constraints, allocate
from allocation.distributed import Communicator, Shard, global_allocate, run_local_ranks
from allocation.testing import constraints, score_matrices

WORLD = 2


def _gather_rows(local: torch.Tensor, shard: Shard, comm: Communicator) -> torch.Tensor:
    padded = torch.zeros((shard.n_max, local.shape[1]), dtype=local.dtype)
    padded[: shard.n_local] = local
    parts = comm.all_gather(padded)
    return torch.cat([parts[r, :size] for r, size in enumerate(shard.sizes)])


def _kept_values(scores, mask, caps: Constraints):
    """The kept values, sorted: per column for feature caps alone, else overall (unique for laminar caps)."""
    if caps.per_feature is not None and caps.total is None:
        return [sorted(scores[:, j][mask[:, j]].tolist()) for j in range(scores.shape[1])]
    return sorted(scores[mask].tolist())


@st.composite
def split_problems(draw, per_token, per_feature, total):
    scores = draw(score_matrices(max_tokens=9, max_features=6))
    caps = draw(constraints(*scores.shape, per_token=per_token, per_feature=per_feature, total=total))
    cut = draw(st.integers(0, scores.shape[0]))
    return scores, caps, cut


EXACTNESS_CASES = {  # (per_token, per_feature, total) present
    "mutual-choice": (False, False, True),
    "feature-choice": (False, True, False),
    "feature-choice + budget": (False, True, True),
    "topk + budget": (True, False, True),
}


def check_global_equals_single(rank: int, comm: Communicator) -> dict:
    """Per case: None, or the first counter-example (both ranks draw the same examples in the same order)."""
    failures = {}
    for name, flags in EXACTNESS_CASES.items():

        # no shrinking: both ranks must run the same examples in the same order (shrinking is timed)
        @settings(max_examples=60, derandomize=True, database=None, deadline=None,
                  phases=[Phase.explicit, Phase.generate])
        @given(split_problems(*flags))
        def property_(problem):
            scores, caps, cut = problem
            rows = slice(0, cut) if rank == 0 else slice(cut, None)
            local = scores[rows]
            shard = Shard(0 if rank == 0 else cut, local.shape[0], scores.shape[0],
                          (cut, scores.shape[0] - cut))
            mask = _gather_rows(global_allocate(local, caps, comm, shard), shard, comm)
            expected = allocate(scores, caps)
            assert _kept_values(scores, mask, caps) == _kept_values(scores, expected, caps), (scores, caps, cut)
            assert int(mask.sum()) == int(expected.sum()), (scores, caps, cut)  # exactly the budget, ties or not
            assert not bool(mask[scores <= 0].any())
            if scores.unique().numel() == scores.numel():  # tie-free: the mask itself is unique
                assert torch.equal(mask, expected), (scores, caps, cut)

        try:
            property_()
            failures[name] = None
        except AssertionError as error:
            failures[name] = str(error)
    return failures


def check_zipf_feature_choice(rank: int, comm: Communicator) -> bool:
    """Zipf-shaped capacities of FeatureChoice(k, zipf_capacities=1) on a 64 x 48 batch with ties."""
    from allocation.sae import FeatureChoice

    scores = torch.randn(64, 48, generator=torch.Generator().manual_seed(1)).mul(4).round()  # many ties
    caps = FeatureChoice(k=4, zipf_capacities=1.0).constraints(64, 48)
    shard = Shard.equal(64, rank, 2)
    local = scores[shard.offset: shard.offset + shard.n_local]
    mask = _gather_rows(global_allocate(local, caps, comm, shard), shard, comm)
    expected = allocate(scores, caps)
    return (_kept_values(scores, mask, caps) == _kept_values(scores, expected, caps)
            and int(mask.sum()) == int(expected.sum()))


def check_mixed_caps(rank: int, comm: Communicator) -> dict:
    """Token AND feature caps: gathered and solved when small, refused above gather_max_entries."""
    scores = torch.randn(12, 10, generator=torch.Generator().manual_seed(2))
    caps = Constraints(per_token=3, per_feature=4)
    shard = Shard.equal(12, rank, 2)
    local = scores[shard.offset: shard.offset + shard.n_local]
    mask = _gather_rows(global_allocate(local, caps, comm, shard, gather_max_entries=120), shard, comm)
    try:
        global_allocate(local, caps, comm, shard, gather_max_entries=119)
        refusal = None
    except AllocationError as error:
        refusal = str(error)
    return {"equal": torch.equal(mask, allocate(scores, caps)), "refusal": refusal}


# ------------------------------------------------------------------------------------ training

RULES = {  # rule options, aux loss: every batch rule's global path, both aux losses' scopes
    "topk": dict(rule="topk", aux="k"),
    "feature-choice": dict(rule="feature-choice", aux="k"),
    "feature-choice-zipf": dict(rule="feature-choice", zipf_capacities=1.0, aux="zipf"),
    "mutual-choice": dict(rule="mutual-choice", aux="zipf"),
    "custom": dict(rule="custom", per_token=3, per_feature=4, aux="none"),  # mixed caps: gathered, auction
}


def _config(name: str, **changes):
    from allocation.sae import TrainConfig

    options = dict(k=4, n_features=48, batch_size=32, tokens=32 * 6, dead_tokens=32, metrics_every=1,
                   b_dec_sample=64, data_options={"d_in": 16, "n_true_features": 64}, warmup_steps=0)
    return TrainConfig(**{**options, **RULES[name], **changes})


def _state(trainer) -> dict:
    sae = trainer.sae
    return {"weights": {k: v.detach().clone() for k, v in sae.state_dict().items()},
            "usage": {k: v.clone() for k, v in trainer.usage.state_dict().items()}}


def _steps(trainer, steps: int) -> None:
    cfg = trainer.config
    batches = trainer.source.batches(cfg.batch_size, seed=cfg.seed, start_batch=trainer.step)
    for _ in range(steps):
        batch = next(batches)
        trainer.train_step(trainer.sae.scope.rows(batch) if trainer.comm is not None else batch)


def on_two_ranks(rank, world_size, folder):
    """Everything the tests below check on 2 ranks, in one pair of processes (a spawn costs seconds)."""
    from pathlib import Path

    from allocation.sae import Trainer

    folder = Path(folder)
    comm = Communicator()
    results = {"exactness": check_global_equals_single(rank, comm), "zipf": check_zipf_feature_choice(rank, comm),
               "mixed": check_mixed_caps(rank, comm)}
    for name in RULES:  # two steps of every rule on this rank's half of each batch
        trainer = Trainer(_config(name))
        _steps(trainer, 2)
        results[name] = _state(trainer)
    trainer = Trainer(_config("mutual-choice", allocation_scope="local"))
    _steps(trainer, 2)
    results["mutual-choice-local"] = _state(trainer)
    # resume: 4 steps straight, against 2 steps, a checkpoint, and Trainer.resume for 2 more
    straight = Trainer(_config("mutual-choice", checkpoint_every=2), out=folder / "straight")
    straight.run(stop_at_step=4)
    broken = Trainer(_config("mutual-choice", checkpoint_every=2), out=folder / "broken")
    broken.run(stop_at_step=2)
    resumed = Trainer.resume(folder / "broken")
    resumed.run(stop_at_step=4)
    results["resume"] = (_state(straight), _state(resumed), straight.history, resumed.history)
    Trainer(_config("mutual-choice", allocation_scope="local"), out=folder / "local").run(stop_at_step=2)
    if rank == 0:
        torch.save(results, folder / "ranks.pt")


def _assert_close(ranks: dict, single: dict, what: str) -> None:
    for key, value in single["weights"].items():
        torch.testing.assert_close(ranks["weights"][key], value, rtol=1e-4, atol=1e-5, msg=f"{what}: {key}")
    for key, value in single["usage"].items():
        assert torch.equal(ranks["usage"][key], value), (what, key)


@pytest.fixture(scope="module")
def two_rank_training(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("ranks")
    assert run_local_ranks(on_two_ranks, WORLD, str(folder)) == [0, 0]
    return {**torch.load(folder / "ranks.pt", weights_only=False), "folder": folder}


@pytest.mark.parametrize("name", list(EXACTNESS_CASES))
def test_global_allocation_on_two_ranks_equals_one_process_on_the_concatenated_batch(two_rank_training, name):
    assert two_rank_training["exactness"][name] is None


def test_global_feature_choice_with_zipf_capacities_and_ties_keeps_the_same_values(two_rank_training):
    assert two_rank_training["zipf"]


def test_mixed_caps_are_gathered_when_small_and_refused_above_the_stated_size(two_rank_training):
    assert two_rank_training["mixed"]["equal"]
    message = two_rank_training["mixed"]["refusal"]
    assert message is not None and "gather_max_entries=119" in message and "--allocation-scope local" in message


@pytest.mark.parametrize("name", list(RULES))
def test_two_steps_on_two_ranks_equal_one_process_on_the_full_batch(two_rank_training, name):
    from allocation.sae import Trainer

    torch.set_num_threads(1)
    single = Trainer(_config(name))
    _steps(single, 2)
    _assert_close(two_rank_training[name], _state(single), name)


def test_local_scope_allocates_each_ranks_rows_so_it_differs_from_one_process(two_rank_training):
    from allocation.sae import Trainer

    torch.set_num_threads(1)
    single = Trainer(_config("mutual-choice"))
    _steps(single, 2)
    local = two_rank_training["mutual-choice-local"]
    assert not torch.allclose(local["weights"]["W_enc"], single.sae.W_enc.detach(), rtol=1e-4, atol=1e-5)
    assert local["weights"]["thresholds.weight"] == single.sae.thresholds.weight  # same number of updates


def test_metrics_on_two_ranks_are_those_of_one_process(two_rank_training):
    from allocation.sae import Trainer

    torch.set_num_threads(1)
    single = Trainer(_config("mutual-choice", checkpoint_every=2))
    single.run(stop_at_step=4)
    ranks = two_rank_training["resume"][2]
    assert [record["step"] for record in ranks] == [record["step"] for record in single.history]
    for mine, theirs in zip(ranks, single.history):
        for key in ("fvu", "main_loss", "aux_loss", "loss"):
            assert abs(mine[key] - theirs[key]) <= 1e-5 * max(1.0, abs(theirs[key])), (key, mine, theirs)
        assert mine["l0"] == theirs["l0"] and mine["window_tokens"] == theirs["window_tokens"]


def test_a_local_scope_run_resumes_only_on_as_many_processes(two_rank_training):
    from allocation.sae import Trainer

    with pytest.raises(AllocationError, match="on 2 process.*but this resume has 1"):
        Trainer.resume(two_rank_training["folder"] / "local")


def test_a_global_batch_that_does_not_split_evenly_is_refused_with_the_fix():
    with pytest.raises(AllocationError, match="choose a --batch-size divisible by 2"):
        Shard.equal(33, 0, 2)


def test_resume_on_two_ranks_continues_identically(two_rank_training):
    straight, resumed, straight_history, resumed_history = two_rank_training["resume"]
    for key, value in straight["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key
    for key, value in straight["usage"].items():
        assert torch.equal(resumed["usage"][key], value), key
    assert resumed_history == straight_history
    assert [record["step"] for record in straight_history] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------ a rank that dies

TIMEOUT_S = 20.0


def kill_rank_one(rank, world_size, folder):
    import os
    import signal
    import time
    from pathlib import Path

    from allocation.distributed import RankFailedError
    from allocation.sae import Trainer

    trainer = Trainer(_config("mutual-choice"))
    _steps(trainer, 1)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    started = time.monotonic()
    try:
        _steps(trainer, 1)
    except RankFailedError as error:
        (Path(folder) / "rank0.txt").write_text(f"{time.monotonic() - started}\n{error}")
        raise SystemExit(3) from None


def test_a_killed_rank_makes_the_others_exit_non_zero_within_the_timeout(tmp_path):
    codes = run_local_ranks(kill_rank_one, WORLD, str(tmp_path), timeout_s=TIMEOUT_S, join_s=TIMEOUT_S + 60)
    assert codes[0] == 3 and codes[1] != 0 and codes[1] is not None
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert float(seconds) < TIMEOUT_S
    assert "rank 0 of 2" in message and "a rank died or stalled" in message


# ------------------------------------------------------------------------------------ the command line


def test_allocation_train_under_torchrun_trains_what_one_process_trains(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from allocation.sae import Trainer
    from allocation.sae.checkpoint import load_checkpoint

    flags = ["--rule", "feature-choice", "--k", "4", "--n-features", "48", "--batch-size", "32", "--tokens", "96",
             "--data-option", "d_in=16", "--eval-batches", "1", "--calibrate-l0", "0", "--threads", "1",
             "--no-progress", "--out", str(tmp_path / "ranks")]
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "allocation", "train", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=170,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| feature-choice") == 1  # rank 0 alone prints the summary
    assert (tmp_path / "ranks" / "summary.json").exists()
    torch.set_num_threads(1)
    single = Trainer(_config("feature-choice", tokens=96, eval_batches=1, calibrate_l0=0, data_options={"d_in": 16},
                             metrics_every=100, dead_tokens=10_000_000, warmup_steps=None, b_dec_sample=4096))
    _steps(single, 3)
    sae, _, _, _ = load_checkpoint(tmp_path / "ranks" / "checkpoint")
    for key, value in single.sae.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_the_benchmark_quick_run_writes_its_result_and_table(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_distributed

    assert bench_distributed.main(["--quick", "--output", str(tmp_path / "quick.json")]) == 0
    payload = json.loads((tmp_path / "quick.json").read_text())
    mc = payload["rules"]["mutual-choice"]["two_processes"]
    assert payload["rules"]["topk"]["two_processes"]["allocation_bytes_per_step"] == 0  # per token: no traffic
    assert 0 < mc["allocation_bytes_per_step"] and mc["all_gather_bytes_avoided"] == 32 * 64 * 4
    assert "| mutual-choice |" in bench_distributed.section(payload)
