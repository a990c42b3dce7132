"""Issue 12: every SAE rule is a provider of Constraints, named in one registry, priced by one estimator.

A rule defined outside the package trains, saves, resumes and exports once registered; Zipf-capacity
Feature Choice and mixed caps (Custom) train from TrainConfig; old checkpoints still load.
"""

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_sae_train import small_config, tiny_config

import allocation
from allocation import Constraints, zipf
from allocation.errors import AllocationError
from allocation.sae import (
    CheckpointError,
    Custom,
    FeatureChoice,
    MutualChoice,
    Rule,
    SparseAutoencoder,
    TopK,
    TrainConfig,
    Trainer,
    load_sae,
    make_rule,
    register_rule,
    rule_from_dict,
    rule_names,
    save_sae,
    thresholds,
    unregister_rule,
)
from allocation.sae.checkpoint import MANIFEST
from allocation.sae.model import LEGACY_THRESHOLD_BUFFERS
from allocation.sae.thresholds import pricing

DATA = Path(__file__).parent / "data"
SAE_PACKAGE = Path(allocation.__file__).parent / "sae"


# ------------------------------------------------------------------------------ an external rule


def readme_rule_example() -> str:
    """The README's "Add your own rule" block, up to the training run (the test runs its own, shorter)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("### Add your own rule", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    return block.split("\nconfig = ", 1)[0]


def _define_readme_rule():
    namespace: dict = {}
    exec(compile(readme_rule_example(), "README.md", "exec"), namespace)  # registers the rule
    return namespace["CappedBatchTopK"]


@pytest.fixture
def capped_rule():
    rule = _define_readme_rule()
    yield rule
    unregister_rule(rule.name)


def _state(trainer):
    return {name: value.clone() for name, value in trainer.sae.state_dict().items()}


def test_a_rule_registered_from_outside_trains_saves_resumes_and_exports(tmp_path, capped_rule):
    """The README's rule, 10 steps: 5, checkpoint, resume in a new Trainer, 5 more == 10 straight; then
    the SAELens export."""
    CappedBatchTopK = capped_rule
    config = tiny_config(rule="capped-batch-topk", tokens=64 * 10, metrics_every=5, eval_batches=1)
    assert "capped-batch-topk" in rule_names()
    straight = Trainer(config, "synthetic")
    straight.run()
    first = Trainer(config, "synthetic", out=tmp_path)
    first.run(stop_at_step=5)
    assert rule_from_dict(json.loads((tmp_path / "checkpoint" / "cfg.json").read_text())["sae"]["rule"]) == (
        CappedBatchTopK(3)
    )
    resumed = Trainer.resume(tmp_path)
    assert resumed.sae.rule == CappedBatchTopK(3) and resumed.step == 5
    summary = resumed.run()
    assert summary["steps"] == 10
    for name, value in _state(straight).items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["allocation_rule"] == {
        "name": "capped-batch-topk", "k": 3}
    assert cfg["metadata"]["allocation_per_token_cap"] == 6
    weights = load_file(tmp_path / "saelens" / "sae_weights.safetensors")
    assert torch.equal(weights["threshold"], resumed.sae.threshold.float())


def test_an_unregistered_rule_in_a_checkpoint_names_the_fix(tmp_path, capped_rule):
    CappedBatchTopK = capped_rule
    save_sae(SparseAutoencoder(8, 16, CappedBatchTopK(2)), tmp_path / "sae")
    unregister_rule(CappedBatchTopK.name)
    with pytest.raises(CheckpointError, match="capped-batch-topk.*register_rule"):
        load_sae(tmp_path / "sae")


def test_registry_refuses_a_second_class_under_a_taken_name():
    @dataclass(frozen=True)
    class Impostor(Rule):
        k: int
        name: ClassVar[str] = "topk"

    with pytest.raises(AllocationError, match="already registered"):
        register_rule(Impostor)
    with pytest.raises(AllocationError, match="lower case with dashes"):
        register_rule(type("Bad", (Rule,), {"name": "Bad_Name"}))
    assert make_rule("topk", 4) == TopK(4)


def test_make_rule_names_options_a_rule_does_not_take():
    with pytest.raises(AllocationError, match="'topk' does not take per_token"):
        make_rule("topk", 4, per_token=3)
    with pytest.raises(AllocationError, match="rule must be one of topk, feature-choice, mutual-choice, custom"):
        make_rule("bogus")


# ------------------------------------------------------------------------------ rules are constraints


@pytest.mark.parametrize(
    "rule, expected, kind",
    [
        (TopK(4), Constraints(per_token=4), "none"),
        (FeatureChoice(m=3), Constraints(per_feature=3), "feature"),
        (MutualChoice(4), Constraints(total=4 * 10), "budget"),
        (Custom(per_token=5, per_feature=7, k=2), Constraints(per_token=5, per_feature=7, total=20), "auction"),
        (Custom(per_token=5, per_feature=7, total=9, k=2), Constraints(per_token=5, per_feature=7, total=9),
         "auction"),
        (Custom(per_feature=7, k=2), Constraints(per_feature=7, total=20), "feature"),
    ],
    ids=lambda value: getattr(value, "name", None),
)
def test_each_rule_declares_its_constraints_and_the_caps_decide_the_pricing(rule, expected, kind):
    assert rule.constraints(10, 16) == expected
    assert pricing(rule.constraints(10, 16)) == kind
    assert rule_from_dict(json.loads(json.dumps(rule.to_dict()))) == rule


def test_no_isinstance_on_rule_classes_in_the_sae_package():
    """Issue 12.2: the SAE layer reads a rule's constraints, never its class."""
    pattern = re.compile(r"isinstance\([^)]*\b(TopK|FeatureChoice|MutualChoice|Custom|Rule)\b")
    offenders = [str(path.name) for path in SAE_PACKAGE.rglob("*.py") if pattern.search(path.read_text())]
    assert offenders == []


def test_zipf_capacities_sum_to_the_budget_and_follow_j_to_the_minus_s():
    rule = FeatureChoice(k=8, zipf_capacities=1.0)
    caps = rule.capacity(512, 1536)
    assert int(caps.sum()) == 8 * 512 and int(caps.max()) <= 512
    assert bool((caps[:-1] >= caps[1:]).all())  # non-increasing in j
    ranks = np.arange(1, 1537)
    shape = float(caps[1]) * 2 / ranks  # below the capped head, m_j = c / j up to rounding
    assert np.abs(caps.numpy()[1:] - shape[1:]).max() <= 2.0
    steep = FeatureChoice(k=64, zipf_capacities=2.0).capacity(100, 128)  # water-filling: the head hits n
    assert int(steep.sum()) == 64 * 100 and int(steep.max()) == 100 and int(steep[0]) == 100
    with pytest.raises(AllocationError, match="give k with it"):
        FeatureChoice(m=3, zipf_capacities=1.0)


@settings(max_examples=80)
@given(n_tokens=st.integers(1, 64), n_features=st.integers(1, 96), k=st.integers(1, 16),
       s=st.sampled_from([0.0, 0.5, 1.0, 2.0]), floor=st.integers(1, 6))
def test_zipf_capacities_with_a_floor_are_zipf_water_filled_between_the_floor_and_n(n_tokens, n_features, k, s,
                                                                                    floor):
    """m_j = min(max(c j^-s, f), n) up to rounding, f = min(floor, k n // F): the sum is exactly k n
    (as far as F n allows), no feature below f, non-increasing in j, and where no feature is below f
    without the floor, the floor changes nothing."""
    k = min(k, n_features)
    budget = k * n_tokens
    caps = FeatureChoice(k=k, zipf_capacities=s, min_capacity=floor).capacity(n_tokens, n_features)
    plain = FeatureChoice(k=k, zipf_capacities=s).capacity(n_tokens, n_features)
    least = min(floor, budget // n_features)
    assert int(caps.sum()) == budget
    assert int(caps.min()) >= least and int(caps.max()) <= n_tokens
    assert bool((caps[:-1] >= caps[1:]).all())
    real = zipf.water_fill(zipf.zipf_weights(n_features, s), float(budget), float(n_tokens))
    if float(real.min()) >= least:  # the floor does not bind: the plain Zipf capacities, up to rounding
        assert int((caps - plain).abs().max()) <= 1
    else:  # entries strictly between the floor and n follow c j^-s
        filled = zipf.water_fill(zipf.zipf_weights(n_features, s), float(budget), float(n_tokens), floor=float(least))
        assert float(filled.sum()) == pytest.approx(budget, rel=1e-9)
        assert int((caps - filled).abs().max()) <= 1


def test_a_capacity_floor_opens_the_zipf_tail_of_a_small_batch():
    """F = 2048, k = 8, n = 512 (the study's setting): s = 1 leaves 864 features with capacity 0, which
    can never fire; a floor of 1 gives every feature a token per batch and keeps the head Zipf-shaped."""
    plain = FeatureChoice(k=8, zipf_capacities=1.0).capacity(512, 2048)
    floored = FeatureChoice(k=8, zipf_capacities=1.0, min_capacity=1).capacity(512, 2048)
    assert int((plain == 0).sum()) == 864 and int((floored == 0).sum()) == 0
    assert int(floored.sum()) == int(plain.sum()) == 8 * 512
    head = floored[:50].double()
    assert float((head - head[0] / torch.arange(1, 51)).abs().max()) <= 1.0  # m_j = m_1 / j, rounded
    config = small_config("feature-choice", zipf_capacities=1.0, min_capacity=1, n_features=512, batch_size=128)
    rule = Trainer(config, "synthetic").sae.rule  # the TrainConfig field (the --min-capacity flag) reaches the rule
    assert rule == FeatureChoice(k=config.k, zipf_capacities=1.0, min_capacity=1)
    assert rule_from_dict(json.loads(json.dumps(rule.to_dict()))) == rule  # as checkpoints save it
    with pytest.raises(AllocationError, match="give zipf_capacities with it"):
        FeatureChoice(k=8, min_capacity=1)
    with pytest.raises(AllocationError, match="min_capacity must be >= 1"):
        FeatureChoice(k=8, zipf_capacities=1.0, min_capacity=0)


def test_zipf_feature_choice_trains_and_its_eval_l0_matches_the_budget():
    """Regression: a zero capacity (Zipf tail m_j = 0) was priced 0, so at eval such a feature fired on
    every positive score (eval L0 46 against a budget of 8 on synthetic data); now it is priced at its
    largest score and eval L0 is within 10% of k."""
    config = small_config("feature-choice", zipf_capacities=1.0, n_features=512, batch_size=128, tokens=128 * 150)
    trainer = Trainer(config, "synthetic")
    assert trainer.sae.rule == FeatureChoice(k=4, zipf_capacities=1.0)
    assert int((trainer.sae.rule.capacity(128, 512) == 0).sum()) > 100  # the tail has closed features
    summary = trainer.run()
    assert summary["train_l0"]["mean"] <= 4.0
    assert abs(summary["eval_train_split_l0"]["mean"] - 4.0) <= 0.4
    assert abs(summary["eval_l0"]["mean"] - 4.0) <= 0.4


# ------------------------------------------------------------------------------ mixed caps (Custom)


def _custom_sae(per_token=2, per_feature=5, k=1):
    sae = SparseAutoencoder(8, 24, Custom(per_token=per_token, per_feature=per_feature, k=k), seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # many positive affinities: every cap can bind
    return sae


def test_custom_training_mask_is_the_exact_optimum_and_respects_the_per_token_cap():
    sae = _custom_sae(per_token=2, per_feature=3, k=1)
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    out = sae(x)
    constraints = sae.rule.constraints(40, 24)
    exact = allocation.solve(out.pre.detach().double().numpy(), constraints)
    assert float(out.pre.detach().double()[out.mask].sum()) == pytest.approx(exact.objective, rel=1e-9)
    assert int(out.mask.sum(1).max()) <= 2 and int(out.mask.sum(0).max()) <= 3 and int(out.mask.sum()) <= 40
    assert out.prices is not None and out.prices.shape == (24,)


def test_custom_eval_keeps_the_per_token_cap_and_reproduces_the_batch_with_its_own_prices():
    """Eval: per-token top-k of pre - t, t = b_j + lambda; with this batch's certified prices (decay 0) it
    keeps the training mask up to ties (complementary slackness)."""
    sae = SparseAutoencoder(8, 24, Custom(per_token=2, per_feature=3, k=1), seed=0, threshold_decay=0.0,
                            threshold_correction=0.0)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    out = sae(x)
    sae.update_thresholds(out.pre.detach(), out.mask, out.code, out.prices)
    sae.eval()
    with torch.no_grad():
        eval_mask = sae(x).mask
    assert int(eval_mask.sum(1).max()) <= 2
    agree = float((eval_mask == out.mask).float().mean())
    assert agree > 0.99


def test_custom_trains_checkpoints_resumes_bit_identically_and_exports(tmp_path):
    config = tiny_config(rule="custom", per_token=4, per_feature=16, k=2, tokens=64 * 8, metrics_every=4,
                         eval_batches=1)
    straight = Trainer(config, "synthetic")
    straight.run()
    Trainer(config, "synthetic", out=tmp_path).run(stop_at_step=4)
    resumed = Trainer.resume(tmp_path)
    resumed.run()
    for name, value in _state(straight).items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name
    assert max(record["l0"]["max"] for record in resumed.history) <= 4
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["metadata"]["allocation_rule"] == {"name": "custom", "per_token": 4, "per_feature": 16,
                                                  "total": None, "k": 2}


def test_custom_per_token_l0_never_exceeds_the_cap_in_training_mode():
    trainer = Trainer(tiny_config(rule="custom", per_token=2, per_feature=8, k=2, tokens=64 * 4), "synthetic")
    for batch in [trainer.source.batch(64, seed=0, batch_index=i) for i in range(4)]:
        out = trainer.sae(batch)
        assert int(out.l0.max()) <= 2
        trainer.train_step(batch)


# ------------------------------------------------------------------------------ checkpoints before issue 12


@pytest.mark.parametrize("rule", ["feature-choice", "mutual-choice"])
def test_format_2_checkpoints_resume_to_the_state_the_code_that_wrote_them_reached(tmp_path, rule):
    """tests/data: 4 steps saved by the format-2 code (buffers threshold_sum, ...) and its state after 8;
    the resumed run reaches that state after 8 (old buffer names renamed into ``thresholds``), up to
    float rounding: the training step's arithmetic has since changed order (sparse gradient of the
    kept entries), a misloaded tensor would differ by far more."""
    shutil.copytree(DATA / f"checkpoint-v2-{rule}", tmp_path, dirs_exist_ok=True)
    manifest = json.loads((tmp_path / "checkpoint" / MANIFEST).read_text())
    assert manifest["format"] == "allocation-sae-checkpoint/2"
    trainer = Trainer.resume(tmp_path)
    trainer.run()
    reference = load_file(DATA / f"v2-{rule}-step8.safetensors")
    state = trainer.sae.state_dict()
    for name, value in reference.items():
        torch.testing.assert_close(state[LEGACY_THRESHOLD_BUFFERS.get(name, name)], value, rtol=1e-5, atol=1e-6,
                                   msg=name)


def test_a_checkpoint_of_an_unknown_format_is_refused_naming_it(tmp_path):
    save_sae(SparseAutoencoder(8, 16, TopK(2)), tmp_path / "sae")
    manifest_path = tmp_path / "sae" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["format"] = "allocation-sae-checkpoint/99"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format 'allocation-sae-checkpoint/99'.*cannot read"):
        load_sae(tmp_path / "sae")


# ------------------------------------------------------------------------------ the config and the step


def test_trainer_does_not_mutate_the_callers_config():
    config = tiny_config(rule="topk", tokens=64 * 2, data_options={})
    before = config.to_dict()
    Trainer(config, torch.randn(512, 16))
    assert config.to_dict() == before


def test_the_finite_check_runs_once_per_step_over_the_affinities(monkeypatch):
    """Issue 12.5: the SAE checked pre for NaN and the rule checked it again (two passes over (n, F))."""
    trainer = Trainer(tiny_config(rule="mutual-choice", tokens=64 * 2), "synthetic")
    batch = trainer.source.batch(64, seed=0, batch_index=0)
    calls = []
    real = torch.aminmax

    def counting(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "aminmax", counting)
    trainer.train_step(batch)
    assert calls.count((64, 48)) == 1


def test_rule_options_reach_registered_rules_through_train_config(capped_rule):
    assert TrainConfig(rule="capped-batch-topk", k=3, n_features=48).make_rule() == capped_rule(3)
    with pytest.raises(AllocationError, match="does not take per_token"):
        TrainConfig(rule="topk", per_token=3)
    with pytest.raises(AllocationError, match="does not take zipf_capacities"):
        TrainConfig(rule="mutual-choice", zipf_capacities=1.0)


# ------------------------------------------------------------------------------ the CLI from TrainConfig


def test_train_help_lists_every_train_config_field(capsys):
    """Issue 12.4: 7 fields had no flag; now the parser is generated from the dataclass."""
    from dataclasses import fields

    from allocation.cli import main as cli_main
    from allocation.sae.train import option_name

    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    missing = [option_name(spec.name) for spec in fields(TrainConfig) if option_name(spec.name) not in text]
    assert missing == []
    assert all(spec.metadata.get("help") for spec in fields(TrainConfig))


CLI_BASE = [
    "train", "--n-features", "48", "--tokens", str(64 * 6), "--batch-size", "64", "--lr", "0.01",
    "--metrics-every", "3", "--eval-batches", "1", "--data-option", "d_in=16", "--data-option",
    "n_true_features=32", "--no-progress", "--threads", "1",
]  # fmt: skip


@pytest.mark.parametrize(
    "rule_args, rule",
    [
        (["--rule", "feature-choice", "--zipf-capacities", "1.0", "--k", "3"], FeatureChoice(k=3, zipf_capacities=1.0)),
        (["--rule", "custom", "--per-token", "4", "--per-feature", "16", "--k", "2"],
         Custom(per_token=4, per_feature=16, k=2)),
    ],
    ids=["zipf-feature-choice", "custom"],
)
def test_cli_trains_resumes_and_exports_the_new_rules(tmp_path, capsys, rule_args, rule):
    from allocation.cli import main as cli_main

    out = tmp_path / "run"
    assert cli_main(CLI_BASE + rule_args + ["--out", str(out)]) == 0
    assert load_sae(out / "checkpoint").rule == rule
    assert json.loads((out / "saelens" / "cfg.json").read_text())["metadata"]["allocation_rule"] == rule.to_dict()
    resume = CLI_BASE[:5] + ["--tokens", str(64 * 9), "--no-progress", "--threads", "1"]
    assert cli_main(resume + ["--out", str(out), "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 9
    capsys.readouterr()
    changed = rule_args[:-1] + [str(int(rule_args[-1]) + 1)]
    assert cli_main(resume + changed + ["--out", str(out), "--resume"]) == 2
    assert "the checkpoint has" in capsys.readouterr().err


def test_rule_option_flag_reaches_a_registered_rule():
    """--rule-option KEY=VALUE (TrainConfig.rule_options) carries a registered rule's own options."""
    import argparse

    from allocation.commands.train import add_config_arguments, given_options

    @dataclass(frozen=True)
    class Banded(Rule):
        k: int
        factor: int = 2
        name: ClassVar[str] = "banded"

        def constraints(self, n_tokens: int, n_features: int) -> Constraints:
            return Constraints(per_token=self.factor * self.k, total=self.k * n_tokens)

    register_rule(Banded)
    try:
        parser = argparse.ArgumentParser()
        add_config_arguments(parser)
        given = given_options(parser.parse_args(["--rule-option", "factor=3", "--k", "2"]), "banded")
        config = TrainConfig(**given, n_features=48)
        assert config.rule_options == {"factor": 3} and config.make_rule() == Banded(k=2, factor=3)
        assert rule_from_dict(config.make_rule().to_dict()) == Banded(k=2, factor=3)
    finally:
        unregister_rule("banded")


def test_custom_count_correction_brings_the_eval_l0_to_the_training_l0_on_bursty_batches():
    """Batches alternate between scale 1 and 2. Averaged auction prices alone keep ~20% too few
    entries at eval; the correction (eval column counts vs the training mask's, one normaliser for
    all features: a per-batch kept_j denominator settled 8% short) brings them back."""
    rule = Custom(per_token=3, per_feature=10, k=2)
    constraints = rule.constraints(64, 32)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 32, generator=generator) * (2.0 if index % 2 else 1.0) for index in range(500)]
    training = [(pre, thresholds.select(pre, constraints, "auction")) for pre in batches[:300]]
    assert all(int(selection.mask.sum()) == 128 for _, selection in training)  # the budget binds: L0 = k
    mean_l0 = {}
    for correction in (0.0, 0.05):
        sae = SparseAutoencoder(8, 32, rule, threshold_correction=correction)
        for _ in range(2):
            for pre, selection in training:
                sae.update_thresholds(pre, selection.mask, None, selection.prices)
        kept = [thresholds.eval_select(pre, constraints, "auction", sae.threshold) for pre in batches[300:]]
        assert max(int(mask.sum(dim=1).max()) for mask in kept) <= 3
        mean_l0[correction] = sum(int(mask.sum()) for mask in kept) / (200 * 64)
    assert mean_l0[0.0] < 2 * 0.9  # plain averaging: more than 10% short
    assert abs(mean_l0[0.05] - 2) < 2 * 0.05  # corrected: within 5%
