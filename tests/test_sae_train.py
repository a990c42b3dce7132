"""Training: synthetic FVU, eval-mode thresholds, exact resume, NaN stop, checkpoints, SAELens export, CLI."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from allocation.cli import main as cli_main
from allocation.errors import AllocationError
from allocation.sae import (
    CheckpointError,
    SparseAutoencoder,
    TopK,
    TrainConfig,
    Trainer,
    TrainingDivergedError,
    export_saelens,
    load_checkpoint,
    load_sae,
    save_sae,
)

SMALL_DATA = {"d_in": 32, "n_true_features": 64, "mean_active": 4.0}


def small_config(rule, **overrides):
    options = dict(
        rule=rule,
        k=4,
        n_features=128,
        aux="k",
        tokens=256 * 200,
        batch_size=256,
        lr=1e-2,
        dead_tokens=256 * 20,
        metrics_every=50,
        eval_batches=8,
        data_options=dict(SMALL_DATA),
    )
    options.update(overrides)
    return TrainConfig(**options)


def tiny_config(rule="mutual-choice", aux="zipf", **overrides):
    options = dict(
        rule=rule,
        k=3,
        n_features=48,
        aux=aux,
        tokens=64 * 30,
        batch_size=64,
        lr=1e-2,
        dead_tokens=64 * 5,
        metrics_every=7,
        eval_batches=2,
        data_options={"d_in": 16, "n_true_features": 32, "mean_active": 3.0},
    )
    options.update(overrides)
    return TrainConfig(**options)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores, 2 threads cost ~10x the CPU time for these small matrices."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def trained(one_thread):
    """One CI-sized run per rule on synthetic data (200 steps of 256 tokens)."""
    return {
        rule: (trainer, trainer.run())
        for rule in ("topk", "feature-choice", "mutual-choice")
        for trainer in [Trainer(small_config(rule), "synthetic")]
    }


@pytest.mark.parametrize("rule", ["topk", "mutual-choice"])
def test_synthetic_training_reaches_fvu_below_0_2(trained, rule):
    trainer, summary = trained[rule]
    assert summary["train_fvu"] < 0.2 and summary["eval_fvu"] < 0.2
    assert trainer.history[0]["fvu"] > summary["train_fvu"]  # it learned
    assert summary["feature_recovery"] > 0.8


@pytest.mark.parametrize("rule", ["feature-choice", "mutual-choice"])
def test_eval_mode_l0_on_heldout_is_within_10_percent_of_budget(trained, rule):
    trainer, summary = trained[rule]
    assert abs(summary["eval_l0"]["mean"] - 4) <= 0.4
    assert summary["eval_l0"]["max"] > summary["eval_l0"]["min"]  # adaptive: tokens differ
    assert trainer.sae.threshold.min() >= 0 and trainer.sae.threshold.max() > 0


def test_metrics_are_reported_with_spread_and_density(trained):
    trainer, _ = trained["mutual-choice"]
    record = trainer.history[-1]
    assert [h["step"] for h in trainer.history] == [50, 100, 150, 200]
    assert set(record["l0"]) == {"mean", "min", "p50", "max"}
    assert record["l0"]["mean"] == pytest.approx(4.0)  # training budget k n, exactly
    assert sum(record["density"]["counts"]) + record["density"]["never"] == 128
    for key in ("fvu", "dead_fraction", "under_used_fraction", "aux_loss", "main_loss"):
        assert math.isfinite(record[key])


@pytest.mark.parametrize("aux", ["k", "zipf"])
def test_regression_main_and_aux_losses_share_units(aux):
    """Both losses are variance-normalised: scaling the data (and the SAE with it) changes neither,
    so the aux weight 1/32 means the same at any activation scale (a raw-MSE main loss would scale by c^2)."""
    trainer = Trainer(tiny_config(rule="topk", aux=aux, dead_tokens=1), "synthetic")
    trainer.usage.update(torch.zeros(64, 48, dtype=torch.bool))  # every feature dead: aux_k is active
    batch = trainer.source.batch(64, seed=0, batch_index=0)
    with torch.no_grad():
        main, aux_value = trainer.losses(batch, trainer.sae(batch))
        trainer.sae.b_dec.mul_(10.0)
        trainer.sae.b_enc.mul_(10.0)
        scaled_main, scaled_aux = trainer.losses(10.0 * batch, trainer.sae(10.0 * batch))
    assert float(aux_value) > 0
    assert float(scaled_main) == pytest.approx(float(main), rel=1e-4)
    assert float(scaled_aux) == pytest.approx(float(aux_value), rel=1e-4)


def test_learning_rate_schedule():
    cfg = TrainConfig(
        n_features=2**14, tokens=1000 * 100, batch_size=100, warmup_steps=10, decay_fraction=0.2
    )
    assert cfg.learning_rate == pytest.approx(2e-4)
    assert TrainConfig(n_features=2**16).learning_rate == pytest.approx(1e-4)
    assert cfg.lr_at(0) == pytest.approx(2e-4 / 10)
    assert cfg.lr_at(9) == pytest.approx(2e-4)
    assert cfg.lr_at(500) == pytest.approx(2e-4)
    assert cfg.lr_at(900) == pytest.approx(2e-4 * 100 / 200)
    assert cfg.lr_at(999) == pytest.approx(2e-4 / 200)


def test_resume_is_bit_identical(tmp_path):
    straight = Trainer(tiny_config(), "synthetic", out=tmp_path / "straight")
    straight_summary = straight.run()
    interrupted = Trainer(tiny_config(), "synthetic", out=tmp_path / "resumed")
    assert interrupted.run(stop_at_step=13) == {"stopped_at_step": 13}
    resumed = Trainer.resume(tmp_path / "resumed")
    assert resumed.step == 13
    resumed_summary = resumed.run()
    for name, value in straight.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name
    assert straight.history == resumed.history
    assert straight_summary["eval_fvu"] == resumed_summary["eval_fvu"]
    # the control: continuing with a fresh optimizer (no saved state) does not give the same weights
    fresh = Trainer(tiny_config(), "synthetic", sae=load_sae(tmp_path / "resumed" / "checkpoint"))
    fresh.step = 13
    for batch in fresh.source.batches(64, seed=0, start_batch=13):
        fresh.train_step(batch)
        if fresh.step == 30:
            break
    assert not torch.equal(fresh.sae.W_enc, straight.sae.W_enc)


def test_nan_loss_stops_training_and_keeps_last_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(checkpoint_every=5), "synthetic", out=tmp_path)
    trainer.run(stop_at_step=5)
    files = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}
    with torch.no_grad():
        trainer.sae.W_enc[0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match="became nan at step 5.*last good checkpoint.*is intact"):
        trainer.run()
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()} == files
    assert Trainer.resume(tmp_path).step == 5


def test_corrupt_checkpoints_raise_clear_errors(tmp_path):
    trainer = Trainer(tiny_config(), "synthetic", out=tmp_path)
    trainer.run(stop_at_step=3)
    checkpoint = tmp_path / "checkpoint"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    data = bytearray((checkpoint / "sae.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (checkpoint / "sae.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sae.safetensors.*corrupt"):
        load_checkpoint(checkpoint)
    (checkpoint / "trainer.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="trainer.json.*corrupt"):
        Trainer.resume(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_interrupted_swap_falls_back_to_previous_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(), "synthetic", out=tmp_path)
    trainer.run(stop_at_step=3)
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.old")  # crash between the two renames
    assert Trainer.resume(tmp_path).step == 3


def test_save_and_load_sae_round_trip(tmp_path):
    sae = SparseAutoencoder(8, 16, TopK(2), seed=3)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.rule == sae.rule
    for name, value in sae.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name])


@pytest.mark.parametrize("rule", ["feature-choice", "mutual-choice"])
def test_saelens_export_jumprelu_matches_eval_encode(tmp_path, rule):
    trainer = Trainer(tiny_config(rule=rule, aux="k"), "synthetic")
    trainer.run()
    export_saelens(trainer.sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    weights = load_file(tmp_path / "sae_weights.safetensors")
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == 48 and cfg["d_in"] == 16
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    x = trainer.source.batch(32, seed=5, batch_index=0, split="heldout")
    hidden_pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    saelens_acts = torch.relu(hidden_pre) * (hidden_pre > weights["threshold"])  # SAELens JumpReLU encode
    trainer.sae.eval()
    torch.testing.assert_close(saelens_acts, trainer.sae.encode(x))
    if rule == "mutual-choice":
        assert torch.all(weights["threshold"] == weights["threshold"][0])


def test_saelens_export_topk(tmp_path):
    export_saelens(SparseAutoencoder(8, 16, TopK(3)), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3
    assert "threshold" not in load_file(tmp_path / "sae_weights.safetensors")


def test_bad_training_input_raises_clear_errors(tmp_path):
    with pytest.raises(AllocationError, match="k=200 exceeds n_features=128"):
        small_config("topk", k=200)
    with pytest.raises(AllocationError, match="rule must be one of"):
        small_config("bogus")
    with pytest.raises(AllocationError, match="aux must be one of"):
        small_config("topk", aux="l1")
    with pytest.raises(AllocationError, match="nowhere.npy"):
        Trainer(small_config("topk", data_options={}), str(tmp_path / "nowhere.npy"))
    bad = torch.randn(512, 8)
    bad[7, 3] = float("nan")
    with pytest.raises(AllocationError, match="NaN|nan|finite"):
        Trainer(small_config("topk", data_options={}), bad)
    sae = SparseAutoencoder(16, 128, TopK(4))
    with pytest.raises(AllocationError, match="d_in=16.*d_in=32"):
        Trainer(small_config("topk"), "synthetic", sae=sae)


def test_cli_train_prints_summary_table_and_resumes(tmp_path, capsys):
    args = [
        "train",
        "--rule",
        "mutual-choice",
        "--k",
        "3",
        "--n-features",
        "48",
        "--aux",
        "zipf",
        "--tokens",
        str(64 * 12),
        "--batch-size",
        "64",
        "--lr",
        "0.01",
        "--metrics-every",
        "6",
        "--data-option",
        "d_in=16",
        "--data-option",
        "n_true_features=32",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "| rule" in printed and "mutual-choice" in printed and "eval FVU" in printed
    for name in (
        "summary.json",
        "metrics.jsonl",
        "checkpoint/cfg.json",
        "checkpoint/sae.safetensors",
        "saelens/cfg.json",
        "saelens/sae_weights.safetensors",
    ):
        assert (tmp_path / name).exists(), name
    assert (
        cli_main(["train", "--resume", "--rule", "mutual-choice", "--out", str(tmp_path), "--no-progress"])
        == 0
    )
    assert "mutual-choice" in capsys.readouterr().out
    assert cli_main(["train", "--rule", "topk", "--k", "999", "--n-features", "48", "--no-progress"]) == 2
    assert "k=999 exceeds n_features=48" in capsys.readouterr().err


def test_regression_train_step_uses_the_batch_rule_after_an_evaluation_left_the_sae_in_eval_mode():
    """train_step never called sae.train(): after sae.eval() (or a downstream evaluation, whose
    reconstruct left the SAE in eval mode) training selected with the inference thresholds."""
    from allocation.sae.downstream import sae_reconstruction

    trainer = Trainer(tiny_config("mutual-choice", aux="none"), "synthetic")
    batches = trainer.source.batches(64, seed=0)
    sae_reconstruction(trainer.sae)(next(batches))
    assert trainer.sae.training, "an evaluation must restore the SAE's mode"
    trainer.sae.eval()  # thresholds still at their initial value: eval mode keeps far more than k
    result = trainer.train_step(next(batches))
    assert result.l0 == pytest.approx(3.0)  # the batch budget k n, exactly
    assert trainer.sae.training


# ------------------------------------------------------------------------------ aux_zipf_loss options


def test_aux_zipf_options_reach_the_loss():
    from allocation.sae.losses import aux_zipf_loss

    options = {"zipf_deficit": "log_ratio", "zipf_fit": True, "zipf_exclude_saturated": True, "zipf_fill": True,
               "zipf_under_used_only": False}
    trainer = Trainer(tiny_config(rule="topk", **options), "synthetic")
    trainer.usage.update(torch.rand(64, 48) < torch.linspace(0.0, 0.5, 48))  # graded usage: many deficits
    batch = trainer.source.batch(64, seed=0, batch_index=0)
    with torch.no_grad():
        out = trainer.sae(batch)
        got = trainer.aux_loss(batch, out)
        want = aux_zipf_loss(out.pre, out.mask, batch - out.x_hat, trainer.sae.W_dec, trainer.usage.frequency,
                             3.0, deficit="log_ratio", fit=True, exclude_saturated=True, fill=True,
                             under_used_only=False)
        default = aux_zipf_loss(out.pre, out.mask, batch - out.x_hat, trainer.sae.W_dec, trainer.usage.frequency,
                                3.0)
    assert float(got) == pytest.approx(float(want)) and float(got) != pytest.approx(float(default))


def test_configs_saved_before_0_2_keep_the_aux_zipf_loss_they_trained_with():
    saved = {k: v for k, v in TrainConfig(aux="zipf").to_dict().items() if not k.startswith("zipf_")}
    old = TrainConfig.from_dict({**saved, "zipf_s": 1.0})
    assert (old.zipf_deficit, old.zipf_fit, old.zipf_exclude_saturated, old.zipf_fill, old.zipf_under_used_only) == (
        "absolute", False, False, False, False)
    assert TrainConfig.from_dict(TrainConfig(aux="zipf").to_dict()) == TrainConfig(aux="zipf")


def test_aux_zipf_options_are_flags_and_bad_values_are_named():
    import argparse

    from allocation.commands.train import add_config_arguments, given_options

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--zipf-deficit", "relative", "--zipf-fit", "--no-zipf-fill"])
    assert given_options(args, None) == {"zipf_deficit": "relative", "zipf_fit": True, "zipf_fill": False}
    with pytest.raises(AllocationError, match="zipf_deficit must be one of absolute, relative, log_ratio"):
        TrainConfig(zipf_deficit="square")
    with pytest.raises(AllocationError, match="zipf_fit must be true or false"):
        TrainConfig(zipf_fit="yes")
    with pytest.raises(SystemExit) as exited:  # argparse's choices: usage and exit status 2
        cli_main(["train", "--zipf-deficit", "square", "--no-progress"])
    assert exited.value.code == 2
