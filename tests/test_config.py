import pytest

from minigpt_jax import config as cfg
from minigpt_jax.config import Config, ConfigError


def test_baseline_matches_spec():
    c = cfg.experiment_config("baseline")
    assert ((c.vocab_size, c.seq_len, c.embed_dim, c.n_heads, c.n_layers, c.ffn_mult)
            == (50257, 64, 128, 4, 2, 4))
    assert ((c.lr, c.batch_size, c.max_epochs, c.dropout, c.segmentation)
            == (5e-4, 32, 1, 0.1, "pytorch"))


def test_experiments_are_overrides_of_baseline():
    assert list(cfg.EXPERIMENTS) == ["baseline", "lr_1e-3", "batch_size_16", "n_layers_1",
                                     "embed_dim_64"]
    assert cfg.experiment_config("lr_1e-3").lr == 1e-3
    assert cfg.experiment_config("batch_size_16").batch_size == 16
    assert cfg.experiment_config("n_layers_1").n_layers == 1
    e = cfg.experiment_config("embed_dim_64")
    assert (e.embed_dim, e.head_dim) == (64, 16)
    # user overrides change the baseline; the experiment's own override wins
    e = cfg.experiment_config("embed_dim_64", {"embed_dim": 32, "lr": 1e-2})
    assert (e.embed_dim, e.lr) == (64, 1e-2)


@pytest.mark.parametrize("overrides, message", [
    ({"seq_len": 31}, "seq_len=31: must be in [32, 4096]"
                      " (segmentation=pytorch keeps segments of at least 32"),
    ({"seq_len": 1, "segmentation": "chunks"}, "seq_len=1: must be in [2, 4096]"),
    ({"seq_len": 4097}, "seq_len=4097: must be in [32, 4096]"),
    ({"segmentation": "tokens"}, "segmentation='tokens': must be one of pytorch, chunks"),
    ({"embed_dim": 130}, "embed_dim=130: must be divisible by n_heads=4"),
    ({"embed_dim": 0}, "embed_dim=0: must be a positive integer"),
    ({"n_heads": -1}, "n_heads=-1: must be a positive integer"),
    ({"n_layers": 0}, "n_layers=0: must be a positive integer"),
    ({"batch_size": 0}, "batch_size=0: must be a positive integer"),
    ({"batch_size": -4}, "batch_size=-4: must be a positive integer"),
    ({"lr": 0.0}, "lr=0.0: must be > 0"),
    ({"lr": -1e-3}, "lr=-0.001: must be > 0"),
    ({"dropout": 1.0}, "dropout=1.0: must be in [0, 1)"),
    ({"dropout": -0.1}, "dropout=-0.1: must be in [0, 1)"),
    ({"vocab_size": 1000}, "vocab_size=1000: must be > 50256"),
    ({"dtype": "float16"}, "dtype='float16': must be one of float32, bfloat16"),
    ({"batch_size": 2.5}, "batch_size=2.5: expected int"),
])
def test_invalid_values_are_rejected_with_field_and_range(overrides, message):
    with pytest.raises(ConfigError) as e:
        Config().replace(**overrides)
    assert message in str(e.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError,
                       match="unknown config key learning_rate; valid keys: vocab_size, seq_len"):
        Config().replace(learning_rate=1.0)


def test_parse_overrides():
    assert cfg.parse_overrides(["lr=1e-3", "n_layers=1", "dtype=bfloat16"]) == {
        "lr": 1e-3, "n_layers": 1, "dtype": "bfloat16"}
    with pytest.raises(ConfigError, match="n_layers='two': expected int"):
        cfg.parse_overrides(["n_layers=two"])
    with pytest.raises(ConfigError, match="expected key=value"):
        cfg.parse_overrides(["lr"])
    with pytest.raises(ConfigError, match="unknown config key 'foo'"):
        cfg.parse_overrides(["foo=1"])
    with pytest.raises(ConfigError, match="unknown experiment 'nope'; valid: baseline, lr_1e-3"):
        cfg.experiment_config("nope")


def test_config_json_round_trip():
    c = cfg.experiment_config("embed_dim_64")
    assert Config.from_dict(c.to_dict()) == c
