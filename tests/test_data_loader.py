"""MultiCropLoader / EvalLoader: shapes, ranges, determinism, sharding, and FFCV vs PIL equivalence.

FFCV compiles its pipelines with numba on first use (seconds per decoder on CPU), so the FFCV loaders
are built once per module, with few and small crops.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from dinovmf.data import EvalLoader, MultiCropConfig, MultiCropLoader, epoch_order
from dinovmf.data import loader as loader_module
from dinovmf.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dinovmf.data.embedded import CLASSES, render_image

N_IMAGES, BATCH = 64, 8
CROPS = MultiCropConfig(num_local=1, global_size=24, local_size=12)
SHARD = dict(seed=5, rank=1, world_size=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A .beton of 64 embedded images (class sub-folders) and its labels in file order."""
    pytest.importorskip("ffcv")
    from dinovmf.data.prepare import prepare_dataset
    root = tmp_path_factory.mktemp("loader")
    labels = []
    for i in range(N_IMAGES):
        img, label = render_image("val", i)
        (root / "src" / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "src" / CLASSES[label] / f"{i:03d}.png")
    for c, name in enumerate(sorted(CLASSES)):  # prepare sorts class names and file names
        labels += [c] * len(list((root / "src" / name).glob("*.png")))
    prepare_dataset(root / "src", root / "d.beton", num_workers=1, progress=False)
    return root / "d.beton", np.array(labels)


@pytest.fixture(scope="module")
def ffcv_loader(data):
    return MultiCropLoader(data[0], BATCH, CROPS, "cpu", backend="ffcv", num_workers=2, **SHARD)


@pytest.fixture(scope="module")
def pil_loader(data):
    return MultiCropLoader(data[0], BATCH, CROPS, "cpu", backend="pil", num_workers=0, **SHARD)


def _decoded(loader, epoch):
    loader.set_epoch(epoch)
    return [([c.clone() for c in crops], labels.clone()) for crops, labels in loader.decoded_batches()]


def test_batches_have_dino_layout(ffcv_loader, data):
    low = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    high = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    ffcv_loader.set_epoch(0)
    batches = list(ffcv_loader)
    assert len(batches) == len(ffcv_loader) == (N_IMAGES // 2) // BATCH
    for crops, labels in batches:
        assert [tuple(c.shape) for c in crops] == [(BATCH, 3, 24, 24)] * 2 + [(BATCH, 3, 12, 12)]
        assert all(c.dtype == torch.float32 and c.device.type == "cpu" for c in crops)
        for c in crops:
            assert (c >= low.view(1, 3, 1, 1) - 1e-4).all() and (c <= high.view(1, 3, 1, 1) + 1e-4).all()
        assert labels.dtype == torch.int64 and labels.shape == (BATCH,)
    # This rank's shard, in this epoch's order.
    expected = data[1][epoch_order(N_IMAGES, SHARD["seed"], 0, SHARD["rank"], SHARD["world_size"])]
    assert np.array_equal(torch.cat([lab for _, lab in batches]).numpy(), expected)


def test_ffcv_batches_are_deterministic_per_epoch(ffcv_loader):
    a, b, c = _decoded(ffcv_loader, 1), _decoded(ffcv_loader, 1), _decoded(ffcv_loader, 2)
    assert all(torch.equal(x, y) for (ca, _), (cb, _) in zip(a, b) for x, y in zip(ca, cb))
    assert not torch.equal(a[0][0][0], c[0][0][0])
    ffcv_loader.set_epoch(1)
    first = next(iter(ffcv_loader))[0]
    ffcv_loader.set_epoch(1)
    again = next(iter(ffcv_loader))[0]
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_ffcv_and_pil_agree(ffcv_loader, pil_loader):
    """Same order and labels, same crop boxes (same keys), so crops differ only by resampling."""
    for epoch in (0, 3):
        f, p = _decoded(ffcv_loader, epoch), _decoded(pil_loader, epoch)
        assert len(f) == len(p)
        for (fc, fl), (pc, pl) in zip(f, p):
            assert torch.equal(fl, pl)
            for x, y in zip(fc, pc):
                assert x.shape == y.shape and x.dtype == y.dtype == torch.uint8
                # Resampling differs (OpenCV INTER_AREA vs PIL bilinear); boxes agree.
                assert (x.float() - y.float()).abs().mean() < 6  # ~2 measured; ~80 for other boxes
        # Pixel statistics per crop kind agree closely.
        for k in range(CROPS.num_crops):
            fx = torch.cat([b[0][k] for b in f]).float()
            px = torch.cat([b[0][k] for b in p]).float()
            assert abs(fx.mean() - px.mean()) < 1.5 and abs(fx.std() - px.std()) < 2.5


def test_pil_ranks_read_disjoint_shards(data):
    seen = []
    for rank in range(2):
        loader = MultiCropLoader(data[0], BATCH, CROPS, "cpu", backend="pil", num_workers=0,
                                 seed=5, rank=rank, world_size=2, drop_last=False)
        loader.set_epoch(2)
        labels = torch.cat([lab for _, lab in loader.decoded_batches()]).numpy()
        order = epoch_order(N_IMAGES, 5, 2, rank, 2)
        assert np.array_equal(labels, data[1][order])
        seen.append(set(order.tolist()))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == N_IMAGES


def test_eval_loader_ffcv_matches_pil(data):
    f = list(EvalLoader(data[0], 24, 32, "cpu", backend="ffcv", num_workers=1))
    p = list(EvalLoader(data[0], 24, 32, "cpu", backend="pil", num_workers=0))
    assert [x.shape[0] for x, _ in f] == [24, 24, 16]
    fx, fl = torch.cat([x for x, _ in f]), torch.cat([y for _, y in f])
    px, pl = torch.cat([x for x, _ in p]), torch.cat([y for _, y in p])
    assert fx.shape == (N_IMAGES, 3, 32, 32) and fx.dtype == torch.float32
    assert np.array_equal(fl.numpy(), data[1]) and torch.equal(fl, pl)
    assert (fx - px).abs().mean() < 0.1  # normalised units; only the resampling filter differs


def test_fallback_notice_when_ffcv_missing(data, monkeypatch, capsys):
    monkeypatch.setattr(loader_module, "ffcv_available", lambda: False)
    loader = MultiCropLoader(data[0], BATCH, CROPS, "cpu", num_workers=0)
    assert loader.backend == "pil"
    assert "PIL fallback" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="ffcv"):
        MultiCropLoader(data[0], BATCH, CROPS, "cpu", backend="ffcv")


def test_view_recipes_reach_the_pixels(data):
    """A loader built with all-grayscale, no-jitter recipes hands out gray crops (equal RGB before normalising)."""
    from dinovmf.data.augment import dino_view_recipes
    recipes = dino_view_recipes(jitter_p=0.0, gray_p=1.0)
    loader = MultiCropLoader(data[0], BATCH, CROPS, "cpu", backend="pil", num_workers=0,
                             view_recipes=recipes, **SHARD)
    crops, _ = next(iter(loader))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for crop in crops:
        rgb = crop * std + mean
        torch.testing.assert_close(rgb[:, 0], rgb[:, 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(rgb[:, 1], rgb[:, 2], atol=1e-5, rtol=0)
    default = next(iter(MultiCropLoader(data[0], BATCH, CROPS, "cpu", backend="pil", num_workers=0, **SHARD)))[0]
    assert not torch.allclose((default[0] * std + mean)[:, 0], (default[0] * std + mean)[:, 1], atol=1e-3)


def test_bad_arguments(data, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        MultiCropLoader(data[0], 0, CROPS, "cpu")
    with pytest.raises(ValueError, match="backend"):
        MultiCropLoader(data[0], 4, CROPS, "cpu", backend="dali")
    with pytest.raises(ValueError, match="crops"):
        MultiCropLoader(data[0], 4, {"num_local": 2}, "cpu")
    with pytest.raises(FileNotFoundError):
        MultiCropLoader(tmp_path / "missing.beton", 4, CROPS, "cpu")
    with pytest.raises(ValueError, match="folder"):
        MultiCropLoader(tmp_path, 4, CROPS, "cpu", backend="ffcv")
    with pytest.raises(ValueError, match="epoch"):
        MultiCropLoader(data[0], 4, CROPS, "cpu", backend="pil", num_workers=0).set_epoch(-1)


def test_pil_loader_reads_an_image_folder_without_ffcv(tmp_path, monkeypatch):
    """The fallback path alone (as on a machine without FFCV): folder in, DINO batches out."""
    monkeypatch.setattr(loader_module, "ffcv_available", lambda: False)
    for i in range(12):
        img, label = render_image("train", i)
        (tmp_path / CLASSES[label]).mkdir(exist_ok=True)
        Image.fromarray(img).save(tmp_path / CLASSES[label] / f"{i}.png")
    loader = MultiCropLoader(tmp_path, 4, CROPS, "cpu", num_workers=0)
    assert loader.backend == "pil" and len(loader) == 3
    batches = list(loader)
    assert [tuple(c.shape) for c in batches[0][0]] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)]
    folder_label = {name: k for k, name in enumerate(sorted(CLASSES))}  # labels follow sorted folder names
    expected = sorted(folder_label[CLASSES[i % 10]] for i in range(12))
    assert sorted(torch.cat([lab for _, lab in batches]).tolist()) == expected
    images, labels = next(iter(EvalLoader(tmp_path, 12, 16, "cpu", num_workers=0)))
    assert images.shape == (12, 3, 16, 16) and labels.tolist() == expected


def test_only_numbas_finalizer_keyerror_is_silenced(monkeypatch):
    """The unraisable-hook filter drops numba's harmless finalizer KeyError and nothing else."""
    import sys
    import types

    from dinovmf.data import ffcv_loader

    def raised_in(filename, name, exc):
        code = compile(f"def {name}():\n    raise exc\n", filename, "exec")
        namespace = {"exc": exc}
        exec(code, namespace)
        try:
            namespace[name]()
        except BaseException as e:  # noqa: BLE001
            return types.SimpleNamespace(exc_value=e, exc_traceback=e.__traceback__, object=None,
                                         exc_type=type(e), err_msg=None)

    numba_file = "/site-packages/numba/core/dispatcher.py"
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    ffcv_loader._silence_numba_finalizer_keyerror()
    ffcv_loader._silence_numba_finalizer_keyerror()  # idempotent: one filter, not a chain of them
    silenced = raised_in(numba_file, "finalizer", KeyError("sig"))
    others = [raised_in(numba_file, "finalizer", ValueError("x")),       # another error type
              raised_in("/site-packages/mylib/dispatcher.py", "finalizer", KeyError("sig")),  # another file
              raised_in(numba_file, "compile", KeyError("sig"))]         # another function
    for u in [silenced] + others:
        sys.unraisablehook(u)
    assert seen == others
