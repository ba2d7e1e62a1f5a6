"""The kNN index that serving searches, and the columns it shows: built once, opened shared.

`build_index_files(bank_path, cfg)` (what `lvm index` runs) writes beside the bank, in
`<bank>.index/`:
- `<factory>.faiss`: a FAISS `index_factory` index over the vectors (inner product = cosine on
  unit vectors), written with FAISS's own `write_index`; `<factory>.json` records the content
  hash of the bank it was built from;
- `lookup.arrow`: an uncompressed Arrow IPC file of text, doc_id, position and vector, whose
  schema metadata records the same hash and the bank's identity.
Both are built by streaming the bank batch by batch (training samples for IVF / PQ are drawn
with a seed), so building holds the index and one batch.

`Retrieval.open(bank_path, factory)` memory-maps both (FAISS `IO_FLAG_MMAP_IFC`, Arrow
`memory_map`): every replica on a node shares the same page-cache pages instead of holding its
own copy, and a row's text or vector is read only when a request asks for it. Files built for
another bank (a content hash that differs from the bank's) are refused, or rebuilt when asked:
never used. `Retrieval.from_bank(bank)` is the in-memory form for small banks and tests.
Evaluation never uses this index: it stays exact (lvm_ray.eval.metrics).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from lvm_ray.config import IndexConfig
from lvm_ray.data import bankdir
from lvm_ray.data.bank import CONTENT_HASH, META_KEY, BankError, ConceptBank

log = logging.getLogger(__name__)
LOOKUP = "lookup.arrow"


class IndexFileError(BankError):
    """An index file is missing, or was built for another bank."""


def index_dir(bank_path: str | Path) -> Path:
    """Where a bank's serving files live: beside it, `<bank>.index/`."""
    return Path(str(bank_path).rstrip("/") + ".index")


def slug(factory: str) -> str:
    """A file name for an index_factory string ("IVF1024,PQ32" -> "IVF1024_PQ32")."""
    return re.sub(r"[^A-Za-z0-9]+", "_", factory).strip("_")


def bank_content(bank_path: str | Path) -> str:
    """The bank's recorded content hash (computed from its files when an older bank lacks it)."""
    return bankdir.read_meta(bank_path).get(CONTENT_HASH) or \
        bankdir.stream_content_hash(bankdir.bank_files(bank_path))


# ----------------------------------------------------------------------------- building


def new_index(dim: int, factory: str, cfg: IndexConfig = IndexConfig()) -> faiss.Index:
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"index.factory {factory!r} is not a FAISS index_factory string: "
                         f"{str(e).splitlines()[0]}") from None
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efConstruction = cfg.ef_construction
    return index


def build_index(vectors: np.ndarray, factory: str = "Flat",
                cfg: IndexConfig = IndexConfig()) -> faiss.Index:
    """An index over (N, D) vectors held in memory."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = new_index(vectors.shape[1], factory, cfg)
    if not index.is_trained:
        rng = np.random.default_rng(cfg.seed)
        n = min(cfg.train_size, len(vectors))
        index.train(vectors[np.sort(rng.choice(len(vectors), n, replace=False))])
    index.add(vectors)
    return index


def _stream_index(bank_path: Path, factory: str, cfg: IndexConfig) -> faiss.Index:
    n = bankdir.n_rows(bank_path)
    dim = bankdir.schema(bank_path).field("vector").type.list_size
    index = new_index(dim, factory, cfg)
    if not index.is_trained:  # one pass for a seeded sample, one to add
        picks = np.sort(np.random.default_rng(cfg.seed).choice(n, min(cfg.train_size, n),
                                                               replace=False))
        sample, row = [], 0
        for b in bankdir.iter_batches(bank_path, ["vector"]):
            lo, hi = np.searchsorted(picks, [row, row + b.num_rows])
            sample.append(bankdir.vectors_of(b)[picks[lo:hi] - row])
            row += b.num_rows
        index.train(np.ascontiguousarray(np.concatenate(sample), dtype=np.float32))
    for b in bankdir.iter_batches(bank_path, ["vector"]):
        index.add(np.ascontiguousarray(bankdir.vectors_of(b), dtype=np.float32))
    return index


def _write_lookup(bank_path: Path, path: Path, content: str) -> None:
    """Stream the bank's columns into an uncompressed Arrow IPC file whose schema records the
    bank's content hash and identity (counted first, from the doc_id column alone)."""
    meta = bankdir.read_meta(bank_path)
    n_docs, last = 0, None
    for b in bankdir.iter_batches(bank_path, ["doc_id"]):
        ids = np.array(b.column(0).to_pylist(), dtype=object)
        if len(ids):
            n_docs += int(np.sum(ids[1:] != ids[:-1])) + int(ids[0] != last)
            last = ids[-1]
    schema = bankdir.schema(bank_path)
    identity = {"encoder": meta.get("encoder"), "dim": schema.field("vector").type.list_size,
                "corpus": meta.get("corpus"), "n_concepts": bankdir.n_rows(bank_path),
                "n_docs": n_docs, "content": content}
    record = {"bank_content": content, "identity": identity, "meta": meta}
    columns = ["doc_id", "position", "text", "vector"]
    out_schema = pa.schema([schema.field(c) for c in columns],
                           metadata={META_KEY: json.dumps(record).encode()})
    tmp = path.with_name(f".{path.name}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, out_schema) as writer:
        for b in bankdir.iter_batches(bank_path, columns):
            writer.write_batch(pa.record_batch(b.columns, schema=out_schema))
    tmp.replace(path)


def build_index_files(bank_path: str | Path, cfg: IndexConfig = IndexConfig(),
                      force: bool = False) -> dict[str, Any]:
    """Write (or keep, when they match the bank) the lookup file and the `cfg.factory` index
    beside the bank. Returns what was done, with timings."""
    bank_path = Path(bank_path)
    content = bank_content(bank_path)
    out = index_dir(bank_path)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"dir": str(out), "factory": cfg.factory}
    lookup = out / LOOKUP
    t = time.perf_counter()
    if force or _lookup_content(lookup) != content:
        _write_lookup(bank_path, lookup, content)
        report["lookup_s"] = time.perf_counter() - t
    idx, side = out / f"{slug(cfg.factory)}.faiss", out / f"{slug(cfg.factory)}.json"
    t = time.perf_counter()
    if force or _index_content(side) != content or not idx.is_file():
        index = _stream_index(bank_path, cfg.factory, cfg)
        tmp = idx.with_name(f".{idx.name}.tmp")
        faiss.write_index(index, str(tmp))
        tmp.replace(idx)
        bankdir.write_atomic(side, json.dumps({
            "factory": cfg.factory, "bank_content": content, "n": int(index.ntotal),
            "dim": int(index.d), "metric": "inner_product", "train_size": cfg.train_size,
            "ef_construction": cfg.ef_construction, "seed": cfg.seed,
            "build_s": time.perf_counter() - t}, indent=1).encode())
        report["index_s"] = time.perf_counter() - t
    report["built"] = "lookup_s" in report or "index_s" in report
    bankdir.release_arrow_memory()
    return report


def _lookup_content(path: Path) -> str | None:
    try:
        raw = (pa.ipc.open_file(pa.memory_map(str(path))).schema.metadata or {})[META_KEY]
        return json.loads(raw)["bank_content"]
    except (OSError, KeyError, ValueError, pa.ArrowInvalid):
        return None


def _index_content(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["bank_content"]
    except (OSError, KeyError, ValueError):
        return None


# ----------------------------------------------------------------------------- serving


class Retrieval:
    """A kNN index over the bank's vectors plus its text / doc id / position / vector columns,
    by concept id. Shared read-only by every request of a replica."""

    def __init__(self, index: faiss.Index, columns: Any, identity: dict[str, Any],
                 factory: str, meta: dict[str, Any], mapped: bool, files: tuple[Path, ...] = ()):
        self.index, self.columns, self._identity = index, columns, identity
        self.factory, self.meta, self.mapped = factory, meta, mapped
        self.files = files  # the memory-mapped files (empty in memory)
        self._exact_storage = _stores_exact_vectors(index)
        if index.ntotal != identity["n_concepts"]:
            raise IndexFileError(f"the index holds {index.ntotal} vectors but the bank has "
                              f"{identity['n_concepts']}")

    @classmethod
    def from_bank(cls, bank: ConceptBank, factory: str = "Flat") -> "Retrieval":
        """In memory: the index holds its own copy of the vectors (small banks, tests)."""
        return cls(build_index(bank.vectors, factory), _BankColumns(bank), bank.identity(),
                   factory, bank.meta, mapped=False)

    @classmethod
    def open(cls, bank_path: str | Path, factory: str = "Flat", build: bool = False,
             cfg: IndexConfig | None = None, files: str | Path | None = None) -> "Retrieval":
        """Memory-map the serving files of the bank at bank_path (in `files`, default
        index_dir(bank_path)). Missing or built for another bank: rebuilt when `build`, else
        IndexFileError naming the fix."""
        bank_path = Path(bank_path)
        content = bank_content(bank_path)
        out = Path(files) if files is not None else index_dir(bank_path)
        idx, side = out / f"{slug(factory)}.faiss", out / f"{slug(factory)}.json"
        problems = []
        if _lookup_content(out / LOOKUP) != content:
            problems.append(f"{out / LOOKUP} is " + ("missing" if not (out / LOOKUP).exists()
                                                      else "for another bank"))
        if _index_content(side) != content or not idx.is_file():
            problems.append(f"{idx} is " + ("missing" if not idx.exists()
                                            else "for another bank (stale)"))
        if problems and not build:
            raise IndexFileError(
                f"serving files of the bank {bank_path}: " + "; ".join(problems) + ". Build them "
                f"with `lvm index --bank {bank_path} --set index.factory={factory}` (never used "
                "when built for another bank)")
        if problems:
            log.info("building %s for %s (%s)", factory, bank_path, "; ".join(problems))
            build_index_files(bank_path, cfg or IndexConfig(factory=factory))
        try:
            index = faiss.read_index(str(idx), faiss.IO_FLAG_MMAP_IFC)
            mapped = True
        except RuntimeError:  # an index type FAISS cannot map: read it (one copy per process)
            index, mapped = faiss.read_index(str(idx)), False
        table = pa.ipc.open_file(pa.memory_map(str(out / LOOKUP))).read_all()  # zero-copy
        record = json.loads(table.schema.metadata[META_KEY])
        return cls(index, _MappedColumns(table), record["identity"], factory, record["meta"],
                   mapped, (idx, out / LOOKUP) if mapped else (out / LOOKUP,))

    def populate(self, max_fraction: float = 0.5) -> int:
        """Fill this process's page tables for its mapping of the index file and of the lookup
        file's text / doc id / position columns (a replica's warm-up): an HNSW search touches
        thousands of vectors scattered over the file, and in a fresh process each one is a page
        fault, several ms per query until most pages have been touched (BENCHMARKS.md,
        scale_1m_rerun: in-replica P50 14.9 -> 6.4-9.4 ms at 1M); a request's rows are a few
        more, read from disk when the page cache has dropped them. The pages are the page
        cache's, shared by every replica. Not the lookup file's vectors: with an exact index
        they are read from the index (`vectors`), and keeping them resident too would hold a
        second copy. Skipped when it all exceeds `max_fraction` of the available memory (it
        would not stay resident). Returns the bytes populated."""
        if not self.mapped:
            return 0
        return populate_mappings(self.files[:1], max_fraction, extra=self.columns.small_ranges())

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """IVF nprobe / HNSW efSearch, applied to the live index (ValueError if the index type
        has no such parameter)."""
        ps = faiss.ParameterSpace()
        for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
            if value is None:
                continue
            try:
                ps.set_index_parameter(self.index, name, float(value))
            except RuntimeError:
                raise ValueError(f"index {self.factory!r} has no search parameter {name}") \
                    from None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) -> scores (B, k), concept ids (B, k); id -1 where fewer than k were found."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        assert q.ndim == 2 and q.shape[1] == self.dim, \
            f"expected queries (B, D={self.dim}), got {q.shape}"
        return self.index.search(q, k)

    def rows(self, ids: np.ndarray) -> list[tuple[str, str, int]]:
        """(text, doc_id, position) of each concept id."""
        return self.columns.rows(np.asarray(ids, dtype=np.int64))

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """(n, D) float32 vectors of concept ids: from the index itself when it stores them
        exactly (Flat, HNSW over Flat: the pages a search keeps hot), else from the lookup
        file (IVF / PQ codes are lossy)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.mapped and self._exact_storage:
            return self.index.reconstruct_batch(ids)
        return self.columns.vectors(ids)


def _stores_exact_vectors(index: faiss.Index) -> bool:
    """Whether reconstruct() returns the added vectors bit for bit (a flat store)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    return isinstance(index, faiss.IndexFlat)


class _BankColumns:
    def __init__(self, bank: ConceptBank):
        self.bank = bank

    def rows(self, ids: np.ndarray) -> list[tuple[str, str, int]]:
        b = self.bank
        return [(str(b.texts[i]) if b.texts is not None else "", b.doc_id(i),
                 int(b.positions[i])) for i in ids]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return self.bank.vectors[ids].astype(np.float32, copy=False)


class _MappedColumns:
    """Rows of the memory-mapped lookup file by concept id. Each record batch is addressed on its
    own (numpy views of the vector chunks, O(1) scalar reads of the text chunks): a ChunkedArray
    `take` would concatenate the whole column first, O(N) per request."""

    def __init__(self, table: pa.Table):
        self.table = table
        chunks = {c: table.column(c).chunks for c in ("text", "doc_id", "position", "vector")}
        self.starts = np.cumsum([0] + [len(c) for c in chunks["text"]])  # first row of each
        self.text, self.doc, self.pos = chunks["text"], chunks["doc_id"], chunks["position"]
        dim = table.schema.field("vector").type.list_size
        self.vecs = [c.flatten().to_numpy(zero_copy_only=True).reshape(-1, dim)
                     for c in chunks["vector"]]  # (rows, D) views of the mapped file

    def small_ranges(self) -> list[tuple[int, int]]:
        """(address, bytes) of every buffer of the text, doc_id and position columns: a few
        percent of the file at 384-d, what a request's rows read besides vectors."""
        return [(b.address, b.size) for col in (self.text, self.doc, self.pos) for chunk in col
                for b in chunk.buffers() if b is not None and b.size]

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = np.searchsorted(self.starts, ids, side="right") - 1
        return k, ids - self.starts[k]

    def rows(self, ids: np.ndarray) -> list[tuple[str, str, int]]:
        return [(self.text[k][j].as_py(), self.doc[k][j].as_py(), int(self.pos[k][j].as_py()))
                for k, j in zip(*self._locate(ids))]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.vecs[0].shape[1] if self.vecs else 0), dtype=np.float32)
        for i, (k, j) in enumerate(zip(*self._locate(ids))):
            out[i] = self.vecs[k][j]
        return out


MADV_POPULATE_READ = 22  # Linux >= 5.14: fault a range's pages in, read-only


def populate_mappings(paths: tuple[Path, ...] | list[Path], max_fraction: float = 0.5,
                      extra: list[tuple[int, int]] = ()) -> int:
    """Populate this process's page tables for every mapping of `paths` and the (address,
    bytes) ranges `extra` (Linux; 0 elsewhere), by madvise(MADV_POPULATE_READ) or, on older
    kernels, one read per page."""
    import ctypes
    import mmap

    maps = Path("/proc/self/maps")
    names = {str(Path(p).resolve()) for p in paths}
    if not (names or extra) or not maps.exists():
        return 0
    ranges = []
    for line in maps.read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in names:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi - lo))
    page = mmap.PAGESIZE
    for addr, n in extra:  # madvise wants page-aligned starts
        lo = addr - addr % page
        ranges.append((lo, n + addr - lo))
    total = sum(n for _, n in ranges)
    avail = mem_available()
    if avail is not None and total > max_fraction * avail:
        log.info("not populating %.1f GB of mapped index files: more than %.0f%% of the %.1f GB "
                 "available", total / 1e9, 100 * max_fraction, avail / 1e9)
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    t0 = time.perf_counter()
    for lo, n in ranges:
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(n), MADV_POPULATE_READ) != 0:
            mem = np.frombuffer((ctypes.c_char * n).from_address(lo), dtype=np.uint8)
            int(mem[::page].max())  # one read per page faults it in
    log.info("populated %.2f GB of mapped index files in %.1f s", total / 1e9,
             time.perf_counter() - t0)
    return total


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each query's exact top-k ids that the approximate top-k also holds."""
    a, e = np.asarray(approx)[:, :k], np.asarray(exact)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, e)]))
