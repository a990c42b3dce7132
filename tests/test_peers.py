"""The peer benchmark (benchmarks/bench_peers.py): adapters, shared batches, budget, report.

The sparsify and SAELens adapters run only where those packages are importable (``make test-peers``,
in .venv-peers); under ``make test`` they skip and only allocation's adapters and the harness run.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _peers  # noqa: E402
import bench_peers  # noqa: E402

from allocation.sae import TrainConfig  # noqa: E402

MODULES = {"sparsify": "sparsify", "sae-lens": "sae_lens", "allocation": "allocation"}
K, F, D_IN, STEPS, BATCH = 4, 32, 16, 8, 32


def require(name: str) -> type:
    """The adapter class, skipping the test when its package is not importable."""
    cls = _peers.SYSTEMS[name]
    pytest.importorskip(MODULES[cls.family])
    return cls


def available_names() -> list[str]:
    return [name for name, cls in _peers.SYSTEMS.items() if _peers.available(cls.family)]


@pytest.fixture(scope="module")
def data():
    return bench_peers.random_data(1000, D_IN, seed=0)


def setup_for(seed: int = 0) -> _peers.Setup:
    return _peers.Setup(k=K, n_features=F, d_in=D_IN, steps=STEPS, batch_size=BATCH, seed=seed)


@pytest.mark.parametrize("name", list(_peers.SYSTEMS))
def test_adapter_trains_at_the_budget_and_lowers_the_fvu(name, data, tmp_path):
    cls = require(name)
    setup = setup_for()
    b_dec = data.b_dec(setup.seed)
    system = cls(setup, b_dec, data.train)
    assert torch.equal(system.sae.b_dec.detach(), b_dec)  # the shared geometric median
    system.finish(tmp_path / "init")
    before = bench_peers.evaluate(system, data.evaluation)["fvu"]
    for step in range(STEPS):
        system.step(data.batch(BATCH, setup.seed, step), setup.lr_at(step))
        assert system.last_l0() == pytest.approx(K)  # k per token, or k n per batch
    system.finish(tmp_path / "trained")
    after = bench_peers.evaluate(system, data.evaluation)
    assert torch.isfinite(torch.tensor(after["fvu"])) and after["fvu"] < before
    adam = system.optimizer_settings(setup.lr_at(STEPS - 1))
    assert adam["betas"] == list(_peers.ADAM_BETAS) and adam["eps"] == _peers.ADAM_EPS
    assert sum(group["size"] for group in adam["groups"]) == sum(p.numel() for p in system.sae.parameters())
    if cls.family != "allocation":  # allocation's own defaults may scale a group's lr (its W_dec)
        assert all(group["lr_scale"] == pytest.approx(1.0) for group in adam["groups"])
    assert system.steps_since_fired().shape == (F,)
    x_hat, active = system.encode_eval(data.evaluation)
    assert x_hat.shape == data.evaluation.shape and active.shape == (data.evaluation.shape[0], F)
    if cls.rule == "topk":
        assert bool((active.sum(dim=1) <= K).all())


@pytest.mark.parametrize("name", ["saelens-topk", "saelens-batchtopk"])
def test_saelens_inference_sae_is_loaded_from_disk(name, data, tmp_path):
    cls = require(name)
    from sae_lens import SAE

    system = cls(setup_for(), data.b_dec(0), data.train)
    for step in range(3):
        system.step(data.batch(BATCH, 0, step), 1e-3)
    system.finish(tmp_path)
    assert (tmp_path / name / "cfg.json").exists()
    assert isinstance(system.inference, SAE) and not isinstance(system.inference, type(system.sae))
    if name == "saelens-topk":  # the loaded inference SAE reconstructs as the trained one does
        with torch.no_grad():
            trained = system.sae.decode(system.sae.encode(data.evaluation))
        torch.testing.assert_close(system.encode_eval(data.evaluation)[0], trained, rtol=1e-4, atol=1e-5)
    if name == "saelens-batchtopk":
        assert json.loads((tmp_path / name / "cfg.json").read_text())["architecture"] == "jumprelu"
        assert system.calibrate(data.calibration, K) is not None
        _, active = system.encode_eval(data.calibration)
        assert int(active.sum()) == K * data.calibration.shape[0]  # exactly k n on the calibration half


def test_every_system_gets_the_same_batches_in_rotating_order(data, tmp_path):
    seen: dict[str, list[float]] = {}
    order: list[str] = []

    def spy(system, batch):
        seen.setdefault(system.name, []).append(float(batch.double().sum()))
        order.append(system.name)

    names = available_names()
    factories = [_peers.SYSTEMS[name] for name in names]
    run = bench_peers.run_seed(factories, data, setup_for(seed=1), tmp_path, on_step=spy)
    expected = [float(data.batch(BATCH, 1, step).double().sum()) for step in range(STEPS)]
    assert all(sums == expected for sums in seen.values()) and set(seen) == set(names)
    assert order[: len(names)] == names and order[len(names)] == names[1 % len(names)]
    for result in run["systems"].values():
        assert len(result["step_ms"]) == STEPS and result["as_trained"]["fvu"] > 0
        assert result["train_l0_last"] == pytest.approx(K)
    assert run["systems"]["allocation-topk"]["step_ratio_to_allocation-topk"] == 1.0


def test_the_shared_schedule_is_allocations():
    setup = _peers.Setup(k=16, n_features=1536, d_in=384, steps=240, batch_size=512)
    config = TrainConfig(tokens=240 * 512, batch_size=512, lr=2e-3, warmup_steps=setup.warmup_steps,
                         decay_fraction=0.2)
    assert (setup.warmup_steps, setup.decay_steps) == (12, 48)
    assert all(setup.lr_at(step) == pytest.approx(config.lr_at(step)) for step in range(240))
    assert setup.lr_at(0) == pytest.approx(2e-3 / 12) and setup.lr_at(239) == pytest.approx(2e-3 / 48)


def test_global_threshold_keeps_exactly_the_budget():
    pre = torch.randn(50, 40, generator=torch.Generator().manual_seed(0))
    for budget in (1, 37, 400):
        assert int((pre > _peers.global_threshold(pre, budget)).sum()) == budget


def test_heldout_split_is_fixed_and_disjoint(data):
    again = bench_peers.random_data(1000, D_IN, seed=0)
    assert torch.equal(data.calibration, again.calibration) and torch.equal(data.evaluation, again.evaluation)
    rows = torch.cat([data.calibration, data.evaluation])
    assert rows.shape[0] == data.source.n_heldout and torch.unique(rows, dim=0).shape[0] == rows.shape[0]


def test_quick_run_writes_json_and_renders_the_readme_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Performance\n\ntext\n\n## Development\n\nmore\n")
    output = tmp_path / "peers.json"
    systems = ",".join(available_names())
    argv = ["--quick", "--systems", systems, "--output", str(output), "--readme", str(readme)]
    assert bench_peers.main(argv) == 0
    payload = json.loads(output.read_text())
    assert payload["command"].endswith(" ".join(argv))
    assert [s["k"] for s in payload["settings"]] == [4]
    text = readme.read_text()
    assert text.index("## Performance") < text.index(bench_peers.START) < text.index("## Development")
    assert "| allocation-mc |" in text and "k = 4, F = 64" in text
    assert bench_peers.main(["--report-only", "--output", str(output), "--readme", str(readme)]) == 0
    assert readme.read_text().count(bench_peers.START) == 1
    partial = {**payload, "settings": [], "complete": False}
    text = bench_peers.render(partial, earlier={**payload, "file": "earlier.json"})
    assert "Incomplete run" in text and "From an earlier complete run" in text and "k = 4, F = 64" in text


def test_settings_are_parsed_as_k_by_features():
    assert bench_peers.parse_settings("16x1536, 8x768") == [(16, 1536), (8, 768)]
    with pytest.raises(SystemExit, match="KxF"):
        bench_peers.parse_settings("16-1536")
