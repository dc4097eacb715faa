"""The probes patch on the real Megatron-Core model: right numbers at any layout, training untouched."""

import json
from pathlib import Path

import pytest
import torch

from megatron_patches import probes
from megatron_patches.errors import ConfigError
from megatron_patches.hooks import enable_patch
from megatron_patches.parallel import Layout, initialize
from megatron_patches.probe_scoring import probe_scores
from megatron_patches.training.config import Config, LoggingConfig
from megatron_patches.training.model import ModelConfig, build_model_for_this_rank
from tests.dist import run_on_ranks
from tests.megatron_patches.training.test_train import _train, losses, tiny_args
from tests.probe_reference import PROBES_YAML, hand_scores
from tests.tiny_hf import build_tokenizer, write_token_corpus

# Vocabulary 512 pads to 512 at TP 1 and TP 2 alike, so one checkpoint loads at both layouts.
MODEL = dict(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=512,
    max_position_embeddings=64,
)


def _config() -> Config:
    return Config(model=ModelConfig(**MODEL), logging=LoggingConfig(eval_interval=1))


def _hand_scores(tokenizer_dir: str, model) -> dict[str, float]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return hand_scores(tokenizer, lambda ids: model(ids, torch.arange(ids.shape[1])[None], None))


def _score_at_tp1_and_save(options: dict, checkpoint_dir: str) -> tuple[dict, dict]:
    from megatron.core import dist_checkpointing

    cfg = _config()
    initialize(Layout(1), seed=7, model=cfg.model)
    model = build_model_for_this_rank(cfg.model).eval()
    hook = enable_patch("probes", options, cfg)
    sums, counts = probes.score_rows(model, hook.batch, hook.vocab_size, micro_batch_size=3)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, checkpoint_dir)
    return probe_scores(hook.probes, sums, counts), _hand_scores(options["tokenizer"], model)


def _score_at(
    tp: int, pp: int, options: dict, checkpoint_dir: str, vpp: int | None = None, micro_batch_size: int = 2
) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_patches.training.checkpoint import load_model_state, model_sharded_state
    from megatron_patches.training.model import build_model_chunks_for_this_rank

    cfg = _config()
    initialize(Layout(torch.distributed.get_world_size(), tp, pp, vpp), seed=11, model=cfg.model)
    chunks = build_model_chunks_for_this_rank(cfg.model)  # with VPP: model chunks, as the trainer holds
    model = torch.nn.ModuleList(chunks) if vpp else chunks[0]
    load_model_state(model, dist_checkpointing.load(model_sharded_state(model), checkpoint_dir))
    model.train()  # as the trainer leaves it: the patch switches to eval and back
    hook = enable_patch("probes", options, cfg)
    sums, counts = probes.score_rows(model, hook.batch, hook.vocab_size, micro_batch_size)
    assert model.training
    return probe_scores(hook.probes, sums, counts)


@pytest.fixture(scope="module")
def probe_options(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes")
    build_tokenizer(root / "tok")
    (root / "probes.yaml").write_text(PROBES_YAML)
    return {"file": str(root / "probes.yaml"), "tokenizer": str(root / "tok")}


def test_scores_equal_hand_computation_from_the_models_logits_at_tp2_pp2(tmp_path, probe_options):
    checkpoint = tmp_path / "weights"
    checkpoint.mkdir()
    [(patch, hand)] = run_on_ranks(_score_at_tp1_and_save, 1, probe_options, str(checkpoint))
    assert patch == pytest.approx(hand, rel=1e-6, abs=1e-5)
    per_rank = run_on_ranks(_score_at, 4, 2, 2, probe_options, str(checkpoint))
    # interleaved pipeline: the one micro-batch of 8 rows is padded to a multiple of PP for its schedule
    per_rank += run_on_ranks(_score_at, 2, 1, 2, probe_options, str(checkpoint), 2, 8)
    for scores in per_rank:  # the last stage computed; every rank, the logging rank too, has it
        assert scores == pytest.approx(hand, rel=1e-5, abs=1e-4)


def _tensorboard_scalars(run_dir: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith(prefix)]
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags}


def test_probes_are_logged_and_leave_the_training_losses_bit_identical(tmp_path, probe_options):
    tokenizer = build_tokenizer(tmp_path / "tok")
    data = [1, write_token_corpus(tmp_path / "data", "facts", tokenizer, 200, seed=3)]
    common = (
        f"data.eod_id={tokenizer.eos_token_id}",
        "model.vocab_size=320",
        "parallel.pipeline_model_parallel_size=2",
        "train.train_iters=24",
        "model.hidden_dropout=0.1",  # dropout on: a consumed RNG draw would change the losses
        "model.attention_dropout=0.1",
        "logging.eval_interval=8",
        "logging.eval_iters=1",
        "checkpoint.save_at_end=false",
    )
    plain = tiny_args(tmp_path / "plain", data, *common)
    probed = tiny_args(tmp_path / "probed", data, *common, f"patches.probes={json.dumps(probe_options)}")
    assert run_on_ranks(_train, 2, plain, timeout=600) == [0, 0]
    assert run_on_ranks(_train, 2, probed, timeout=600) == [0, 0]
    assert losses(tmp_path / "probed") == losses(tmp_path / "plain")
    logged = _tensorboard_scalars(tmp_path / "probed", "probe/")
    assert sorted(logged) == ["probe/beijing_vs_tokyo", "probe/boils_ppl", "probe/capital_zh", "probe/paris"]
    assert [step for step, _ in logged["probe/paris"]] == [8, 16, 24]
    paris = [value for _, value in logged["probe/paris"]]
    assert paris[-1] > paris[0] + 1.0, paris  # the model learns the fact it reads
    assert not _tensorboard_scalars(tmp_path / "plain", "probe/")


@pytest.mark.parametrize(
    ("options", "overrides", "message"),
    [
        ({"tokenizer": ""}, {}, "patches.probes needs 'tokenizer'"),
        ({"tokenizer": None}, {}, "config key 'patches.probes.tokenizer' expects str, got None"),
        ({"bogus": 1}, {}, "unknown config key 'patches.probes.bogus'"),
        ({"fle": "x"}, {}, "unknown config key 'patches.probes.fle'; did you mean 'file'?"),
        ({}, {"eval_interval": None}, "set logging.eval_interval"),
        ({}, {"vocab_size": 100}, "gives token id"),
        ({"micro_batch_size": 0}, {}, "micro_batch_size must be a positive integer"),
    ],
)
def test_bad_options_are_refused_at_enable(probe_options, options, overrides, message):
    cfg = _config()
    cfg.logging.eval_interval = overrides.get("eval_interval", 1)
    cfg.model.vocab_size = overrides.get("vocab_size", cfg.model.vocab_size)
    with pytest.raises(ConfigError) as err:
        enable_patch("probes", {**probe_options, **options}, cfg)
    assert message in str(err.value)


def _megatron_scores_of_converted(mcore_dir: str, options: dict) -> dict:
    from tools.convert import mcore_io

    model_cfg = mcore_io.read_model_config(mcore_dir)
    cfg = Config(model=model_cfg, logging=LoggingConfig(eval_interval=1))
    initialize(Layout(torch.distributed.get_world_size(), 2, 2), seed=0, model=model_cfg)
    model = build_model_for_this_rank(model_cfg)
    from megatron.core import parallel_state as ps

    state, _ = mcore_io.load_model_for_rank(
        mcore_dir, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), 2
    )
    model.load_state_dict(state, strict=True)
    hook = enable_patch("probes", options, cfg)
    sums, counts = probes.score_rows(model, hook.batch, hook.vocab_size, micro_batch_size=2)
    return probe_scores(hook.probes, sums, counts)


def test_megatron_and_hf_scores_agree_on_a_converted_checkpoint(tmp_path, probe_options):
    import transformers

    from megatron_patches.probe_scoring import load_probes
    from tests.tiny_hf import build_model
    from tests.tools.convert.tiny import randomize
    from tools.convert import commands
    from tools.eval.probes import score_hf
    from tools.hf_runtime.loading import load_model, load_tokenizer

    hf_dir = build_model(tmp_path / "hf", "llama", num_hidden_layers=4)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    randomize(model, seed=5).save_pretrained(hf_dir)  # O(1) activations: scores far from uniform
    commands.hf2mcore(str(hf_dir), str(tmp_path / "mcore"), tp=2, pp=2, quiet=True)
    options = {**probe_options, "tokenizer": str(hf_dir)}

    per_rank = run_on_ranks(_megatron_scores_of_converted, 4, str(tmp_path / "mcore"), options)
    hf = score_hf(load_model(hf_dir, "float32", "cpu"), load_tokenizer(hf_dir), load_probes(options["file"]))
    assert len({json.dumps(s, sort_keys=True) for s in per_rank}) == 1  # every rank got the same numbers
    assert set(per_rank[0]) == set(hf) and len(hf) >= 3
    assert len({round(v, 3) for v in hf.values()}) > 1, hf
    for name, value in hf.items():
        assert per_rank[0][name] == pytest.approx(value, rel=1e-5, abs=1e-4), name
