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

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from ..errors import AllocationError
from .calibration import calibrated_copy
from .checkpoint import (
    _json_bytes,
    _write_file,
    export_saelens,
    load_checkpoint,
    save_checkpoint,
)
from .data import ActivationSource, load_activations
from .losses import REDUCTIONS, aux_k_loss, aux_zipf_loss, normalized_mse
from .metrics import FeatureUsage, MetricsWindow, evaluate
from .model import (
    ENCODER_INIT_SCALE,
    RULE_NAMES,
    NonFiniteAffinitiesError,
    SAEOutput,
    SparseAutoencoder,
    default_learning_rate,
    make_rule,
)

AUX_NAMES = ("none", "k", "zipf")

DECODER_LR_SCALE = 3.0
"""W_dec's Adam learning rate relative to the other parameters'. Unit-norm decoder rows move slowly
under Adam's per-entry steps; on MiniLM (benchmarks/results/ablation_*.json) a 3x decoder rate
lowered held-out FVU in short and long runs, while the same factor on every weight helped only short
runs. (SAELens gets a similar effect from its decoder initialised at norm 0.1.)"""

FIELDS_BEFORE_0_2 = {"decoder_lr_scale": 1.0, "encoder_init_scale": 1.0}
"""What a config saved before these fields existed trained with (resume continues it unchanged)."""


def adam(groups: list, lr: float) -> torch.optim.Adam:
    """Adam (betas 0.9 / 0.999, eps 6.25e-10), fused into one kernel per step where torch has it."""
    try:
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=6.25e-10)


class TrainingDivergedError(AllocationError):
    """The loss (or the gradient norm) became NaN or inf; the step was not applied."""


@dataclass
class TrainConfig:
    """Everything a run needs besides the data; every field is a CLI flag of ``allocation train``."""

    rule: str = "topk"  # topk | feature-choice | mutual-choice
    k: int = 32  # activations per token (TopK), or budget k * n per batch (FC, MC)
    n_features: int = 4096
    aux: str = "k"  # none | k (aux_k_loss) | zipf (aux_zipf_loss)
    tokens: int = 1_000_000  # training tokens; steps = tokens // batch_size
    batch_size: int = 1024
    lr: Optional[float] = None  # None: 2e-4 / sqrt(n_features / 2**14)
    decoder_lr_scale: float = DECODER_LR_SCALE  # W_dec's learning rate is lr times this
    encoder_init_scale: float = ENCODER_INIT_SCALE  # W_enc = c W_dec^T at init
    warmup_steps: Optional[int] = None  # None: 5% of the steps, at most 1000
    decay_fraction: float = 0.2  # lr decays linearly to 0 over the last 20% of steps
    grad_clip: float = 1.0
    dead_tokens: int = 10_000_000  # dead = no activation in the last dead_tokens tokens
    usage_window_tokens: Optional[int] = None  # memory of the usage frequency; None: min(1M, tokens / 4)
    k_aux: Optional[int] = None  # None: d_in // 2
    aux_coefficient: float = 1.0 / 32.0
    zipf_s: float = 1.0
    threshold_decay: float = 0.99
    threshold_correction: float = 0.05  # dual-subgradient step of the eval thresholds (0: plain average)
    decode: str = "auto"  # auto | sparse | dense
    reduction: str = "mean"
    metrics_every: int = 100
    checkpoint_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    calibrate_l0: Optional[float] = None  # also evaluate at thresholds calibrated to this L0 (None: k; 0: skip)
    b_dec_sample: int = 4096
    seed: int = 0
    device: str = "cpu"  # torch device for the SAE and the batches (data sources yield CPU tensors)
    data: str = "synthetic"  # how the data was named (for resume); arrays are recorded as '<array>'
    data_options: Dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rule = str(self.rule).lower().replace("_", "-")
        if self.rule not in RULE_NAMES:
            raise AllocationError(f"rule must be one of {', '.join(RULE_NAMES)}, got {self.rule!r}")
        if self.aux not in AUX_NAMES:
            raise AllocationError(f"aux must be one of {', '.join(AUX_NAMES)}, got {self.aux!r}")
        if self.reduction not in REDUCTIONS:
            raise AllocationError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        for name in (
            "k",
            "n_features",
            "tokens",
            "batch_size",
            "dead_tokens",
            "metrics_every",
            "eval_batches",
            "b_dec_sample",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AllocationError(f"{name} must be a positive integer, got {value!r}")
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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise AllocationError(f"{name} must be a positive number, got {value!r}")
        if self.calibrate_l0 is not None and not (0 <= self.calibrate_l0 <= self.n_features):
            raise AllocationError(
                f"calibrate_l0 must be in [0, n_features={self.n_features}] (0 skips calibration), "
                f"got {self.calibrate_l0}"
            )
        if self.checkpoint_every < 0:
            raise AllocationError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")

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
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise AllocationError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        if data is None:
            data = config.data
        elif isinstance(data, (str, Path)):
            config.data = str(data)
        else:
            config.data = "<array>"
        self.source = load_activations(data, **config.data_options)
        self.out = Path(out) if out is not None else None
        if sae is None:
            rule = make_rule(config.rule, config.k)
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
        try:
            self.device = torch.device(config.device)
        except (RuntimeError, TypeError) as error:
            raise AllocationError(
                f"device must be a torch device such as 'cpu' or 'cuda', got {config.device!r}"
            ) from error
        self.sae = sae.to(self.device)
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
            )
        budget = self.sae.rule.budget(*out.pre.shape) / out.pre.shape[0]
        return aux_zipf_loss(
            out.pre,
            out.mask,
            residual,
            self.sae.W_dec,
            self.usage.frequency.to(out.pre.device),
            budget,
            s=cfg.zipf_s,
            k_aux=cfg.k_aux,
            coefficient=cfg.aux_coefficient,
            reduction=cfg.reduction,
            sparse=sparse,
        )

    def losses(self, batch: Tensor, out: SAEOutput) -> Tuple[Tensor, Tensor]:
        """(main, aux): normalized MSE R(||x - x_hat||^2) / R(||x - mean x||^2) and the aux loss."""
        return normalized_mse(batch, out.x_hat, self.config.reduction), self.aux_loss(batch, out)

    def train_step(self, batch: Tensor) -> StepResult:
        """One optimisation step on ``batch`` (n, d_in); raises TrainingDivergedError on NaN/inf."""
        cfg, sae = self.config, self.sae
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        try:
            out = sae(batch)
        except NonFiniteAffinitiesError:
            raise TrainingDivergedError(
                self._diverged_message("the affinities (encoder output)", float("nan"))
            ) from None
        main, aux = self.losses(batch, out)
        loss = main + aux
        if not bool(torch.isfinite(loss)):
            raise TrainingDivergedError(self._diverged_message("the loss", float(loss)))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_gradient()
        grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        if not bool(torch.isfinite(grad_norm)):
            raise TrainingDivergedError(self._diverged_message("the gradient norm", float(grad_norm)))
        self.optimizer.step()
        sae.normalize_decoder()
        sae.update_thresholds(out.pre.detach(), out.mask, out.code)
        l0_per_token, fired = out.l0, out.fired
        self.usage.record(fired, batch.shape[0])
        main_value, aux_value, loss_value = float(main.detach()), float(aux.detach()), float(loss.detach())
        self.window.record(batch, out.x_hat.detach(), l0_per_token, fired, main_value, aux_value, loss_value)
        self.step += 1
        l0 = float(l0_per_token.sum()) / batch.shape[0]
        return StepResult(self.step, loss_value, main_value, aux_value, l0, lr)

    def _diverged_message(self, what: str, value: float) -> str:
        where = (
            f"the last good checkpoint in {str(self.out / 'checkpoint')!r} is intact"
            if self.out is not None and (self.out / "checkpoint").exists()
            else "no checkpoint was written"
        )
        return (
            f"{what} became {value} at step {self.step} (token {self.step * self.config.batch_size}); "
            f"training stopped before applying it and {where}. "
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
        """Train until ``config.steps`` (or ``stop_at_step``, then checkpoint); returns the summary."""
        cfg = self.config
        last = cfg.steps if stop_at_step is None else min(stop_at_step, cfg.steps)
        bar = None
        if progress:
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
                if self.out is not None and (
                    (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == last
                ):
                    self.elapsed += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        self.elapsed += time.perf_counter() - started
        if self.step < cfg.steps:
            return {"stopped_at_step": self.step}
        return self.finish()

    def _report(self, started: float, on_metrics: Optional[Callable[[dict], None]]) -> None:
        cfg = self.config
        budget = self.sae.rule.budget(cfg.batch_size, cfg.n_features) / cfg.batch_size
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
            _write_file(self.out / "metrics.jsonl", lines.encode())
        if on_metrics is not None:
            on_metrics(record)

    def finish(self) -> dict:
        """Held-out evaluation (eval mode: thresholds), feature recovery when known, SAELens export."""
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
            "seconds": self.elapsed,
            "tokens_per_second": self.step * cfg.batch_size / max(self.elapsed, 1e-9),
        }
        calibrated = self.calibrated_evaluation()
        if calibrated is not None:
            summary["calibrated"] = calibrated
        true_features = getattr(self.source, "true_features", None)
        if true_features is not None:
            from .synthetic import feature_recovery

            summary["feature_recovery"] = feature_recovery(self.sae.W_dec.detach().cpu(), true_features)
        if self.out is not None:
            _write_file(self.out / "summary.json", _json_bytes(summary))
            export_saelens(self.sae, self.out / "saelens", dataset_path=cfg.data)
        return summary

    def calibrated_evaluation(self) -> Optional[dict]:
        """Held-out eval at thresholds calibrated to L0 = calibrate_l0 (k by default); None for TopK / 0.

        Calibration tokens: the held-out batches right after the evaluated ones (same seed), so the
        two sets are disjoint while 2 * eval_batches * batch_size fits in one pass of the split. The
        SAE itself keeps its trained thresholds (a calibrated copy is evaluated).
        """
        cfg = self.config
        target = cfg.k if cfg.calibrate_l0 is None else cfg.calibrate_l0
        if not self.sae.rule.batch_dependent or target == 0:
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

    # ------------------------------------------------------------------------------- checkpoints
    def state_tensors(self) -> Dict[str, Tensor]:
        tensors: Dict[str, Tensor] = {"rng.torch": torch.get_rng_state()}
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"optimizer.{index}.{key}"] = value
        tensors.update({f"usage.{k}": v for k, v in self.usage.state_dict().items()})
        tensors.update({f"window.{k}": v for k, v in self.window.state_dict().items()})
        return tensors

    def save(self) -> Path:
        """Checkpoint into ``out/checkpoint`` (atomic)."""
        if self.out is None:
            raise AllocationError("this Trainer has no out directory; pass out=DIR to save checkpoints")
        groups = [
            {k: v for k, v in group.items() if k != "params"}
            for group in self.optimizer.state_dict()["param_groups"]
        ]
        state = {"step": self.step, "history": self.history, "elapsed": self.elapsed, "param_groups": groups}
        config = {"train": self.config.to_dict(), "data_source": self.source.describe()}
        return save_checkpoint(self.out / "checkpoint", self.sae, config, self.state_tensors(), state)

    @classmethod
    def resume(
        cls, out: Union[str, Path], data: Union[str, ActivationSource, Tensor, Path, None] = None
    ) -> "Trainer":
        """Continue the run saved in ``out/checkpoint`` exactly where it stopped."""
        out = Path(out)
        sae, cfg, tensors, state = load_checkpoint(out / "checkpoint")
        config = TrainConfig.from_dict(cfg.get("train", {}))
        if data is None and config.data == "<array>":
            raise AllocationError("this run trained on an in-memory array; pass the same data to resume it")
        trainer = cls(config, data, out=out, sae=sae)
        try:
            optimizer_state = {}
            for name, value in tensors.items():
                if name.startswith("optimizer."):
                    _, index, key = name.split(".", 2)
                    optimizer_state.setdefault(int(index), {})[key] = value
            groups = trainer.optimizer.state_dict()["param_groups"]
            saved_groups = state["param_groups"]
            if len(saved_groups) == 1 < len(groups):  # saved before the decoder had its own group
                saved_groups = [{**saved_groups[0], "lr_scale": group["lr_scale"]} for group in groups]
            for group, saved in zip(groups, saved_groups, strict=True):
                group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
            trainer.optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})
            trainer.usage.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("usage.")})
            trainer.window.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("window.")})
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
        return trainer


def train(config: TrainConfig, data=None, *, out=None, progress: bool = False) -> dict:
    """Train an SAE as configured; returns the summary (also written to out/summary.json)."""
    return Trainer(config, data, out=out).run(progress=progress)
