"""Config loading: presets, YAML files, dotted overrides, and the errors for bad input."""
import pytest

from dinovmf.config import Config, all_keys, available_presets, config_from_dict, dump_yaml, load_config


def test_every_preset_loads_and_round_trips():
    assert {"demo", "vit_s16_in1k", "vit_b16_in1k", "vit_l16_in1k"} <= set(available_presets())
    for name in available_presets():
        cfg = load_config(name, ["model.init_from=weights.pth"] if name == "continue" else [])  # it needs weights
        assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_are_coerced_to_the_field_type():
    cfg = load_config("demo", ["optim.lr=1e-3", "steps=7", "crops.global_scale=0.2,1",
                               "data.val=null", "model.norm_last_layer=true", "train.compile=no"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.steps == 7
    assert cfg.crops.global_scale == (0.2, 1.0)
    assert cfg.data.val is None
    assert cfg.model.norm_last_layer is True and cfg.train.compile is False


def test_method_decides_prototype_norms_and_centering():
    dino, vmf = load_config(None, ["method=dino"]), load_config(None, ["method=dino_vmf"])
    assert (dino.norm_last_layer, dino.vmf, dino.centering) == (True, False, "logit")
    assert (vmf.norm_last_layer, vmf.vmf, vmf.centering) == (False, True, "prob")
    assert load_config(None, ["method=dino", "loss.centering=sinkhorn"]).centering == "sinkhorn"


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("steps: 3\noptim:\n  lr: 0.5\n")
    cfg = load_config(str(path), ["optim.lr=0.25"])
    assert cfg.steps == 3 and cfg.optim.lr == 0.25
    assert cfg.model == Config().model  # untouched groups keep the defaults


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "did you mean 'optim.lr'"),
    ("stesp=3", "did you mean 'steps'"),
    ("model.achr=vit_tiny", "did you mean 'model.arch'"),
    ("steps=abc", "steps expects an integer"),
    ("steps=1.5", "steps expects an integer"),
    ("train.compile=maybe", "train.compile expects true/false"),
    ("crops.global_scale=0.4", "expects 2 values"),
    ("method=dinovmf", "did you mean 'dino_vmf'"),
    ("optim=3", "is a group"),
    ("steps", "must look like key=value"),
    ("train.batch_size=0", "train.batch_size must be > 0"),
    ("model.depth=0", "model.depth must be >= 1"),
    ("augment.hue=0.7", r"augment.hue must be in \[0, 0.5\]"),
    ("augment.gray_p=1.5", "augment.gray_p must be a probability"),
    ("augment.blur_p=1,0.1,2", r"augment.blur_p\[2\] must be a probability"),
    ("augment.blur_sigma=0,1", "augment.blur_sigma must satisfy 0 < low <= high"),
    ("augment.contrast=-1", "augment.contrast must be >= 0"),
    ("augment.hues=0.5", "did you mean 'augment.hue'"),
    ("dist.bucket_cap_mb=0", "dist.bucket_cap_mb must be a positive number of MiB"),
    ("dist.bucket_cap_mb=nan", "dist.bucket_cap_mb must be a positive number of MiB"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("demo", [override])


def test_unknown_key_in_yaml_suggests_the_closest(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("optim:\n  weight_decya: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key 'optim.weight_decya' in .*typo.yaml.*'optim.weight_decay'"):
        load_config(str(path))


def test_bad_yaml_and_missing_files(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: {lr: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(path))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_config(str(tmp_path / "list.yaml"))
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match="did you mean 'demo'"):
        load_config("dmeo")


def test_dump_yaml_reloads(tmp_path):
    cfg = load_config("vit_b16_in1k", ["steps=11"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(str(path)) == cfg
    assert "optim.lr" in all_keys() and "data.train" in all_keys()


def test_one_definition_of_methods_and_centering_modes():
    """config validates against the definitions the code dispatches on: no second list to drift."""
    from dinovmf.centering import CENTERING_MODES
    from dinovmf.config import METHODS
    from dinovmf.objectives import OBJECTIVES

    assert set(OBJECTIVES) == set(METHODS)
    for mode in CENTERING_MODES:
        assert load_config(None, [f"loss.centering={mode}"]).centering == mode
    with pytest.raises(ValueError, match="loss.centering"):
        load_config(None, ["loss.centering=mean"])
    assert load_config(None, ["model.depth=none"]).model.depth is None  # "none" is null for a non-string field


def test_ddp_knobs_are_refused_on_an_fsdp2_run():
    assert load_config("vit_b16_in1k", ["dist.static_graph=true"]).dist.static_graph  # DDP: accepted
    for knob in ("dist.bucket_cap_mb=50", "dist.gradient_as_bucket_view=true", "dist.static_graph=true"):
        with pytest.raises(ValueError, match=rf"{knob.split('=')[0]} is a DDP setting, but this run uses FSDP2"):
            load_config("vit_l16_in1k", [knob])  # its preset sets dist.fsdp=true
