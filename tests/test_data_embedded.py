"""The embedded dataset: deterministic, generated once, atomic, and separable by shape, not colour."""
import numpy as np
import pytest

from dinovmf.data import embedded
from dinovmf.data.embedded import CLASSES, SPLITS, class_folder, ensure_embedded, render_image
from dinovmf.data.prepare import list_images


def test_render_is_deterministic_and_labelled():
    a, la = render_image("train", 17)
    b, lb = render_image("train", 17)
    c, _ = render_image("val", 17)
    assert a.dtype == np.uint8 and a.shape == (embedded.IMAGE_SIZE, embedded.IMAGE_SIZE, 3)
    assert np.array_equal(a, b) and la == lb == 17 % len(CLASSES)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="split"):
        render_image("test", 0)


def test_ensure_embedded_generates_once_into_class_folders(tmp_path):
    paths = ensure_embedded(tmp_path)
    assert set(paths) == set(SPLITS)
    for split, count in SPLITS.items():
        files, labels, names = list_images(paths[split])
        assert names == [class_folder(k) for k in range(len(CLASSES))]  # folder order = label order
        assert np.bincount(labels).tolist() == [count // len(CLASSES)] * len(CLASSES)
    # Nothing half-written left beside the splits.
    assert sorted(p.name for p in paths["train"].parent.iterdir()) == sorted(SPLITS)
    stamp = paths["val"].stat().st_mtime_ns
    again = ensure_embedded(tmp_path)
    assert again == paths and paths["val"].stat().st_mtime_ns == stamp
    # The files hold exactly the rendered pixels.
    from PIL import Image
    img = np.asarray(Image.open(paths["val"] / class_folder(3) / "00013.png"))
    assert np.array_equal(img, render_image("val", 13)[0])


def _gradient_histograms(images):
    """A small HOG: unsigned gradient orientation histograms (8 bins) over a 4 x 4 grid of cells."""
    feats = []
    for im in images:
        g = im.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        gy, gx = np.gradient(g)
        mag, ang = np.hypot(gx, gy), np.arctan2(gy, gx) % np.pi
        bins = (ang / np.pi * 8).astype(int) % 8
        s = g.shape[0] // 4
        h = np.stack([np.bincount(bins[i:i + s, j:j + s].ravel(), mag[i:i + s, j:j + s].ravel(), 8)
                      for i in range(0, 4 * s, s) for j in range(0, 4 * s, s)]).ravel()
        feats.append(h / (np.linalg.norm(h) + 1e-9))
    return np.array(feats)


def _knn_accuracy(train_x, train_y, test_x, test_y, k=5):
    d = ((test_x[:, None, :] - train_x[None, :, :]) ** 2).sum(-1)
    votes = train_y[np.argsort(d, axis=1)[:, :k]]
    pred = np.array([np.bincount(v, minlength=len(CLASSES)).argmax() for v in votes])
    return (pred == test_y).mean()


def test_classes_separate_by_shape_not_by_mean_colour():
    train = [render_image("train", i) for i in range(600)]
    val = [render_image("val", i) for i in range(200)]
    ty, vy = np.array([lab for _, lab in train]), np.array([lab for _, lab in val])
    hog = _knn_accuracy(_gradient_histograms([im for im, _ in train]), ty,
                        _gradient_histograms([im for im, _ in val]), vy)
    colour = _knn_accuracy(np.array([im.reshape(-1, 3).mean(0) for im, _ in train]), ty,
                           np.array([im.reshape(-1, 3).mean(0) for im, _ in val]), vy)
    chance = 1 / len(CLASSES)
    assert hog > 0.6, hog                 # shape / texture carries the label
    assert colour < chance + 0.08, colour  # the mean colour does not
