"""Ablation of allocation's training recipe on the peer protocol: which choice costs held-out FVU?

    .venv/bin/python benchmarks/ablate_training.py --variants baseline,enc_scale=0.577 --seeds 0,1,2

Protocol (the peer benchmark's): MiniLM layer-3 activations, 50k tokens, the last 10% held out;
k = 16, F = 1536, batch 512, 240 steps, Adam lr 2e-3, 5% warmup, 20% linear decay, clip 1,
geometric-median b_dec, no auxiliary loss. Each variant changes ONE thing from the current
defaults (or a named combination); every variant sees the same batches per seed. Held-out FVU
is over all held-out tokens (TopK: L0 = k exactly).

Variants (comma-separated, ``name=value``):
  baseline                 the package's current defaults (recorded in the results as "defaults")
  enc_scale=S              W_enc = S * W_dec^T at init (S = 1/sqrt(3) = 0.577 is nn.Linear's row norm)
  uniform_init             sparsify's init: W_enc ~ U(-1/sqrt(d), 1/sqrt(d)), W_dec = its normalised transpose
  dec_lr=M                 the decoder's learning rate is M times lr (encoder and biases: 1 x lr)
  eps=E                    Adam's eps
  enc_lr=M, b_enc_lr=M, b_dec_lr=M   the same for W_enc, b_enc, b_dec (default 1)
  a=1+b=2                  several changes at once
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from allocation.sae import TrainConfig, Trainer, load_activations  # noqa: E402
from allocation.sae.losses import fvu  # noqa: E402


def parse_variant(text: str) -> dict:
    """'baseline' or 'a=1+b=2' -> {'a': 1.0, 'b': 2.0} ('uniform_init' -> {'uniform_init': True})."""
    options: dict = {}
    if text == "baseline":
        return options
    for part in text.split("+"):
        name, _, value = part.partition("=")
        options[name] = float(value) if value else True
    return options


def apply_variant(trainer: Trainer, options: dict, seed: int) -> None:
    """Change the freshly built trainer's SAE and optimiser as the variant says (before any step)."""
    sae = trainer.sae
    with torch.no_grad():
        if options.get("uniform_init"):
            generator = torch.Generator().manual_seed(seed)
            bound = 1.0 / math.sqrt(sae.d_in)
            weight = torch.empty(sae.n_features, sae.d_in).uniform_(-bound, bound, generator=generator)
            sae.W_enc.copy_(weight.t())
            sae.W_dec.copy_(weight / weight.norm(dim=1, keepdim=True))
        if "enc_scale" in options:
            sae.W_enc.copy_(sae.W_dec.t() * options["enc_scale"])
    scales = {"W_dec": options.get("dec_lr", trainer.config.decoder_lr_scale), "W_enc": options.get("enc_lr", 1.0),
              "b_enc": options.get("b_enc_lr", 1.0), "b_dec": options.get("b_dec_lr", 1.0)}
    named = dict(sae.named_parameters())
    groups = [{"params": [named[name]], "lr_scale": scales[name]} for name in named]
    eps = options.get("eps", trainer.optimizer.defaults["eps"])
    trainer.optimizer = torch.optim.Adam(groups, lr=trainer.config.learning_rate, betas=(0.9, 0.999), eps=eps)


def run(source, rule: str, k: int, n_features: int, steps: int, batch_size: int, seed: int, options: dict) -> dict:
    config = TrainConfig(rule=rule, k=k, n_features=n_features, aux="none", tokens=steps * batch_size,
                         batch_size=batch_size, lr=2e-3, decay_fraction=0.2, grad_clip=1.0, seed=seed)
    trainer = Trainer(config, source)
    apply_variant(trainer, options, seed)
    batches = source.batches(batch_size, seed=seed)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    seconds = time.perf_counter() - started
    heldout = torch.from_numpy(source.split_rows("heldout").copy()).float()
    sae = trainer.sae.eval()
    with torch.no_grad():
        out = sae(heldout)
    return {"fvu": float(fvu(heldout, out.x_hat)), "l0": float(out.mask.sum(dim=1).float().mean()),
            "seconds": seconds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="baseline")
    parser.add_argument("--rules", default="topk")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default="16x1536", help="KxF, comma-separated")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--n-tokens", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="ablation")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = load_activations("minilm", n_tokens=args.n_tokens)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for setting in args.settings.split(","):
        k, n_features = (int(v) for v in setting.split("x"))
        for rule in args.rules.split(","):
            for variant in args.variants.split(","):
                runs = [run(source, rule, k, n_features, args.steps, args.batch_size, seed, parse_variant(variant))
                        for seed in seeds]
                fvus = [r["fvu"] for r in runs]
                row = {"setting": setting, "rule": rule, "variant": variant, "seeds": seeds, "runs": runs,
                       "fvu_mean": statistics.mean(fvus), "fvu_std": statistics.stdev(fvus) if len(fvus) > 1 else 0}
                rows.append(row)
                print(f"{setting:>9} {rule:>14} {variant:>28}: FVU {row['fvu_mean']:.4f} ± {row['fvu_std']:.4f} "
                      f"(L0 {statistics.mean(r['l0'] for r in runs):.2f})", flush=True)
    defaults = {name: getattr(TrainConfig(), name) for name in ("decoder_lr_scale", "encoder_init_scale")}
    payload = {"command": " ".join(sys.argv), "machine": _common.machine(torch.device("cpu")), "defaults": defaults,
               "rows": rows}
    path = _common.RESULTS / f"{args.name}_cpu.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
