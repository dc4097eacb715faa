"""Write the demo corpus `data/demo/raw/*.jsonl.gz` deterministically (seeded).

    python -m data.demo.build_corpus [--out data/demo/raw] [--scale 1.0]

Mixed zh / en / code / markdown / math documents with something for every stage to do: planted
exact and near duplicates, PII, reposting boilerplate, junk that the clean rules must drop, and
malformed input (a line that is not JSON, one that is not UTF-8, one without text, and a gzip file
cut off in the middle). Code text comes from the Python standard library's own sources, so the
bytes of code documents depend on the Python version that generated them; everything else depends
only on the seed.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
from pathlib import Path

from . import synth

HERE = Path(__file__).resolve().parent


def _line(text: str, doc_id: str, source: str) -> bytes:
    return (json.dumps({"id": doc_id, "text": text, "source": source}, ensure_ascii=False) + "\n").encode()


def prose(rng: random.Random, scale: float) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    zh = [(synth.zh_doc(rng), "web/zh") for _ in range(int(900 * scale))]
    en = [(synth.en_doc(rng), "web/en") for _ in range(int(700 * scale))]
    en += [(synth.markdown_doc(rng), "web/docs") for _ in range(int(80 * scale))]
    en += [(synth.math_doc(rng), "web/math") for _ in range(int(80 * scale))]
    return zh, en


def plant(rng: random.Random, docs: list[tuple[str, str]], share: float) -> None:
    """Append exact copies and near duplicates (a few edits) of a share of `docs`."""
    originals = rng.sample(docs, int(len(docs) * share))
    for text, source in originals[: len(originals) // 2]:
        docs.append((text, source))
    for text, source in originals[len(originals) // 2 :]:
        docs.append((synth.perturb(rng, text, rng.randint(1, max(2, len(text) // 200))), source))


def extras(rng: random.Random) -> list[tuple[str, str]]:
    docs = [(synth.pii_doc(rng)[0], "web/zh") for _ in range(40)]
    docs += [(f"转载自 example 新闻网\n{synth.zh_doc(rng)}\n本文来源：网络", "web/zh") for _ in range(20)]
    docs += [(text, "web/junk") for _ in range(6) for _, text in synth.junk_docs(rng)]
    return docs


def write(path: Path, lines: list[bytes], truncate: bool = False) -> None:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz:
        gz.writelines(lines)
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) * 2 // 3] if truncate else data)


def build(out: Path, scale: float = 1.0, seed: int = 1234) -> list[Path]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    zh, en = prose(rng, scale)
    files = synth.stdlib_sources()
    code = [(synth.code_doc(rng, files), "github/python") for _ in range(int(260 * scale))]
    for docs in (zh, en, code):
        plant(rng, docs, 0.1)
    zh += extras(rng)
    written = []
    for name, docs in (("web_zh", zh), ("web_en", en), ("code", code)):
        rng.shuffle(docs)
        lines = [_line(text, f"{name}-{i}", source) for i, (text, source) in enumerate(docs)]
        if name == "web_en":
            lines[10:10] = [b"this line is not JSON\n", b'{"id": "bad-utf8", "text": "\xff\xfe"}\n']
            lines[20:20] = [b'{"id": "no-text", "body": "the text field is missing"}\n', b"[1, 2, 3]\n"]
        write(out / f"{name}.jsonl.gz", lines)
        written.append(out / f"{name}.jsonl.gz")
    tail = [_line(synth.en_doc(rng), f"cut-{i}", "web/en") for i in range(60)]
    write(out / "zz_truncated.jsonl.gz", tail, truncate=True)
    written.append(out / "zz_truncated.jsonl.gz")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "raw")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of documents")
    args = parser.parse_args()
    for path in build(args.out, args.scale):
        print(f"{path} {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
