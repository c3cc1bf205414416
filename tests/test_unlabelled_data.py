"""A flat folder of unlabelled images (label -1): training works, kNN says why it cannot run.

The custom-dataset path a new user takes: the same images as class sub-folders give a kNN number;
as one flat folder they train the same, and the evaluation is skipped with a clear message instead of
the `index -1 is out of bounds` crash it used to be.
"""
import shutil

import pytest
import torch
from _train_utils import tiny_config, write_image_folder

from dinovmf.cli import main
from dinovmf.eval.knn import knn_classify
from dinovmf.eval.run import UnlabelledDataError, dataset_features
from dinovmf.models import build_backbone
from dinovmf.train import train


def flat_copy(labelled, flat):
    """All images of a class-folder tree in one flat folder (unique names)."""
    flat.mkdir(parents=True)
    for f in sorted(labelled.rglob("*.png")):
        shutil.copy(f, flat / f"{f.parent.name}_{f.name}")
    return flat


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    base = tmp_path_factory.mktemp("flat")
    return flat_copy(write_image_folder(base / "labelled", "train", per_class=4), base / "flat")


def test_training_on_unlabelled_images_skips_knn_with_a_message(flat, tmp_path, capsys):
    summary = train(tiny_config(flat, flat, ["steps=2"]), tmp_path)
    out = capsys.readouterr().out
    assert summary["step"] == 2 and "knn_top1" not in summary
    assert "kNN skipped" in out and "need class labels" in out and str(flat) in out
    assert (tmp_path / "checkpoints" / "step_0000002").is_dir()


def test_training_without_data_val_says_there_is_no_knn(flat, tmp_path, capsys):
    summary = train(tiny_config(flat, flat, ["steps=1", "data.val=null"]), tmp_path)
    assert summary["step"] == 1 and "knn_top1" not in summary
    assert "no kNN evaluation: data.val is not set" in capsys.readouterr().out


def test_unlabelled_images_are_a_clear_error_for_eval_and_the_features(flat, tmp_path, capsys):
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=1)
    with pytest.raises(UnlabelledDataError, match="40 unlabelled image"):
        dataset_features(backbone, flat, 32, 16, "cpu", loader_backend="pil", num_workers=0)
    torch.save({"step": 0, "model_args": {"name": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1},
                "teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, tmp_path / "c.pt")
    assert main(["eval", "knn", str(tmp_path / "c.pt"), "--train", str(flat), "--val", str(flat),
                 "--loader", "pil"]) == 2
    err = capsys.readouterr().err
    assert "dinovmf eval: error:" in err and "need class labels" in err and "Traceback" not in err


def test_knn_rejects_negative_labels():
    feats = torch.randn(4, 3)
    with pytest.raises(ValueError, match="class indices >= 0"):
        knn_classify(feats, torch.tensor([0, 1, -1, 0]), feats, torch.tensor([0, 1, 1, 0]))
