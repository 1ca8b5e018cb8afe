from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torchvision

from ichmodel.config import ModelConfig
from ichmodel.losses import MultitaskLoss
from ichmodel.metrics import binarize, f2_score
from ichmodel.model import ICHModel, build_model
from ichmodel.predict import series_probs
from ichmodel.resnet import resnet18
from ichmodel.strategies import TransferBatch

KEYS = {
    "g",
    "h",
    "mc_logits",
    "ac_logits",
    "lp_logits",
    "dc_logits",
    "cpc_context",
    "cpc_targets",
    "cpc_predictions",
}


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**({"feature_dim": 32, "rnn_hidden": 16, "dropout": 0.0, "cpc_steps": 3} | kw))


def _model(seed: int = 0, **kw) -> ICHModel:
    torch.manual_seed(seed)
    return build_model(_cfg(**kw))


def _images(B: int = 3, T: int = 5, C: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, T, C, size, size, generator=torch.Generator().manual_seed(seed))


def test_output_contract_and_zero_padding() -> None:
    model = _model()
    lengths = torch.tensor([5, 2, 4])
    out = model(_images(), lengths)
    assert set(out) == KEYS
    B, T = 3, 5
    assert out["g"].shape == out["h"].shape == out["cpc_targets"].shape == (B, T, 32)
    assert out["mc_logits"].shape == out["ac_logits"].shape == out["dc_logits"].shape == (B, T, 5)
    assert out["lp_logits"].shape == (B, T, 6)
    assert out["cpc_context"].shape == (B, T, 16)
    assert out["cpc_predictions"].shape == (B, T, 3, 32)
    assert torch.equal(out["cpc_context"], out["h"][..., :16])
    for b, m in enumerate(lengths.tolist()):
        assert (out["g"][b, m:] == 0).all() and (out["h"][b, m:] == 0).all()
        assert (out["g"][b, :m].abs().sum(-1) > 0).all()


def test_full_size_defaults_build() -> None:
    model = build_model(ModelConfig())
    assert model.rnn.hidden_size == 256 and model.rnn.bidirectional
    assert model.cls.in_features == 512 and model.cls.out_features == 5
    assert model.cls2.out_features == 6 and len(model.cpc_predictors) == 8
    assert model.cpc_predictors[0].in_features == 256 and model.cpc_predictors[0].out_features == 512
    assert isinstance(model.backbone.proj, torch.nn.Identity)


def test_config_and_input_validation() -> None:
    with pytest.raises(ValueError, match="rnn_hidden"):
        build_model(ModelConfig(feature_dim=64, rnn_hidden=16))
    model = _model()
    with pytest.raises(ValueError, match=r"\[B, T, C, H, W\]"):
        model(torch.zeros(32, 32), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="lengths"):
        model(_images(B=2), torch.tensor([6, 1]))


def test_single_slices_give_the_ac_logits_of_the_same_slices_in_a_series() -> None:
    """``[N, C, H, W]`` input (the slice stage) runs the backbone and the shared classifier only."""
    model = _model().eval()  # BatchNorm running statistics: the result does not depend on the batch
    images = _images(B=1)  # [1, T, C, H, W]
    series = model(images, torch.tensor([images.shape[1]]))
    slices = model(images[0], torch.tensor([images.shape[1]]))
    assert set(slices) == {"ac_logits"}
    torch.testing.assert_close(slices["ac_logits"], series["ac_logits"][0], rtol=1e-4, atol=1e-5)


def test_cached_features_give_the_outputs_of_the_images_they_came_from() -> None:
    """``[B, T, D]`` input (a frozen backbone's cached g) skips the backbone; with diversity transfer the
    pairs come as features ``[U, 2, D]``."""
    model = _model().eval()
    images, lengths = _images(B=2, T=4), torch.tensor([4, 2])
    transfer = TransferBatch(
        pair_images=torch.randn(1, 2, 3, 32, 32),
        slot=torch.tensor([[-1, 0, -1, -1], [0, -1, -1, -1]]),
        pair_classes=torch.tensor([2]),
    )
    seen: list[int] = []
    model.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    plain = model(images, lengths)
    with_pairs = model(images, lengths, transfer=transfer)
    pair_feats = model.backbone(transfer.pair_images[0]).view(1, 2, -1)
    seen.clear()
    from_features = model(plain["g"], lengths)
    from_pair_features = model(
        plain["g"], lengths, transfer=TransferBatch(pair_feats, transfer.slot, transfer.pair_classes)
    )
    assert seen == []  # the backbone did not run
    for key in ("mc_logits", "ac_logits", "lp_logits", "dc_logits", "h"):
        torch.testing.assert_close(from_features[key], plain[key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(from_pair_features[key], with_pairs[key], rtol=1e-4, atol=1e-5)


def test_backbone_runs_once_over_valid_slices_and_pairs() -> None:
    model = _model()
    seen: list[int] = []
    model.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    transfer = TransferBatch(
        pair_images=torch.randn(2, 2, 3, 32, 32),
        slot=torch.tensor([[0, -1, -1, 1, -1], [-1, 1, -1, -1, -1], [-1, -1, -1, -1, -1]]),
        pair_classes=torch.tensor([1, 4]),
    )
    model(_images(), torch.tensor([5, 2, 4]), transfer=transfer)
    assert seen == [5 + 2 + 4 + 2 * 2]


def test_diversity_transfer_adds_pair_difference_at_slots_only() -> None:
    model = _model()
    model.eval()  # BatchNorm running statistics: features do not depend on the batch's composition
    images = _images()
    lengths = torch.tensor([5, 2, 4])
    pairs = torch.randn(2, 2, 3, 32, 32)
    slot = torch.full((3, 5), -1)
    slot[0, 1], slot[2, 3], slot[1, 0] = 0, 1, 1
    slot[1, 4] = 0  # on padding: ignored
    with torch.no_grad():
        plain = model(images, lengths)
        moved = model(images, lengths, transfer=TransferBatch(pairs, slot, torch.tensor([2, 3])))
        f = model.backbone(pairs.flatten(0, 1)).view(2, 2, -1)
    info = f[:, 1] - f[:, 0]
    expected = plain["g"].clone()
    expected[0, 1] += info[0]
    expected[2, 3] += info[1]
    expected[1, 0] += info[1]
    # The two forwards run the backbone over different batch sizes, so untouched slices differ by float
    # noise that depends on the CPU's kernels (around 1e-6 on AMD EPYC): compare relative to the features.
    scale = plain["g"].abs().max()
    assert torch.allclose(moved["g"], expected, rtol=1e-4, atol=1e-4 * scale)
    assert (moved["g"][1, 2:] == 0).all()
    changed = (moved["g"] - plain["g"]).abs().amax(-1) > 1e-3 * scale  # a pair difference is O(scale)
    assert changed.nonzero().tolist() == [[0, 1], [1, 0], [2, 3]]
    # AC and DC read the transferred g; an empty TransferBatch is the same as none.
    assert torch.allclose(moved["ac_logits"], model.cls(moved["g"]), rtol=1e-5, atol=1e-5)
    empty = TransferBatch(
        torch.zeros(0, 2, 3, 32, 32), torch.full((3, 5), -1), torch.zeros(0, dtype=torch.long)
    )
    with torch.no_grad():
        assert torch.equal(model(images, lengths, transfer=empty)["g"], plain["g"])


def test_transfer_without_grad_gives_the_same_features_and_no_gradient_through_the_pairs() -> None:
    images, lengths = _images(), torch.tensor([5, 2, 4])
    slot = torch.full((3, 5), -1)
    slot[0, 1], slot[2, 3] = 0, 1
    grads = {}
    for flag in (True, False):
        model = _model(transfer_grad=flag)
        model.eval()  # running statistics: one joint pass and two separate passes give the same features
        pairs = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out = model(images, lengths, transfer=TransferBatch(pairs, slot, torch.tensor([2, 3])))
        out["g"].sum().backward()
        grads[flag] = (out["g"].detach(), pairs.grad)
    scale = grads[True][0].abs().max()  # joint vs separate backbone passes: kernel-dependent noise
    assert torch.allclose(grads[True][0], grads[False][0], rtol=1e-4, atol=1e-4 * scale)
    assert grads[True][1] is not None and grads[True][1].abs().sum() > 0
    assert grads[False][1] is None  # the pair pass kept no graph


def test_masking_zeroes_gru_input_but_not_g() -> None:
    model = _model(dropout=0.5)
    model.eval()
    captured: list[torch.Tensor] = []

    def grab(module, args):
        padded, _ = torch.nn.utils.rnn.pad_packed_sequence(args[0], batch_first=True, total_length=5)
        captured.append(padded)

    model.rnn.register_forward_pre_hook(grab)
    images = _images()
    lengths = torch.tensor([5, 2, 4])
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 2] = mask[2, 0] = mask[2, 3] = True
    with torch.no_grad():
        plain = model(images, lengths)
        masked = model(images, lengths, mask=mask)
    order = torch.argsort(lengths, descending=True, stable=True)  # the GRU gets the series sorted by length
    rnn_in = torch.empty_like(captured[1])
    rnn_in[order] = captured[1]
    assert (rnn_in[mask] == 0).all()
    keep = ~mask & (torch.arange(5)[None] < lengths[:, None])
    assert torch.allclose(rnn_in[keep], plain["g"][keep])
    # g, AC and DC do not see the mask; the GRU does.
    for k in ("g", "ac_logits", "dc_logits"):
        assert torch.equal(masked[k], plain[k]), k
    assert not torch.allclose(masked["h"], plain["h"])
    assert torch.equal(masked["h"][1], plain["h"][1])  # series 1 had no masked slice


def test_cpc_context_is_causal() -> None:
    model = _model()
    model.eval()
    images = _images(B=2, T=6)
    lengths = torch.tensor([6, 6])
    changed = images.clone()
    changed[:, 3:] = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        a, b = model(images, lengths), model(changed, lengths)
    assert torch.allclose(a["cpc_context"][:, :3], b["cpc_context"][:, :3], atol=1e-6)
    assert not torch.allclose(a["cpc_context"][:, 3:], b["cpc_context"][:, 3:])
    assert not torch.allclose(a["h"][:, :3], b["h"][:, :3])  # the backward direction does see the future
    head = model.cpc_predictors[1]
    assert torch.allclose(a["cpc_predictions"][:, :, 1], head(a["cpc_context"]), atol=1e-5)


def test_channels_last_gives_the_same_outputs() -> None:
    model = _model()
    model.eval()
    images = _images()
    lengths = torch.tensor([5, 2, 4])
    with torch.no_grad():
        ref = model(images, lengths)
        cl_input = images.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # channels innermost
        assert cl_input.stride(2) == 1
        a = model(cl_input, lengths)
        model.to(memory_format=torch.channels_last)
        b = model(images, lengths)
    assert model._wants_channels_last(images)
    for out in (a, b):
        assert torch.allclose(out["mc_logits"], ref["mc_logits"], atol=1e-4)


def test_our_resnet18_is_torchvisions_draw_for_draw_and_gives_its_outputs() -> None:
    """``ichmodel.resnet`` (no torchvision import at run time) builds torchvision's ResNet18: the same names,
    the same initial weights from the same seed, the same random numbers left over, the same outputs."""
    for seed in (0, 11):
        torch.manual_seed(seed)
        theirs = torchvision.models.resnet18(weights=None)
        after_theirs = torch.rand(3)
        torch.manual_seed(seed)
        ours = resnet18()
        after_ours = torch.rand(3)
        assert torch.equal(after_theirs, after_ours)
        a, b = theirs.state_dict(), ours.state_dict()
        assert list(a) == list(b)
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
        x = torch.randn(2, 3, 48, 48)
        for train in (True, False):
            theirs.train(train), ours.train(train)
            # one call each: in training mode a call also updates BatchNorm's running stats
            want, got = theirs(x), ours(x)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_pretrained_weights_and_other_channel_counts(tmp_path) -> None:
    torch.manual_seed(3)
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model = build_model(_cfg(pretrained_weights=str(path), feature_dim=512, rnn_hidden=256))
    assert torch.equal(model.backbone.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    assert torch.equal(model.backbone.conv1.weight, resnet.conv1.weight)
    one = build_model(_cfg(pretrained_weights=str(path), in_channels=1, feature_dim=512, rnn_hidden=256))
    assert torch.allclose(one.backbone.conv1.weight, resnet.conv1.weight.sum(1, keepdim=True))
    five = build_model(_cfg(in_channels=5))
    out = five(torch.randn(2, 3, 5, 32, 32), torch.tensor([3, 1]))
    assert out["mc_logits"].shape == (2, 3, 5)
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="ResNet18"):
        build_model(_cfg(pretrained_weights=str(bad)))


# ---------------------------------------------------------------- overfitting


BLOBS = ((4, 4), (4, 20), (20, 4), (20, 20), (12, 12))  # top-left corner of each class's 8×8 blob


def _synthetic_series(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n series of 4-8 slices; class c shows as a bright square at BLOBS[c]; labels persist across slices."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 9, size=n)
    T = int(lengths.max())
    images = rng.normal(0.0, 0.3, size=(n, T, 3, size, size)).astype(np.float32)
    labels = np.zeros((n, T, 5), dtype=np.float32)
    for b in range(n):
        state = rng.random(5) < 0.3
        for t in range(lengths[b]):
            flip = rng.random(5) < 0.25
            state = np.where(flip, ~state, state)
            labels[b, t] = state
            for c in np.flatnonzero(state):
                y, x = BLOBS[c]
                images[b, t, :, y : y + 8, x : x + 8] += 2.0
    return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(lengths)


@pytest.mark.slow
def test_tiny_model_overfits_eight_series() -> None:
    torch.manual_seed(0)
    images, labels, lengths = _synthetic_series(8, 32, seed=0)
    valid = torch.arange(images.size(1))[None] < lengths[:, None]
    model = build_model(_cfg(feature_dim=64, rnn_hidden=32, cpc_steps=2))
    loss_fn = MultitaskLoss({"mc": 1.0, "ac": 1.0, "lp": 0.2, "dc": 0.2, "cpc": 0.1})
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    start = time.monotonic()
    model.train()
    for _ in range(50):  # F2 reaches 1.0 by step 50 here (0.998 at 40); the bar is 0.95
        parts = loss_fn(model(images, lengths), labels, valid)
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
    probs = series_probs(model, images, lengths)
    y = labels[valid].numpy()
    f2 = f2_score(y, binarize(probs[valid].numpy(), 0.5))
    assert f2 > 0.95, (
        f"micro-F2 {f2:.3f} after {time.monotonic() - start:.0f}s, loss {parts['loss'].item():.3f}"
    )


def test_mc_plus_ac_prediction_is_the_mean_of_the_two_heads_probabilities() -> None:
    images, lengths = _images(B=2, T=4), torch.tensor([4, 2])
    mc_model = _model(seed=3, prediction="mc")
    both = _model(seed=3)  # the same weights, the default prediction: mc+ac
    outputs = mc_model.eval()(images, lengths)
    mc, ac = torch.sigmoid(outputs["mc_logits"]), torch.sigmoid(outputs["ac_logits"])
    assert not torch.allclose(mc, ac, atol=1e-3)  # the two heads differ, so the mean is a real change
    torch.testing.assert_close(series_probs(mc_model, images, lengths), mc, rtol=0, atol=1e-5)
    torch.testing.assert_close(series_probs(both, images, lengths), (mc + ac) / 2, rtol=0, atol=1e-5)
    ac_model = _model(seed=3, prediction="ac")  # the slice stage's own head alone
    torch.testing.assert_close(series_probs(ac_model, images, lengths), ac, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="model.prediction"):
        ModelConfig(prediction="mc+dc")
