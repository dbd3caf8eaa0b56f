import pytest

from common.config import ConfigError, get_path, load_config, save_config

DEFAULTS = {
    "seed": 0,
    "model": {"features": [32, 64], "dropout": 0.1, "name": "unet"},
    "train": {"lr": 1e-3, "epochs": 10, "amp": True, "schedule": None},
    "class_weights": {},  # free-form
}


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_file_and_overrides_layer_in_order(tmp_path):
    base = write(tmp_path / "base.yaml", "train:\n  lr: 0.01\n  epochs: 3\n")
    cfg_path = write(tmp_path / "exp.yaml", "base: base.yaml\ntrain:\n  epochs: 5\nmodel:\n  dropout: 0.3\n")
    cfg = load_config(cfg_path, ["train.lr=3e-4", "model.features=[8,16,32]", "seed=7"], DEFAULTS)
    assert cfg["train"] == {"lr": 3e-4, "epochs": 5, "amp": True, "schedule": None}
    assert cfg["model"] == {"features": [8, 16, 32], "dropout": 0.3, "name": "unet"}
    assert cfg["seed"] == 7
    assert "base" not in cfg
    assert DEFAULTS["train"]["lr"] == 1e-3  # defaults untouched
    assert base.exists()


@pytest.mark.parametrize("override, expected", [
    ("train.lr=1e-4", 1e-4),          # YAML 1.1 reads this as a string; must become float
    ("train.lr=2", 2.0),              # int → float
    ("train.epochs=4.0", 4),          # integral float → int
    ("train.amp=false", False),
    ("train.schedule=cosine", "cosine"),  # null default accepts anything
    ("model.name=123", "123"),        # number → str for a str key
])
def test_override_types(override, expected):
    cfg = load_config(None, [override], DEFAULTS)
    key, _ = override.split("=")
    assert get_path(cfg, key) == expected
    assert type(get_path(cfg, key)) is type(expected)


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", r"unknown config key 'train.lrr'.*Did you mean 'lr'"),
    ("trian.lr=1", r"unknown config key 'trian'.*Did you mean 'train'"),
    ("train.epochs=abc", r"'train.epochs' must be int"),
    ("train.amp=1", r"'train.amp' must be bool"),
    ("model.features=5", r"'model.features' must be list"),
    ("train.lr.x=1", r"'train.lr' must be float"),
    ("train.lr", r"expected key=value"),
])
def test_override_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], DEFAULTS)


def test_unknown_key_in_file_names_file_and_valid_keys(tmp_path):
    path = write(tmp_path / "bad.yaml", "model:\n  dropuot: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [], DEFAULTS)
    text = str(info.value)
    assert "bad.yaml" in text and "model.dropuot" in text and "Did you mean 'dropout'" in text
    assert "features" in text and "name" in text  # lists the valid keys


def test_free_form_section_accepts_any_key(tmp_path):
    path = write(tmp_path / "a.yaml", "class_weights:\n  normal: 1\n  severe: 4\n")
    cfg = load_config(path, ["class_weights.moderate=2"], DEFAULTS)
    assert cfg["class_weights"] == {"normal": 1, "severe": 4, "moderate": 2}


def test_null_empties_an_inherited_free_form_table(tmp_path):
    write(tmp_path / "base.yaml", "class_weights:\n  normal: 1\n  severe: 4\n")
    path = write(tmp_path / "child.yaml", "base: base.yaml\nclass_weights: null\n")
    assert load_config(path, [], DEFAULTS)["class_weights"] == {}
    assert load_config(path, ["class_weights.x=2"], DEFAULTS)["class_weights"] == {"x": 2}


def test_base_include_is_one_level_only(tmp_path):
    write(tmp_path / "a.yaml", "seed: 1\n")
    write(tmp_path / "b.yaml", "base: a.yaml\nseed: 2\n")
    path = write(tmp_path / "c.yaml", "base: b.yaml\nseed: 3\n")
    with pytest.raises(ConfigError, match="one level"):
        load_config(path, [], DEFAULTS)


@pytest.mark.parametrize("text, message", [("seed: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "must be a mapping")])
def test_bad_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path / "x.yaml", text), [], DEFAULTS)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("does/not/exist.yaml", [], DEFAULTS)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=5e-4"], DEFAULTS)
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path, [], DEFAULTS) == cfg


def test_without_defaults_files_merge_freely(tmp_path):
    path = write(tmp_path / "a.yaml", "x: 1\nsub:\n  y: 2\n")
    assert load_config(path, ["sub.z=3"]) == {"x": 1, "sub": {"y": 2, "z": 3}}
