"""On-device augmentation: one transform per series, seeded, identity when off."""

from __future__ import annotations

import torch

from ichmodel.augment import augment_series, normalize, reverse_series, to_float
from ichmodel.config import AugmentConfig


def _series(B=3, T=4, size=16):
    g = torch.Generator().manual_seed(0)
    one = torch.rand(B, 1, 3, size, size, generator=g)
    return one.expand(B, T, 3, size, size).clone()  # every slice of a series identical


def test_every_slice_of_a_series_gets_the_same_transform_and_series_differ():
    images = _series()
    out = augment_series(images, AugmentConfig(), torch.Generator().manual_seed(1))
    assert out.shape == images.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    for b in range(images.shape[0]):
        for t in range(1, images.shape[1]):
            torch.testing.assert_close(out[b, t], out[b, 0])
    assert not torch.allclose(out[0, 0], images[0, 0])


def test_seeded_and_disabled():
    images = _series()
    a = augment_series(images, AugmentConfig(), torch.Generator().manual_seed(5))
    b = augment_series(images, AugmentConfig(), torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    off = augment_series(images, AugmentConfig(enabled=False), torch.Generator().manual_seed(5))
    assert off is images


def test_identity_parameters_leave_images_unchanged():
    images = _series()
    cfg = AugmentConfig(flip_prob=0.0, rotate_degrees=0.0, brightness=0.0, contrast=0.0, crop_scale_min=1.0)
    torch.testing.assert_close(
        augment_series(images, cfg, torch.Generator().manual_seed(0)), images, atol=1e-5, rtol=0
    )


def test_flip_mirrors_the_width_axis():
    images = _series(B=1, T=2)
    cfg = AugmentConfig(flip_prob=1.0, rotate_degrees=0.0, brightness=0.0, contrast=0.0, crop_scale_min=1.0)
    out = augment_series(images, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images.flip(-1), atol=1e-5, rtol=0)


def test_to_float_and_normalize():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    f = to_float(x)
    assert f.dtype == torch.float32 and float(f.max()) == 1.0
    n = normalize(f)
    torch.testing.assert_close(
        n[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    )


def test_reverse_series_reverses_images_and_labels_of_drawn_series_within_their_length():
    B, T = 6, 5
    images = torch.arange(B * T, dtype=torch.float32).view(B, T, 1, 1, 1).expand(B, T, 1, 2, 2).clone()
    labels = torch.arange(B * T, dtype=torch.float32).view(B, T, 1).expand(B, T, 5).clone()
    lengths = torch.tensor([5, 3, 5, 4, 5, 2])
    cfg = AugmentConfig(reverse_prob=0.5)
    out_images, out_labels = reverse_series(images, labels, lengths, cfg, torch.Generator().manual_seed(0))
    chosen = torch.rand(B, generator=torch.Generator().manual_seed(0)) < 0.5  # the same draw, per series
    assert 0 < int(chosen.sum()) < B  # this seed reverses some series and keeps others
    for b in range(B):
        n = int(lengths[b])
        want = labels[b, :n].flip(0) if chosen[b] else labels[b, :n]
        assert torch.equal(out_labels[b, :n], want)
        assert torch.equal(out_images[b, :n, 0, 0, 0], want[:, 0])  # images moved with their labels
        assert torch.equal(out_labels[b, n:], labels[b, n:])  # padding stays at the end


def test_reverse_series_is_off_by_default_and_leaves_the_generator_alone():
    images, labels = torch.rand(2, 3, 1, 2, 2), torch.rand(2, 3, 5)
    g = torch.Generator().manual_seed(7)
    out = reverse_series(images, labels, torch.tensor([3, 2]), AugmentConfig(), g)
    assert out[0] is images and out[1] is labels
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(7)))
    always = reverse_series(images, labels, torch.tensor([3, 2]), AugmentConfig(reverse_prob=1.0), g)
    assert torch.equal(always[1][0], labels[0].flip(0)) and torch.equal(
        always[1][1, :2], labels[1, :2].flip(0)
    )
