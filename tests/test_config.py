import pytest

from toyjax import config as config_lib
from toyjax.config import Config, ConfigError


def test_overrides_are_typed():
    cfg = config_lib.apply_overrides(Config(), ["--config.model.d_model=256", "config.train.learning_rate=1e-4",
                                                "--config.model.tie_embeddings=false", "--config.model.moe.top_k=1"])
    assert cfg.model.d_model == 256 and isinstance(cfg.model.d_model, int)
    assert cfg.train.learning_rate == 1e-4
    assert cfg.model.tie_embeddings is False
    assert cfg.model.moe.top_k == 1


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.d_modle'; did you mean 'model.d_model'\?"):
        config_lib.apply_overrides(Config(), ["--config.model.d_modle=3"])


def test_bad_value_and_section_errors():
    with pytest.raises(ConfigError, match="model.n_layers.*expects int"):
        config_lib.apply_overrides(Config(), ["--config.model.n_layers=four"])
    with pytest.raises(ConfigError, match="is a section"):
        config_lib.apply_overrides(Config(), ["--config.model.moe=3"])
    with pytest.raises(ConfigError, match="must look like"):
        config_lib.apply_overrides(Config(), ["--config.model.d_model"])


def test_json_round_trip_and_unknown_keys(tmp_path):
    cfg = config_lib.apply_overrides(Config(), ["--config.model.grammar_feature_sizes=3,5"])
    config_lib.save(cfg, tmp_path / "c.json")
    assert config_lib.load(tmp_path / "c.json") == cfg
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        config_lib.from_dict({"train": {"stepz": 3}})


def test_config_file_errors(tmp_path):
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no get_config"):
        config_lib.load_config_file(tmp_path / "bad.py")
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load_config_file(tmp_path / "missing.py")


def test_every_experiment_config_loads_and_documents_its_command():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "experiments" / "configs").glob("*.py"))
    assert files, "no experiment configs found"
    for path in files:
        cfg = config_lib.load_config_file(path)
        doc = path.read_text().split('"""')[1]
        assert "python launch.py" in doc or "python experiments/" in doc, f"{path.name}: docstring gives no command"
        assert isinstance(cfg, Config)
