"""HF exports that transformers 4.4x-4.5x stacks (vLLM, SGLang, lm-eval) load as the same model as 5.x."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from megatron_patches.formats.hf_files import copy_tokenizer_files
from tests import transformers4
from tests.tools.convert import tiny
from tools.convert import commands
from tools.convert.families import family_named

WORDS = 90  # the test tokenizer's size; the tiny models have 100 embedding rows
TEXTS = ["w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14", "w89 w3 never-seen w42", "</s> w7"]
# Run under transformers 4.57 and under the project's 5.x: what each makes of the same export.
LOAD_SCRIPT = """
import json, sys, torch, transformers
texts, result = json.loads(sys.argv[1]), {"version": transformers.__version__, "models": []}
for directory in sys.argv[2:]:
    config = transformers.AutoConfig.from_pretrained(directory)
    rope = getattr(config, "rope_parameters", None)  # 4.x keeps it as an unused extra attribute
    if transformers.__version__.startswith("4."):  # which reads the top-level keys only
        rope = {"rope_theta": config.rope_theta, **(config.rope_scaling or {"rope_type": "default"})}
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ids = [tokenizer(text)["input_ids"] for text in texts]
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    with torch.no_grad():
        logits = model.eval()(torch.tensor(ids[:1])).logits
    generation = transformers.GenerationConfig.from_pretrained(directory)
    result["models"].append({
        "rope_theta": rope["rope_theta"], "rope_type": rope["rope_type"], "ids": ids,
        "tokenizer": type(tokenizer).__name__, "dtype": str(model.dtype),
        "eos": [tokenizer.eos_token_id, generation.eos_token_id],
        "logits": logits.flatten().tolist(),
    })
print(json.dumps(result))
"""


def _tokenizer(directory, with_bookkeeping: bool = False):
    """A whitespace word-level tokenizer saved by transformers 5 (which names its class TokenizersBackend)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(directory)
    if with_bookkeeping:  # what data.preprocess train-tokenizer writes beside its tokenizer
        for name in ("report.json", "tokenizer_info.json"):
            (directory / name).write_text("{}")
    return directory


def _trainer_checkpoint(case: str, tmp_path, tokenizer=None):
    """A checkpoint as the trainer leaves it: weights, model_config and the tokenizer beside them."""
    hf = tiny.save_hf(case, tmp_path / "hf" / case)
    ckpt = tmp_path / "ckpt" / case
    commands.hf2mcore(hf, ckpt, quiet=True)
    for path in ckpt.glob("*.json"):
        path.unlink()  # no HF config: trained from scratch
    if tokenizer is not None:
        copy_tokenizer_files(tokenizer, ckpt)  # what the trainer's _keep_tokenizer does
    return hf, ckpt


@pytest.mark.parametrize("case", ["llama31", "deepseek_coder", "yi", "mistral", "qwen2", "qwen3"])
def test_exported_config_carries_the_rope_and_dtype_keys_transformers_4_reads(case):
    model_type, overrides = tiny.CASES[case]
    source = transformers.AutoConfig.for_model(model_type, **{**tiny.BASE, **overrides}).to_dict()
    family = family_named(model_type)
    written = family.write_config(family.read_config(source), {}, torch.bfloat16)
    params = dict(written["rope_parameters"])
    assert written["rope_theta"] == params.pop("rope_theta") == overrides.get("rope_theta", 10000.0)
    assert written["rope_scaling"] == (None if params["rope_type"] == "default" else params)
    assert written["torch_dtype"] == written["dtype"] == "bfloat16"


def test_trainer_checkpoint_export_has_a_generation_config_and_no_pipeline_files(tmp_path):
    tokenizer = _tokenizer(tmp_path / "tok", with_bookkeeping=True)
    _, ckpt = _trainer_checkpoint("qwen2", tmp_path, tokenizer)
    commands.mcore2hf(ckpt, tmp_path / "out", quiet=True)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert not (tmp_path / "out" / "tokenizer_info.json").exists()

    (tokenizer / "README.md").write_text("a model card of some other model")
    commands.mcore2hf(ckpt, tmp_path / "out2", tokenizer=str(tokenizer), quiet=True)
    shipped = {path.name for path in (tmp_path / "out2").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= shipped
    assert not shipped & {"report.json", "tokenizer_info.json", "README.md"}


def test_export_loads_as_the_same_model_in_transformers_4_and_5(tmp_path):
    transformers4.site_dir()  # installed (or skipped) before any work
    tokenizer = _tokenizer(tmp_path / "tok")
    exports = []
    for case in ("llama31", "deepseek_coder", "qwen3"):  # llama3 and linear rope scaling, explicit head_dim
        _, ckpt = _trainer_checkpoint(case, tmp_path)
        commands.mcore2hf(ckpt, tmp_path / "out" / case, tokenizer=str(tokenizer), quiet=True)
        exports.append(str(tmp_path / "out" / case))

    args = (LOAD_SCRIPT, json.dumps(TEXTS), *exports)
    old, new = transformers4.run(*args), transformers4.run(*args, transformers4=False)
    assert old["version"] == transformers4.VERSION and new["version"].startswith("5.")
    assert [m["rope_theta"] for m in new["models"]] == [500000.0, 100000.0, 10000.0]
    for before, now in zip(old["models"], new["models"], strict=True):
        assert {k: v for k, v in before.items() if k != "logits"} == {
            k: v for k, v in now.items() if k != "logits"
        } | {"tokenizer": "PreTrainedTokenizerFast"}
        torch.testing.assert_close(torch.tensor(before["logits"]), torch.tensor(now["logits"]))
