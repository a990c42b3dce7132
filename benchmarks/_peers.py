"""One adapter per system of the peer benchmark (``bench_peers.py``), all with the same interface.

    system = SYSTEMS["sparsify-topk"](Setup(k=16, n_features=1536, d_in=384, ...), b_dec, train)
    system.step(batch, lr)                 # one optimisation step, exactly as the system's trainer does it
    x_hat, active = system.encode_eval(x)  # inference: reconstruction (n, d_in) and kept mask (n, F)

Each adapter trains its system the way that system's own trainer does (read from the installed
sources: ``sparsify/trainer.py`` and ``sparsify/sparse_coder.py``; ``sae_lens/training/sae_trainer.py``
and ``sae_lens/saes/topk_sae.py`` / ``batchtopk_sae.py``), except for what the benchmark makes
identical for everyone: the batches (given to ``step``), the learning rate of each step (given to
``step``: one warmup / constant / decay schedule), Adam (betas, eps), gradient-norm clipping and
b_dec at initialisation (one geometric median). ``OVERRIDDEN`` lists, per peer, the defaults that
this replaces. Peers are imported lazily: this module imports without sparsify or sae-lens.
"""

from __future__ import annotations

import math
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 6.25e-10  # allocation.sae.Trainer's Adam eps, used for every peer too


@dataclass(frozen=True)
class Setup:
    """What every system of one run shares: the budget, the width and the optimiser recipe."""

    k: int
    n_features: int
    d_in: int
    steps: int
    batch_size: int
    lr: float = 2e-3
    warmup_fraction: float = 0.05
    decay_fraction: float = 0.2
    grad_clip: float = 1.0
    seed: int = 0

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_fraction * self.steps)

    @property
    def decay_steps(self) -> int:
        return int(self.decay_fraction * self.steps)

    def lr_at(self, step: int) -> float:
        """lr * min((s + 1) / warmup, 1, (steps - s) / decay): linear warmup, constant, linear decay to 0."""
        scale = 1.0
        if self.warmup_steps > 0 and step < self.warmup_steps:
            scale = (step + 1) / self.warmup_steps
        decay_start = self.steps - self.decay_steps
        if self.decay_steps > 0 and step >= decay_start:
            scale = min(scale, (self.steps - step) / self.decay_steps)
        return self.lr * scale


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's lr <- lr (the shared schedule, applied before the optimiser step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def adam_settings(optimizer: torch.optim.Optimizer, module: torch.nn.Module, shared_lr: float,
                  lrs: Optional[list] = None) -> dict:
    """The Adam settings a system trains with, read back from its optimiser after its last step.

    ``lr_scale`` per parameter group = the group's lr in that step / the shared schedule's lr (1 = the
    shared lr); ``lrs``: the groups' lrs in that step when a scheduler has changed them since.
    """
    groups = optimizer.param_groups
    lrs = lrs if lrs is not None else [g["lr"] for g in groups]
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    return {
        "optimizer": type(optimizer).__name__,
        "betas": list(groups[0]["betas"]),
        "eps": groups[0]["eps"],
        "fused": bool(groups[0].get("fused")),
        "groups": [{"parameters": [names.get(id(p), "?") for p in g["params"]],
                    "size": sum(p.numel() for p in g["params"]),
                    "lr_scale": lr / shared_lr if shared_lr > 0 else None} for g, lr in zip(groups, lrs)],
    }


def mask_from_topk(acts: Tensor, indices: Tensor, n_features: int) -> Tensor:
    """(n, F) bool mask of the (token, index) pairs whose activation is > 0."""
    mask = torch.zeros(acts.shape[0], n_features, dtype=torch.bool, device=acts.device)
    return mask.scatter_(1, indices, acts > 0)


class System(ABC):
    """One SAE implementation behind the benchmark's interface."""

    name: str = ""
    family: str = ""  # sparsify | sae-lens | allocation
    rule: str = ""  # topk | batchtopk | feature-choice | mutual-choice
    batch_rule = False  # inference uses thresholds learned in training (calibration applies)

    def __init__(self, setup: Setup, b_dec: Tensor, train: Tensor) -> None:
        self.setup = setup

    @abstractmethod
    def step(self, batch: Tensor, lr: float) -> None:
        """One training step on ``batch`` (n, d_in) at learning rate ``lr`` (the timed unit)."""

    @abstractmethod
    def last_l0(self) -> float:
        """Mean kept features per token of the last training step (read after the timed step)."""

    @abstractmethod
    def steps_since_fired(self) -> Tensor:
        """(F,) training steps since each feature last had an activation > 0."""

    @abstractmethod
    def optimizer_settings(self, lr: float) -> dict:
        """The Adam settings this system trains with (``lr``: the shared lr of its last step)."""

    def config(self) -> dict:
        """The system's own configuration (its defaults and what the benchmark set), for the results."""
        return {}

    def finish(self, workdir: Path) -> None:
        """Build the inference model (after the last step); nothing to do for most systems."""
        return None

    @abstractmethod
    def encode_eval(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Inference on x (n, d_in): (x_hat (n, d_in), kept mask (n, F) bool); batch-independent."""

    def calibrate(self, x: Tensor, target_l0: int) -> Optional[str]:
        """Set the inference thresholds so that the mean L0 on x is target_l0; returns how, or None."""
        return None


# ------------------------------------------------------------------------------------- sparsify


class SparsifyTopK(System):
    """EleutherAI sparsify ``SparseCoder`` (TopK), stepped as ``sparsify.Trainer`` steps it.

    Per step (trainer.py, loss_fn="fvu"): decoder rows set to unit norm before the forward, loss =
    ``ForwardOutput.fvu`` = ||y - y_hat||^2 / ||y - mean(y)||^2 of the batch, backward, remove the
    decoder gradient parallel to each row, optimiser step, zero_grad; fired features are counted
    for dead-feature tracking. Added here: gradient-norm clipping (sparsify does not clip).
    """

    name, family, rule = "sparsify-topk", "sparsify", "topk"

    def __init__(self, setup: Setup, b_dec: Tensor, train: Tensor) -> None:
        super().__init__(setup, b_dec, train)
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(setup.seed)  # sparsify.Trainer seeds the global RNG before building each coder
        config = SparseCoderConfig(activation="topk", k=setup.k, num_latents=setup.n_features)
        self.sae = SparseCoder(setup.d_in, config, device="cpu", dtype=torch.float32)
        with torch.no_grad():
            self.sae.b_dec.copy_(b_dec)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=setup.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
        self.since_fired = torch.zeros(setup.n_features, dtype=torch.int64)
        self._l0 = float("nan")

    def step(self, batch: Tensor, lr: float) -> None:
        sae = self.sae
        set_learning_rate(self.optimizer, lr)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(batch)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), self.setup.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            fired = torch.zeros(self.setup.n_features, dtype=torch.bool)
            fired[out.latent_indices[out.latent_acts > 0]] = True
            self.since_fired += 1
            self.since_fired[fired] = 0
        self._last = out

    def last_l0(self) -> float:
        return float((self._last.latent_acts > 0).sum(dim=1).double().mean())

    def config(self) -> dict:
        return self.sae.cfg.to_dict()

    def steps_since_fired(self) -> Tensor:
        return self.since_fired.clone()

    def optimizer_settings(self, lr: float) -> dict:
        return adam_settings(self.optimizer, self.sae, lr)

    @torch.no_grad()
    def encode_eval(self, x: Tensor) -> tuple[Tensor, Tensor]:
        acts, indices, _ = self.sae.encode(x)
        return self.sae.decode(acts, indices), mask_from_topk(acts, indices, self.setup.n_features)


# ------------------------------------------------------------------------------------- SAELens


class SAELensSystem(System):
    """A SAELens training SAE stepped by SAELens' own ``SAETrainer.step`` (the seam ``fit()`` uses).

    ``SAETrainer.step`` runs ``training_forward_pass`` (the class's loss: summed-over-d MSE, batch
    mean, plus the aux loss, off here), the dead-neuron bookkeeping, backward, clip_grad_norm_(1.0)
    (hard-coded in SAELens), Adam step, zero_grad and its lr scheduler (constant; the shared
    schedule is written into the optimiser before each step). Inference: ``save_inference_model``
    then ``SAE.load_from_disk``, as SAELens users do.
    """

    family = "sae-lens"

    def __init__(self, setup: Setup, b_dec: Tensor, train: Tensor) -> None:
        super().__init__(setup, b_dec, train)
        from sae_lens import LoggingConfig, SAETrainer
        from sae_lens.config import SAETrainerConfig

        if setup.grad_clip != 1.0:
            raise ValueError("SAELens' trainer clips the gradient norm at 1.0 (hard-coded); use grad_clip=1")
        torch.manual_seed(setup.seed)  # SAELens initialises from the global RNG (kaiming_uniform_)
        self.sae = self.build()
        with torch.no_grad():
            self.sae.b_dec.copy_(b_dec)
        config = SAETrainerConfig(
            total_training_samples=setup.steps * setup.batch_size,
            train_batch_size_samples=setup.batch_size,
            lr=setup.lr,
            lr_end=setup.lr,
            lr_scheduler_name="constant",
            adam_beta1=ADAM_BETAS[0],
            adam_beta2=ADAM_BETAS[1],
            device="cpu",
            logger=LoggingConfig(log_to_wandb=False),
        )
        self.trainer = SAETrainer(cfg=config, sae=self.sae, data_provider=iter(()))
        for group in self.trainer.optimizer.param_groups:
            group["eps"] = ADAM_EPS
        self.inference = None

    @abstractmethod
    def build(self):
        """The SAELens training SAE (its config's defaults, aux loss coefficient 0)."""

    def step(self, batch: Tensor, lr: float) -> None:
        trainer = self.trainer
        trainer.maybe_reset_sparsity()
        set_learning_rate(trainer.optimizer, lr)
        self._lrs = [group["lr"] for group in trainer.optimizer.param_groups]  # its scheduler resets them after
        self._last = trainer.step(batch)
        trainer.n_training_steps += 1

    def last_l0(self) -> float:
        return float((self._last.feature_acts > 0).sum(dim=1).double().mean())

    def config(self) -> dict:
        return {"sae": self.sae.cfg.to_dict(), "trainer": self.trainer.cfg.__dict__}

    def steps_since_fired(self) -> Tensor:
        return self.trainer.n_forward_passes_since_fired.to(torch.int64).clone()

    def optimizer_settings(self, lr: float) -> dict:
        return adam_settings(self.trainer.optimizer, self.sae, lr, self._lrs)

    def finish(self, workdir: Path) -> None:
        from sae_lens import SAE

        path = Path(workdir) / self.name
        self.sae.save_inference_model(path)
        self.inference = SAE.load_from_disk(str(path), device="cpu")
        self.inference.eval()

    @torch.no_grad()
    def encode_eval(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.inference is None:
            raise RuntimeError("call finish() first: inference runs on the SAE loaded from disk")
        acts = self.inference.encode(x)
        return self.inference.decode(acts), acts > 0


class SAELensTopK(SAELensSystem):
    """SAELens ``TopKTrainingSAE`` (defaults: rescale_acts_by_decoder_norm=True, decoder_init_norm=0.1)."""

    name, rule = "saelens-topk", "topk"

    def build(self):
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

        setup = self.setup
        config = TopKTrainingSAEConfig(d_in=setup.d_in, d_sae=setup.n_features, k=setup.k, aux_loss_coefficient=0.0)
        return TopKTrainingSAE(config)


class SAELensBatchTopK(SAELensSystem):
    """SAELens ``BatchTopKTrainingSAE``: k n largest per batch; inference is the saved JumpReLU SAE.

    Its inference threshold is trained as an EMA (rate topk_threshold_lr = 0.01) of the smallest
    kept activation of each batch. ``calibrate`` replaces it by one global threshold halfway between
    the (k n)-th and (k n + 1)-th largest pre-activation of the n calibration tokens (JumpReLU keeps
    pre > threshold), i.e. exactly k n kept entries on them.
    """

    name, rule, batch_rule = "saelens-batchtopk", "batchtopk", True

    def build(self):
        from sae_lens import BatchTopKTrainingSAE
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig

        setup = self.setup
        config = BatchTopKTrainingSAEConfig(
            d_in=setup.d_in, d_sae=setup.n_features, k=setup.k, aux_loss_coefficient=0.0
        )
        return BatchTopKTrainingSAE(config)

    @torch.no_grad()
    def calibrate(self, x: Tensor, target_l0: int) -> Optional[str]:
        sae = self.inference
        pre = sae.process_sae_in(x) @ sae.W_enc + sae.b_enc
        sae.threshold.fill_(global_threshold(pre, target_l0 * x.shape[0]))
        return "one global JumpReLU threshold between the (k n)-th and (k n + 1)-th largest pre-activation"


def global_threshold(pre: Tensor, budget: int) -> float:
    """t = (v_B + v_{B+1}) / 2 of the sorted-descending values v of ``pre``, clipped at 0: #{pre > t} = B."""
    flat = pre.flatten()
    if budget >= flat.numel():
        return 0.0
    values = flat.topk(budget + 1).values
    return max(0.0, float((values[budget - 1] + values[budget]) / 2))


# ------------------------------------------------------------------------------------ allocation


class AllocationSystem(System):
    """allocation's own ``Trainer.train_step`` on the shared batches (allocation's defaults otherwise).

    The learning rate of each step comes from its TrainConfig (lr, warmup_steps, decay_fraction
    given as the shared recipe); ``step`` checks it equals the shared schedule.
    """

    family = "allocation"

    def __init__(self, setup: Setup, b_dec: Tensor, train: Tensor) -> None:
        super().__init__(setup, b_dec, train)
        from allocation.sae import TrainConfig, Trainer

        config = TrainConfig(
            rule=self.rule,
            k=setup.k,
            n_features=setup.n_features,
            aux="none",
            tokens=setup.steps * setup.batch_size,
            batch_size=setup.batch_size,
            lr=setup.lr,
            warmup_steps=setup.warmup_steps,
            decay_fraction=setup.decay_fraction,
            grad_clip=setup.grad_clip,
            seed=setup.seed,
        )
        self.trainer = Trainer(config, data=train)
        with torch.no_grad():
            self.trainer.sae.b_dec.copy_(b_dec)
        self.sae = self.trainer.sae

    def step(self, batch: Tensor, lr: float) -> None:
        self._last = self.trainer.train_step(batch)
        if not math.isclose(self._last.lr, lr, rel_tol=1e-9, abs_tol=1e-15):
            raise AssertionError(f"{self.name}: Trainer used lr {self._last.lr}, the shared schedule {lr}")

    def last_l0(self) -> float:
        return float(self._last.l0)

    def config(self) -> dict:
        return self.trainer.config.to_dict()

    def steps_since_fired(self) -> Tensor:
        return self.trainer.usage.tokens_since_fired // self.setup.batch_size

    def optimizer_settings(self, lr: float) -> dict:
        return adam_settings(self.trainer.optimizer, self.sae, lr)

    @torch.no_grad()
    def encode_eval(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``sae.eval()`` inference (thresholds for the batch rules); the training mode is restored after."""
        training = self.sae.training
        self.sae.eval()
        try:
            out = self.sae(x)
        finally:
            self.sae.train(training)
        return out.x_hat, out.mask

    def calibrate(self, x: Tensor, target_l0: int) -> Optional[str]:
        calibrate = calibration_api()
        if calibrate is None or not self.batch_rule:
            return None
        self.calibration_report = calibrate(self.sae, x, target_l0=target_l0)
        return "allocation.sae.calibrate_thresholds(sae, x_calibration, target_l0=k)"


def calibration_api() -> Optional[Callable]:
    """``allocation.sae.calibrate_thresholds`` when this allocation has it, else None."""
    import allocation.sae

    return getattr(allocation.sae, "calibrate_thresholds", None)


class AllocationTopK(AllocationSystem):
    name, rule = "allocation-topk", "topk"


class AllocationFeatureChoice(AllocationSystem):
    name, rule, batch_rule = "allocation-fc", "feature-choice", True


class AllocationMutualChoice(AllocationSystem):
    name, rule, batch_rule = "allocation-mc", "mutual-choice", True


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (SparsifyTopK, SAELensTopK, SAELensBatchTopK, AllocationTopK, AllocationFeatureChoice,
                AllocationMutualChoice)
}

REQUIRES = {"sparsify": "sparsify", "sae-lens": "sae_lens", "allocation": "allocation"}

OVERRIDDEN = {
    "sparsify": [
        "optimizer: Adam with the shared betas/eps (sparsify's TrainConfig default is signum; its Adam "
        "uses torch's eps 1e-8)",
        "lr: the shared lr (sparsify's Adam default: 2e-4 / sqrt(F / 2^14))",
        "lr schedule: the shared warmup/constant/linear decay (sparsify: linear warmup over "
        "lr_warmup_steps = 1000, then linear decay to 0 over the whole run)",
        "gradient-norm clipping at 1 added (sparsify does not clip)",
        "b_dec at init: the shared geometric median (sparsify: the mean of the first batch)",
    ],
    "sae-lens": [
        "lr: the shared lr (SAELens' default 3e-4)",
        "lr schedule: the shared one, written into the optimiser before each step (SAELens' scheduler "
        "set to constant, its default, with no warmup or decay steps)",
        "Adam eps: the shared eps (SAELens: torch's default 1e-8)",
        "b_dec at init: the shared geometric median (SAELens: zeros)",
        "aux_loss_coefficient = 0 (default 1.0; its dead-feature window of 1000 steps is longer "
        "than these runs, so the aux loss would be 0 anyway)",
    ],
    "allocation": [
        "aux = 'none' (default 'k')",
        "lr: the shared lr (default 2e-4 / sqrt(F / 2^14)); warmup, decay, clipping: the shared recipe "
        "(the same values as its defaults)",
    ],
}


def available(family: str) -> bool:
    """Whether the package a family needs is importable."""
    import importlib.util

    return importlib.util.find_spec(REQUIRES[family]) is not None


def temporary_workdir() -> tempfile.TemporaryDirectory:
    """Where the SAELens inference models are written and loaded back from."""
    return tempfile.TemporaryDirectory(prefix="bench_peers_")
