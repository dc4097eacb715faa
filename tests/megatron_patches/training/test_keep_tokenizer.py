"""The tokenizer kept beside checkpoints is the tokenizer, as the converter's --tokenizer copies it."""

from types import SimpleNamespace

from megatron_patches.training.run import _keep_tokenizer

TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# data.preprocess bookkeeping beside a trained tokenizer, and an HF model directory's other files.
NOT_TOKENIZER = ("report.json", "fingerprint.json", "tokenizer_info.json", "config.json", "model.safetensors")


def test_checkpoints_keep_the_tokenizer_files_and_no_pipeline_bookkeeping(tmp_path):
    source = tmp_path / "tokenizer"
    source.mkdir()
    for name in TOKENIZER + NOT_TOKENIZER:
        (source / name).write_text("{}")
    plan = SimpleNamespace(data=SimpleNamespace(tokenizer=str(source)), save_dir=tmp_path / "checkpoints")
    _keep_tokenizer(plan)
    assert sorted(p.name for p in plan.save_dir.iterdir()) == sorted(TOKENIZER)
