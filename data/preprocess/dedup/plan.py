"""`dedup-plan`: how many documents and tokens each dedup threshold would keep, per channel.

Signatures and LSH candidate pairs are computed once, and each candidate pair's similarity once
(exactly, or from the signatures with `verify: signature`); every threshold then only filters those
pairs and re-clusters them, exactly as `dedup` would with that threshold for every channel. The
result (a table on stdout and `plan.json` in `--out`) tells the user which threshold per channel
(`dedup.channel_thresholds`) leaves the tokens the run needs.

Tokens are counted as `tokenize` counts them when a tokenizer is given: the document's ids plus one
EOD (when `tokenize.append_eod`). Without one they are estimated as UTF-8 bytes / 4.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megatron_patches.errors import ConfigError

from ..config import PipelineConfig
from ..engines.local import Progress, run_tasks
from ..report import Stats, write_json_atomic
from ..stage import FileTask, cpu_workers, file_tasks, staged_dir
from ..tokenizer.encode import Encoder, load_encoder
from .local import Corpus, candidate_edges, cluster_removals, pair_similarities, signature_task
from .tasks import good_documents

BYTES_PER_TOKEN = 4  # the estimate without a tokenizer
_BATCH = 256


@dataclass(frozen=True)
class PlanTask(FileTask):
    tokenizer: Path | None = None


@dataclass(frozen=True)
class PlanRow:
    channel: str  # "all" sums every channel
    threshold: float
    docs_kept: int
    docs: int
    tokens_kept: int
    tokens: int


@functools.lru_cache(maxsize=2)
def _encoder(path: Path) -> Encoder:
    return load_encoder(path)


def facts_task(task: PlanTask, progress: Progress) -> Stats:
    """Per good document of the task, in signature order: its channel (code) and its tokens."""
    work = task.out / "_work" / task.tag
    names: dict[str, int] = {}
    codes, tokens, batch = [], [], []
    for doc, _ in good_documents(task.path, task.config.text_field, task.span):
        codes.append(names.setdefault(doc.channel or "unlabelled", len(names)))
        batch.append(doc.text)
        if len(batch) >= _BATCH:
            tokens += _count_tokens(batch, task)
            batch = []
    tokens += _count_tokens(batch, task)
    np.asarray(codes, dtype=np.int32).tofile(work / "channel.bin")
    np.asarray(tokens, dtype=np.int64).tofile(work / "tokens.bin")
    (work / "channels.json").write_text(json.dumps(list(names)))
    return Stats()


def _count_tokens(texts: list[str], task: PlanTask) -> list[int]:
    if not texts:
        return []
    if task.tokenizer is None:
        return [-(-len(t.encode("utf-8", errors="surrogatepass")) // BYTES_PER_TOKEN) for t in texts]
    eod = 1 if task.config.tokenize.append_eod else 0
    return [len(ids) + eod for ids in _encoder(task.tokenizer).encode_batch(texts)]


class _Facts:
    """Channel and tokens of every document, aligned with the corpus's gids (sorted)."""

    def __init__(self, tasks: list[PlanTask], corpus: Corpus):
        self.gids = np.concatenate([a.gids() for a in corpus.arrays]) if tasks else np.zeros(0, np.int64)
        channels, tokens = [], []
        for task in tasks:
            work = task.out / "_work" / task.tag
            names = json.loads((work / "channels.json").read_text())
            channels += [names[c] for c in np.fromfile(work / "channel.bin", dtype=np.int32).tolist()]
            tokens.append(np.fromfile(work / "tokens.bin", dtype=np.int64))
        self.channels = np.asarray(channels, dtype=object)
        self.tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
        if not self.gids.size == self.channels.size == self.tokens.size:
            raise RuntimeError("dedup plan: signature and token passes saw different documents")

    def rows(self, dropped: list[int], threshold: float) -> list[PlanRow]:
        kept = np.ones(self.gids.size, dtype=bool)
        kept[np.searchsorted(self.gids, np.asarray(dropped, dtype=np.int64))] = False
        out = []
        for channel in [*sorted(set(self.channels.tolist())), "all"]:
            mine = np.ones_like(kept) if channel == "all" else self.channels == channel
            tokens = self.tokens[mine]
            out.append(
                PlanRow(
                    channel,
                    threshold,
                    int(kept[mine].sum()),
                    int(mine.sum()),
                    int(tokens[kept[mine]].sum()),
                    int(tokens.sum()),
                )
            )
        return out


def plan_dedup(
    config: PipelineConfig,
    inputs: list[Path],
    out: Path,
    thresholds: list[float],
    tokenizer: Path | None = None,
    overwrite: bool = False,
) -> list[PlanRow]:
    """The plan rows (channel x threshold), also written to `<out>/plan.json`."""
    d = config.dedup
    if d.verify == "none":
        raise ConfigError("dedup plan needs dedup.verify exact or signature (with none no threshold applies)")
    if not thresholds or any(not 0.0 < t <= 1.0 for t in thresholds):
        raise ConfigError(f"dedup plan: thresholds must be numbers in (0, 1], got {thresholds}")
    if tokenizer is not None:
        load_encoder(tokenizer)  # a bad tokenizer fails here, before any work
    with staged_dir(out, overwrite) as tmp:
        make = functools.partial(PlanTask, tokenizer=tokenizer)
        tasks = file_tasks(inputs, tmp, config, "dedup plan", make)
        workers = cpu_workers(config.workers)
        run_tasks(signature_task, tasks, workers, desc="dedup plan: signatures")
        run_tasks(facts_task, tasks, workers, desc="dedup plan: tokens")
        corpus = Corpus(tasks, d.perms)
        exact, candidates = candidate_edges(corpus, tasks, config, Stats())
        similarity = pair_similarities(candidates, corpus, tasks, config)
        facts = _Facts(tasks, corpus)
        rows = []
        for threshold in sorted(set(thresholds)):
            near = [pair for pair, s in zip(candidates, similarity, strict=True) if s >= threshold]
            dropped = cluster_removals(exact + near, corpus, d.keep, Stats())
            rows += facts.rows(sorted(dropped), threshold)
        del corpus  # its memory maps point into _work
        shutil.rmtree(tmp / "_work", ignore_errors=True)
        payload = {
            "tokens": counted_as(tokenizer),
            "lsh_threshold": lsh_threshold(config),
            "rows": [asdict(r) for r in rows],
        }
        write_json_atomic(tmp / "plan.json", payload)
    return rows


def lsh_threshold(config: PipelineConfig) -> float:
    """The Jaccard at which a pair becomes an LSH candidate with probability about 1/2: far below
    it the candidates, not the threshold, decide (add bands or lower rows to plan lower)."""
    d = config.dedup
    return round((1 / d.bands) ** (1 / d.rows), 3)


def format_plan(rows: list[PlanRow], config: PipelineConfig, tokenizer: Path | None) -> str:
    lines = [
        f"{'channel':<16} {'threshold':>9} {'docs kept':>25} {'tokens kept':>33}",
        *(
            f"{r.channel:<16} {r.threshold:>9.2f} {_share(r.docs_kept, r.docs):>25} "
            f"{_share(r.tokens_kept, r.tokens):>33}"
            for r in rows
        ),
        f"tokens: {counted_as(tokenizer)}; exact duplicates are dropped at every threshold",
    ]
    low = lsh_threshold(config)
    if any(r.threshold < low + 0.1 for r in rows):
        lines.append(
            f"note: with {config.dedup.bands} bands x {config.dedup.rows} rows LSH finds pairs near "
            f"Jaccard {low} only half the time, so thresholds near or below it drop too little"
        )
    return "\n".join(lines)


def counted_as(tokenizer: Path | None) -> str:
    if tokenizer is None:
        return f"estimated as UTF-8 bytes / {BYTES_PER_TOKEN} (give --tokenizer to count them)"
    return f"ids of {tokenizer} plus EOD, as tokenize counts them"


def _share(part: int, whole: int) -> str:
    percent = 100.0 * part / whole if whole else 100.0
    return f"{part:,} / {whole:,} ({percent:.1f}%)"
