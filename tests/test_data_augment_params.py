"""The augmentation parameters (dinovmf/data/augment_params.py): DINO's per-view recipe, their laws, and
that they are a pure function of the crop key (the same in plain Python and under numba)."""
import itertools

import numpy as np
import pytest
from scipy import stats

from dinovmf.config import AugmentConfig, CropsConfig, load_config
from dinovmf.data import augment_params as P
from dinovmf.data.crops import crop_key, key_uniform

N = 6000


def _binomial_ok(frac, p, n, z=4.5):
    return abs(frac - p) <= z * np.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12


def _col(params, name):
    return params[:, P.PARAM_NAMES.index(name)]


def _draw(recipe, n=N, salt=0):
    return P.draw_params([crop_key(salt, i, 0, 0, 0) for i in range(n)], recipe)


def test_crop_recipes_follow_dinos_views():
    """Blur 1.0 / 0.1 / 0.5 on global 1 / global 2 / locals, solarisation on global 2 only; the rest shared."""
    recipes = P.crop_recipes(AugmentConfig(), CropsConfig(n_local=3))
    col = {name: recipes[:, i].tolist() for i, name in enumerate(P.RECIPE_NAMES)}
    assert recipes.shape == (5, P.NUM_RECIPE)
    assert col["blur_p"] == [1.0, 0.1, 0.5, 0.5, 0.5] and col["solarize_p"] == [0.0, 0.2, 0.0, 0.0, 0.0]
    assert set(col["jitter_p"]) == {0.8} and set(col["gray_p"]) == {0.2} and set(col["flip_p"]) == {0.5}
    assert set(col["hue"]) == {0.1} and set(col["sigma_lo"]) == {0.1} and set(col["sigma_hi"]) == {2.0}


def test_config_augment_group_reaches_the_recipes():
    cfg = load_config(None, ["augment.hue=0.5", "augment.gray_p=0.6", "augment.blur_sigma=0.02,0.3",
                             "augment.blur_p=0.9,0.3,0", "augment.solarize_p=0.4", "crops.n_local=2"])
    recipes = P.crop_recipes(cfg.augment, cfg.crops)
    col = {name: recipes[:, i].tolist() for i, name in enumerate(P.RECIPE_NAMES)}
    assert col["blur_p"] == [0.9, 0.3, 0.0, 0.0] and col["solarize_p"] == [0.0, 0.4, 0.0, 0.0]
    assert set(col["hue"]) == {0.5} and set(col["gray_p"]) == {0.6}
    assert set(col["sigma_lo"]) == {0.02} and set(col["sigma_hi"]) == {0.3}


@pytest.mark.parametrize("view", [0, 1, 2])
def test_drawn_parameters_follow_the_recipe(view):
    """Per view: the drawn fractions match the probabilities, factors are uniform on their ranges."""
    recipe = P.crop_recipes(AugmentConfig(), CropsConfig())[view]
    params = _draw(recipe)
    rates = {"flip": 0.5, "jitter": 0.8, "gray": 0.2, "blur": (1.0, 0.1, 0.5)[view], "solarize": (0.0, 0.2, 0.0)[view]}
    for name, p in rates.items():
        flags = _col(params, name)
        assert set(np.unique(flags)) <= {0.0, 1.0}
        assert _binomial_ok(flags.mean(), p, N), (name, flags.mean(), p)
    for name, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2),
                         ("hue", -0.1, 0.1), ("sigma", 0.1, 2.0)):
        v = _col(params, name).astype(np.float64)
        assert stats.kstest(v, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3, name


def test_jitter_order_is_a_uniform_permutation():
    params = _draw(P.crop_recipes(AugmentConfig(), CropsConfig())[0])
    order = params[:, P.OP0:P.OP3 + 1].astype(int)
    assert (np.sort(order, axis=1) == np.arange(4)).all()
    index = {perm: i for i, perm in enumerate(itertools.permutations(range(4)))}
    counts = np.bincount([index[tuple(o)] for o in order], minlength=24)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_strong_jitter_factors_stay_non_negative():
    """Strength s > 1 gives factors uniform on [0, 1 + s], torchvision ColorJitter's range (not 1 +- s)."""
    recipe = P.crop_recipes(AugmentConfig(brightness=1.5, contrast=2.0, saturation=1.0), CropsConfig())[0]
    params = _draw(recipe)
    for name, hi in (("brightness", 2.5), ("contrast", 3.0), ("saturation", 2.0)):
        v = _col(params, name).astype(np.float64)
        assert v.min() >= 0.0 and v.max() <= hi
        assert stats.kstest(v, stats.uniform(0.0, hi).cdf).pvalue > 1e-3, name


def test_parameters_are_a_pure_function_of_the_key():
    recipes = P.crop_recipes(AugmentConfig(), CropsConfig())
    keys = [crop_key(3, s, 1, 7, c) for s in range(20) for c in range(12)]
    rows = np.repeat(recipes[None], 20, axis=0).reshape(-1, P.NUM_RECIPE)
    a, b = P.draw_params(keys, rows), P.draw_params(keys, rows)
    assert np.array_equal(a, b)
    other = P.draw_params([crop_key(4, s, 1, 7, c) for s in range(20) for c in range(12)], rows)
    assert (a != other).any(axis=1).mean() > 0.99
    # One crop's parameters do not depend on the others drawn with it.
    assert np.array_equal(P.draw_params(keys[5:6], rows[5]), a[5:6])


def test_parameter_stream_is_independent_of_the_crop_box_stream():
    """The box uses counters < AUG_COUNTER of the same key: the uniforms are uncorrelated."""
    keys = [crop_key(0, i, 0, 0, 0) for i in range(N)]
    box = np.array([key_uniform(k, 0) for k in keys])
    aug = np.array([key_uniform(k, P.AUG_COUNTER + 5) for k in keys])
    assert abs(np.corrcoef(box, aug)[0, 1]) < 0.05
    assert P.AUG_COUNTER >= 40  # random_crop_box draws 4 uniforms x 10 tries


def test_numba_draw_matches_python():
    """The decoders draw under numba (FFCV's threads), tests and PIL workers in Python: bit for bit equal."""
    numba = pytest.importorskip("numba")

    @numba.njit
    def draw_all(keys, recipes, out):
        for i in range(len(keys)):
            P.draw_crop_params(keys[i], recipes[i], out[i])

    recipes = np.repeat(P.crop_recipes(AugmentConfig(brightness=1.5), CropsConfig()), 50, axis=0)
    keys = np.array([crop_key(9, i, i % 7, 3, i % 12) for i in range(len(recipes))], dtype=np.int64)
    out = np.empty((len(keys), P.NUM_PARAMS), dtype=np.float32)
    draw_all(keys, recipes, out)
    assert np.array_equal(out, P.draw_params(keys, recipes))
