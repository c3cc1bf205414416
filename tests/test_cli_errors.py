"""Bad input to `dinovmf train` / `dinovmf eval` gives one clear error line and exit status 2."""
import pytest

from dinovmf.cli import main


def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_missing_training_data(tmp_path, capsys):
    code, err = run_cli(["train", "--out", str(tmp_path / "run"), f"data.train={tmp_path}/nowhere"], capsys)
    assert code == 2
    assert "dinovmf train: error:" in err and "nowhere" in err and "does not exist" in err
    assert "Traceback" not in err


def test_bad_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {arch: vit_tiny\n")
    code, err = run_cli(["train", "--config", str(bad), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "not valid YAML" in err


def test_unknown_key_suggests(tmp_path, capsys):
    code, err = run_cli(["train", "--out", str(tmp_path / "run"), "optim.learning_rate=1e-3"], capsys)
    assert code == 2 and "unknown key 'optim.learning_rate'" in err
    code, err = run_cli(["train", "--out", str(tmp_path / "run"), "train.batchsize=8"], capsys)
    assert code == 2 and "did you mean 'train.batch_size'" in err


def test_unknown_preset_and_bad_values(tmp_path, capsys):
    code, err = run_cli(["train", "--config", "vit_b16_inlk", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "did you mean 'vit_b16_in1k'" in err
    code, err = run_cli(["train", "--out", str(tmp_path / "run"), "method=simclr"], capsys)
    assert code == 2 and "method must be one of" in err


def test_missing_resume_checkpoint(tmp_path, capsys):
    code, err = run_cli(["train", "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "ckpt.pt")], capsys)
    assert code == 2 and "does not exist" in err


def test_eval_missing_or_bad_checkpoint(tmp_path, capsys):
    code, err = run_cli(["eval", "knn", str(tmp_path / "missing.pt"), "--train", "embedded", "--val", "embedded"],
                        capsys)
    assert code == 2 and "dinovmf eval: error:" in err and "does not exist" in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    code, err = run_cli(["eval", "linear", str(junk), "--train", "embedded", "--val", "embedded"], capsys)
    assert code == 2 and "cannot be read" in err


def test_eval_requires_data_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "knn", "ckpt.pt", "--train", "embedded"])
    assert e.value.code == 2 and "--val" in capsys.readouterr().err
