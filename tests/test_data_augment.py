"""Batched multi-crop augmentation (dinovmf/data/augment.py) against float64 / scipy / colorsys oracles."""
import colorsys

import numpy as np
import pytest
import torch
from scipy import ndimage

from dinovmf.data import augment as A

LUMA = np.array(A.LUMA_WEIGHTS)


def _images(n=6, h=9, w=11, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _luma(x):  # numpy [N, 3, H, W] -> [N, 1, H, W]
    return np.einsum("c,nchw->nhw", LUMA, x)[:, None]


def test_grayscale_brightness_contrast_saturation_match_formulas():
    x = _images()
    xn = x.numpy()
    f = torch.linspace(0.6, 1.4, x.shape[0], dtype=torch.float64)
    fn = f.numpy()[:, None, None, None]
    np.testing.assert_allclose(A.rgb_to_grayscale(x).numpy(), _luma(xn), atol=1e-12)
    np.testing.assert_allclose(A.adjust_brightness(x, f).numpy(), np.clip(xn * fn, 0, 1), atol=1e-12)
    mean = _luma(xn).mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(A.adjust_contrast(x, f).numpy(),
                               np.clip(fn * xn + (1 - fn) * mean, 0, 1), atol=1e-12)
    np.testing.assert_allclose(A.adjust_saturation(x, f).numpy(),
                               np.clip(fn * xn + (1 - fn) * _luma(xn), 0, 1), atol=1e-12)


def test_hue_matches_colorsys():
    x = _images(n=4, h=5, w=6)
    x[0, :, 0, 0] = 0.5  # a gray pixel: undefined hue must stay gray
    shift = torch.tensor([0.1, -0.1, 0.05, -0.03], dtype=torch.float64)
    out = A.adjust_hue(x, shift).numpy()
    xn = x.numpy()
    ref = np.empty_like(xn)
    for n in range(xn.shape[0]):
        for i in range(xn.shape[2]):
            for j in range(xn.shape[3]):
                h, s, v = colorsys.rgb_to_hsv(*xn[n, :, i, j])
                ref[n, :, i, j] = colorsys.hsv_to_rgb((h + shift[n].item()) % 1.0, s, v)
    np.testing.assert_allclose(out, ref, atol=1e-10)


def test_gaussian_blur_matches_scipy():
    x = _images(n=3, h=20, w=17)
    sigma = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    out = A.gaussian_blur(x, sigma).numpy()
    radius = int(np.ceil(3 * 2.0))
    for n, s in enumerate(sigma.tolist()):
        # scipy's "mirror" is torch's "reflect"; truncate so that scipy's radius equals ours.
        ref = ndimage.gaussian_filter(x[n].numpy(), sigma=(0, s, s), mode="mirror", truncate=radius / s)
        np.testing.assert_allclose(out[n], ref, atol=1e-6 if s < 0.5 else 1e-12)


def test_solarize_and_normalize():
    x = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert A.solarize(x)[0, 0, 0].tolist() == [0.0, 0.25, 0.5, 0.25, 0.0]
    out = A.normalize(torch.ones(1, 3, 2, 2))
    expected = (1 - torch.tensor(A.IMAGENET_MEAN)) / torch.tensor(A.IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_to_float_nchw_checks_layout():
    u8 = torch.randint(0, 256, (2, 4, 5, 3), dtype=torch.uint8)
    out = A.to_float_nchw(u8)
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out[1, 2, 3, 4], u8[1, 3, 4, 2].float() / 255)
    with pytest.raises(ValueError, match="images"):
        A.to_float_nchw(torch.zeros(2, 3, 4, 5, dtype=torch.uint8))


def _binomial_ok(frac, p, n, z=4.5):
    return abs(frac - p) <= z * np.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12


def test_augmentation_statistics_follow_dino_recipe():
    """Drawn fractions per view match DINO's probabilities, and each drawn op shows in the pixels."""
    b = 1500
    aug = A.MultiCropAugmentation("cpu")
    crops = [torch.randint(0, 256, (b, 6, 6, 3), dtype=torch.uint8) for _ in range(2)]
    crops.append(torch.randint(0, 256, (b, 4, 4, 3), dtype=torch.uint8))
    out, params = aug(crops, torch.Generator().manual_seed(0), return_params=True)
    assert [o.shape for o in out] == [(b, 3, 6, 6), (b, 3, 6, 6), (b, 3, 4, 4)]
    g, loc = params["global"], params["local"]
    expected = {  # (global 1, global 2, local)
        "flip": (0.5, 0.5, 0.5), "jitter": (0.8, 0.8, 0.8), "gray": (0.2, 0.2, 0.2),
        "blur": (1.0, 0.1, 0.5), "solarize": (0.0, 0.2, 0.0)}
    for name, (p1, p2, pl) in expected.items():
        for frac, p in ((g[name][:b].float().mean().item(), p1), (g[name][b:].float().mean().item(), p2),
                        (loc[name].float().mean().item(), pl)):
            assert _binomial_ok(frac, p, b), (name, frac, p)
    sigma = loc["sigma"].numpy()
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.05
    for name, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2),
                         ("hue", -0.1, 0.1)):
        v = loc[name].numpy()
        assert v.min() >= lo and v.max() <= hi and abs(v.mean() - (lo + hi) / 2) < 0.05 * (hi - lo)
    # Jitter order: a permutation per row, each op first about a quarter of the time.
    order = loc["jitter_order"]
    assert (order.sort(dim=1).values == torch.arange(4)).all()
    first = torch.bincount(order[:, 0], minlength=4).float() / b
    assert all(_binomial_ok(f, 0.25, b) for f in first.tolist())
    # Grayscale rows have equal channels once normalisation is undone.
    std, mean = torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1)
    pixels = out[0] * std + mean
    spread = (pixels.max(dim=1).values - pixels.min(dim=1).values).amax(dim=(1, 2))
    assert (spread[g["gray"][:b]] < 1e-5).all() and (spread[~g["gray"][:b]] > 1e-3).float().mean() > 0.95
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_flip_and_solarize_show_in_pixels():
    recipe = A.ViewRecipe(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.5)
    x = torch.rand(400, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    out, p = A.augment(x.clone(), [recipe], torch.Generator().manual_seed(2), return_params=True)
    raw = out * torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1)
    ref = torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
    ref = torch.where(p["solarize"].view(-1, 1, 1, 1), torch.where(ref >= 0.5, 1 - ref, ref), ref)
    torch.testing.assert_close(raw, ref, atol=1e-5, rtol=0)
    assert 0.4 < p["flip"].float().mean() < 0.6 and 0.4 < p["solarize"].float().mean() < 0.6


def test_jitter_applies_ops_in_the_drawn_order():
    """Row by row, the batched jitter equals applying the four ops one at a time in the drawn order."""
    recipe = A.ViewRecipe(flip_p=0.0, jitter_p=1.0, gray_p=0.0, blur_p=0.0)
    x = _images(n=24, h=4, w=5, seed=3).float()
    out, p = A.augment(x.clone(), [recipe], torch.Generator().manual_seed(4), return_params=True)
    fns = {"brightness": A.adjust_brightness, "contrast": A.adjust_contrast,
           "saturation": A.adjust_saturation, "hue": A.adjust_hue}
    for row in range(x.shape[0]):
        y = x[row:row + 1]
        for op in p["jitter_order"][row].tolist():
            name = A.JITTER_OPS[op]
            y = fns[name](y, p[name][row:row + 1])
        torch.testing.assert_close(out[row:row + 1], A.normalize(y), atol=1e-5, rtol=0)


def test_augmentation_is_deterministic_per_generator_seed():
    aug = A.MultiCropAugmentation("cpu")
    crops = [torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8) for _ in range(4)]
    a = aug(crops, A.augmentation_generator("cpu", 0, 1, 0, 5))
    b = aug(crops, A.augmentation_generator("cpu", 0, 1, 0, 5))
    c = aug(crops, A.augmentation_generator("cpu", 0, 2, 0, 5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_bad_inputs_raise():
    aug = A.MultiCropAugmentation("cpu")
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="crops"):
        aug([torch.zeros(2, 4, 4, 3, dtype=torch.uint8)], g)
    with pytest.raises(ValueError, match="batch size"):
        aug([torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.zeros(3, 4, 4, 3, dtype=torch.uint8)], g)
    with pytest.raises(ValueError, match="multiple"):
        A.augment(torch.zeros(3, 3, 4, 4), [A.GLOBAL1, A.GLOBAL2], g)


def test_config_augment_group_builds_the_view_recipes():
    """`augment.*` keys reach every view; DINO's per-view blur and solarisation split is kept."""
    import dataclasses

    from dinovmf.config import load_config
    cfg = load_config(None, ["augment.hue=0.5", "augment.gray_p=0.6", "augment.blur_sigma=0.02,0.3",
                             "augment.blur_p=0.9,0.3,0", "augment.solarize_p=0.4"])
    (g1, g2), loc = A.dino_view_recipes(**dataclasses.asdict(cfg.augment))
    assert (g1.blur_p, g2.blur_p, loc.blur_p) == (0.9, 0.3, 0.0)
    assert (g1.solarize_p, g2.solarize_p, loc.solarize_p) == (0.0, 0.4, 0.0)
    assert {r.hue for r in (g1, g2, loc)} == {0.5} and {r.gray_p for r in (g1, g2, loc)} == {0.6}
    assert (g1.blur_sigma, loc.blur_sigma) == ((0.02, 0.3), (0.02, 0.3))
    # The config's defaults are DINO's recipes.
    assert A.dino_view_recipes(**dataclasses.asdict(load_config(None).augment)) == ((A.GLOBAL1, A.GLOBAL2), A.LOCAL)

    b = 2000
    aug = A.MultiCropAugmentation("cpu", (g1, g2), loc)
    crops = [torch.randint(0, 256, (b, 6, 6, 3), dtype=torch.uint8) for _ in range(3)]
    _, params = aug(crops, torch.Generator().manual_seed(0), return_params=True)
    hue, sigma = params["global"]["hue"].numpy(), params["global"]["sigma"].numpy()
    assert hue.min() >= -0.5 and hue.max() <= 0.5 and np.abs(hue).mean() > 0.24  # uniform on [-0.5, 0.5]
    assert sigma.min() >= 0.02 and sigma.max() <= 0.3
    assert _binomial_ok(params["local"]["gray"].float().mean().item(), 0.6, b)
    assert params["local"]["blur"].sum() == 0
