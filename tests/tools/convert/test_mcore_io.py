"""The checkpoint-layout API the trainer shares with the converter."""

from __future__ import annotations

import pytest
import torch

from megatron_patches.errors import ConfigError
from tests.tools.convert import tiny
from tools.convert import commands, mcore_io


def test_tracker_round_trip_and_bad_contents(tmp_path):
    mcore_io.write_tracker(tmp_path, 1200)
    assert (tmp_path / mcore_io.TRACKER_FILE).read_text() == "1200\n"
    assert mcore_io.read_tracker(tmp_path) == 1200
    mcore_io.write_tracker(tmp_path, "release")
    assert mcore_io.read_tracker(tmp_path) == "release"
    (tmp_path / mcore_io.TRACKER_FILE).write_text("latest\n")
    with pytest.raises(ConfigError, match="holds 'latest', neither an iteration number nor 'release'"):
        mcore_io.read_tracker(tmp_path)
    with pytest.raises(ConfigError, match="latest_checkpointed_iteration.txt not found"):
        mcore_io.read_tracker(tmp_path / "nowhere")


def test_directory_names():
    assert mcore_io.iteration_dir_name(100) == "iter_0000100"
    assert mcore_io.iteration_dir_name("release") == "release"
    assert mcore_io.rank_dir_name(3, 0, 1) == "mp_rank_03"
    assert mcore_io.rank_dir_name(3, 1, 2) == "mp_rank_03_001"
    with pytest.raises(ConfigError):
        mcore_io.iteration_dir_name(-1)


def test_load_model_for_rank_names_keys_for_either_spec(tmp_path):
    hf = tiny.save_hf("qwen3", tmp_path / "hf")
    commands.hf2mcore(hf, tmp_path / "ckpt", tp=2, pp=2, quiet=True)
    local, cfg = mcore_io.load_model_for_rank(tmp_path / "ckpt", 1, 1, 2)
    assert cfg == mcore_io.read_model_config(tmp_path / "ckpt") and cfg.qk_layernorm and cfg.kv_channels == 16
    te, _ = mcore_io.load_model_for_rank(tmp_path / "ckpt", 1, 1, 2, spec="te")
    assert local["decoder.layers.1.input_layernorm.weight"].equal(
        te["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"]
    )
    assert local["decoder.layers.0.mlp.linear_fc2._extra_state"] is None
    assert te["decoder.final_layernorm._extra_state"].dtype == torch.uint8
    assert te["decoder.layers.0.self_attention.q_layernorm._extra_state"].numel() == 0
    assert {k for k in te if not k.endswith("_extra_state")} == {
        k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight").replace(
            "pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"
        )
        for k in local
        if not k.endswith("_extra_state")
    }


def test_export_without_side_files_derives_the_config(tmp_path):
    hf = tiny.save_hf("llama31", tmp_path / "hf")
    commands.hf2mcore(hf, tmp_path / "ckpt", tp=2, pp=1, quiet=True)
    for path in (tmp_path / "ckpt").glob("*.json"):
        path.unlink()  # as a checkpoint trained from scratch: weights and model_config only
    commands.mcore2hf(tmp_path / "ckpt", tmp_path / "out", quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(hf), tiny.hf_tensors(tmp_path / "out"))
    import transformers

    got, want = (transformers.AutoConfig.from_pretrained(d) for d in (tmp_path / "out", hf))
    for field in (
        "num_key_value_heads",
        "rope_parameters",
        "tie_word_embeddings",
        "rms_norm_eps",
        "vocab_size",
    ):
        assert getattr(got, field) == getattr(want, field), field


def _tokenizer(directory, size: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, size)}}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>",
    )  # fmt: skip
    fast.save_pretrained(directory)
    return directory


def test_trained_from_scratch_export_takes_a_tokenizer(tmp_path):
    hf = tiny.save_hf("qwen2", tmp_path / "hf")
    commands.hf2mcore(hf, tmp_path / "ckpt", quiet=True)
    for path in (tmp_path / "ckpt").glob("*.json"):
        path.unlink()
    with pytest.raises(ConfigError, match="tokenizer has 120 tokens but the model's vocab_size is 100"):
        commands.mcore2hf(
            tmp_path / "ckpt", tmp_path / "out", tokenizer=_tokenizer(tmp_path / "big", 120), quiet=True
        )
    commands.mcore2hf(
        tmp_path / "ckpt", tmp_path / "out", tokenizer=_tokenizer(tmp_path / "tok", 90), quiet=True
    )
    import transformers

    config = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert config.architectures == ["Qwen2ForCausalLM"] and (config.bos_token_id, config.eos_token_id) == (
        1,
        2,
    )
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").eos_token == "</s>"
    tiny.assert_same_tensors(tiny.hf_tensors(hf), tiny.hf_tensors(tmp_path / "out"))


def test_resolve_accepts_a_root_or_an_iteration_dir(tmp_path):
    (tmp_path / "ckpt" / "iter_0000020").mkdir(parents=True)
    (tmp_path / "ckpt" / "iter_0000030").mkdir()
    mcore_io.write_tracker(tmp_path / "ckpt", 30)
    assert mcore_io.resolve(tmp_path / "ckpt") == (tmp_path / "ckpt", tmp_path / "ckpt" / "iter_0000030")
    assert mcore_io.resolve(tmp_path / "ckpt", 20)[1] == tmp_path / "ckpt" / "iter_0000020"
    assert mcore_io.resolve(tmp_path / "ckpt" / "iter_0000020") == (
        tmp_path / "ckpt",
        tmp_path / "ckpt" / "iter_0000020",
    )
    with pytest.raises(ConfigError, match="checkpoint iteration directory not found"):
        mcore_io.resolve(tmp_path / "ckpt", 40)
