import tomllib

import pytest

from fedloom.config import Config, config_from_dict, load_config, to_toml
from fedloom.errors import ConfigError


def test_defaults_round_trip_through_commented_toml():
    cfg = Config()
    text = to_toml(cfg)
    assert "# local SGD learning rate" in text
    assert config_from_dict(tomllib.loads(text)) == cfg


def test_overrides_are_typed_by_toml():
    cfg = load_config(None, ["client.lr=0.25", "model.hidden=[32, 16]", "run.name=abc", "client.max_steps=5"])
    assert cfg.client.lr == 0.25 and cfg.model.hidden == [32, 16] and cfg.run.name == "abc"
    assert cfg.client.max_steps == 5


@pytest.mark.parametrize("override,key,words", [
    ("client.lr=-1", "client.lr", "must be > 0"),
    ("client.lr=\"fast\"", "client.lr", "must be a number"),
    ("client.batch_size=2.5", "client.batch_size", "must be an integer"),
    ("server.optimizer=adamw", "server.optimizer", "must be one of"),
    ("server.beta2=1.5", "server.beta2", "between 0 and 1"),
    ("run.rounds=0", "run.rounds", "must be >= 1"),
    ("client.lrr=1", "client.lrr", "unknown setting"),
    ("trainer.lr=1", "trainer", "unknown section"),
    ("data.partition=iid", "data.partition", "natural"),
    ("model.name=logreg", "model.name", "does not fit"),
    ("data.train_fraction=1.0", "data.train_fraction", "strictly between"),
    ("lr=1", "lr", "section.key=value"),
])
def test_bad_values_name_their_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.key == key
    assert str(err.value).startswith(key) and words in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[client\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_configuration_reference_is_current():
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert to_toml(Config()) in doc
