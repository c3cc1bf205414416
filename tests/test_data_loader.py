"""MultiCropLoader / EvalLoader: shapes, ranges, determinism, sharding, FFCV vs PIL equivalence, the
augmentation in the workers against the reference, torch's thread count and FFCV's epoch threads.

FFCV compiles its pipelines with numba on first use (seconds per decoder on CPU), so the FFCV loaders
are built once per module, with few and small crops.
"""
import numpy as np
import pytest
import torch
from _augment_checks import assert_matches_reference
from PIL import Image

from dinovmf.config import AugmentConfig, CropsConfig
from dinovmf.data import EvalLoader, MultiCropLoader, epoch_order
from dinovmf.data import loader as loader_module
from dinovmf.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dinovmf.data.embedded import CLASSES, render_image

N_IMAGES, BATCH = 64, 8
CROPS = CropsConfig(n_local=1, global_size=24, local_size=12)
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
    """(uint8 crops, parameters, labels) of every batch of `epoch`, copied out of the loader's buffers."""
    loader.set_epoch(epoch)
    return [([c.clone() for c in crops], params.clone(), labels.clone())
            for crops, params, labels in loader.decoded_batches()]


def _finished(loader, epoch):
    loader.set_epoch(epoch)
    return [([c.clone() for c in crops], labels.clone()) for crops, labels in loader]


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
    assert all(torch.equal(x, y) for (ca, pa, _), (cb, pb, _) in zip(a, b) for x, y in zip(ca + [pa], cb + [pb]))
    assert not torch.equal(a[0][0][0], c[0][0][0]) and not torch.equal(a[0][1], c[0][1])
    first, again = _finished(ffcv_loader, 1), _finished(ffcv_loader, 1)
    assert all(torch.equal(x, y) for (fa, _), (fb, _) in zip(first, again) for x, y in zip(fa, fb))


@pytest.mark.parametrize("backend", ["ffcv", "pil"])
def test_augmentation_in_the_workers_matches_the_reference(backend, ffcv_loader, pil_loader):
    """The finished crops (augmented per image in FFCV's threads through the C++ kernel's C entry point,
    or in the PIL workers through the torch op) are the float64 reference applied to the decoded uint8
    crops with the same parameters."""
    loader = ffcv_loader if backend == "ffcv" else pil_loader
    finished, decoded = _finished(loader, 2), _decoded(loader, 2)
    assert len(finished) == len(decoded) == len(loader)
    for (crops, labels), (raw, params, raw_labels) in zip(finished, decoded):
        assert torch.equal(labels, raw_labels) and params.shape == (BATCH, CROPS.num_crops, 14)
        for c in range(CROPS.num_crops):
            assert_matches_reference(crops[c], raw[c], params[:, c])


def test_ffcv_and_pil_agree(ffcv_loader, pil_loader):
    """Same order and labels, same crop boxes and augmentation parameters (same keys), so crops differ only
    by resampling."""
    for epoch in (0, 3):
        f, p = _decoded(ffcv_loader, epoch), _decoded(pil_loader, epoch)
        assert len(f) == len(p)
        for (fc, fp, fl), (pc, pp, pl) in zip(f, p):
            assert torch.equal(fl, pl) and torch.equal(fp, pp)
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
        labels = torch.cat([lab for _, _, lab in loader.decoded_batches()]).numpy()
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


def test_augment_config_reaches_the_pixels(data):
    """A loader built with all-grayscale, no-jitter settings hands out gray crops (equal RGB before normalising)."""
    loader = MultiCropLoader(data[0], BATCH, CROPS, "cpu", augment=AugmentConfig(jitter_p=0.0, gray_p=1.0),
                             backend="pil", num_workers=0, **SHARD)
    crops, _ = next(iter(loader))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for crop in crops:
        rgb = crop * std + mean
        torch.testing.assert_close(rgb[:, 0], rgb[:, 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(rgb[:, 1], rgb[:, 2], atol=1e-5, rtol=0)
    default = next(iter(MultiCropLoader(data[0], BATCH, CROPS, "cpu", backend="pil", num_workers=0, **SHARD)))[0]
    assert not torch.allclose((default[0] * std + mean)[:, 0], (default[0] * std + mean)[:, 1], atol=1e-3)


def test_device_path_matches_worker_path(pil_loader, data):
    """Augmenting on the device (uint8 crops + parameters -> MultiCropAugmentation, as on a GPU) gives the
    crops the workers finish on a CPU device."""
    from dinovmf.data import MultiCropAugmentation
    pil_loader.set_epoch(4)
    (crops, _), (raw, params, _) = next(iter(pil_loader)), next(iter(pil_loader.decoded_batches()))
    on_device = MultiCropAugmentation("cpu")(raw, params)
    for a, b in zip(crops, on_device):
        assert torch.equal(a, b)
    assert "augmentation" in pil_loader.describe() and "torch threads" in pil_loader.describe()


def test_without_the_extension_the_training_process_augments(pil_loader, data, monkeypatch, capsys):
    """No C++ extension: a notice, then the torch reference in the training process (same crops)."""
    from dinovmf.data import fused
    monkeypatch.setattr(fused, "fused_unavailable", lambda device: "ExtensionUnavailable: not built")
    monkeypatch.setattr(loader_module, "fused_unavailable", fused.fused_unavailable)
    loader = MultiCropLoader(data[0], BATCH, CROPS, "cpu", backend="pil", num_workers=0, **SHARD)
    assert not loader.augment_in_workers and "using the torch reference" in capsys.readouterr().out
    assert "augmentation on cpu" in loader.describe()
    loader.set_epoch(4)
    pil_loader.set_epoch(4)
    (crops, _), (raw, params, _) = next(iter(loader)), next(iter(pil_loader.decoded_batches()))
    for c in range(CROPS.num_crops):
        assert_matches_reference(crops[c], raw[c], params[:, c])


def test_bad_arguments(data, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        MultiCropLoader(data[0], 0, CROPS, "cpu")
    with pytest.raises(ValueError, match="backend"):
        MultiCropLoader(data[0], 4, CROPS, "cpu", backend="dali")
    with pytest.raises(ValueError, match="crops"):
        MultiCropLoader(data[0], 4, {"n_local": 2}, "cpu")
    with pytest.raises(ValueError, match="crops.local_scale"):
        MultiCropLoader(data[0], 4, CropsConfig(local_scale=(0.5, 0.1)), "cpu")
    with pytest.raises(ValueError, match="augment.gray_p"):
        MultiCropLoader(data[0], 4, CROPS, "cpu", augment=AugmentConfig(gray_p=2.0))
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


def test_ffcv_leaves_torch_thread_count_alone(ffcv_loader, data):
    """FFCV's Compiler sets torch's threads to its worker count (at import, loader build, epoch start);
    the training process keeps its own."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # differs from the fixtures' 1 and 2 workers
        ffcv_loader.set_epoch(0)
        next(iter(ffcv_loader))
        assert torch.get_num_threads() == 3
        evaluation = EvalLoader(data[0], 24, 16, "cpu", backend="ffcv", num_workers=1)
        assert torch.get_num_threads() == 3
        next(iter(evaluation))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_ffcv_sets_its_numba_threads_and_leaves_torch_threads_alone():
    """FFCV's `Compiler.set_num_threads`, which FFCV calls from each epoch's decoding thread as it starts,
    also set torch's intra-op thread count: the training process's count changed mid-run at a moment set
    by thread timing, and two 2-process demo runs with one seed differed from their third step (issue #24).
    Patched by `ffcv_available`, it sets numba's count only."""
    import numba

    from dinovmf.data.ffcv_loader import ffcv_available
    assert ffcv_available()
    from ffcv.pipeline.compiler import Compiler
    threads, numba_threads, compiler_threads = torch.get_num_threads(), numba.get_num_threads(), Compiler.num_threads
    try:
        torch.set_num_threads(3)
        Compiler.set_num_threads(2)
        assert (torch.get_num_threads(), numba.get_num_threads(), Compiler.num_threads) == (3, 2, 2)
    finally:
        torch.set_num_threads(threads)
        Compiler.set_num_threads(compiler_threads)
        numba.set_num_threads(numba_threads)


def test_keep_torch_threads_restores_the_count():
    """What wraps FFCV's import, loader build and epoch start."""
    from dinovmf.data.ffcv_loader import keep_torch_threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with keep_torch_threads():
            torch.set_num_threads(1)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_stopping_an_ffcv_epoch_early_leaves_no_thread_and_forks_cleanly(ffcv_loader, capfd):
    """A fork (DataLoader workers, FFCV's dataset writer) after an FFCV epoch was stopped early: FFCV's
    decoding thread has been joined, so numba's TBB layer does not print "Unable to join threads to
    shut down before fork()" (it did before, measured with numba 0.68.1 and TBB)."""
    import multiprocessing
    import threading
    ffcv_loader.set_epoch(1)
    batches = iter(ffcv_loader)
    next(batches)
    assert any(type(t).__name__ == "EpochIterator" for t in threading.enumerate())
    ffcv_loader.close()  # as a training loop that stops mid-epoch (dropping the iterator does the same)
    assert not any(type(t).__name__ == "EpochIterator" for t in threading.enumerate())
    capfd.readouterr()
    child = multiprocessing.get_context("fork").Process(target=int)
    child.start()
    child.join()
    assert child.exitcode == 0
    out, err = capfd.readouterr()
    assert "Unable to join threads" not in out + err


def test_ffcv_state_types_leave_numbas_types_alone():
    """FFCV's memory managers used to set `.mutable = False` on numba's interned array types, changing
    the hash of keys numba's dispatchers hold (the "Exception ignored ... KeyError" noise after a loader
    was freed); `ffcv_available` replaces those properties by ones that build read-only types."""
    pytest.importorskip("ffcv")
    import numba as nb
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.memory_managers.process_cache.manager import ProcessCacheManager

    from dinovmf.data import ffcv_available
    assert ffcv_available()
    shared = [nb.uint8[::1], nb.uint8[:, ::1], nb.uint64[::1], nb.uint32[::1]]
    keys, hashes = [t.key for t in shared], [hash(t) for t in shared]
    signatures = {tuple(shared): "compiled"}  # as a dispatcher's overloads hold its argument types
    os_state = OSCacheManager.state_type.fget(None)
    process_state = ProcessCacheManager.state_type.fget(None)
    assert [t.key for t in shared] == keys and [hash(t) for t in shared] == hashes
    assert signatures[tuple(shared)] == "compiled"
    assert [t.mutable for t in os_state.types] == [False, True, True]
    assert [t.mutable for t in process_state.types] == [False] * 4
    assert os_state.types[0] == nb.types.Array(nb.uint8, 1, "C", readonly=True)
