"""What only torchao 0.13-0.15 need (:mod:`mxfp8_compat.providers.torchao_013_015`), tested beside it:
dropping those releases deletes this file with the module (README, "What removing a release touches")."""

from __future__ import annotations

from packaging.specifiers import SpecifierSet

import fakes
from mxfp8_compat import Generation, ScaleMode
from mxfp8_compat.providers import match as matching
from mxfp8_compat.providers.torchao_013_015 import apply_forward_params, bind_scaling_type, positional_prefix


def test_positional_only_row_rejects_a_reused_slot(fake_torchao):
    """The positional-only fingerprint (written for 0.15's alias, which no row binds now) pins every slot."""
    row = Generation(
        key="0.15-apply",
        versions=SpecifierSet(">=0.15.0.dev0,<0.16.0.dev0", prereleases=True),
        entry_points=(("torchao.prototype.moe_training.scaled_grouped_mm", "_to_mxfp8_then_scaled_grouped_mm"),),
        fingerprint=("A", "B_t", "offs", "block_size", "out_dtype"),
        params=apply_forward_params,
        fingerprint_rule=positional_prefix,
        bind=bind_scaling_type,
        native=True,
        emulation="reference",
        scale_mode=ScaleMode.RCEIL,
        wgrad_with_hp=False,
    )
    fake_torchao("0.15.0", fakes.GEN_015)
    assert matching.match_generation("0.15.0", table=(row,)).bound is not None
    fakes.purge_torchao_modules()
    reused = {k: v.replace("block_size=32, out_dtype", "bias=None, out_dtype") for k, v in fakes.GEN_015.items()}
    fake_torchao("0.15.0", reused)
    match = matching.match_generation("0.15.0", table=(row,))
    assert match.bound is None
    assert any("positional parameters" in reason for reason in match.reasons), match.reasons
