"""Lenses for debugging an HF model (Llama, Qwen2, Qwen3, Mistral), from Python or the CLI.

Baichuan2 is refused (``hf.UNSUPPORTED_FAMILIES`` says why); its ``hf2hf --to llama`` export works.

- :func:`cosine_distances`: per layer and token, 1 - cos(input, output) of the
  decoder layer's hidden state: how much each layer changes the residual stream
  (near 0: the layer does almost nothing).
- :func:`logit_lens`: the top-k next tokens read from each layer's output
  through the final norm and the output head (the last layer's lens is the
  model's own prediction).
- :func:`attention`: a layer/head's attention weights; ``[query, key]`` is the
  weight of the query token on the key token.

``python -m tools.eval inspect --hf DIR --text "..."`` prints text tables;
``--plot out.png`` also draws them as heat maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from megatron_patches.errors import ConfigError
from tools.eval import plots
from tools.eval.families import require_family
from tools.hf_runtime.loading import load_model, load_tokenizer, model_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Trace:
    """Every decoder layer's input and output hidden states for one sequence."""

    tokens: list[str]
    inputs: list[torch.Tensor]  # per layer [T, H]
    outputs: list[torch.Tensor]  # per layer [T, H]


def load(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) with eager attention, so attention weights can be returned."""
    require_family(path)
    return load_model(path, attn_implementation="eager"), load_tokenizer(path)


def _decoder(model: PreTrainedModel) -> torch.nn.Module:
    return model.model


def trace(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str
) -> tuple[Trace, torch.Tensor]:
    """(hidden states around every decoder layer, input ids [1, T])."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model_device(model))
    if ids.shape[1] == 0:
        raise ConfigError(f"{text!r} tokenizes to nothing")
    inputs, outputs = [], []

    def capture(module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, tuple) else output
        inputs.append(hidden_in[0].detach().float())
        outputs.append(hidden_out[0].detach().float())

    handles = [layer.register_forward_hook(capture, with_kwargs=True) for layer in _decoder(model).layers]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
    return Trace(tokens, inputs, outputs), ids


def cosine_distances(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str
) -> tuple[list[str], torch.Tensor]:
    """(tokens, [layers, T] of 1 - cos(layer input, layer output))."""
    t, _ = trace(model, tokenizer, text)
    pairs = zip(t.inputs, t.outputs, strict=True)
    rows = [1 - torch.nn.functional.cosine_similarity(i, o, dim=-1) for i, o in pairs]
    return t.tokens, torch.stack(rows).cpu()


def logit_lens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, k: int = 5
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(tokens, probabilities [layers, T, k], token ids [layers, T, k]) of each layer's top-k."""
    t, _ = trace(model, tokenizer, text)
    norm, head = _decoder(model).norm, model.get_output_embeddings()
    probs, ids = [], []
    with torch.no_grad():
        for hidden in t.outputs:
            logits = head(norm(hidden.to(head.weight.dtype))).float()
            top = torch.softmax(logits, dim=-1).topk(k, dim=-1)
            probs.append(top.values)
            ids.append(top.indices)
    return t.tokens, torch.stack(probs).cpu(), torch.stack(ids).cpu()


def attention(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, layer: int, head: int
) -> tuple[list[str], torch.Tensor]:
    """(tokens, [T, T] attention weights of ``layer``/``head``; row = query, column = key)."""
    config = model.config
    if not 0 <= layer < config.num_hidden_layers or not 0 <= head < config.num_attention_heads:
        raise ConfigError(
            f"layer {layer} / head {head} out of range: the model has {config.num_hidden_layers} layers "
            f"and {config.num_attention_heads} heads"
        )
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model_device(model))
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    if not out.attentions or out.attentions[layer] is None:
        raise ConfigError("the model returned no attention weights: load it with attn_implementation='eager'")
    tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
    return tokens, out.attentions[layer][0, head].float().cpu()


def _cell(token: str, width: int = 8) -> str:
    return repr(token)[1:-1][:width]


def cosine_table(tokens: list[str], distances: torch.Tensor) -> str:
    header = f"{'layer':>5} {'mean':>7} | " + " ".join(f"{_cell(t):>8}" for t in tokens)
    rows = [
        f"{i:>5} {row.mean():>7.4f} | " + " ".join(f"{v:>8.4f}" for v in row.tolist())
        for i, row in enumerate(distances)
    ]
    return "\n".join(["cosine distance between each layer's input and output", header, *rows])


def lens_table(
    tokens: list[str],
    probs: torch.Tensor,
    ids: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    position: int = -1,
) -> str:
    position = position % len(tokens)
    title = f"logit lens after token {position} ({tokens[position]!r}): top-{probs.shape[-1]} next tokens"
    rows = [
        f"{layer:>5} | "
        + "  ".join(
            f"{tokenizer.decode([i])!r} {p:.3f}"
            for p, i in zip(probs[layer, position], ids[layer, position], strict=True)
        )
        for layer in range(probs.shape[0])
    ]
    return "\n".join([title, *rows])


def attention_line(
    tokens: list[str], weights: torch.Tensor, layer: int, head: int, query: int, key: int
) -> str:
    count = len(tokens)
    if not (-count <= query < count and -count <= key < count):
        raise ConfigError(f"token positions {query}, {key} out of range for {count} tokens")
    query, key = query % count, key % count
    return (
        f"layer {layer} head {head}: attention of token {query} ({tokens[query]!r}) "
        f"on token {key} ({tokens[key]!r}) = {weights[query, key].item():.4f}"
    )


def plot(
    path: str | Path,
    tokens: list[str],
    distances: torch.Tensor | None = None,
    lens: torch.Tensor | None = None,
    lens_words: list[list[str]] | None = None,
    weights: torch.Tensor | None = None,
    title: str = "",
) -> None:
    """Heat maps of whichever analyses are given, side by side, into ``path`` (PNG).

    ``lens`` is the top-1 probability per layer and token ([layers, T]); ``lens_words``
    (the top-1 tokens, same shape) are written into its cells.
    """
    panels = [p for p in (("cosine", distances), ("lens", lens), ("attention", weights)) if p[1] is not None]
    fig, axes = plots.pyplot().subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    labels = [_cell(t) for t in tokens]
    for ax, (kind, matrix) in zip(axes[0], panels, strict=True):
        image = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        if kind == "attention":
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.set_xlabel("key")
            ax.set_ylabel("query")
        else:
            ax.set_yticks(range(matrix.shape[0]))
            ax.set_ylabel("layer")
        ax.set_title({"cosine": "1 - cos(in, out)", "lens": "logit lens top-1 p", "attention": title}[kind])
        if kind == "lens" and lens_words is not None:
            for (layer, position), word in np.ndenumerate(np.array(lens_words, dtype=object)):
                ax.text(position, layer, _cell(word, 6), ha="center", va="center", fontsize=6, color="w")
    plots.save(fig, path)
