"""Configs that used to pass validation and fail (or do nothing) later: plan_run stops them, one line."""

from pathlib import Path

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.training.config import load_config
from megatron_patches.training.validate import plan_run
from tests.megatron_patches.training.corpus import write_corpus
from tests.megatron_patches.training.test_train import tiny_args
from tests.tiny_hf import VOCAB, build_tokenizer


@pytest.fixture
def args(tmp_path):
    prefix = write_corpus(tmp_path / "data", "zh", 20, 128, seed=1)
    return tiny_args(tmp_path / "run", [1, prefix])


def _plan(args, *extra):
    return plan_run(load_config(None, [*args, *extra]), world_size=1)


def test_the_base_config_is_valid(args):
    plan = _plan(args, "logging.eval_interval=5")
    assert plan.resume_from is None and plan.pretrained is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["data.split=100,0,0", "logging.eval_interval=5"],
            "logging.eval_interval is set but data.split '100,0,0' leaves no validation data",
        ),
        (["data.split=99,x,0"], "data.split must be 'train,valid,test' weights"),
        (["data.split=0,1,0"], "data.split must be 'train,valid,test' weights with a positive train share"),
        (["model.make_vocab_size_divisible_by=0"], "model.make_vocab_size_divisible_by must be positive"),
        (["checkpoint.async_save=true"], "checkpoint.async_save=true is not supported"),
        (
            ["data.reset_attention_mask=true", "model.transformer_impl=transformer_engine"],
            "data.reset_attention_mask=true needs model.transformer_impl=local",
        ),
    ],
)
def test_bad_values_are_refused_in_validation(args, extra, message):
    with pytest.raises(ConfigError) as err:
        _plan(args, *extra)
    assert message in str(err.value)


def test_load_from_a_directory_without_a_checkpoint_is_refused(args, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"checkpoint.load .*empty holds no checkpoint"):
        _plan(args, f"checkpoint.load={tmp_path / 'empty'}")
    # The save directory itself is fine: that is a resumable job's first launch.
    save = tmp_path / "ckpt"
    assert _plan(args, f"checkpoint.load={save}", f"checkpoint.save={save}").resume_from is None


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(args, tmp_path):
    build_tokenizer(tmp_path / "tok")
    with pytest.raises(ConfigError) as err:
        _plan(args, f"data.tokenizer={tmp_path / 'tok'}")
    tok = tmp_path / "tok"
    assert str(err.value) == f"tokenizer {tok} needs vocab_size {VOCAB} but model.vocab_size is 128"
    _plan(args, f"data.tokenizer={tmp_path / 'tok'}", f"model.vocab_size={VOCAB}")


def test_transformer_impl_auto_takes_te_only_where_it_runs(monkeypatch):
    from megatron_patches.training import model

    cfg = model.ModelConfig(transformer_impl="auto")
    assert model.resolve_transformer_impl(cfg).transformer_impl == "local"  # this CPU machine
    monkeypatch.setattr(model, "transformer_engine_usable", lambda: True)
    assert model.resolve_transformer_impl(cfg).transformer_impl == "transformer_engine"
    explicit = model.ModelConfig(transformer_impl="local")
    assert model.resolve_transformer_impl(explicit) is explicit


def test_the_7b_config_validates_on_this_machine_with_auto(tmp_path):
    from megatron_patches.training.run import describe

    config = Path(__file__).resolve().parents[3] / "launch" / "configs" / "llama2_7b.yaml"
    cfg = load_config(config, ["data.mock=true", f"run_dir={tmp_path}"])
    plan = plan_run(cfg, world_size=16)
    assert "transformer: local (sdpa attention)" in describe(cfg, plan)
