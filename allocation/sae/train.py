"""Training loop: Adam with a width-scaled learning rate, warmup + linear decay, gradient clipping.

    trainer = Trainer(TrainConfig(rule="mutual-choice", k=32, n_features=4096, aux="zipf",
                                  tokens=2_000_000), data="synthetic", out="runs/mc")
    summary = trainer.run(progress=True)

One step (``Trainer.train_step(batch)``): forward (the rule's allocation), loss = MSE +
auxiliary loss, backward, remove the decoder gradient parallel to each row, clip, Adam step,
renormalise decoder rows, fold the batch's dual prices into the running thresholds, update the
feature-usage counters. Metrics every ``metrics_every`` steps and at the end; checkpoints every
``checkpoint_every`` steps and at the end; ``Trainer.resume(out)`` continues bit-identically.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from .._validate import all_finite, check_device, positive_int, positive_number
from ..errors import AllocationError
from .atomic import resolve_published, write_file
from .calibration import calibrated_copy, training_l0
from .checkpoint import STATE_JSON, json_bytes, load_checkpoint, prefixed, save_checkpoint, with_prefix
from .data import ActivationSource, load_activations
from .distributed import (
    LOCAL,
    SCOPES,
    RankScope,
    data_parallel,
    init_from_environment,
    merge_window,
    rank_device,
    window_share,
)
from .downstream import check_downstream, trainer_downstream
from .losses import (
    DEFAULT_DEFICIT,
    DEFAULT_UNDER_USED_ONLY,
    DEFICITS,
    REDUCTIONS,
    aux_k_loss,
    aux_zipf_loss,
    normalized_mse,
)
from .metrics import FeatureUsage, MetricsWindow, evaluate
from .model import (
    ENCODER_INIT_SCALE,
    NonFiniteAffinitiesError,
    SAEOutput,
    SparseAutoencoder,
    default_learning_rate,
)
from .rules import Rule, make_rule, rule_class, rule_key
from .rundir import RunDirectory
from .saelens import export_saelens, metadata_from_source

AUX_NAMES = ("none", "k", "zipf")
EXPLODED_FVU = 10.0  # a train or eval FVU above this (10x worse than predicting the mean) is an explosion
# may differ from the checkpoint on resume (downstream*: evaluation after training only)
RESUMABLE_CHANGES = ("tokens", "device", "checkpoint_every", "downstream", "downstream_tokens", "collective_timeout")

DECODER_LR_SCALE = 3.0
"""W_dec's Adam learning rate relative to the other parameters'. Unit-norm decoder rows move slowly
under Adam's per-entry steps; on MiniLM (benchmarks/results/ablation_*.json) a 3x decoder rate
lowered held-out FVU in short and long runs, while the same factor on every weight helped only short
runs. (SAELens gets a similar effect from its decoder initialised at norm 0.1.)"""

FIELDS_BEFORE_0_2 = {
    "decoder_lr_scale": 1.0,
    "encoder_init_scale": 1.0,
    "zipf_deficit": "absolute",
    "zipf_fit": False,
    "zipf_exclude_saturated": False,
    "zipf_fill": False,
    "zipf_under_used_only": False,
}
"""What a config saved before these fields existed trained with (resume continues it unchanged)."""


def adam(groups: list, lr: float) -> torch.optim.Adam:
    """Adam (betas 0.9 / 0.999, eps 6.25e-10), fused into one kernel per step where torch has it."""
    try:
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=6.25e-10)


class TrainingDivergedError(AllocationError):
    """The loss or the gradient norm became NaN or inf (the step was not applied), or a step left
    non-finite parameters or a zero decoder row (nothing from that step is saved)."""


class TrainingExplodedWarning(RuntimeWarning):
    """The run finished but its loss exploded (FVU above EXPLODED_FVU): its SAE is not usable."""


def option(default: Any = None, help: str = "", *, factory: Optional[Callable[[], Any]] = None,
           **cli: Any) -> Any:
    """A TrainConfig field with its ``allocation train`` help next to it (``metadata['help']``).

    ``cli``: extra argparse settings for its flag (``choices``, ``metavar``, ``flag``).
    """
    metadata = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


RULE_OPTION_FIELDS = ("zipf_capacities", "min_capacity", "per_token", "per_feature", "total")
"""TrainConfig fields that are options of the rule itself (passed to make_rule when set)."""


@dataclass
class TrainConfig:
    """Everything a run needs besides the data; every field is a flag of ``allocation train``."""

    rule: str = option("topk", "a registered rule: topk | feature-choice | mutual-choice | custom | any rule "
                       "added with allocation.sae.register_rule; on the command line several, comma-separated, "
                       "train one after another into --out/<rule> and are compared")
    k: int = option(32, "activations per token (TopK), or the budget k n per batch of n tokens "
                    "(feature-choice, mutual-choice; custom without --total)")
    zipf_capacities: Optional[float] = option(
        None, "feature-choice: Zipf-shaped capacities m_j ~ j^-S summing to k n per batch (S >= 0)", metavar="S")
    min_capacity: Optional[int] = option(
        None, "feature-choice with --zipf-capacities: every feature's capacity is at least min(C, k n / F) "
        "tokens per batch (default 0: a tail feature's share can round to 0, and it never fires)", metavar="C")
    per_token: Optional[int] = option(None, "custom: at most K features per token", metavar="K")
    per_feature: Optional[int] = option(None, "custom: at most M tokens per feature, per batch", metavar="M")
    total: Optional[int] = option(None, "custom: at most B entries per batch (replaces the budget k n)", metavar="B")
    rule_options: Dict = option(help="an option of a registered rule, KEY=VALUE (JSON value; repeatable)",
                                factory=dict, flag="--rule-option")
    n_features: int = option(4096, "dictionary size F")
    aux: str = option("k", "auxiliary loss: none, k (aux_k_loss, dead features) or zipf (aux_zipf_loss)",
                      choices=AUX_NAMES)
    tokens: int = option(1_000_000, "training tokens; steps = tokens // batch_size; may grow on --resume")
    batch_size: int = option(1024, "tokens per training batch")
    lr: Optional[float] = option(None, "Adam learning rate (default 2e-4 / sqrt(n_features / 2^14))")
    decoder_lr_scale: float = option(DECODER_LR_SCALE, "W_dec's learning rate is lr times this")
    encoder_init_scale: float = option(ENCODER_INIT_SCALE, "W_enc = c W_dec^T at init (default 1/sqrt(3))")
    warmup_steps: Optional[int] = option(None, "linear warmup steps (default 5% of the steps, at most 1000)")
    decay_fraction: float = option(0.2, "fraction of the steps over which lr decays linearly to 0")
    grad_clip: float = option(1.0, "gradient-norm clipping")
    dead_tokens: int = option(10_000_000, "a feature is dead after this many tokens without an activation")
    usage_window_tokens: Optional[int] = option(
        None, "memory of the feature-usage frequency, in tokens (default min(1M, tokens / 4))")
    k_aux: Optional[int] = option(None, "auxiliary activations per token (default d_in // 2)")
    aux_coefficient: float = option(1.0 / 32.0, "weight of the auxiliary loss")
    zipf_s: float = option(1.0, "Zipf exponent s >= 0 of aux_zipf_loss's usage targets")
    zipf_deficit: str = option(
        DEFAULT_DEFICIT, "aux_zipf_loss's deficit of feature j below its target t_j: absolute (t_j - u_j), "
        "relative (1 - u_j / t_j) or log_ratio (log t_j / u_j, floored)", choices=DEFICITS)
    zipf_fit: bool = option(False, "aux_zipf_loss: targets from the Zipf law fitted (s and c, least squares on "
                            "log-usage vs log-rank) to the features that are not under-used, instead of --zipf-s")
    zipf_exclude_saturated: bool = option(False, "aux_zipf_loss: no deficit for the ranks whose target sits at "
                                          "the frequency cap 1")
    zipf_under_used_only: bool = option(
        DEFAULT_UNDER_USED_ONLY, "aux_zipf_loss: deficits only for the under-used features (firing below "
        "0.1 x budget / F), the dead included")
    zipf_fill: bool = option(True, "aux_zipf_loss: capacities over the batch size are water-filled onto the other "
                             "features (no-: clamped, those matches lost, as configs before 0.2 trained)")
    threshold_decay: float = option(0.99, "decay of the moving average of the batch dual prices (eval thresholds)")
    threshold_correction: float = option(
        0.05, "dual-subgradient step of the eval thresholds' count-matching correction (0: plain average)")
    decode: str = option("auto", "decoder path: auto (sparse when it pays), sparse or dense",
                         choices=("auto", "sparse", "dense"))
    reduction: str = option("mean", "reduction of the reconstruction loss over tokens", choices=REDUCTIONS)
    metrics_every: int = option(100, "steps between metrics records")
    checkpoint_every: int = option(0, "steps between checkpoints (0: only at the end); may change on --resume")
    eval_batches: int = option(4, "held-out batches evaluated after training")
    calibrate_l0: Optional[float] = option(
        None, "after training, also evaluate batch rules at eval thresholds calibrated to this L0 per token on "
        "held-out calibration tokens (default: the rule's training budget per token; 0 skips it)")
    b_dec_sample: int = option(4096, "tokens whose geometric median initialises b_dec")
    seed: int = option(0, "seed of the SAE's initialisation and the batch order")
    allocation_scope: str = option(
        "global", "under torchrun (several processes): global allocates each batch rule over the global batch, "
        "exactly as one process would; local over each rank's own tokens (per-rank batches)", choices=SCOPES)
    collective_timeout: float = option(
        300.0, "several processes: seconds a rank waits for the others before the run fails; may change on --resume")
    device: str = option("cpu", "torch device for the SAE and the batches, e.g. cpu or cuda; may change on --resume")
    data: str = option("synthetic", "synthetic | minilm | hf (a local transformers model: --data-option model=DIR "
                       "text=FILE layer=L) | PATH (.npy, .safetensors, memmap); in-memory arrays are recorded as "
                       "'<array>'")
    downstream: Optional[bool] = option(
        None, "after training, splice the SAE into the model and report loss recovered (causal LMs) or embedding "
        "cosine (encoders) on held-out text (default: on where the data names its model: hf, minilm); may change "
        "on --resume")
    downstream_tokens: int = option(2048, "held-out tokens of the downstream evaluation; may change on --resume")
    data_options: Dict = option(help="an option of the data source, KEY=VALUE, e.g. layer=3 or n_tokens=50000 "
                                "(repeatable)", factory=dict, flag="--data-option")

    def __post_init__(self) -> None:
        self.rule = rule_key(self.rule)
        rule_class(self.rule)  # AllocationError listing the registered rules
        if self.aux not in AUX_NAMES:
            raise AllocationError(f"aux must be one of {', '.join(AUX_NAMES)}, got {self.aux!r}")
        if self.reduction not in REDUCTIONS:
            raise AllocationError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        for name in ("k", "n_features", "tokens", "batch_size", "dead_tokens", "metrics_every", "eval_batches",
                     "b_dec_sample", "downstream_tokens"):
            positive_int(getattr(self, name), name, allow_integral_float=False)
        if self.k > self.n_features:
            raise AllocationError(f"k={self.k} exceeds n_features={self.n_features}; choose k <= n_features")
        if self.tokens < self.batch_size:
            raise AllocationError(
                f"tokens={self.tokens} is less than one batch (batch_size={self.batch_size})"
            )
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise AllocationError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise AllocationError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if not self.grad_clip > 0:
            raise AllocationError(f"grad_clip must be > 0, got {self.grad_clip}")
        for name in ("decoder_lr_scale", "encoder_init_scale"):
            positive_number(getattr(self, name), name)
        if self.calibrate_l0 is not None and not (0 <= self.calibrate_l0 <= self.n_features):
            raise AllocationError(
                f"calibrate_l0 must be in [0, n_features={self.n_features}] (0 skips calibration), "
                f"got {self.calibrate_l0}"
            )
        if self.checkpoint_every < 0:
            raise AllocationError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.warmup_steps is not None and (
            isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0
        ):
            raise AllocationError(
                f"warmup_steps must be an integer >= 0 (or None for the default), got {self.warmup_steps!r}"
            )
        if not (isinstance(self.zipf_s, (int, float)) and math.isfinite(self.zipf_s) and self.zipf_s >= 0):
            raise AllocationError(
                f"zipf_s must be a finite number >= 0 (0: uniform targets, 1: Zipf's law), got {self.zipf_s!r}"
            )

        if self.zipf_deficit not in DEFICITS:
            raise AllocationError(f"zipf_deficit must be one of {', '.join(DEFICITS)}, got {self.zipf_deficit!r}")
        for name in ("zipf_fit", "zipf_exclude_saturated", "zipf_fill", "zipf_under_used_only"):
            if not isinstance(getattr(self, name), bool):
                raise AllocationError(f"{name} must be true or false, got {getattr(self, name)!r}")

        if self.allocation_scope not in SCOPES:
            raise AllocationError(f"allocation_scope must be one of {', '.join(SCOPES)}, got {self.allocation_scope!r}")
        positive_number(self.collective_timeout, "collective_timeout")
        if not isinstance(self.rule_options, dict) or not isinstance(self.data_options, dict):
            raise AllocationError("rule_options and data_options must be dicts")
        self.make_rule().validate(self.n_features)

    def rule_options_given(self) -> Dict[str, Any]:
        """The rule's own options this config sets: the RULE_OPTION_FIELDS that are not None, and rule_options."""
        given = {name: getattr(self, name) for name in RULE_OPTION_FIELDS if getattr(self, name) is not None}
        return {**given, **self.rule_options}

    def make_rule(self) -> Rule:
        """The configured rule, from the registry: make_rule(rule, k, **rule options)."""
        return make_rule(self.rule, self.k, **self.rule_options_given())

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else default_learning_rate(self.n_features)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(1000, self.steps // 20)

    def lr_at(self, step: int) -> float:
        """Linear warmup to lr, constant, then linear decay to 0 over the last decay_fraction of steps."""
        scale = 1.0
        if self.warmup > 0 and step < self.warmup:
            scale = (step + 1) / self.warmup
        decay_steps = int(self.decay_fraction * self.steps)
        decay_start = self.steps - decay_steps
        if decay_steps > 0 and step >= decay_start:
            scale = min(scale, (self.steps - step) / decay_steps)
        return self.learning_rate * scale

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Inverse of ``to_dict``; fields a config predates take the values it trained with."""
        known = {f.name for f in fields(cls)}
        return cls(**{**FIELDS_BEFORE_0_2, **{k: v for k, v in data.items() if k in known}})


@dataclass
class StepResult:
    """Scalars of one training step (floats, for logging)."""

    step: int
    loss: float
    main: float  # normalized MSE
    aux: float
    l0: float
    lr: float


class Trainer:
    """Owns the SAE, the optimizer, the usage counters and the run directory.

    ``out`` (optional) is checked at once (``allocation.sae.rundir``): it must be writable, and a
    fresh run refuses one that is not empty unless ``overwrite=True`` (which replaces the run's own
    files when training starts); ``Trainer.resume(out)`` continues the run there. Writes hold the
    directory's lock.

    Benchmark API: ``Trainer(config, data)`` then ``train_step(batch)`` on (batch_size, d_in)
    tensors; ``sae.decode_mode`` ('sparse' / 'dense' / 'auto') picks the decoder path.
    """

    def __init__(
        self,
        config: TrainConfig,
        data: Union[str, ActivationSource, Tensor, Path, None] = None,
        *,
        out: Union[str, Path, None] = None,
        sae: Optional[SparseAutoencoder] = None,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise AllocationError(f"config must be a TrainConfig, got {type(config).__name__}")
        if data is None:
            data = config.data
        # the Trainer's own copy: the caller's config is never changed (data is recorded here)
        config = copy.deepcopy(config)
        config.data = str(data) if isinstance(data, (str, Path)) else "<array>"
        self.config = config
        self.comm = init_from_environment(config.device, config.collective_timeout)  # None: one process
        self.rank = 0 if self.comm is None else self.comm.rank
        self.world_size = 1 if self.comm is None else self.comm.world_size
        self.device = check_device(rank_device(config.device, self.comm), "device")
        self._attach(out, fresh=True, overwrite=overwrite)  # before any work: refuse a busy or bad --out
        self.source = load_activations(data, **config.data_options)
        check_downstream(config, self.source)
        if sae is None:
            rule = config.make_rule()
            sae = SparseAutoencoder(
                self.source.d_in,
                config.n_features,
                rule,
                decode=config.decode,
                threshold_decay=config.threshold_decay,
                threshold_correction=config.threshold_correction,
                encoder_init_scale=config.encoder_init_scale,
                seed=config.seed,
            )
            sae.initialize_b_dec(self.source.sample(config.b_dec_sample, seed=config.seed))
        elif sae.d_in != self.source.d_in:
            raise AllocationError(f"the SAE has d_in={sae.d_in} but the data has d_in={self.source.d_in}")
        elif sae.n_features != config.n_features:
            raise AllocationError(
                f"the SAE has n_features={sae.n_features} but the config has n_features={config.n_features}"
            )
        self.sae = sae.to(self.device)
        self.model: torch.nn.Module = self.sae  # what a training step calls: the SAE, or its DDP wrapper
        self.gradient_bytes = [0]  # bytes of gradients this rank all-reduced (data-parallel runs)
        if self.comm is not None:
            self.sae.scope = RankScope(self.comm, config.batch_size, config.allocation_scope)
            self.model = data_parallel(self.sae, self.comm, self.gradient_bytes)
        groups = [
            {"params": [sae.W_dec], "lr_scale": float(config.decoder_lr_scale)},
            {"params": [sae.W_enc, sae.b_enc, sae.b_dec], "lr_scale": 1.0},
        ]
        self.optimizer = adam(groups, config.learning_rate)
        window = config.usage_window_tokens or max(config.batch_size, min(1_000_000, config.tokens // 4))
        self.usage = FeatureUsage(config.n_features, dead_tokens=config.dead_tokens, window_tokens=window)
        self.window = MetricsWindow(config.n_features)
        self.step = 0
        self.history: list = []
        self.elapsed = 0.0

    # ------------------------------------------------------------------------------- the run directory
    def _attach(self, out: Union[str, Path, None], *, fresh: bool, overwrite: bool = False) -> None:
        """Use ``out`` as the run directory: writable, and (fresh run) empty unless ``overwrite``.

        With several processes only rank 0 writes (and checks) it; ``checkpoints`` is set on every rank.
        """
        self.checkpoints = out is not None
        if self.rank != 0:
            out = None
        self.out = Path(out) if out is not None else None
        self.rundir = RunDirectory(self.out) if self.out is not None else None
        self._pending_fresh: Optional[str] = None
        if self.rundir is None:
            return
        self.rundir.check_writable()
        if fresh:
            if not overwrite:
                self.rundir.check_fresh(self._describe_existing_run)
            self._pending_fresh = "overwrite" if overwrite else "check"

    def _describe_existing_run(self) -> Optional[str]:
        checkpoint = resolve_published(self.out / "checkpoint")
        if checkpoint is None:
            return None
        try:
            step = int(json.loads((checkpoint / STATE_JSON).read_text())["step"])
            steps = TrainConfig.from_dict(json.loads((checkpoint / "cfg.json").read_text())["train"]).steps
        except Exception:  # only for the message: an unreadable checkpoint is still 'a run'
            return "a run's checkpoint"
        return f"a run (checkpoint at step {step} of {steps})"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the run directory's writer lock; a fresh run checks (or clears) the directory first."""
        if self.rundir is None:
            yield
            return
        with self.rundir.locked():
            if self._pending_fresh == "overwrite":
                self.rundir.clear_run()
            elif self._pending_fresh == "check":
                self.rundir.check_fresh(self._describe_existing_run)
            self._pending_fresh = None
            yield

    # ------------------------------------------------------------------------------- one step
    def aux_loss(self, batch: Tensor, out: SAEOutput) -> Tensor:
        """The configured auxiliary loss for this forward pass (0 for aux='none')."""
        cfg = self.config
        if cfg.aux == "none":
            return out.pre.new_zeros(())
        residual = batch - out.x_hat
        sparse = self.sae.decode_mode != "dense"
        if cfg.aux == "k":
            return aux_k_loss(
                out.pre,
                residual,
                self.sae.W_dec,
                self.usage.dead.to(out.pre.device),
                k_aux=cfg.k_aux,
                coefficient=cfg.aux_coefficient,
                reduction=cfg.reduction,
                sparse=sparse,
                scope=self.sae.scope,
            )
        n_tokens = self.sae.scope.n_tokens(out.pre.shape[0])
        budget = self.sae.budget(n_tokens) / n_tokens
        return aux_zipf_loss(
            out.pre,
            out.mask,
            residual,
            self.sae.W_dec,
            self.usage.frequency.to(out.pre.device),
            budget,
            s=cfg.zipf_s,
            deficit=cfg.zipf_deficit,
            fit=cfg.zipf_fit,
            exclude_saturated=cfg.zipf_exclude_saturated,
            fill=cfg.zipf_fill,
            under_used_only=cfg.zipf_under_used_only,
            k_aux=cfg.k_aux,
            coefficient=cfg.aux_coefficient,
            reduction=cfg.reduction,
            sparse=sparse,
            scope=self.sae.scope,
        )

    def losses(self, batch: Tensor, out: SAEOutput) -> Tuple[Tensor, Tensor]:
        """(main, aux): normalized MSE R(||x - x_hat||^2) / R(||x - mean x||^2) and the aux loss."""
        return normalized_mse(batch, out.x_hat, self.config.reduction, self.sae.scope), self.aux_loss(batch, out)

    def train_step(self, batch: Tensor) -> StepResult:
        """One optimisation step on ``batch`` (n, d_in); raises TrainingDivergedError on NaN/inf.

        With several processes ``batch`` is this rank's rows of the global batch (``RankScope.rows``),
        and a collective that fails (a rank died or timed out) raises RankFailedError.
        """
        if self.comm is None:
            return self._train_step(batch)
        try:
            return self._train_step(batch)
        except AllocationError:
            raise
        except (RuntimeError, torch.distributed.DistError) as error:  # DDP's own collectives
            raise self.comm.failure(f"training step {self.step + 1}", error) from None

    def _train_step(self, batch: Tensor) -> StepResult:
        cfg, sae = self.config, self.sae
        sae.train()  # the batch rule, whatever mode an evaluation in between left the SAE in
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        try:
            out = self.model(batch)
        except NonFiniteAffinitiesError:
            raise TrainingDivergedError(
                self._diverged_message("the affinities (encoder output)", float("nan"))
            ) from None
        main, aux = self.losses(batch, out)
        loss = main + aux
        shares = torch.stack([main.detach(), aux.detach(), loss.detach()]).to(torch.float64)
        fired, n_tokens, mean = out.fired, batch.shape[0], None
        if self.comm is not None:  # one all-reduce: the batch's firing counts, its losses, its sum and size
            n_features = fired.shape[0]
            stats = torch.cat([fired.to(torch.float64), shares, batch.detach().sum(dim=0).to(torch.float64),
                               torch.tensor([float(n_tokens)], dtype=torch.float64, device=fired.device)])
            stats = sae.scope.loss_sum(stats)
            fired, totals = stats[:n_features].round().to(torch.int64), stats[n_features: n_features + 3]
            n_tokens = int(stats[-1])
            mean = (stats[n_features + 3: -1] / n_tokens).to(batch.dtype)
        else:
            totals = shares
        main_value, aux_value, loss_value = (float(v) for v in totals)
        if not math.isfinite(loss_value):
            raise TrainingDivergedError(self._diverged_message("the loss", loss_value))
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients: each rank's share times the number of ranks sums them
        (loss if self.comm is None else loss * self.comm.world_size).backward()
        sae.remove_parallel_gradient()
        grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        if not bool(torch.isfinite(grad_norm)):
            raise TrainingDivergedError(self._diverged_message("the gradient norm", float(grad_norm)))
        self.optimizer.step()
        self._check_parameters(sae.normalize_decoder())
        sae.update_thresholds(out.pre.detach(), out.mask, out.code, out.prices, out.frontier)
        self.usage.record(fired, n_tokens)
        # the window adds this rank's rows and loss shares (merged over the ranks when read, merge_window)
        self.window.record(batch, out.x_hat.detach(), out.l0, out.fired, *(float(v) for v in shares), mean=mean)
        self.step += 1
        l0 = float(fired.sum()) / n_tokens
        return StepResult(self.step, loss_value, main_value, aux_value, l0, lr)

    def parameter_problem(self, decoder_norms: Optional[Tensor] = None, *, buffers: bool = True) -> Optional[str]:
        """What is wrong with the SAE's parameters (non-finite, a zero decoder row), or None.

        ``decoder_norms``: W_dec's row norms before ``normalize_decoder`` (F,); finite and > 0 for
        every row means W_dec is finite and non-degenerate after it, without another pass.
        """
        sae = self.sae
        tensors = list(sae.named_parameters()) + (list(sae.named_buffers()) if buffers else [])
        for name, tensor in tensors:
            if decoder_norms is not None and name == "W_dec":
                continue
            if tensor.is_floating_point() and not all_finite(tensor):
                return f"{name} holds NaN or inf"
        with torch.no_grad():
            norms = sae.W_dec.norm(dim=1) if decoder_norms is None else decoder_norms
            smallest, largest = (float(v) for v in torch.aminmax(norms))
        if not math.isfinite(largest):
            return "W_dec holds NaN or inf"
        if not smallest > 0:
            return "a decoder row (W_dec) has zero norm"
        return None

    def _check_parameters(self, decoder_norms: Tensor) -> None:
        """After a step: the parameters (buffers are checked before saving) and the decoder's norms."""
        problem = self.parameter_problem(decoder_norms, buffers=False)
        if problem is not None:
            raise TrainingDivergedError(
                self._diverged_message(f"after the optimiser step, {problem}", None, applied=True)
            )

    def _diverged_message(self, what: str, value: Optional[float], *, applied: bool = False) -> str:
        where = (
            f"the last good checkpoint in {str(self.out / 'checkpoint')!r} is intact"
            if self.out is not None and resolve_published(self.out / "checkpoint") is not None
            else "no checkpoint was written"
        )
        became = what if value is None else f"{what} became {value}"
        stopped = "nothing from this step was saved" if applied else "training stopped before applying it"
        return (
            f"{became} at step {self.step} (token {self.step * self.config.batch_size}); "
            f"{stopped} and {where}. "
            f"Lower --lr (now {self.config.learning_rate:.3g}) "
            "or check the data's scale"
        )

    # ------------------------------------------------------------------------------- the run
    def run(
        self,
        *,
        progress: bool = False,
        stop_at_step: Optional[int] = None,
        on_metrics: Optional[Callable[[dict], None]] = None,
    ) -> dict:
        """Train until ``config.steps`` (or ``stop_at_step``, then checkpoint); returns the summary.

        Holds the run directory's lock throughout (another process writing it is refused).
        """
        with self._locked():
            return self._run(progress, stop_at_step, on_metrics)

    def _run(self, progress: bool, stop_at_step: Optional[int], on_metrics) -> dict:
        cfg = self.config
        last = cfg.steps if stop_at_step is None else min(stop_at_step, cfg.steps)
        bar = None
        if progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.steps,
                initial=self.step,
                unit="step",
                desc=f"{cfg.rule} k={cfg.k}",
                mininterval=1.0,
                dynamic_ncols=True,
            )
        batches = self.source.batches(cfg.batch_size, seed=cfg.seed, start_batch=self.step)
        if self.comm is not None:  # this rank's rows of every global batch
            batches = map(self.sae.scope.rows, batches)
        if self.out is not None and self.step < last:
            # summary.json describes a finished state this run is about to change (e.g. a resume with
            # more --tokens): remove it, so that its presence always means 'finished, export current'
            (self.out / "summary.json").unlink(missing_ok=True)
        try:
            self._train_until(last, batches, bar, on_metrics)
        finally:
            if bar is not None:
                bar.close()
        if self.step < cfg.steps:
            return {"stopped_at_step": self.step}
        if self.rank != 0:  # rank 0 evaluates and exports (no collectives); the others are done
            return {"rank": self.rank, "steps": self.step}
        self.sae.scope = LOCAL  # evaluation is batch-independent: no rank is needed any more
        return self.finish()

    def _train_until(self, last: int, batches, bar, on_metrics) -> None:
        cfg = self.config
        started = time.perf_counter()
        try:
            while self.step < last:
                result = self.train_step(next(batches).to(self.device))
                if bar is not None:
                    bar.update(1)
                    if result.step % 10 == 0:
                        bar.set_postfix(loss=f"{result.loss:.4g}", l0=f"{result.l0:.1f}", refresh=False)
                if self.step % cfg.metrics_every == 0 or self.step == cfg.steps:
                    self._report(started, on_metrics)
                if self.checkpoints and (
                    (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == last
                ):
                    self.elapsed += time.perf_counter() - started
                    started = time.perf_counter()
                    merge_window(self.window, self.sae.scope, held_by_rank0=True)  # the checkpoint: every rank's rows
                    if self.out is not None:
                        self.save()
                    if self.comm is not None:  # every rank may read the checkpoint once this returns
                        self.comm.barrier()
        finally:
            self.elapsed += time.perf_counter() - started

    def _report(self, started: float, on_metrics: Optional[Callable[[dict], None]]) -> None:
        cfg = self.config
        budget = self.sae.budget(cfg.batch_size) / cfg.batch_size
        merge_window(self.window, self.sae.scope)
        record = {
            "step": self.step,
            "tokens": self.step * cfg.batch_size,
            "lr": cfg.lr_at(max(self.step - 1, 0)),
            **self.window.summary(self.usage, budget),
        }
        self.window.reset()
        self.history.append(record)
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(entry) + "\n" for entry in self.history)
            write_file(self.out / "metrics.jsonl", lines.encode())
        if on_metrics is not None:
            on_metrics(record)

    def finish(self, saelens_metadata: Optional[Mapping[str, Any]] = None) -> dict:
        """Held-out evaluation (eval mode: thresholds), feature recovery when known, SAELens export.

        ``saelens_metadata`` (e.g. ``hook_name``) overrides what the data source says about itself in
        the export's cfg. A run whose FVU exploded (above EXPLODED_FVU, or not finite) gets a
        ``TrainingExplodedWarning`` and the reason in ``summary["warnings"]``.
        """
        with self._locked():
            return self._finish(dict(saelens_metadata or {}))

    def _finish(self, saelens_metadata: dict) -> dict:
        cfg = self.config
        heldout = self.source.batches(cfg.batch_size, seed=cfg.seed, split="heldout")
        evaluation = evaluate(self.sae, heldout, max_batches=cfg.eval_batches)
        # the same eval-mode code on unseen batches of the training split: separates the thresholds'
        # accuracy (budget matched on the training distribution) from a shift of the held-out data
        train_split = self.source.batches(cfg.batch_size, seed=cfg.seed + 1, split="train")
        train_split_eval = evaluate(self.sae, train_split, max_batches=cfg.eval_batches)
        train_metrics = self.history[-1] if self.history else {}
        summary = {
            "rule": cfg.rule,
            "k": cfg.k,
            "n_features": cfg.n_features,
            "aux": cfg.aux,
            "tokens": cfg.steps * cfg.batch_size,
            "steps": self.step,
            "train_fvu": train_metrics.get("fvu"),
            "dead_fraction": train_metrics.get("dead_fraction"),
            "under_used_fraction": train_metrics.get("under_used_fraction"),
            "train_l0": train_metrics.get("l0"),
            "eval_fvu": evaluation["fvu"],
            "eval_l0": evaluation["l0"],
            "eval_never_fired_fraction": evaluation["never_fired_fraction"],
            "eval_density": evaluation["density"],
            "eval_train_split_fvu": train_split_eval["fvu"],
            "eval_train_split_l0": train_split_eval["l0"],
            "processes": self.world_size,
            "allocation_scope": cfg.allocation_scope,
            "seconds": self.elapsed,
            "tokens_per_second": self.step * cfg.batch_size / max(self.elapsed, 1e-9),
        }
        calibrated = self.calibrated_evaluation()
        if calibrated is not None:
            summary["calibrated"] = calibrated
        downstream = trainer_downstream(self)
        if downstream is not None:
            summary["downstream"] = downstream
        true_features = getattr(self.source, "true_features", None)
        if true_features is not None:
            from .synthetic import feature_recovery

            summary["feature_recovery"] = feature_recovery(self.sae.W_dec.detach().cpu(), true_features)
        summary["warnings"] = self.explosion_warnings(evaluation["fvu"])
        for message in summary["warnings"]:
            warnings.warn(message, TrainingExplodedWarning, stacklevel=3)
        if self.out is not None:
            metadata = metadata_from_source(self.source.describe(), dataset_path=cfg.data)
            metadata.update(saelens_metadata)
            export_saelens(self.sae, self.out / "saelens", **metadata)
            write_file(self.out / "summary.json", json_bytes(summary))  # last: its presence means 'done'
        return summary

    def calibrated_evaluation(self) -> Optional[dict]:
        """Held-out eval at thresholds calibrated to L0 = calibrate_l0 (default: the rule's budget per token,
        k for FC / MC); None for TopK / 0.

        Calibration tokens: the held-out batches right after the evaluated ones (same seed), so the
        two sets are disjoint while 2 * eval_batches * batch_size fits in one pass of the split. The
        SAE itself keeps its trained thresholds (a calibrated copy is evaluated).
        """
        cfg = self.config
        target = training_l0(self.sae, cfg.batch_size) if cfg.calibrate_l0 is None else cfg.calibrate_l0
        if not self.sae.batch_dependent or target == 0:
            return None
        stream = self.source.batches(cfg.batch_size, seed=cfg.seed, split="heldout", start_batch=cfg.eval_batches)
        tokens = torch.cat([next(stream) for _ in range(cfg.eval_batches)]).to(self.device)
        twin, report = calibrated_copy(self.sae, tokens, float(target))
        heldout = self.source.batches(cfg.batch_size, seed=cfg.seed, split="heldout")
        evaluation = evaluate(twin, heldout, max_batches=cfg.eval_batches)
        n_heldout = getattr(self.source, "n_heldout", None)
        return {
            **report,
            "eval_fvu": evaluation["fvu"],
            "eval_l0": evaluation["l0"],
            "eval_never_fired_fraction": evaluation["never_fired_fraction"],
            "disjoint_from_eval": n_heldout is None or 2 * cfg.eval_batches * cfg.batch_size <= n_heldout,
        }

    def explosion_warnings(self, eval_fvu: Optional[float] = None) -> list:
        """One message per sign that the loss exploded: a train FVU (metrics) or the eval FVU above
        EXPLODED_FVU or not finite."""
        messages = []
        worst = max(self.history, key=lambda r: _badness(r.get("fvu")), default=None)
        if worst is not None and _badness(worst.get("fvu")) > EXPLODED_FVU:
            messages.append(
                f"the loss exploded: train FVU reached {worst['fvu']:.3g} at step {worst['step']} "
                f"(above {EXPLODED_FVU:g}, i.e. far worse than predicting the mean); this SAE is not "
                f"usable. Lower --lr (now {self.config.learning_rate:.3g})"
            )
        if eval_fvu is not None and _badness(eval_fvu) > EXPLODED_FVU:
            messages.append(f"the eval FVU is {eval_fvu:.3g} (above {EXPLODED_FVU:g}): the loss exploded")
        return messages

    # ------------------------------------------------------------------------------- checkpoints
    def state_tensors(self) -> Dict[str, Tensor]:
        tensors: Dict[str, Tensor] = {"rng.torch": torch.get_rng_state()}
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"optimizer.{index}.{key}"] = value
        tensors.update(prefixed("usage.", self.usage.state_dict()))
        tensors.update(prefixed("window.", self.window.state_dict()))
        return tensors

    def save(self) -> Path:
        """Checkpoint into ``out/checkpoint`` (atomic); refuses parameters that are not finite."""
        if self.out is None:
            raise AllocationError("this Trainer has no out directory; pass out=DIR to save checkpoints")
        problem = self.parameter_problem()
        if problem is not None:
            raise TrainingDivergedError(f"refusing to checkpoint step {self.step}: {problem}")
        with self._locked():
            return self._save()

    def _save(self) -> Path:
        groups = [
            {k: v for k, v in group.items() if k != "params"}
            for group in self.optimizer.state_dict()["param_groups"]
        ]
        state = {"step": self.step, "history": self.history, "elapsed": self.elapsed, "param_groups": groups,
                 "world_size": self.world_size}
        config = {"train": self.config.to_dict(), "data_source": self.source.describe()}
        return save_checkpoint(self.out / "checkpoint", self.sae, config, self.state_tensors(), state)

    @classmethod
    def resume(
        cls,
        out: Union[str, Path],
        data: Union[str, ActivationSource, Tensor, Path, None] = None,
        *,
        changes: Optional[Mapping[str, Any]] = None,
    ) -> "Trainer":
        """Continue the run saved in ``out/checkpoint`` exactly where it stopped.

        ``changes``: TrainConfig fields the caller asks for (e.g. the command line's options). Those
        in RESUMABLE_CHANGES are applied (``tokens`` only upwards: a longer run); any other that
        differs from the checkpoint is an error naming each difference.
        """
        out = Path(out)
        sae, cfg, tensors, state = load_checkpoint(out / "checkpoint")
        try:
            config = TrainConfig.from_dict(cfg["train"])
        except (KeyError, TypeError, AllocationError) as error:
            raise AllocationError(
                f"checkpoint in {str(out)!r} has no valid training configuration ({error}); start a fresh run"
            ) from None
        config = _apply_changes(config, dict(changes or {}), int(state.get("step", 0)))
        if data is None and config.data == "<array>":
            raise AllocationError("this run trained on an in-memory array; pass the same data to resume it")
        trainer = cls(config, data, sae=sae)
        trainer._attach(out, fresh=False)
        try:
            optimizer_state: Dict[int, Dict[str, Tensor]] = {}
            for name, value in with_prefix(tensors, "optimizer.").items():
                index, key = name.split(".", 1)
                optimizer_state.setdefault(int(index), {})[key] = value
            groups = trainer.optimizer.state_dict()["param_groups"]
            saved_groups = state["param_groups"]
            if len(saved_groups) == 1 < len(groups):  # saved before the decoder had its own group
                saved_groups = [{**saved_groups[0], "lr_scale": group["lr_scale"]} for group in groups]
            for group, saved in zip(groups, saved_groups, strict=True):
                group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
            trainer.optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})
            trainer.usage.load_state_dict(with_prefix(tensors, "usage."))
            trainer.window.load_state_dict(with_prefix(tensors, "window."))
            window_share(trainer.window, trainer.sae.scope)
            torch.set_rng_state(tensors["rng.torch"])
            trainer.step, trainer.history, trainer.elapsed = (
                int(state["step"]),
                list(state["history"]),
                state["elapsed"],
            )
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise AllocationError(
                f"checkpoint in {str(out)!r} is inconsistent ({error!r}); start a fresh run"
            ) from None
        saved_world = int(state.get("world_size", 1))
        if config.allocation_scope == "local" and trainer.sae.batch_dependent and saved_world != trainer.world_size:
            raise AllocationError(
                f"this run allocated over each rank's own tokens (--allocation-scope local) on {saved_world} "
                f"process(es), but this resume has {trainer.world_size}: the per-rank batch would change. Resume "
                f"it with {saved_world} process(es) (torchrun --nproc-per-node ...)"
            )
        if not 0 <= trainer.step <= config.steps:
            raise AllocationError(
                f"checkpoint in {str(out)!r} is inconsistent: step {trainer.step} is outside the run's "
                f"0..{config.steps} steps; start a fresh run"
            )
        return trainer


def option_name(field_name: str) -> str:
    """The ``allocation train`` flag of a TrainConfig field: its metadata's ``flag`` (data_options ->
    --data-option, rule_options -> --rule-option), else --field-name."""
    spec = {f.name: f for f in fields(TrainConfig)}.get(field_name)
    if spec is not None and "flag" in spec.metadata:
        return spec.metadata["flag"]
    return "--" + field_name.replace("_", "-")


def _apply_changes(config: TrainConfig, changes: Dict[str, Any], step: int) -> TrainConfig:
    """``config`` with the allowed ``changes``; AllocationError naming every disallowed difference."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise AllocationError(f"unknown training options {unknown}; valid: {sorted(known)}")
    current = config.to_dict()
    if "rule" in changes:
        changes["rule"] = rule_key(changes["rule"])
    conflicts = [
        f"{option_name(name)} {_show(value)} (the checkpoint has {_show(current[name])})"
        for name, value in changes.items()
        if name not in RESUMABLE_CHANGES and value != current[name]
    ]
    if conflicts:
        allowed = ", ".join(
            option_name(name) + (" (more only)" if name == "tokens" else "") for name in RESUMABLE_CHANGES
        )
        raise AllocationError(
            "--resume continues the checkpoint's run as it was configured, but "
            + "; ".join(conflicts)
            + f". Drop these options, or start a new run (another --out, or --overwrite). "
            f"Options that may change on resume: {allowed}, --threads"
        )
    tokens = changes.get("tokens", config.tokens)
    if tokens < config.tokens:
        raise AllocationError(
            f"--tokens {tokens} is fewer than the checkpoint's run ({config.tokens} tokens, {step} steps "
            "done); --tokens on resume can only extend a run"
        )
    applied = {name: value for name, value in changes.items() if name in RESUMABLE_CHANGES}
    return TrainConfig.from_dict({**current, **applied}) if applied else config


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(value.items())) or "(none)"
    return str(value)


def _badness(value: Optional[float]) -> float:
    """An FVU for comparisons: inf when it is NaN or inf, -inf when it is missing."""
    if value is None:
        return -math.inf
    return value if math.isfinite(value) else math.inf


def train(config: TrainConfig, data=None, *, out=None, progress: bool = False) -> dict:
    """Train an SAE as configured; returns the summary (also written to out/summary.json)."""
    return Trainer(config, data, out=out).run(progress=progress)
