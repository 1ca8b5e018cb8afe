from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ichmodel.config import LossConfig, ModelConfig
from ichmodel.losses import (
    TASKS,
    MultitaskLoss,
    asymmetric_loss,
    balanced_count_weights,
    build_loss,
    distance_loss,
    info_nce_loss,
    label_count_loss,
    soft_f2_loss,
)
from ichmodel.model import DistanceHead, build_model
from ichmodel.strategies import make_transfer_batch, plan_strategies, transfer_labels

ALL_ONE = dict.fromkeys(TASKS, 1.0)


# ---------------------------------------------------------------- asymmetric loss


def test_asl_equals_bce_summed_over_classes_without_focusing() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, generator=g) * 3
    targets = (torch.rand(3, 4, 5, generator=g) < 0.4).float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()
    asl = asymmetric_loss(logits, targets, gamma_pos=0.0, gamma_neg=0.0, clip=0.0)
    assert asl.item() == pytest.approx(bce.item(), rel=1e-6)


def test_asl_golden_value() -> None:
    # p = [0.5, 0.75]; class 0 positive: −(1 − 0.5)^1 log 0.5 = 0.5 log 2;
    # class 1 negative: p_m = 0.75 − 0.05 = 0.7, −0.7² log(0.3).
    logits = torch.tensor([[0.0, math.log(3.0)]])
    targets = torch.tensor([[1.0, 0.0]])
    expected = 0.5 * math.log(2.0) - 0.49 * math.log(0.3)
    assert expected == pytest.approx(0.9365203, abs=1e-6)
    got = asymmetric_loss(logits, targets, gamma_pos=1.0, gamma_neg=2.0, clip=0.05)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_asl_clip_discards_easy_negatives_and_mask_averages_valid_rows() -> None:
    logits = torch.tensor([[-5.0, -5.0], [0.0, 0.0], [9.0, -9.0]])  # p(-5) = 0.0067 < clip
    targets = torch.zeros(3, 2)
    only_easy = asymmetric_loss(logits[:1], targets[:1], 1.0, 4.0, 0.05)
    assert only_easy.item() == 0.0
    # Row 2 is masked: the mean is over rows 0 and 1 only.
    mask = torch.tensor([True, True, False])
    row1 = asymmetric_loss(logits[1:2], targets[1:2], 1.0, 4.0, 0.05)
    masked = asymmetric_loss(logits, targets, 1.0, 4.0, 0.05, weight_mask=mask)
    assert masked.item() == pytest.approx(row1.item() / 2)
    assert asymmetric_loss(logits, targets, weight_mask=torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_asl_validates_arguments() -> None:
    with pytest.raises(ValueError, match="same shape"):
        asymmetric_loss(torch.zeros(2, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="clip"):
        asymmetric_loss(torch.zeros(2, 5), torch.zeros(2, 5), clip=1.0)


# ---------------------------------------------------------------- label count, distance


def test_label_count_loss_golden() -> None:
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert label_count_loss(torch.zeros(2, 6), targets).item() == pytest.approx(math.log(6))
    logits = torch.full((2, 6), -10.0)
    logits[0, 2] = 10.0  # two labels
    logits[1, 0] = 10.0  # none
    assert label_count_loss(logits, targets).item() < 1e-6
    logits[1, 0], logits[1, 5] = -10.0, 10.0
    assert label_count_loss(logits, targets).item() == pytest.approx(10.0, rel=1e-3)  # (0 + 20) / 2
    with pytest.raises(ValueError, match=r"L \+ 1"):
        label_count_loss(torch.zeros(2, 5), targets)


def test_label_count_class_weights_golden() -> None:
    # Rows: counts 2, 0, 0, 0 with uniform logits: every CE is log 6, so any weighting gives log 6.
    targets = torch.tensor([[1.0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert label_count_loss(torch.zeros(4, 6), targets, class_weights="balanced").item() == pytest.approx(
        math.log(6)
    )
    # Row 0 (count 2) has CE 20, the three count-0 rows 0: plain mean 20/4; balanced weights
    # n / (K·n_c) = 4/2 = 2 for count 2 and 4/6 for count 0: (2·20) / (2 + 3·2/3) = 10.
    logits = torch.full((4, 6), -10.0)
    logits[:, 0] = 10.0
    assert label_count_loss(logits, targets).item() == pytest.approx(5.0, rel=1e-3)
    assert label_count_loss(logits, targets, class_weights="balanced").item() == pytest.approx(10.0, rel=1e-3)
    weights = torch.tensor([1.0, 1, 3, 1, 1, 1])  # fixed weights: (3·20) / (3 + 3) = 10
    assert label_count_loss(logits, targets, class_weights=weights).item() == pytest.approx(10.0, rel=1e-3)
    # A masked row changes neither the weights nor the mean.
    mask = torch.tensor([True, True, True, False])
    assert label_count_loss(logits, targets, mask, "balanced").item() == pytest.approx(
        label_count_loss(logits[:3], targets[:3], class_weights="balanced").item(), rel=1e-6
    )
    with pytest.raises(ValueError, match=r"\[6\]"):
        label_count_loss(logits, targets, class_weights=torch.ones(5))


def test_balanced_count_weights_are_capped_and_zero_for_absent_classes() -> None:
    count = torch.tensor([0] * 99 + [5])
    w = balanced_count_weights(count, None, 6)
    assert w[0].item() == pytest.approx(100 / (2 * 99))
    assert w[5].item() == 10.0  # 100 / 2 = 50, capped
    assert w[1:5].tolist() == [0.0] * 4


def test_soft_f2_golden_and_identities() -> None:
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # Confident and right: 0; nothing predicted: 1.
    assert soft_f2_loss(torch.tensor([[20.0, -20.0], [-20.0, -20.0]]), targets).item() == pytest.approx(
        0.0, abs=1e-6
    )
    assert soft_f2_loss(torch.full((2, 2), -30.0), targets).item() == pytest.approx(1.0, abs=1e-6)
    # p = 0.5 everywhere: tp = 0.5, fp = 1.5, fn = 0.5: F2 = 2.5 / (2.5 + 2 + 1.5) = 5/12.
    assert soft_f2_loss(torch.zeros(2, 2), targets).item() == pytest.approx(1 - 5 / 12, rel=1e-6)
    # The mask drops row 1: tp = 0.5, fp = 0.5, fn = 0.5: F2 = 2.5 / (2.5 + 2 + 0.5).
    got = soft_f2_loss(torch.zeros(2, 2), targets, torch.tensor([True, False]))
    assert got.item() == pytest.approx(0.5, rel=1e-6)
    assert soft_f2_loss(torch.zeros(2, 2), targets, torch.zeros(2, dtype=torch.bool)).item() == 0.0


def test_distance_closer_embedding_gives_higher_probability_and_lower_loss() -> None:
    torch.manual_seed(0)
    head = DistanceHead(feature_dim=8, num_classes=5)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(8))
        head.proj.bias.zero_()
    e = head.embeddings.detach()
    # g lies on class 2's embedding, nudged slightly toward class 0's.
    g = F.normalize(e[2], dim=0) + 0.3 * F.normalize(e[0], dim=0)
    d2 = head.squared_distances(g[None])[0]
    probs = torch.sigmoid(head(g[None]))[0]
    assert int(d2.argmin()) == 2 and int(probs.argmax()) == 2
    order_d = torch.argsort(d2)
    assert torch.all(probs[order_d][:-1] >= probs[order_d][1:])  # probability falls as distance rises
    near = torch.zeros(1, 5)
    near[0, 2] = 1
    far = torch.zeros(1, 5)
    far[0, int(d2.argmax())] = 1
    logits = head(g[None])
    assert distance_loss(logits, near).item() < distance_loss(logits, far).item()


# ---------------------------------------------------------------- InfoNCE


def test_info_nce_is_log_b_when_all_scores_are_equal() -> None:
    B, T, K, D = 4, 6, 3, 5
    targets = torch.randn(B, T, D)
    assert info_nce_loss(torch.zeros(B, T, K, D), targets, torch.full((B,), T), None).item() == pytest.approx(
        math.log(B), rel=1e-6
    )
    # Cosine scores: one prediction direction for every anchor and identical targets give equal scores too.
    same = torch.randn(D).expand(B, T, D)
    pred = torch.randn(D).expand(B, T, K, D)
    assert info_nce_loss(pred, same, torch.full((B,), T), 0.1).item() == pytest.approx(math.log(B), rel=1e-6)


def test_info_nce_golden_value() -> None:
    # B = 2, T = 2, K = 1, D = 1: predictions a = [1, 2] at t = 0, targets v = [1, −1] at t = 1.
    # Dot scores S = [[1, −1], [2, −2]]; row 0: log(1 + e^−2); row 1 (positive −2): log(1 + e^4).
    pred = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 2, 1, 1).clone()
    targets = torch.tensor([[0.0, 1.0], [0.0, -1.0]]).view(2, 2, 1)
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(4))) / 2
    got = info_nce_loss(pred, targets, torch.tensor([2, 2]), temperature=None)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Cosine at temperature 0.5: S = [[1, −1], [1, −1]] / 0.5 = [[2, −2], [2, −2]].
    expected = (math.log1p(math.exp(-4)) + math.log1p(math.exp(4))) / 2
    assert info_nce_loss(pred, targets, torch.tensor([2, 2]), 0.5).item() == pytest.approx(expected, rel=1e-6)
    # Series 1 with one slice: its anchor and its candidate vanish, leaving series 0 alone: loss 0.
    assert info_nce_loss(pred, targets, torch.tensor([2, 1])).item() == 0.0
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(pred, targets, torch.tensor([2, 2]), 0.0)


def test_cosine_info_nce_ignores_feature_norms_and_bounds_the_gradient() -> None:
    """Defect: raw dot products grew with the feature norm (~29), so CPC's gradient swamped MC's."""
    torch.manual_seed(0)
    B, T, K, D = 4, 6, 3, 8
    pred = torch.randn(B, T, K, D)
    targets = torch.randn(B, T, D, requires_grad=True)
    lengths = torch.full((B,), T)
    base = info_nce_loss(pred, targets, lengths, 0.1)
    scaled = info_nce_loss(pred * 30, targets * 30, lengths, 0.1)
    assert scaled.item() == pytest.approx(base.item(), rel=1e-5)
    (grad_cos,) = torch.autograd.grad(info_nce_loss(pred * 30, targets * 30, lengths, 0.1), targets)
    (grad_dot,) = torch.autograd.grad(info_nce_loss(pred * 30, targets * 30, lengths, None), targets)
    assert grad_dot.norm() > 10 * grad_cos.norm()


def test_info_nce_ignores_padding_and_steps_past_the_end() -> None:
    torch.manual_seed(0)
    B, T, K, D = 3, 5, 4, 6
    lengths = torch.tensor([5, 3, 4])
    pred = torch.randn(B, T, K, D)
    targets = torch.randn(B, T, D)
    base = info_nce_loss(pred, targets, lengths, None)
    # Garbage in padding and 3 more padded slices change nothing.
    pred2 = torch.cat([pred, torch.randn(B, 3, K, D) * 100], dim=1)
    targets2 = torch.cat([targets, torch.randn(B, 3, D) * 100], dim=1)
    for b, m in enumerate(lengths.tolist()):
        pred2[b, m:] = 1e3
        targets2[b, m:] = -1e3
    again = info_nce_loss(pred2, targets2, lengths, None)
    assert again.item() == pytest.approx(base.item(), rel=1e-5)
    # Brute force over anchors.
    total, n = 0.0, 0
    for b in range(B):
        for t in range(T):
            for k in range(1, K + 1):
                if t + k >= lengths[b]:
                    continue
                cands = [c for c in range(B) if t + k < lengths[c]]
                scores = torch.stack([pred[b, t, k - 1] @ targets[c, t + k] for c in cands])
                total += -torch.log_softmax(scores, 0)[cands.index(b)].item()
                n += 1
    assert base.item() == pytest.approx(total / n, rel=1e-5)
    # The same brute force with cosine scores over the temperature.
    total = 0.0
    for b in range(B):
        for t in range(T):
            for k in range(1, K + 1):
                if t + k >= lengths[b]:
                    continue
                cands = [c for c in range(B) if t + k < lengths[c]]
                scores = torch.stack(
                    [F.cosine_similarity(pred[b, t, k - 1], targets[c, t + k], 0) / 0.2 for c in cands]
                )
                total += -torch.log_softmax(scores, 0)[cands.index(b)].item()
    assert info_nce_loss(pred, targets, lengths, 0.2).item() == pytest.approx(total / n, rel=1e-5)


# ---------------------------------------------------------------- MultitaskLoss


def test_multitask_loss_validates_weights() -> None:
    with pytest.raises(ValueError, match="'dc'"):
        MultitaskLoss({"mc": 1.0, "dc": -0.5})
    with pytest.raises(ValueError, match="Unknown"):
        MultitaskLoss({"mc": 1.0, "xx": 1.0})
    with pytest.raises(ValueError, match="'cpc'"):
        MultitaskLoss({"cpc": float("nan")})
    with pytest.raises(ValueError, match="Unknown"):
        build_loss(LossConfig(), {"alpha": 1.0})


def test_build_loss_reads_config_and_override() -> None:
    loss = build_loss(LossConfig(mu=0.5, gamma_pos=2.0), {"lp": 0.0})
    assert loss.weights == {"mc": 1.0, "ac": 1.0, "lp": 0.0, "dc": 0.5, "cpc": 1.0}
    assert loss.gamma_pos == 2.0 and loss.gamma_neg == 4.0 and loss.clip == 0.05
    assert loss.aux_scale == 0.25 and loss.cpc_temperature == 0.1 and loss.lp_class_weights == "balanced"
    assert loss.term_weights == {"mc": 1.0, "ac": 1.0, "dc": 0.125, "cpc": 0.25}
    dot = build_loss(LossConfig(cpc_score="dot", lp_class_weights="1,1,2,2,3,3", soft_f2=0.5))
    assert dot.cpc_temperature is None and dot.lp_class_weights.tolist() == [1, 1, 2, 2, 3, 3]
    assert dot.term_weights["f2"] == 0.5


@pytest.mark.parametrize(
    "field, value",
    [("cpc_score", "dots"), ("cpc_temperature", 0.0), ("lp_class_weights", "1,2"), ("aux_scale", -1.0)],
)
def test_loss_config_rejects_bad_new_fields(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        LossConfig(**{field: value})


def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(feature_dim=32, rnn_hidden=16, dropout=0.0, cpc_steps=3))


def _batch(seed: int = 0, lengths=(5, 3, 4), T: int | None = None, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    T = T or max(lengths)
    B = len(lengths)
    images = torch.randn(B, T, 3, size, size, generator=g)
    labels = (torch.rand(B, T, 5, generator=g) < 0.3).float()
    lengths_t = torch.tensor(lengths)
    valid = torch.arange(T)[None] < lengths_t[:, None]
    return images, labels, lengths_t, valid


def test_multitask_total_is_the_weighted_sum_and_zero_weight_is_zero() -> None:
    model = _tiny_model()
    images, labels, lengths, valid = _batch()
    out = model(images, lengths)
    weights = {"mc": 1.0, "ac": 0.5, "lp": 0.0, "dc": 2.0, "cpc": 0.25}
    parts = MultitaskLoss(weights)(out, labels, valid)
    assert set(parts) == {"loss", *TASKS}
    assert parts["lp"].item() == 0.0
    assert all(parts[k].item() > 0 for k in ("mc", "ac", "dc", "cpc"))
    scale = {"mc": 1.0, "ac": 1.0, "lp": 0.25, "dc": 0.25, "cpc": 0.25}  # aux_scale on LP, DC, CPC
    total = sum(weights[k] * scale[k] * parts[k] for k in TASKS)
    assert parts["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    # With the soft-F2 term on, its part is reported and added with its weight.
    with_f2 = MultitaskLoss(weights, aux_scale=1.0, soft_f2=2.0)(out, labels, valid)
    assert set(with_f2) == {"loss", *TASKS, "f2"} and 0 < with_f2["f2"].item() < 1
    total = sum(weights[k] * with_f2[k] for k in TASKS) + 2.0 * with_f2["f2"]
    assert with_f2["loss"].item() == pytest.approx(total.item(), rel=1e-6)


def test_padding_never_leaks_into_any_loss() -> None:
    """The same series padded to T = 5 and to T = 9 (garbage in the padding) give the same parts."""
    model = _tiny_model()
    model.train()  # BatchNorm batch statistics agree too: the backbone only ever sees the valid slices
    loss_fn = MultitaskLoss(ALL_ONE)
    images, labels, lengths, valid = _batch(1)
    g = torch.Generator().manual_seed(9)
    images9 = torch.cat([images, torch.randn(3, 4, 3, 32, 32, generator=g) * 50], dim=1)
    labels9 = torch.cat([labels, torch.ones(3, 4, 5)], dim=1)
    for b, m in enumerate(lengths.tolist()):  # garbage in the existing padding too
        images9[b, m:] = 7.0
        labels9[b, m:] = 1.0
    valid9 = torch.arange(9)[None] < lengths[:, None]
    with torch.no_grad():
        a = loss_fn(model(images, lengths), labels, valid)
        b = loss_fn(model(images9, lengths), labels9, valid9)
    for k in ("loss", *TASKS):
        assert b[k].item() == pytest.approx(a[k].item(), rel=1e-5, abs=1e-6), k


def test_unlabelled_slices_are_ignored_by_supervised_tasks() -> None:
    model = _tiny_model()
    model.eval()
    images, labels, lengths, valid = _batch(2)
    with torch.no_grad():
        out = model(images, lengths)
    loss_fn = MultitaskLoss(ALL_ONE)
    unknown = labels.clone()
    unknown[0, 1] = -1
    fewer = valid.clone()
    fewer[0, 1] = False
    a = loss_fn(out, unknown, valid)
    b = loss_fn(out, labels, fewer)
    for k in ("mc", "ac", "lp", "dc"):
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-6), k


def _grad_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_gradients_reach_every_parameter_with_all_tasks_and_strategies() -> None:
    model = _tiny_model()
    images, labels, lengths, valid = _batch(3)
    plan = plan_strategies(lengths, 0.3, 0.3, 1.0, 4, torch.Generator().manual_seed(0))
    transfer = make_transfer_batch(plan, torch.randn(4, 2, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert transfer.num_pairs > 0 and plan.mask.any()
    labels = transfer_labels(labels, transfer.slot, transfer.pair_classes)
    out = model(images, lengths, transfer=transfer, mask=plan.mask)
    MultitaskLoss(ALL_ONE)(out, labels, valid)["loss"].backward()
    missing = {n for n, _ in model.named_parameters()} - _grad_names(model)
    assert not missing


@pytest.mark.parametrize(
    "task, head",
    [("lp", "cls2."), ("dc", "dc."), ("cpc", "cpc_predictors.")],
)
def test_zero_weight_gives_no_gradient_to_its_head(task: str, head: str) -> None:
    model = _tiny_model()
    images, labels, lengths, valid = _batch(4)
    weights = dict(ALL_ONE, **{task: 0.0})
    MultitaskLoss(weights)(model(images, lengths), labels, valid)["loss"].backward()
    got = _grad_names(model)
    head_params = {n for n, _ in model.named_parameters() if n.startswith(head)}
    assert head_params and not (head_params & got)
    assert {n for n, _ in model.named_parameters()} - head_params <= got


def test_pretraining_weights_train_only_mc_and_ac_heads() -> None:
    model = _tiny_model()
    images, labels, lengths, valid = _batch(5)
    parts = MultitaskLoss({"mc": 1.0, "ac": 1.0})(model(images, lengths), labels, valid)
    assert parts["lp"].item() == parts["dc"].item() == parts["cpc"].item() == 0.0
    parts["loss"].backward()
    got = _grad_names(model)
    assert any(n.startswith("backbone.") for n in got) and "cls.weight" in got
    assert not any(n.startswith(("cls2.", "dc.", "cpc_predictors.")) for n in got)
