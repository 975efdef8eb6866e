import re

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


def test_unknown_attribute_in_get_config_is_an_error(tmp_path):
    (tmp_path / "typo.py").write_text("from toyjax.config import Config\n\n\ndef get_config():\n"
                                      "    config = Config()\n    config.model.moe.n_expert = 4\n    return config\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.moe.n_expert'; did you mean 'model.moe.n_experts'"):
        config_lib.load_config_file(tmp_path / "typo.py")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.step'; did you mean 'train.steps'"):
        Config().train.step = 3
    cfg = Config()
    cfg.model.d_model = 64  # a real field still sets
    assert cfg.model.d_model == 64 and "d_modle" not in vars(cfg.model)


def test_tiny_config_rejects_unknown_keys_and_bad_values():
    from toyjax.testing import tiny_config

    assert tiny_config(model={"d_model": 64}).model.d_model == 64
    with pytest.raises(ConfigError, match=r"unknown config key 'model.d_modle'; did you mean 'model.d_model'"):
        tiny_config(model={"d_modle": 64})
    with pytest.raises(ConfigError, match=r"model.n_heads=3 must divide model.d_model=32"):
        tiny_config(model={"n_heads": 3})


def test_every_experiment_config_validates():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "experiments" / "configs").glob("*.py")):
        cfg = config_lib.load_config_file(path)
        assert config_lib.validate(cfg) is cfg, path.name


def _with(**values) -> Config:
    cfg = Config()
    for key, value in values.items():
        section, _, name = key.rpartition("__")
        node = cfg
        for part in section.split("__"):
            node = getattr(node, part)
        setattr(node, name, value)
    return cfg


def test_validate_is_a_pure_check_of_each_rule():
    good = [Config(), _with(model__attention="topk", model__attention_top_k=1),
            _with(model__ffn="moe", model__moe__n_experts=1, model__moe__top_k=1),
            _with(model__positions="rotary", model__n_heads=4), _with(data__source="structured", train__loss="valid_subset"),
            _with(data__source="mixed", data__structured_share=1.0, model__grammar_state_embedding=True),
            _with(model__ffn="dense", model__moe__n_experts=0),  # the moe section is read only when ffn='moe'
            _with(tokenizer__vocab_size=8, tokenizer__kind="phrase", tokenizer__simplify="unk")]
    for cfg in good:
        before = cfg.to_dict()
        assert config_lib.validate(cfg) is cfg and cfg.to_dict() == before
    bad = {
        "model.attention 'sparse'; registered: dense, topk": _with(model__attention="sparse"),
        "model.ffn 'mlp'; registered: dense, moe": _with(model__ffn="mlp"),
        "model.moe.n_experts=0 must be >= 1 with model.ffn='moe'": _with(model__ffn="moe", model__moe__n_experts=0),
        "model.moe.top_k=3 must be between 1 and model.moe.n_experts=2": _with(model__ffn="moe", model__moe__n_experts=2,
                                                                               model__moe__top_k=3),
        "model.moe.router='gshard' must be one of 'noisy_topk', 'switch'": _with(model__moe__router="gshard"),
        "model.moe.dispatch='scatter' must be one of 'auto', 'einsum', 'sort'": _with(model__moe__dispatch="scatter"),
        "model.attention_top_k=0 must be >= 1 with model.attention='topk'": _with(model__attention="topk",
                                                                                 model__attention_top_k=0),
        "model.n_heads=3 must divide model.d_model=128": _with(model__n_heads=3),
        "model.positions='rotary' needs an even head size": _with(model__positions="rotary", model__d_model=12,
                                                                  model__n_heads=4),
        "model.positions='alibi' must be one of 'learned', 'rotary'": _with(model__positions="alibi"),
        "model.dtype='int8' must be one of": _with(model__dtype="int8"),
        "model.max_len=1 must be >= 2": _with(model__max_len=1),
        "model.dropout=1.0 must be in [0, 1)": _with(model__dropout=1.0),
        "tokenizer.vocab_size=7 must be >= 8": _with(tokenizer__vocab_size=7),
        "tokenizer.kind='bpe' must be one of 'topword', 'phrase'": _with(tokenizer__kind="bpe"),
        "tokenizer.simplify='magic' must be one of 'nearest', 'unk', 'contextual'": _with(tokenizer__simplify="magic"),
        "train.loss='valid_subset' needs a grammar": _with(train__loss="valid_subset"),
        "model.grammar_state_embedding=True needs a grammar": _with(model__grammar_state_embedding=True),
        "train.loss='nll' must be one of 'full', 'valid_subset'": _with(train__loss="nll"),
        "train.steps=0 must be >= 1": _with(train__steps=0),
        "train.learning_rate=0.0 must be > 0": _with(train__learning_rate=0.0),
        "train.sample_temperature=0.0 must be > 0": _with(train__sample_temperature=0.0),
        "data.valid_fraction=1.0 must be in (0, 1)": _with(data__valid_fraction=1.0),
        "data.structured_share=1.5 must be in [0, 1]": _with(data__structured_share=1.5),
        "data.source='' must name a corpus": _with(data__source=""),
        "model.d_model='128' must be int": _with(model__d_model="128"),
        "train.learning_rate=nan must be a finite float": _with(train__learning_rate=float("nan")),
    }
    for message, cfg in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_lib.validate(cfg)


def test_every_problem_is_reported_in_one_error():
    with pytest.raises(ConfigError, match=r"model.max_len=0 must be >= 2; train.steps=-5 must be >= 1"):
        config_lib.apply_overrides(Config(), ["--config.train.steps=-5", "--config.model.max_len=0"])
    with pytest.raises(ConfigError, match="train.steps=-5"):
        config_lib.from_dict({"train": {"steps": -5}})
