"""Corpus recipes outside the package: the King James Bible (scripts/corpora/kjv.py), run here
against a stand-in for Debian's `bible` program that prints the same format."""

import importlib.util
import json
import stat
from pathlib import Path

from lvm_ray.config import CorpusConfig
from lvm_ray.data.corpus import load_documents

ROOT = Path(__file__).resolve().parents[1]


def kjv_module():
    spec = importlib.util.spec_from_file_location("kjv", ROOT / "scripts/corpora/kjv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_bible(tmp_path: Path) -> Path:
    """Prints verses the way `bible -f gen1:1-rev22:21` does, books out of order on purpose."""
    lines = ["Rev22:21 The grace of our Lord Jesus Christ be with you all. Amen.",
             "Ge1:1 In the beginning God created the heaven and the earth.",
             "Ge1:2 And the earth was without form, and void.",
             "1Cor1:1 Paul, called to be an apostle of Jesus Christ."]
    exe = tmp_path / "bible"
    exe.write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(lines) + "\nEOF\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def test_kjv_recipe_writes_one_document_per_book_in_canonical_order(tmp_path):
    kjv = kjv_module()
    out = tmp_path / "kjv.jsonl"
    assert kjv.main(["--bible", str(fake_bible(tmp_path)), "--out", str(out)]) == 0
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["id"] for d in docs] == ["01-Ge", "46-1Cor", "66-Rev"]
    assert docs[0]["title"] == "Genesis" and docs[0]["text"].count("\n\n") == 1
    loaded, skipped = load_documents(CorpusConfig(source="jsonl", path=str(out)))
    assert [d.doc_id for d in loaded] == ["01-Ge", "46-1Cor", "66-Rev"] and not skipped
    assert len(kjv.BOOKS) == 66 and len({a for a, _ in kjv.BOOKS}) == 66


def test_kjv_recipe_without_the_program_says_what_to_install(tmp_path, capsys):
    assert kjv_module().main(["--bible", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "x.jsonl")]) == 2
    assert "apt-get install bible-kjv" in capsys.readouterr().err


def merge_module():
    spec = importlib.util.spec_from_file_location("merge_banks",
                                                  ROOT / "scripts/corpora/merge_banks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_merged_bank_keeps_each_corpus_documents_positions_and_splits(tmp_path):
    import dataclasses

    import numpy as np
    import pytest

    from lvm_ray.config import WindowConfig
    from lvm_ray.data.bank import load_bank, save_bank
    from lvm_ray.data.synthetic import make_synthetic_bank
    from lvm_ray.data.windows import make_windows

    # Both banks name their documents alike: the corpus prefix must keep them apart.
    a = make_synthetic_bank(n_docs=12, doc_len=(20, 30), dim=16, seed=0)
    b = make_synthetic_bank(n_docs=8, doc_len=(20, 30), dim=16, seed=1)
    for bank in (a, b):
        bank.meta.update(encoder="enc-x", dim=16)
    pa_, pb = save_bank(a, tmp_path / "a.parquet"), save_bank(b, tmp_path / "b.parquet")
    merge = merge_module()
    assert merge.main(["--out", str(tmp_path / "m.parquet"), f"one={pa_}", f"two={pb}"]) == 0
    m = load_bank(tmp_path / "m.parquet")
    n = len(a)
    assert len(m) == n + len(b)
    np.testing.assert_array_equal(m.vectors, np.concatenate([a.vectors, b.vectors]))
    assert list(m.doc_ids[:n]) == [f"one/{d}" for d in a.doc_ids]
    assert list(m.doc_ids[n:]) == [f"two/{d}" for d in b.doc_ids]
    assert list(m.splits) == list(a.splits) + list(b.splits)
    np.testing.assert_array_equal(m.positions, np.concatenate([a.positions, b.positions]))
    assert list(m.texts[n:]) == list(b.texts)
    assert m.meta["encoder"] == "enc-x" and set(m.meta["corpus"]["parts"]) == {"one", "two"}
    # Alike names stay two documents each: windows (one document each) never span corpora.
    assert len(set(m.doc_ids)) == len(set(a.doc_ids)) + len(set(b.doc_ids))
    ws = make_windows(m, "train", WindowConfig(context=8, min_context=2))
    assert len(ws) == len(make_windows(a, "train", WindowConfig(context=8, min_context=2))) + \
        len(make_windows(b, "train", WindowConfig(context=8, min_context=2)))
    other = dataclasses.replace(b, meta={**b.meta, "encoder": "enc-y"})
    with pytest.raises(ValueError, match="one encoder"):
        merge.merge_banks({"one": a, "two": other})
