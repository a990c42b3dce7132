"""``allocation train``: train SAEs (one rule, or several to compare); progress bar, summary table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

from ..errors import AllocationError
from ..sae.model import RULE_NAMES
from ..sae.train import AUX_NAMES, TrainConfig, Trainer

DEFAULTS = TrainConfig()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train sparse autoencoders with TopK, Feature Choice or Mutual Choice",
        description="Train an SAE whose activation is an allocation rule, print a summary table, write "
        "checkpoints (cfg.json + sae.safetensors), metrics.jsonl, summary.json and a SAELens export "
        "under --out. "
        "Several comma-separated rules train one after another into --out/<rule> and are compared.",
    )
    parser.add_argument(
        "--rule",
        default="topk",
        help=f"{' | '.join(RULE_NAMES)}, or several separated by commas (default topk)",
    )
    parser.add_argument(
        "--k", type=int, default=DEFAULTS.k, help="activations per token / budget k n per batch"
    )
    parser.add_argument("--n-features", type=int, default=DEFAULTS.n_features, help="dictionary size F")
    parser.add_argument(
        "--aux",
        choices=AUX_NAMES,
        default=DEFAULTS.aux,
        help="auxiliary loss: none, k (aux_k_loss, dead features) or zipf (aux_zipf_loss)",
    )
    parser.add_argument(
        "--data", default="synthetic", help="synthetic | minilm | PATH (.npy, .safetensors, memmap)"
    )
    parser.add_argument(
        "--data-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option for the data source, e.g. layer=3 or n_tokens=50000 (repeatable)",
    )
    parser.add_argument("--tokens", type=int, default=DEFAULTS.tokens, help="training tokens")
    parser.add_argument(
        "--out", type=Path, help="run directory (checkpoints, metrics, summary, SAELens export)"
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 2e-4 / sqrt(F / 2^14))")
    parser.add_argument(
        "--decoder-lr-scale",
        type=float,
        default=DEFAULTS.decoder_lr_scale,
        help=f"W_dec's learning rate is lr times this (default {DEFAULTS.decoder_lr_scale:g})",
    )
    parser.add_argument(
        "--encoder-init-scale",
        type=float,
        default=DEFAULTS.encoder_init_scale,
        help=f"W_enc = c W_dec^T at init (default 1/sqrt(3) = {DEFAULTS.encoder_init_scale:.3f})",
    )
    parser.add_argument("--warmup-steps", type=int, help="default 5%% of the steps, at most 1000")
    parser.add_argument(
        "--decay-fraction",
        type=float,
        default=DEFAULTS.decay_fraction,
        help="fraction of steps over which lr decays linearly to 0 (default 0.2)",
    )
    parser.add_argument("--grad-clip", type=float, default=DEFAULTS.grad_clip)
    parser.add_argument(
        "--dead-tokens",
        type=int,
        default=DEFAULTS.dead_tokens,
        help="a feature is dead after this many tokens without an activation (default 10M)",
    )
    parser.add_argument("--k-aux", type=int, help="auxiliary activations per token (default d_in // 2)")
    parser.add_argument(
        "--zipf-s", type=float, default=DEFAULTS.zipf_s, help="Zipf exponent s of aux_zipf_loss"
    )
    parser.add_argument("--decode", choices=("auto", "sparse", "dense"), default=DEFAULTS.decode)
    parser.add_argument(
        "--metrics-every", type=int, default=DEFAULTS.metrics_every, help="steps between metrics"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=DEFAULTS.checkpoint_every,
        help="steps between checkpoints (0: only at the end)",
    )
    parser.add_argument(
        "--calibrate-l0",
        type=float,
        help="after training, also evaluate Feature/Mutual Choice at eval thresholds calibrated to this "
        "held-out L0 per token on a held-out calibration set (default: k; 0 skips it)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument(
        "--device", default=DEFAULTS.device, help="torch device, e.g. cpu or cuda (default cpu)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's; 1 is best on busy shared cores)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out/checkpoint")
    parser.add_argument("--plot", type=Path, help="save a comparison figure (FVU curves, feature density)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _data_options(pairs: List[str]) -> Dict:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise AllocationError(f"--data-option expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def run(args: argparse.Namespace) -> int:
    from ..sae.report import plot_runs, summary_table

    if args.threads is not None:
        if args.threads < 1:
            raise AllocationError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    rules = [rule.strip() for rule in args.rule.split(",") if rule.strip()]
    if not rules:
        raise AllocationError("--rule is empty; pass topk, feature-choice or mutual-choice")
    if args.resume and (args.out is None or len(rules) != 1):
        raise AllocationError("--resume needs --out DIR and a single --rule")
    summaries, histories = [], {}
    for rule in rules:
        out = args.out / rule if args.out is not None and len(rules) > 1 else args.out
        if args.resume:
            trainer = Trainer.resume(
                out, None if args.data == "synthetic" and not args.data_option else args.data
            )
        else:
            config = TrainConfig(
                rule=rule,
                k=args.k,
                n_features=args.n_features,
                aux=args.aux,
                tokens=args.tokens,
                batch_size=args.batch_size,
                lr=args.lr,
                decoder_lr_scale=args.decoder_lr_scale,
                encoder_init_scale=args.encoder_init_scale,
                warmup_steps=args.warmup_steps,
                decay_fraction=args.decay_fraction,
                grad_clip=args.grad_clip,
                dead_tokens=args.dead_tokens,
                k_aux=args.k_aux,
                zipf_s=args.zipf_s,
                decode=args.decode,
                metrics_every=args.metrics_every,
                checkpoint_every=args.checkpoint_every,
                calibrate_l0=args.calibrate_l0,
                seed=args.seed,
                device=args.device,
                data_options=_data_options(args.data_option),
            )
            trainer = Trainer(config, args.data, out=out)
        summary = trainer.run(progress=not args.no_progress)
        summaries.append(summary)
        histories[f"{summary['rule']} (aux {summary['aux']})"] = trainer.history
    print(summary_table(summaries))
    sys.stdout.flush()
    if args.plot is not None:
        path = plot_runs(histories, summaries, args.plot, title=f"data: {args.data}")
        print(f"plot saved to {path}")
    if args.out is not None:
        print(f"runs saved under {args.out}")
    return 0
