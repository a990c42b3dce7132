"""The SAELens export loads in the real SAELens and computes what this package's eval-mode SAE does.

Skipped unless ``sae_lens`` is importable: ``make test-interop`` installs it (with this package) into
a separate virtual environment, ``.venv-interop``, and runs this file there; ``make test`` never
installs it.
"""

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from test_sae_train import tiny_config  # noqa: E402

from allocation.sae import Trainer  # noqa: E402
from allocation.sae.saelens import SAELENS_VERSION  # noqa: E402

EXPECTED_CLASS = {"topk": "TopKSAE", "feature-choice": "JumpReLUSAE", "mutual-choice": "JumpReLUSAE"}


@pytest.mark.parametrize("rule", sorted(EXPECTED_CLASS))
def test_issue11_export_loads_in_saelens_and_matches_eval_mode(tmp_path, rule):
    """Issue 11.1: SAE.load_from_disk(RUN/saelens) raised TypeError (no metadata.sae_lens_version,
    null hook_name); now it loads TopKSAE / JumpReLUSAE with our encode and decode."""
    from sae_lens import SAE

    trainer = Trainer(tiny_config(rule=rule, aux="k"), "synthetic", out=tmp_path)
    trainer.run()
    loaded = SAE.load_from_disk(tmp_path / "saelens")
    assert type(loaded).__name__ == EXPECTED_CLASS[rule]
    assert loaded.cfg.metadata.hook_name and loaded.cfg.metadata.sae_lens_version == SAELENS_VERSION
    x = trainer.source.batch(256, seed=7, batch_index=0, split="heldout")
    ours = trainer.sae.eval()
    with torch.no_grad():
        ours_code, theirs_code = ours.encode(x), loaded.encode(x)
        assert torch.equal(ours_code != 0, theirs_code != 0)  # the same features fire
        code_diff = float((ours_code - theirs_code).abs().max())
        decode_diff = float((ours.decode(ours_code) - loaded.decode(theirs_code)).abs().max())
        forward_diff = float((ours.reconstruct(x) - loaded(x)).abs().max())
    print(f"sae_lens {sae_lens.__version__} {rule}: max |diff| encode {code_diff:.3g}, "
          f"decode {decode_diff:.3g}, forward {forward_diff:.3g}")
    assert max(code_diff, decode_diff, forward_diff) <= 1e-5
