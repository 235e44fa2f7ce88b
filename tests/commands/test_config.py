import pytest

from mpiattn import config
from mpiattn.errors import ConfigError


def test_defaults_are_bert_base():
    cfg = config.load()
    m = cfg.model
    assert (m.layers, m.heads, m.hidden, m.ffn) == (12, 12, 768, 3072)
    assert (cfg.input.batch, cfg.input.seq_len, cfg.dtype) == (8, 128, "float32")


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nlayer = 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.layer'.*'model.layers'"):
        config.load(path)


@pytest.mark.parametrize(("override", "message"), [
    ("model.layers=2.5", "must be int"),
    ("model.layers=true", "must be int"),
    ("model.heads=0", "must be positive"),
    ("input.batch=-3", "must be positive"),
    ("dtype=float16", "valid values are float32, float64"),
    ("model.hidden=100", "not a multiple of model.heads"),
    ("input.seq_len=600", "exceeds model.max_positions"),
    ("parallel.tensor=-1", ">= 0"),
    ("nonsense", "expects KEY=VALUE"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, [override])


def test_set_values_are_toml(tmp_path):
    cfg = config.load(None, ["model.layers=3", 'dtype="float64"', "output.path=x.h5",
                             "model.layer_norm_eps=1"])
    assert cfg.model.layers == 3 and cfg.dtype == "float64" and cfg.output.path == "x.h5"
    assert cfg.model.layer_norm_eps == 1.0 and isinstance(cfg.model.layer_norm_eps, float)
    assert cfg.explicit == {"model.layers", "dtype", "output.path", "model.layer_norm_eps"}


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 7\n[model]\nlayers = 2\n[input]\nbatch = 3\n')
    cfg = config.load(path, ["input.batch=5"])
    assert (cfg.seed, cfg.model.layers, cfg.input.batch) == (7, 2, 5)


def test_broken_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


def test_world_checks():
    cfg = config.load()
    assert config.check_world(cfg, 4) == (4, 1)
    assert config.check_world(config.load(None, ["parallel.tensor=2"]), 4) == (2, 2)
    with pytest.raises(ConfigError, match="does not divide"):
        config.check_world(config.load(None, ["parallel.tensor=3"]), 4)
    with pytest.raises(ConfigError, match="parallel.tensor <= 12"):
        config.check_world(cfg, 13)
    with pytest.raises(ConfigError, match="input.batch"):
        config.check_world(config.load(None, ["parallel.tensor=1", "input.batch=2"]), 3)


def test_toml_round_trip():
    cfg = config.load(None, ["model.layers=3", 'input.text="a \\"b\\".txt"',
                             'fault.inject=[{rank=1, layer=0, site="mlp", index=3, bit=30}]'])
    import tomllib

    again = config.from_dict(config._flatten(tomllib.loads(cfg.to_toml())))
    assert again == cfg
