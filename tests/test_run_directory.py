"""Issue 11: runs that cannot be lost or mislabelled, and one clear line (exit 2) for bad input.

The run directory's rules (refuse / --overwrite / --resume checks / lock), nothing broken saved as
good, integrity of every checkpoint file, no leaked staging directories, the umask, the export
sub-command, and the SAELens export's format.
"""

import json
import os
import stat
import subprocess
import sys
import warnings

import pytest
import torch
from test_sae_train import tiny_config

from allocation.cli import main as cli_main
from allocation.errors import AllocationError
from allocation.sae import (
    CheckpointError,
    RunDirectoryError,
    SparseAutoencoder,
    TopK,
    TrainConfig,
    Trainer,
    TrainingDivergedError,
    TrainingExplodedWarning,
    export_saelens,
    load_checkpoint,
)
from allocation.sae.minilm import hook_name
from allocation.sae.rundir import RunDirectory
from allocation.sae.saelens import PLACEHOLDER_HOOK_NAME, SAELENS_VERSION

TINY_ARGS = [
    "train", "--rule", "mutual-choice", "--k", "3", "--n-features", "48", "--aux", "zipf",
    "--tokens", str(64 * 12), "--batch-size", "64", "--lr", "0.01", "--metrics-every", "6",
    "--data-option", "d_in=16", "--data-option", "n_true_features=32", "--no-progress",
]  # fmt: skip


def _files(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ 1. SAELens format


@pytest.mark.parametrize("rule", ["topk", "feature-choice", "mutual-choice"])
def test_issue11_saelens_cfg_is_version_6_with_a_hook_name(tmp_path, rule):
    """Issue 11.1: the cfg had no metadata.sae_lens_version (read as pre-6.0, TypeError in SAELens)
    and a null hook_name; now both are set (the placeholder when the data source has no hook)."""
    Trainer(tiny_config(rule=rule, aux="k"), "synthetic", out=tmp_path).run()
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["metadata"]["sae_lens_version"] == SAELENS_VERSION
    assert cfg["metadata"]["hook_name"] == PLACEHOLDER_HOOK_NAME
    assert cfg["metadata"]["dataset_path"] == "synthetic"
    assert cfg["architecture"] == ("topk" if rule == "topk" else "jumprelu")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"


def test_saelens_export_takes_model_and_hook_from_the_data_files_sidecar(tmp_path):
    from allocation.sae.data import write_memmap

    data = write_memmap(tmp_path / "acts.f32", torch.randn(600, 16), model="gpt2", hook_name="blocks.5.hook_resid_post")
    Trainer(tiny_config(data_options={}, aux="k"), str(data), out=tmp_path / "run").run()
    metadata = json.loads((tmp_path / "run" / "saelens" / "cfg.json").read_text())["metadata"]
    assert metadata["hook_name"] == "blocks.5.hook_resid_post" and metadata["model_name"] == "gpt2"
    assert metadata["dataset_path"] == str(data)


def test_minilm_hooks_are_transformerlens_bert_names():
    assert hook_name(0) == "hook_full_embed"
    assert hook_name(3) == "blocks.2.hook_normalized_resid_post"


def test_issue11_saelens_export_directory_appears_atomically(tmp_path, monkeypatch):
    """Issue 11.10: the export wrote its two files separately; a failure after the first left a new
    weights file beside an old cfg. Now the old export stays whole until the new one is complete."""
    export_saelens(SparseAutoencoder(8, 16, TopK(3), seed=0), tmp_path / "saelens")
    before = _files(tmp_path / "saelens")
    import allocation.sae.atomic as atomic

    real_write, calls = atomic.write_file, []

    def failing_write(path, data, **options):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_write(path, data, **options)

    monkeypatch.setattr(atomic, "write_file", failing_write)
    with pytest.raises(OSError, match="simulated"):
        export_saelens(SparseAutoencoder(8, 16, TopK(5), seed=1), tmp_path / "saelens")
    assert _files(tmp_path / "saelens") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saelens"]  # no staging left


# ------------------------------------------------------------------------------------ 2. divergence


def test_issue11_a_diverged_step_is_never_checkpointed(tmp_path):
    """Issue 11.2: with lr 1e30 a step zeroed W_dec and was saved as 'the last good checkpoint'."""
    trainer = Trainer(tiny_config(checkpoint_every=1), "synthetic", out=tmp_path)
    trainer.run(stop_at_step=2)
    trainer.config.lr = 1e30
    with pytest.raises(TrainingDivergedError, match="nothing from this step was saved.*intact"):
        trainer.run()
    resumed = Trainer.resume(tmp_path)
    assert resumed.step == 2 and resumed.parameter_problem() is None
    norms = resumed.sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    with pytest.raises(TrainingDivergedError, match="refusing to checkpoint"):
        trainer.save()  # the diverged trainer cannot be saved by hand either


def test_issue11_cli_lr_1e30_stops_with_no_checkpoint_and_no_torch_warning(tmp_path, capsys):
    """Issue 11.2 / 11.10: the CLI case of the issue; no spurious requires_grad warning either."""
    args = TINY_ARGS + ["--lr", "1e30", "--checkpoint-every", "1", "--out", str(tmp_path)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "zero norm" in err or "NaN or inf" in err
    assert "no checkpoint was written" in err
    assert not (tmp_path / "checkpoint").exists()
    assert not [w for w in caught if "requires_grad" in str(w.message)]


def test_issue11_non_finite_loss_message_has_no_requires_grad_warning():
    """Issue 11.10: float(loss) on a tensor that requires grad warned before the divergence message."""
    trainer = Trainer(tiny_config(), "synthetic")
    trainer.losses = lambda batch, out: (out.x_hat.sum() * float("nan"), out.x_hat.new_zeros(()))
    batch = trainer.source.batch(64, seed=0, batch_index=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TrainingDivergedError, match="the loss became nan"):
            trainer.train_step(batch)


def test_issue11_exploding_loss_warns_and_the_summary_says_so(tmp_path):
    """Issue 11.2: --lr 1e3 finished rc 0 with train FVU 1.9e18 and no warning."""
    with pytest.warns(TrainingExplodedWarning, match="the loss exploded"):
        summary = Trainer(tiny_config(lr=1e3), "synthetic", out=tmp_path).run()
    assert summary["warnings"] and "exploded" in summary["warnings"][0]
    assert json.loads((tmp_path / "summary.json").read_text())["warnings"] == summary["warnings"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Trainer(tiny_config(), "synthetic").run()["warnings"] == []  # a healthy run: none


# ------------------------------------------------------------------------------------ 3. fresh runs


def test_issue11_fresh_run_refuses_a_directory_holding_a_run(tmp_path, capsys):
    """Issue 11.3: a fresh run on a partial run's directory replaced its checkpoint, rc 0."""
    Trainer(tiny_config(), "synthetic", out=tmp_path).run(stop_at_step=10)
    before = _files(tmp_path)
    with pytest.raises(RunDirectoryError, match=r"step 10 of 30.*--resume.*--overwrite"):
        Trainer(tiny_config(), "synthetic", out=tmp_path)
    assert cli_main(TINY_ARGS + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert _files(tmp_path) == before
    (tmp_path / "notes.txt").write_text("mine")
    assert cli_main(TINY_ARGS + ["--out", str(tmp_path), "--overwrite"]) == 0
    assert load_checkpoint(tmp_path / "checkpoint")[3]["step"] == 12
    assert (tmp_path / "notes.txt").read_text() == "mine"  # --overwrite deletes only the run's own files


def test_fresh_run_accepts_an_empty_or_new_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    assert cli_main(TINY_ARGS + ["--out", str(tmp_path / "empty")]) == 0
    assert cli_main(TINY_ARGS + ["--out", str(tmp_path / "new" / "nested")]) == 0


# ------------------------------------------------------------------------------------ 4. resume checks


@pytest.fixture
def feature_choice_run(tmp_path):
    args = [a if a != "mutual-choice" else "feature-choice" for a in TINY_ARGS]
    assert cli_main(args + ["--out", str(tmp_path), "--checkpoint-every", "4"]) == 0
    return tmp_path


def test_issue11_resume_names_every_conflicting_option(feature_choice_run, capsys):
    """Issue 11.4: --resume --rule mutual-choice --k 16 --n-features 512 continued silently as the
    checkpoint's feature-choice/48."""
    capsys.readouterr()
    argv = ["train", "--resume", "--out", str(feature_choice_run), "--no-progress"]
    assert cli_main(argv + ["--rule", "mutual-choice", "--k", "16", "--n-features", "512"]) == 2
    err = capsys.readouterr().err
    assert "--rule mutual-choice (the checkpoint has feature-choice)" in err
    assert "--k 16 (the checkpoint has 3)" in err and "--n-features 512 (the checkpoint has 48)" in err
    assert cli_main(argv + ["--data-option", "d_in=8"]) == 2
    assert "--data-option d_in=8 (the checkpoint has d_in=16 n_true_features=32)" in capsys.readouterr().err
    assert cli_main(argv + ["--tokens", "64"]) == 2
    assert "can only extend a run" in capsys.readouterr().err


def test_resume_accepts_matching_and_resumable_options(feature_choice_run, capsys):
    argv = ["train", "--resume", "--out", str(feature_choice_run), "--no-progress"]
    assert cli_main(argv + ["--rule", "feature-choice", "--k", "3", "--device", "cpu", "--threads", "1"]) == 0
    assert cli_main(argv + ["--tokens", str(64 * 16), "--checkpoint-every", "2"]) == 0
    summary = json.loads((feature_choice_run / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["rule"] == "feature-choice"


@pytest.mark.parametrize(
    "name, edit",
    [
        ("cfg.json", lambda cfg: cfg["train"].update(rule="topk")),
        ("cfg.json", lambda cfg: cfg["sae"]["rule"].update(k=5)),
        ("trainer.json", lambda state: state.update(step=10**6)),
    ],
)
def test_issue11_an_edited_checkpoint_file_is_refused_as_corrupt(feature_choice_run, capsys, name, edit):
    """Issue 11.4: editing cfg.json's rule made summary.json and the export disagree; trainer.json
    step 10**6 gave steps: 1000000. The manifest's sha256 now covers every file."""
    path = feature_choice_run / "checkpoint" / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"{name}.*corrupt or was edited"):
        load_checkpoint(feature_choice_run / "checkpoint")
    capsys.readouterr()
    assert cli_main(["train", "--resume", "--out", str(feature_choice_run), "--no-progress"]) == 2
    assert "was edited" in capsys.readouterr().err


def test_manifest_missing_or_deleted_file_is_refused(feature_choice_run):
    (feature_choice_run / "checkpoint" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json.*missing"):
        load_checkpoint(feature_choice_run / "checkpoint")


# ------------------------------------------------------------------------------------ 5. one clear line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_issue11_train_device_cuda_without_cuda_exits_2(capsys):
    """Issue 11.5: AssertionError: Torch not compiled with CUDA enabled."""
    assert cli_main(TINY_ARGS + ["--device", "cuda"]) == 2
    assert "CUDA is not available here" in capsys.readouterr().err


def test_issue11_unknown_data_option_lists_the_valid_ones(capsys):
    """Issue 11.5: --data-option bogus=1 raised TypeError (unexpected keyword argument)."""
    assert cli_main(TINY_ARGS + ["--data-option", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "['bogus']" in err and "mean_active" in err and "noise_std" in err


def test_issue11_bad_out_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """Issue 11.5: --out at a file (or an unwritable place) failed at the first metrics write, after
    the training work. Now it fails before any: the data source is never even built."""
    train_module = sys.modules["allocation.sae.train"]  # the module (allocation.sae.train is the function)

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before --out was checked")

    monkeypatch.setattr(train_module, "load_activations", no_data)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert cli_main(TINY_ARGS + ["--out", str(a_file)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert cli_main(TINY_ARGS + ["--out", str(a_file / "below")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_issue11_negative_warmup_and_zipf_exponent_are_refused(capsys):
    """Issue 11.10: --warmup-steps -3 and --zipf-s -1 were accepted."""
    with pytest.raises(AllocationError, match="warmup_steps must be an integer >= 0"):
        tiny_config(warmup_steps=-3)
    with pytest.raises(AllocationError, match="zipf_s must be a finite number >= 0"):
        tiny_config(zipf_s=-1.0)
    assert cli_main(TINY_ARGS + ["--zipf-s", "-1"]) == 2
    assert "zipf_s" in capsys.readouterr().err
    assert TrainConfig(warmup_steps=0, zipf_s=0.0).warmup == 0


# ------------------------------------------------------------------------------------ 8, 9: files


def test_issue11_stale_staging_is_removed_on_the_next_resume(tmp_path):
    """Issue 11.8: killed saves left .checkpoint.tmp-* directories (as big as a checkpoint) forever."""
    Trainer(tiny_config(), "synthetic", out=tmp_path).run(stop_at_step=5)
    stale = [tmp_path / ".checkpoint.tmp-dead1", tmp_path / ".saelens.tmp-dead2", tmp_path / ".checkpoint.old"]
    for directory in stale:
        directory.mkdir()
        (directory / "sae.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".summary.json.dead3.tmp").write_text("{")
    (tmp_path / ".someone-else.tmp-keep").mkdir()  # not the run's: left alone
    Trainer.resume(tmp_path).run()
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert hidden == [".someone-else.tmp-keep"]


def test_issue11_outputs_follow_the_umask(tmp_path):
    """Issue 11.9: checkpoint/ was 0700 and every file 0600 (mkstemp/mkdtemp) whatever the umask."""
    old = os.umask(0o022)
    try:
        Trainer(tiny_config(), "synthetic", out=tmp_path).run()
    finally:
        os.umask(old)
    for path in [tmp_path / "checkpoint", tmp_path / "saelens"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 9
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# ------------------------------------------------------------------------------------ the lock


HOLD_LOCK = """
import sys, time
from allocation.sae.rundir import RunDirectory
with RunDirectory(sys.argv[1]).locked():
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_first_ones_pid(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli_main(TINY_ARGS + ["--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"process {holder.pid} is writing it" in err
        assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli_main(TINY_ARGS + ["--out", str(tmp_path)]) == 0  # a dead holder's lock does not block


def test_lock_is_reentrant_within_one_run_and_removed_after(tmp_path):
    run_dir = RunDirectory(tmp_path)
    with run_dir.locked():
        with run_dir.locked():
            assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(RunDirectoryError, match="in use"):
            with RunDirectory(tmp_path).locked():
                pass
    assert not (tmp_path / ".lock").exists()


# ------------------------------------------------------------------------------------ export


def test_export_subcommand_repairs_a_run_killed_during_its_final_writes(tmp_path, capsys):
    assert cli_main(TINY_ARGS + ["--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    export = _files(tmp_path / "saelens")
    (tmp_path / "summary.json").unlink()
    (tmp_path / "saelens" / "cfg.json").unlink()  # as if killed mid-export by an older version
    assert cli_main(["export", str(tmp_path)]) == 0
    assert _files(tmp_path / "saelens") == export
    repaired = json.loads((tmp_path / "summary.json").read_text())
    for key in ("seconds", "tokens_per_second"):
        summary.pop(key), repaired.pop(key)
    assert repaired == summary
    assert cli_main(["export", str(tmp_path), "--hook-name", "blocks.3.hook_resid_post"]) == 0
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"


def test_export_subcommand_refuses_unfinished_and_missing_runs(tmp_path, capsys):
    Trainer(tiny_config(), "synthetic", out=tmp_path / "run").run(stop_at_step=4)
    assert cli_main(["export", str(tmp_path / "run")]) == 2
    assert "stopped at step 4 of 30" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_extending_a_finished_run_removes_its_stale_summary_until_it_finishes_again(tmp_path):
    """summary.json present means 'finished, export current': a resume with more --tokens that is
    interrupted must not leave the old summary beside a newer checkpoint."""
    Trainer(tiny_config(), "synthetic", out=tmp_path).run()
    assert (tmp_path / "summary.json").exists()
    Trainer.resume(tmp_path, changes={"tokens": 64 * 40}).run(stop_at_step=35)
    assert not (tmp_path / "summary.json").exists()
    assert Trainer.resume(tmp_path).run()["steps"] == 40
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 40


def test_checkpoints_of_the_previous_format_still_load(tmp_path):
    """Format 1 (sha256 of the tensors inside trainer.json, no manifest) stays readable."""
    import hashlib

    Trainer(tiny_config(), "synthetic", out=tmp_path).run(stop_at_step=3)
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "manifest.json").unlink()
    cfg = json.loads((checkpoint / "cfg.json").read_text())
    (checkpoint / "cfg.json").write_text(json.dumps(dict(cfg, format="allocation-sae-checkpoint/1")))
    state = json.loads((checkpoint / "trainer.json").read_text())
    state["sha256"] = {
        name: hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
        for name in ("sae.safetensors", "trainer.safetensors")
    }
    (checkpoint / "trainer.json").write_text(json.dumps(state))
    assert Trainer.resume(tmp_path).step == 3
    (checkpoint / "sae.safetensors").write_bytes(b"x" + (checkpoint / "sae.safetensors").read_bytes()[1:])
    with pytest.raises(CheckpointError, match="sae.safetensors.*corrupt"):
        load_checkpoint(checkpoint)
