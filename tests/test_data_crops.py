"""Crop geometry, crop keys and per-rank order (dinovmf/data/crops.py)."""
import math

import numpy as np
import pytest
from scipy import stats

from dinovmf.config import CropsConfig, validate_crops
from dinovmf.data.crops import DEFAULT_RATIO, crop_key, epoch_order, hash32, key_uniform, random_crop_box

LOG_RATIO = (math.log(DEFAULT_RATIO[0]), math.log(DEFAULT_RATIO[1]))


def test_config_defaults_are_dino():
    c = CropsConfig()
    assert (c.n_global, c.n_local, c.global_size, c.local_size) == (2, 10, 224, 96)
    assert c.global_scale == (0.4, 1.0) and c.local_scale == (0.05, 0.4)
    specs = c.crop_specs()
    assert len(specs) == c.num_crops == 12
    assert specs[:2] == [(224, (0.4, 1.0))] * 2 and specs[2:] == [(96, (0.05, 0.4))] * 10
    validate_crops(c)


@pytest.mark.parametrize("kwargs, name", [
    ({"n_local": -1}, "n_local"), ({"global_size": 0}, "global_size"),
    ({"local_scale": (0.5, 0.2)}, "local_scale"), ({"global_scale": (0.0, 1.0)}, "global_scale"),
    ({"local_scale": (0.5, 1.5)}, "local_scale")])
def test_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=f"crops.{name}"):
        validate_crops(CropsConfig(**kwargs))


def test_n_global_is_not_a_config_key():
    """Two global views are DINO's definition (recipe and loss pairing), not a setting."""
    from dinovmf.config import all_keys
    assert "crops.n_global" not in all_keys() and CropsConfig.n_global == 2


def test_hash_and_uniforms():
    assert all(0 <= hash32(x) < 2**32 for x in (0, 1, 2**32 - 1, 123456789))
    u = np.array([key_uniform(crop_key(7, i, 3, 11, 2), c) for i in range(2000) for c in range(4)])
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # Neighbouring keys and counters are not correlated.
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.05
    keys = {crop_key(0, s, p, f, c) for s in range(10) for p in range(4) for f in range(3) for c in range(3)}
    assert len(keys) == 360


@pytest.mark.parametrize("scale", [(0.05, 0.4), (0.4, 1.0)])
def test_crop_box_distribution_matches_random_resized_crop(scale):
    """Area fraction ~ U(scale) and log aspect ~ U(log ratio) when the first try fits (big square image)."""
    h = w = 1000
    boxes = np.array([random_crop_box(h, w, *scale, *LOG_RATIO, crop_key(1, i, 0, 0, 0)) for i in range(3000)])
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    area = bh * bw / (h * w)
    log_aspect = np.log(bw / bh)
    if scale == (0.05, 0.4):  # every first try fits: the draw is exactly the RandomResizedCrop law
        assert stats.kstest(area, stats.uniform(scale[0], scale[1] - scale[0]).cdf).pvalue > 1e-3
        assert stats.kstest(log_aspect, stats.uniform(LOG_RATIO[0], LOG_RATIO[1] - LOG_RATIO[0]).cdf).pvalue > 1e-3
    assert area.min() >= scale[0] - 0.01 and area.max() <= scale[1] + 0.01
    assert log_aspect.min() >= LOG_RATIO[0] - 0.01 and log_aspect.max() <= LOG_RATIO[1] + 0.01


def test_crop_box_falls_back_to_centre_crop():
    # A 1000 x 10 strip: no 4:3..3:4 box of >= 90% area fits, so the centred fallback is used.
    top, left, h, w = random_crop_box(10, 1000, 0.9, 1.0, *LOG_RATIO, 5)
    assert (h, w) == (10, round(10 * 4 / 3)) and left == (1000 - w) // 2 and top == 0


def test_epoch_order_shards():
    n, world = 103, 4
    shards = [epoch_order(n, seed=3, epoch=1, rank=r, world_size=world) for r in range(world)]
    assert all(len(s) == n // world for s in shards)
    joined = np.concatenate(shards)
    assert len(np.unique(joined)) == len(joined)           # disjoint
    assert np.array_equal(shards[0], epoch_order(n, 3, 1, 0, world))   # deterministic
    assert not np.array_equal(shards[0], epoch_order(n, 3, 2, 0, world))  # changes with the epoch
    assert not np.array_equal(shards[0], epoch_order(n, 4, 1, 0, world))  # and with the seed
    assert np.array_equal(epoch_order(10, 0, 5, shuffle=False), np.arange(10))


@pytest.mark.parametrize("kwargs, name", [({"rank": 2, "world_size": 2}, "rank"),
                                          ({"world_size": 0}, "world_size"),
                                          ({"world_size": 20}, "num_samples")])
def test_epoch_order_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        epoch_order(10, 0, 0, **kwargs)
