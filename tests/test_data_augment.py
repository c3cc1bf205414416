"""The batched torch reference of the augmentation (dinovmf/data/augment.py) against float64 / scipy / colorsys
oracles; the fused kernels are tested against this reference in test_data_fused_augment.py."""
import colorsys

import numpy as np
import pytest
import torch
from scipy import ndimage

from dinovmf.config import AugmentConfig, CropsConfig
from dinovmf.data import augment as A
from dinovmf.data import augment_params as P

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
    """Each row blurs with its own radius ceil(3 sigma) (scipy's truncate = radius / sigma), reflect padding."""
    x = _images(n=4, h=20, w=17)
    sigma = torch.tensor([0.3, 1.0, 2.0, 0.7], dtype=torch.float64)
    out = A.gaussian_blur(x, sigma).numpy()
    for n, s in enumerate(sigma.tolist()):
        radius = int(np.ceil(3 * np.float32(s)))
        # scipy's "mirror" is torch's "reflect"; truncate so that scipy's radius equals ours.
        ref = ndimage.gaussian_filter(x[n].numpy(), sigma=(0, s, s), mode="mirror", truncate=radius / s)
        np.testing.assert_allclose(out[n], ref, atol=1e-12)


def test_blur_of_a_row_does_not_depend_on_the_other_rows():
    """The kernel size comes from the row's own sigma (a crop augmented alone, as in a loader worker, or
    in a batch gets the same pixels)."""
    x = _images(n=2, h=15, w=16)
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    alone = A.gaussian_blur(x[:1], sigma[:1])
    torch.testing.assert_close(A.gaussian_blur(x, sigma)[:1], alone, atol=1e-14, rtol=0)


def test_blur_radius_is_clamped_to_the_image():
    sigma = torch.tensor([0.1, 1.0, 2.0])
    assert A.blur_radius(sigma, 100, 100).tolist() == [1, 3, 6]
    assert A.blur_radius(sigma, 3, 100).tolist() == [1, 2, 2]  # reflect padding needs radius < side
    assert A.blur_radius(sigma, 1, 5).tolist() == [0, 0, 0]    # a one-pixel side: no blur
    x = _images(n=3, h=1, w=5)
    torch.testing.assert_close(A.gaussian_blur(x, sigma.double()), x)


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
    assert A.to_float_nchw(u8, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="images"):
        A.to_float_nchw(torch.zeros(2, 3, 4, 5, dtype=torch.uint8))


def _params(n, **values) -> torch.Tensor:
    """n parameter rows: identity (no op drawn, jitter order 0..3) plus `values` by column name."""
    rows = torch.zeros(n, P.NUM_PARAMS)
    rows[:, P.OP0:P.OP3 + 1] = torch.arange(4.0)
    rows[:, [P.BRIGHTNESS, P.CONTRAST, P.SATURATION]] = 1.0
    rows[:, P.SIGMA] = 1.0
    for name, v in values.items():
        rows[:, P.PARAM_NAMES.index(name)] = torch.as_tensor(v, dtype=torch.float32)
    return rows


def test_identity_parameters_only_normalise():
    x = _images()
    torch.testing.assert_close(A.augment_reference(x, _params(x.shape[0])), A.normalize(x), atol=1e-15, rtol=0)


def test_flip_and_solarize_show_in_pixels():
    x = _images(n=4, h=5, w=7)
    flip, solar = torch.tensor([0.0, 1, 0, 1]), torch.tensor([0.0, 0, 1, 1])
    raw = A.augment_reference(x, _params(4, flip=flip, solarize=solar)) * torch.tensor(
        A.IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1) + torch.tensor(A.IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    ref = torch.where(flip.bool().view(-1, 1, 1, 1), x.flip(-1), x)
    ref = torch.where(solar.bool().view(-1, 1, 1, 1), torch.where(ref >= 0.5, 1 - ref, ref), ref)
    torch.testing.assert_close(raw, ref, atol=1e-12, rtol=0)


def test_jitter_applies_ops_in_the_drawn_order():
    """Row by row, the batched jitter equals applying the four ops one at a time in the drawn order."""
    x = _images(n=48, h=4, w=5, seed=3)
    recipe = P.crop_recipes(AugmentConfig(flip_p=0.0, jitter_p=1.0, gray_p=0.0, blur_p=(0.0, 0.0, 0.0)),
                            CropsConfig())[0]
    params = torch.from_numpy(P.draw_params(np.arange(48) * 11 + 5, recipe))
    out = A.augment_reference(x, params)
    p = A.params_by_name(params, torch.float64)
    assert len({tuple(o) for o in p["jitter_order"].tolist()}) > 12  # many orders are exercised
    fns = {"brightness": A.adjust_brightness, "contrast": A.adjust_contrast,
           "saturation": A.adjust_saturation, "hue": A.adjust_hue}
    for row in range(x.shape[0]):
        y = x[row:row + 1]
        for op in p["jitter_order"][row].tolist():
            name = P.JITTER_OPS[op]
            y = fns[name](y, p[name][row:row + 1])
        torch.testing.assert_close(out[row:row + 1], A.normalize(y), atol=1e-12, rtol=0)


def test_grayscale_after_jitter_gives_equal_channels():
    x = _images(n=6)
    params = torch.from_numpy(P.draw_params(np.arange(6), P.crop_recipes(AugmentConfig(gray_p=1.0), CropsConfig())[2]))
    raw = A.augment_reference(x, params) * torch.tensor(A.IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1) \
        + torch.tensor(A.IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    torch.testing.assert_close(raw[:, 0], raw[:, 1], atol=1e-12, rtol=0)
    torch.testing.assert_close(raw[:, 1], raw[:, 2], atol=1e-12, rtol=0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="x must be"):
        A.augment_reference(torch.zeros(2, 4, 4, 3), _params(2))
    with pytest.raises(ValueError, match="params has 3 rows"):
        A.augment_reference(torch.zeros(2, 3, 4, 4), _params(3))
    with pytest.raises(ValueError, match="params must be"):
        A.augment_reference(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5))
