from __future__ import annotations

import pytest
import torch

from ichmodel.config import LossConfig, ModelConfig
from ichmodel.diagnostics import format_shares, gradient_shares
from ichmodel.losses import build_loss
from ichmodel.model import build_model

#: At default weights no auxiliary task may pull on the backbone harder than this many times MC.
#: AC reads g directly (no dropout 0.5, no GRU) through the same classifier on the same labels: per unit
#: weight its layer4 gradient is 2.2-2.7x MC's at random init (measured over seeds and 10-20 slices), and the
#: paper weighs the two equally. LP, DC and CPC are scaled by loss.aux_scale so that each stays near MC.
MAX_AUX_OVER_MC = 3.0
MAX_FINETUNE_AUX_OVER_MC = 1.5


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model(ModelConfig())  # full size: the shares depend on the real trunk and heads
    g = torch.Generator().manual_seed(0)
    B, T, S = 4, 10, 32  # series, slices, pixels
    batch = {
        "images": torch.randint(0, 256, (B, T, 3, S, S), generator=g, dtype=torch.uint8),
        "labels": (torch.rand(B, T, 5, generator=g) < 0.15).float(),
        "lengths": torch.full((B,), T),
        "valid": torch.ones(B, T, dtype=torch.bool),
    }
    return model, batch


def _shares(model, batch, cfg: LossConfig) -> dict:
    torch.manual_seed(1)  # dropout
    return gradient_shares(model, build_loss(cfg), batch)


def test_shares_sum_to_one_and_leave_the_model_untouched(setup) -> None:
    model, batch = setup
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _shares(model, batch, LossConfig(soft_f2=1.0))
    assert set(result["share"]) == {"mc", "ac", "lp", "dc", "cpc", "f2"}
    assert sum(result["share"].values()) == pytest.approx(1.0, rel=1e-6)
    assert all(n > 0 for n in result["norm"].values())
    assert not model.training and all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running statistics restored
    pretrain = gradient_shares(model, build_loss(LossConfig(), {"lp": 0, "dc": 0, "cpc": 0}), batch)
    assert set(pretrain["share"]) == {"mc", "ac"}
    assert "mc" in format_shares(result) and "%" in format_shares(result)


def test_no_auxiliary_task_outweighs_mc_at_default_weights(setup) -> None:
    model, batch = setup
    result = _shares(model, batch, LossConfig())
    share = result["share"]
    assert max(share[k] for k in ("ac", "lp", "dc", "cpc")) <= MAX_AUX_OVER_MC * share["mc"], share
    assert max(share[k] for k in ("lp", "dc", "cpc")) <= MAX_FINETUNE_AUX_OVER_MC * share["mc"], share


def test_raw_dot_product_cpc_would_swamp_mc(setup) -> None:
    """The defect the defaults fix: dot-product CPC scores pulled ~35x harder than MC on the backbone."""
    model, batch = setup
    old = _shares(model, batch, LossConfig(aux_scale=1.0, cpc_score="dot", lp_class_weights="none"))
    assert old["share"]["cpc"] > 10 * old["share"]["mc"], old["share"]
    assert old["share"]["cpc"] > MAX_AUX_OVER_MC * old["share"]["mc"]  # the default test would fail
