"""Tiny HF tokenizers, models and token corpora built offline, for eval/inference/probe tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SENTENCES = [
    "the capital of france is paris.",
    "the capital of china is beijing.",
    "the capital of japan is tokyo.",
    "water boils at one hundred degrees.",
    "cats chase mice and dogs chase cats.",
    "中国的首都是北京。",
    "Question: which number is even?\nA. three\nB. four\nAnswer: B",
    "Options: red / green\nAnswer: green",
]
VOCAB = 320  # tokenizer vocabulary: 256 byte symbols, merges, and <eos>
EOS = "<eos>"
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def build_tokenizer(directory: Path):
    """A byte-level BPE tokenizer (any text, Chinese and newlines included) saved as an HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return fast


def build_model(directory: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """A tiny random causal LM of ``family`` with the tiny tokenizer, saved as an HF dir."""
    import transformers

    config_name, model_name = FAMILIES[family]
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if family == "qwen3":
        values["head_dim"] = 8
    values.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**values))
    model.save_pretrained(directory)
    build_tokenizer(directory)
    return directory


def write_token_corpus(directory: Path, name: str, tokenizer, docs: int, seed: int) -> str:
    """Megatron .bin/.idx documents of a few sentences each, ending in EOS; returns the prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    directory.mkdir(parents=True, exist_ok=True)
    prefix = str(directory / f"{name}_text_document")
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(docs):
        picks = rng.choice(len(SENTENCES), size=3)
        ids = tokenizer.encode(" ".join(SENTENCES[i] for i in picks), add_special_tokens=False)
        builder.add_item(torch.tensor([*ids, tokenizer.eos_token_id], dtype=torch.int64))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix
