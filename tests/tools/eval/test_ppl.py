"""Per-channel held-out loss on HF exports, and its trend over a run's checkpoints."""

import csv
import json
from pathlib import Path

import pytest
import torch

from megatron_patches.errors import ConfigError
from tests.tiny_hf import SENTENCES, build_model
from tests.tools.eval.cli import run_eval
from tools.eval import trends
from tools.eval.ppl import evaluate_channels, find_channels, windows
from tools.hf_runtime.loading import load_model, load_tokenizer

DOCS = [" ".join(SENTENCES[i : i + 3]) for i in range(0, len(SENTENCES), 2)]


def test_windows_cut_the_document_stream_like_pretraining_samples():
    docs = iter([[1, 2, 3], [4, 5, 6, 7, 8], [9]])
    assert list(windows(docs, 3, None)) == [[1, 2, 3, 4], [4, 5, 6, 7], [7, 8, 9]]
    docs = iter([[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]])
    assert list(windows(docs, 3, None)) == [[1, 2, 3, 4], [4, 5, 6, 7], [7, 8, 9, 10]]
    assert list(windows(iter([list(range(20))]), 3, max_tokens=6)) == [[0, 1, 2, 3], [3, 4, 5, 6]]


@pytest.mark.parametrize("seq_length", [1, 3, 4, 7])
def test_every_token_but_the_streams_first_is_predicted_exactly_once(seq_length):
    documents = [list(range(0, 5)), list(range(5, 6)), list(range(6, 17))]
    predicted = [t for window in windows(iter(documents), seq_length, None) for t in window[1:]]
    assert predicted == list(range(1, 17))


def _held_out(root: Path, tokenizer) -> Path:
    """The same documents as a JSONL channel and as a .bin/.idx channel."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root.mkdir(parents=True, exist_ok=True)
    (root / "web.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS) + "{broken\n")
    builder = IndexedDatasetBuilder(str(root / "webtok_text_document.bin"), dtype=np.uint16)
    for doc in DOCS:
        ids = tokenizer.encode(doc, add_special_tokens=False) + [tokenizer.eos_token_id]
        builder.add_item(torch.tensor(ids))
        builder.end_document()
    builder.finalize(str(root / "webtok_text_document.idx"))
    return root


def _stream(tokenizer) -> list[int]:
    """The token stream of the held-out channel: every document followed by EOS."""
    return [t for d in DOCS for t in tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]]


def _loss_by_hf(model, tokenizer, seq_length: int) -> tuple[float, int]:
    """HF's own shifted cross-entropy, one window at a time, windows overlapping by one token."""
    stream = _stream(tokenizer)
    total = count = 0
    for start in range(0, len(stream), seq_length):
        window = torch.tensor([stream[start : start + seq_length + 1]])
        if window.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=window, labels=window).loss.item()
        total, count = total + loss * (window.shape[1] - 1), count + window.shape[1] - 1
    return total / count, count


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    path = build_model(root / "llama", seed=1)
    return path, load_model(path, device="cpu"), load_tokenizer(path)


def test_jsonl_and_indexed_channels_give_hf_s_own_loss(tmp_path, tiny):
    _, model, tokenizer = tiny
    held_out = _held_out(tmp_path / "held", tokenizer)
    results = evaluate_channels(model, tokenizer, find_channels([str(held_out)]), seq_length=16, batch_size=3)
    loss, count = _loss_by_hf(model, tokenizer, 16)
    assert [r.channel for r in results] == ["web", "webtok"]
    for result in results:
        assert result.tokens == count
        assert result.loss == pytest.approx(loss, abs=1e-5)
    assert results[0].skipped == (f"{held_out / 'web.jsonl'}:{len(DOCS) + 1}: no string 'text'",)


def test_a_channel_scores_every_token_but_its_first(tmp_path, tiny):
    _, model, tokenizer = tiny
    stream = _stream(tokenizer)
    channels = find_channels([str(_held_out(tmp_path / "held", tokenizer) / "web.jsonl")])
    for seq_length in (16, len(stream) - 1):  # many windows; one window holding the whole stream
        (result,) = evaluate_channels(model, tokenizer, channels, seq_length)
        assert result.tokens == len(stream) - 1
    ids = torch.tensor([stream])
    with torch.no_grad():  # the whole stream in one window: the full sequence's own loss
        assert result.loss == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), abs=1e-5)


def test_bad_held_out_paths_are_named(tmp_path):
    with pytest.raises(ConfigError, match="is neither a JSONL file, a directory nor a .bin/.idx prefix"):
        find_channels([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no \\*.jsonl files and no .bin/.idx pairs"):
        find_channels([str(tmp_path / "empty")])


def test_tokens_outside_the_vocabulary_are_named(tmp_path, tiny):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    _, model, tokenizer = tiny
    builder = IndexedDatasetBuilder(str(tmp_path / "other_text_document.bin"), dtype=np.uint16)
    builder.add_item(torch.tensor([5, 400, 7]))
    builder.end_document()
    builder.finalize(str(tmp_path / "other_text_document.idx"))
    with pytest.raises(ConfigError, match="channel other .*: token id 400 is outside the model's vocabulary"):
        evaluate_channels(model, tokenizer, find_channels([str(tmp_path / "other_text_document")]), 16)


def test_checkpoints_mode_writes_the_trend_of_every_export(tmp_path, tiny):
    _, _, tokenizer = tiny
    held_out = _held_out(tmp_path / "held", tokenizer)
    run = tmp_path / "run"
    for iteration, seed in ((20, 5), (10, 4)):
        build_model(run / "hf" / f"iter_{iteration:07d}", seed=seed)
    megatron_only = run / "checkpoints" / "iter_0000030"
    megatron_only.mkdir(parents=True)
    (megatron_only / "metadata.json").write_text("{}")
    proc = run_eval(
        "ppl", "--checkpoints", str(run), "--data", str(held_out / "web.jsonl"), "--seq-length", "16"
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped iteration 30: Megatron checkpoint only (pass --convert to convert it)" in proc.stdout
    with (run / "eval" / "ppl.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["iteration"], r["channel"]) for r in rows] == [("10", "web"), ("20", "web")]
    for row in rows:
        model = load_model(run / "hf" / f"iter_{int(row['iteration']):07d}", device="cpu")
        loss, count = _loss_by_hf(model, tokenizer, 16)
        assert (int(row["tokens"]), float(row["loss"])) == (count, pytest.approx(loss, abs=1e-5))
    assert (run / "eval" / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_megatron_checkpoints_convert_through_the_adapter(tmp_path, monkeypatch, tiny):
    template, _, _ = tiny
    checkpoint = tmp_path / "run" / "checkpoints" / "iter_0000030"
    checkpoint.mkdir(parents=True)
    (checkpoint / "metadata.json").write_text("{}")
    # A stand-in converter command: copies a template HF dir to the output path it is given.
    copy = f"import shutil, sys; shutil.copytree({str(template)!r}, sys.argv[-1])"
    monkeypatch.setattr(trends, "CONVERT_COMMAND", ("-c", copy, "{checkpoint}", "{out}"))
    ready, skipped = trends.resolve_hf_dirs(trends.find_snapshots(tmp_path / "run"), tmp_path / "hf", True)
    assert (ready, skipped) == ([(30, tmp_path / "hf" / "iter_0000030")], [])
    assert trends.is_hf_export(tmp_path / "hf" / "iter_0000030")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["iter_0000030"]  # no temporary left
    monkeypatch.setattr(trends, "CONVERT_COMMAND", ("-c", "import sys; sys.exit('no such checkpoint')"))
    with pytest.raises(ConfigError, match="converting .*iter_0000030 failed: no such checkpoint"):
        trends.megatron_to_hf(checkpoint, tmp_path / "other")


def test_checkpoints_mode_frees_each_model_before_loading_the_next(tmp_path, monkeypatch, tiny):
    import gc
    import weakref

    import tools.eval.__main__ as cli

    _, _, tokenizer = tiny
    held_out = _held_out(tmp_path / "held", tokenizer)
    for iteration in (10, 20, 30):
        build_model(tmp_path / "run" / "hf" / f"iter_{iteration:07d}", seed=iteration)
    loaded = []

    def load_model(*args, **kwargs):
        gc.collect()  # only reference cycles aside: a model still referenced stays alive
        assert all(ref() is None for ref in loaded), "the previous model is still referenced"
        model = real_load_model(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    real_load_model = cli.load_model
    monkeypatch.setattr(cli, "load_model", load_model)
    data = str(held_out / "web.jsonl")
    assert (
        cli.main(["ppl", "--checkpoints", str(tmp_path / "run"), "--data", data, "--seq-length", "16"]) == 0
    )
    assert len(loaded) == 3


def _train_one_rank(args: list[str]) -> int:
    from megatron_patches.training import run

    return run.main(args)


@pytest.mark.slow
def test_a_real_trainer_checkpoint_converts_with_the_given_tokenizer(tmp_path, tiny):
    from tests.dist import run_on_ranks
    from tests.megatron_patches.training.test_train import tiny_args
    from tests.tiny_hf import write_token_corpus

    template, _, tokenizer = tiny
    data = [1, write_token_corpus(tmp_path / "data", "facts", tokenizer, 40, seed=3)]
    extra = (f"data.eod_id={tokenizer.eos_token_id}", "model.vocab_size=320", "train.train_iters=3")
    # No data.tokenizer: the trainer keeps no tokenizer beside its checkpoints, so the export's
    # tokenizer (and its ids in config.json) can only come from --tokenizer.
    assert run_on_ranks(_train_one_rank, 1, tiny_args(tmp_path / "run", data, *extra), timeout=600) == [0]
    assert not (tmp_path / "run" / "checkpoints" / "tokenizer_config.json").exists()
    held_out = _held_out(tmp_path / "held", tokenizer)
    options = ("--data", str(held_out / "web.jsonl"), "--seq-length", "16", "--convert")
    proc = run_eval("ppl", "--checkpoints", tmp_path / "run", *options, "--tokenizer", template)
    assert proc.returncode == 0, proc.stderr
    export = tmp_path / "run" / "hf" / "iter_0000003"
    assert (export / "tokenizer_config.json").is_file()
    assert json.loads((export / "config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    with (tmp_path / "run" / "eval" / "ppl.csv").open() as f:
        rows = list(csv.DictReader(f))
    model = load_model(export, device="cpu")
    loss, count = _loss_by_hf(model, tokenizer, 16)
    assert [(r["iteration"], int(r["tokens"])) for r in rows] == [("3", count)]
    assert float(rows[0]["loss"]) == pytest.approx(loss, abs=1e-5)
