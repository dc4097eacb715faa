"""The record that flows through every step, and how it maps to and from a JSONL line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Keys the pipeline owns; every other key of an input record rides along in `meta`.
_OWN_KEYS = ("id", "source", "channel", "quality")


@dataclass
class Document:
    text: str
    id: str
    source: str | None = None
    channel: str | None = None
    quality: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    line: int = 0  # 1-based line in the input file; not written out

    @classmethod
    def from_record(
        cls, record: dict[str, Any], text_field: str, fallback_id: str, line: int = 0
    ) -> Document:
        """Build from a parsed JSON object; the caller has checked that `text_field` holds a string."""
        meta = {k: v for k, v in record.items() if k != text_field and k not in _OWN_KEYS}
        quality = record.get("quality")
        return cls(
            text=record[text_field],
            id=str(record["id"]) if record.get("id") is not None else fallback_id,
            source=_optional_str(record.get("source")),
            channel=_optional_str(record.get("channel")),
            quality=float(quality) if isinstance(quality, int | float) else None,
            meta=meta,
            line=line,
        )

    def to_record(self, text_field: str = "text") -> dict[str, Any]:
        record: dict[str, Any] = {"id": self.id, text_field: self.text}
        for key in ("source", "channel", "quality"):
            value = getattr(self, key)
            if value is not None:
                record[key] = value
        record.update(self.meta)
        return record

    def to_json(self, text_field: str = "text") -> str:
        return _ENCODER.encode(self.to_record(text_field))

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8", errors="surrogatepass"))


# What json.dumps(record, ensure_ascii=False) uses, made once: json.dumps builds a new encoder on
# every call that passes an argument, a cost paid per document on the clean stage's write path.
_ENCODER = json.JSONEncoder(ensure_ascii=False)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class Malformed:
    """An input line that is not a usable document: counted and written to rejected/malformed.jsonl."""

    reason: str
    path: str
    line: int
    raw: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "rule": "malformed",
                "reason": self.reason,
                "path": self.path,
                "line": self.line,
                "raw": self.raw,
            },
            ensure_ascii=False,
        )
