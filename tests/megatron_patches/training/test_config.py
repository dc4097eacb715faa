import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.training.config import Config, load_config


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_by_dotted_and_bare_megatron_names(tmp_path):
    path = _write(tmp_path, "model:\n  num_layers: 4\ntrain:\n  micro_batch_size: 2\n")
    cfg = load_config(path, ["train.global_batch_size=32", "lr=3e-4", "data_path=[1, a, 2, b]", "seed=7"])
    assert isinstance(cfg, Config)
    assert cfg.model.num_layers == 4
    assert cfg.train.micro_batch_size == 2 and cfg.train.global_batch_size == 32
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.data.data_path == [1, "a", 2, "b"]
    assert cfg.seed == 7


def test_int_is_accepted_for_float_fields_and_null_for_optional(tmp_path):
    cfg = load_config(None, ["lr=1", "lr_decay_iters=null"])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.lr_decay_iters is None


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "message"),
    [
        (
            "train:\n  micro_batch_sise: 2\n",
            [],
            "unknown config key 'train.micro_batch_sise'; did you mean 'micro_batch_size'?",
        ),
        ("", ["global_batch=4"], "unknown config key 'global_batch'; did you mean 'global_batch_size'?"),
        ("", ["train.micro_batch_size=two"], "config key 'train.micro_batch_size' expects int, got 'two'"),
        ("", ["bf16=1"], "config key 'train.bf16' expects bool, got 1"),
        ("", ["num_layers=true"], "config key 'model.num_layers' expects int, got True"),
        ("model: [1, 2]\n", [], "config section model must be a mapping, got [1, 2]"),
        ("", ["novalue"], "override 'novalue' is not of the form key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(tmp_path, yaml_text, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, yaml_text), overrides)
    assert str(err.value) == message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: {num_layers: [\n"))
