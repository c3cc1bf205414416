"""`prepare_dataset` / `dinovmf prepare`: round trip, labels, corrupt / empty / missing / existing cases."""
import numpy as np
import pytest
from PIL import Image

from conftest import require_ffcv

from dinovmf.cli import main
from dinovmf.data.fallback_loader import BetonImages
from dinovmf.data.prepare import RAW_MAX_PIXELS, prepare_dataset, resolve_dataset

require_ffcv()


def _write_images(folder, sizes, seed=0, ext=".png"):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = []
    for i, (h, w) in enumerate(sizes):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:02d}{ext}")
        arrays.append(arr)
    return arrays


def test_round_trip_labels_and_pixels(tmp_path):
    src = tmp_path / "src"
    cats = _write_images(src / "cat", [(20, 30), (31, 17)], seed=1)
    dogs = _write_images(src / "dog", [(16, 16), (25, 40), (12, 9)], seed=2)
    report = prepare_dataset(src, tmp_path / "d.beton", num_workers=1, progress=False)
    assert (report.num_images, report.class_names, report.corrupt) == (5, ["cat", "dog"], [])
    beton = BetonImages(tmp_path / "d.beton")
    assert beton.labels.tolist() == [0, 0, 1, 1, 1]
    for i, expected in enumerate(cats + dogs):  # small images are stored raw: exact
        assert np.array_equal(np.asarray(beton.image(i)), expected)


def test_large_images_are_jpeg_and_close(tmp_path):
    side = int(np.sqrt(RAW_MAX_PIXELS)) + 40
    yy, xx = np.mgrid[0:side, 0:side]
    smooth = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.float64) / side * 255
    src = tmp_path / "flat"
    src.mkdir()
    Image.fromarray(smooth.astype(np.uint8)).save(src / "a.png")
    report = prepare_dataset(src, tmp_path / "j.beton", num_workers=1, progress=False)
    assert report.class_names == []
    beton = BetonImages(tmp_path / "j.beton")
    assert beton.labels.tolist() == [-1]  # flat folder: unlabelled
    assert int(beton.meta_image[0]["mode"]) == 0  # JPEG
    back = np.asarray(beton.image(0)).astype(np.float64)
    assert np.abs(back - smooth.astype(np.uint8)).mean() < 2.0


def test_max_resolution_shrinks_longest_side(tmp_path):
    _write_images(tmp_path / "src", [(40, 80)])
    prepare_dataset(tmp_path / "src", tmp_path / "r.beton", max_resolution=20, num_workers=1, progress=False)
    assert np.asarray(BetonImages(tmp_path / "r.beton").image(0)).shape == (10, 20, 3)
    with pytest.raises(ValueError, match="max_resolution"):
        prepare_dataset(tmp_path / "src", tmp_path / "s.beton", max_resolution=0)


def test_cli_skips_and_reports_corrupt_images(tmp_path, capsys):
    src = tmp_path / "src"
    _write_images(src / "a", [(10, 10), (12, 12)])
    (src / "a" / "garbage.jpg").write_bytes(b"not an image at all")
    good = (src / "a" / "img00.png").read_bytes()
    (src / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    rc = main(["prepare", str(src), str(tmp_path / "c.beton"), "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "2 corrupt" in out and "garbage.jpg" in out and "truncated.png" in out
    assert len(BetonImages(tmp_path / "c.beton")) == 2


@pytest.mark.parametrize("case", ["missing", "empty", "all_corrupt"])
def test_cli_fails_clearly_without_images(tmp_path, capsys, case):
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
    if case == "all_corrupt":
        (src / "x.jpg").write_bytes(b"junk")
    rc = main(["prepare", str(src), str(tmp_path / "o.beton"), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc != 0
    assert {"missing": "does not exist", "empty": "holds no images", "all_corrupt": "corrupt"}[case] in err
    assert not (tmp_path / "o.beton").exists()


def test_cli_never_overwrites_without_force(tmp_path, capsys):
    _write_images(tmp_path / "src", [(8, 8)])
    out = tmp_path / "o.beton"
    out.write_bytes(b"precious")
    assert main(["prepare", str(tmp_path / "src"), str(out), "--workers", "1"]) != 0
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(["prepare", str(tmp_path / "src"), str(out), "--force", "--workers", "1"]) == 0
    assert len(BetonImages(out)) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_resolve_dataset(tmp_path):
    _write_images(tmp_path / "imgs" / "c", [(8, 8), (9, 9)])
    beton = resolve_dataset(tmp_path / "imgs", tmp_path / "run")
    assert beton == tmp_path / "run" / "imgs.beton" and len(BetonImages(beton)) == 2
    assert resolve_dataset(beton, tmp_path / "elsewhere") == beton
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_dataset(tmp_path / "nope", tmp_path)
    with pytest.raises(ValueError, match="embedded"):
        resolve_dataset("embedded:test", tmp_path)
