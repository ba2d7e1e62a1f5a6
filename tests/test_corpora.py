"""Corpus recipes outside the package, the King James Bible (scripts/corpora/kjv.py) and SWORD
commentaries (scripts/corpora/sword.py, per chapter or per section of a mod2imp dump), run
against stand-ins for Debian's `bible` and `diatheke` programs and `mod2imp`'s dump format; and
the bank tools beside them (merge_banks, subsample_bank)."""

import importlib.util
import json
import stat
from pathlib import Path

from lvm_ray.config import CorpusConfig
from lvm_ray.data.corpus import load_documents

ROOT = Path(__file__).resolve().parents[1]


def script_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"scripts/corpora/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kjv_module():
    return script_module("kjv")


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
    return script_module("merge_banks")


def fake_diatheke(tmp_path: Path) -> Path:
    """Prints a commentary chapter the way `diatheke -b TDavid -k "Psalms N"` does: one entry per
    verse (the chapter's text on verse 1, the rest empty), OSIS markup, the module's name last;
    chapter 3 has no commentary."""
    ps1 = ('Psalms 1:1: <title type="x-s">Psalm 1 OVERVIEW</title> <div sID="g1" type="x-p"/>'
           '<hi type="italic">Blessed &amp; happy.</hi> The man walks not. <div eID="g1" '
           'type="x-p"/> <div sID="g2" type="x-p"/><hi type="bold">Verse 1.</hi> He is like a '
           'tree. <hi type="italic">John Trapp.</hi><div eID="g2" type="x-p"/>\n'
           'Psalms 1:2: \nPsalms 1:3: Planted by the rivers.\n(TDavid)')
    ps2 = 'Psalms 2:1: Why do the heathen rage?\nPsalms 2:2: \n(TDavid)'
    exe = tmp_path / "diatheke"
    exe.write_text('#!/bin/sh\ncase "$4" in\n'
                   f"  'Psalms 1') printf '%s\\n' '{ps1}' ;;\n"
                   f"  'Psalms 2') printf '%s\\n' '{ps2}' ;;\n"
                   "  *) printf '(TDavid)\\n' ;;\nesac\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def test_sword_recipe_writes_one_plain_text_document_per_chapter(tmp_path):
    sword = script_module("sword")
    out = tmp_path / "tdavid.jsonl"
    assert sword.main(["--diatheke", str(fake_diatheke(tmp_path)), "--chapters", "3",
                       "--out", str(out)]) == 0
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["id"] for d in docs] == ["TDavid-001", "TDavid-002"]  # chapter 3: no text
    assert docs[0]["title"] == "Psalms 1"
    assert docs[0]["text"].split("\n\n") == [  # title, verse label and credit dropped
        "Blessed & happy. The man walks not.", "He is like a tree.", "Planted by the rivers."]
    assert "<" not in docs[0]["text"] and "TDavid" not in docs[1]["text"]
    assert docs[1]["text"] == "Why do the heathen rage?"
    loaded, skipped = load_documents(CorpusConfig(source="jsonl", path=str(out)))
    assert [d.doc_id for d in loaded] == ["TDavid-001", "TDavid-002"] and not skipped


def test_sword_recipe_drops_navigation_that_would_repeat_as_concepts():
    """Labels, headings and credits would each be a concept repeated hundreds of times across
    the commentary; prose, including its enumerations and a closing name that is part of a
    sentence, stays."""
    drop = script_module("sword").drop_markers
    assert drop("EXPLANATORY NOTES AND QUAINT SAYINGS.") == ""
    assert drop("Ver. 3. — The soul restored.") == "The soul restored."
    assert drop("( last clause ). The calm of the good man's end.") == \
        "The calm of the good man's end."
    assert drop("He walks not. John Trapp, 1660") == "He walks not."
    assert drop("It is a dream. — Augustine.") == "It is a dream."
    listed = drop("Six marks: 1. They know him. 2. They follow. II. The sinner has his way; "
                  "and III. The scorner sits.")
    assert listed == ("Six marks: 1) They know him. 2) They follow. II) The sinner has his way; "
                      "and III) The scorner sits.")
    kept = "He thought of it as in Psalm 2. The next thing came from the Lord Jesus Christ."
    assert drop(kept) == kept
    assert drop("Praise ye the Lord. Selah.") == "Praise ye the Lord. Selah."


def test_sword_recipe_without_the_program_says_what_to_install(tmp_path, capsys):
    assert script_module("sword").main(["--diatheke", str(tmp_path / "nope"), "--out",
                                        str(tmp_path / "x.jsonl")]) == 2
    assert "apt-get install diatheke" in capsys.readouterr().err


def fake_imp() -> str:
    """A mod2imp dump the way Debian's broken MHCC index prints it: keys that do not match their
    text, a paragraph repeated under a later key, sections out of id order, a book
    introduction before the first label, and a section whose label has no prose."""
    def para(n: int, body: str) -> str:
        return f'<div sID="gen{n}" type="x-p"/> {body} <div eID="gen{n}" type="x-p"/>'
    label = '<hi type="bold">Verses {}</hi>'.format
    return "\n".join([
        "$$$Genesis 0:0", para(1, "An introduction to the book."),
        "$$$Genesis 1:1", para(2, label("1-2")), para(4, "God made light. It was good!"),
        "$$$Genesis 1:2", para(7, label("6-8")) + para(8, "The firmament. The waters parted."),
        "$$$Genesis 1:3", para(4, "God made light. It was good!"),  # the broken index repeats
        para(5, '<reference osisRef="John.1.1">Joh 1:1</reference> Only one sentence here.'),
        "$$$Genesis 1:4", para(9, label("9") + " Let the dry land appear. It did."),
        para(10, label("10-12")), "$$$Genesis 1:5", ""])


def test_sword_recipe_cuts_a_mod2imp_dump_into_labelled_sections_in_paragraph_order(tmp_path):
    sword = script_module("sword")
    assert sword.imp_sections(fake_imp()) == [
        ("Verses 1-2", "God made light. It was good!\n\nJoh 1:1 Only one sentence here."),
        ("Verses 6-8", "The firmament. The waters parted."),
        ("Verses 9", "Let the dry land appear. It did.")]  # 10-12: a label without prose
    imp, out = tmp_path / "mhcc.imp", tmp_path / "mhcc.jsonl"
    imp.write_text(fake_imp())
    assert sword.main(["--module", "MHCC", "--imp", str(imp), "--min-sentences", "2",
                       "--max-sentences", "2", "--max-docs", "1", "--out", str(out)]) == 0
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    # Section 0 has 3 sentences; 1 and 2 have 2 each; --max-docs keeps the first of those.
    assert docs == [{"id": "MHCC-00001", "title": "Verses 6-8",
                     "text": "The firmament. The waters parted."}]
    assert sword.main(["--imp", str(tmp_path / "none.imp"), "--out", str(out)]) == 2


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


def test_subsampled_bank_drops_whole_training_documents_and_keeps_val_and_test(tmp_path):
    import numpy as np
    import pytest

    from lvm_ray.data.bank import load_bank, save_bank
    from lvm_ray.data.synthetic import make_synthetic_bank

    bank = make_synthetic_bank(n_docs=40, doc_len=(10, 20), dim=16, seed=0)
    bank.meta.update(encoder="enc-x", dim=16)
    path = save_bank(bank, tmp_path / "full.parquet")
    sub = script_module("subsample_bank")
    assert sub.main(["--fraction", "0.25", "--out", str(tmp_path / "q.parquet"), str(path)]) == 0
    small = load_bank(tmp_path / "q.parquet")
    splits, docs = np.asarray(bank.splits).astype(str), np.asarray(bank.doc_ids)
    train_docs = set(docs[splits == "train"])
    kept = set(np.asarray(small.doc_ids)[np.asarray(small.splits).astype(str) == "train"])
    assert kept < train_docs and len(kept) == round(0.25 * len(train_docs))
    for s in ("val", "test"):  # the same rows, in the same order
        np.testing.assert_array_equal(small.vectors[np.asarray(small.splits).astype(str) == s],
                                      bank.vectors[splits == s])
    # Whole documents: every kept training document has all its rows, positions unchanged.
    for d in kept:
        np.testing.assert_array_equal(small.positions[np.asarray(small.doc_ids) == d],
                                      bank.positions[docs == d])
    assert small.meta["corpus"]["source"] == "subsampled" and small.meta["encoder"] == "enc-x"
    # Seeded: the same draw again, another with another seed.
    again = sub.subsample_train(bank, 0.25, seed=0)
    other = sub.subsample_train(bank, 0.25, seed=1)
    assert set(again.doc_ids) == set(small.doc_ids) and set(other.doc_ids) != set(small.doc_ids)
    with pytest.raises(SystemExit):
        sub.main(["--fraction", "0", "--out", str(tmp_path / "z.parquet"), str(path)])


def test_reversed_training_copies_read_each_training_document_backwards(tmp_path):
    import numpy as np

    from lvm_ray.config import WindowConfig
    from lvm_ray.data.bank import load_bank, save_bank
    from lvm_ray.data.synthetic import make_synthetic_bank
    from lvm_ray.data.windows import make_windows

    bank = make_synthetic_bank(n_docs=12, doc_len=(5, 9), dim=8, seed=0)
    path = save_bank(bank, tmp_path / "full.parquet")
    sub = script_module("subsample_bank")
    assert sub.main(["--reversed", "--out", str(tmp_path / "r.parquet"), str(path)]) == 0
    rev = load_bank(tmp_path / "r.parquet")
    splits, docs = np.asarray(bank.splits).astype(str), np.asarray(bank.doc_ids)
    n = len(bank)
    # The original rows first and unchanged, val and test among them only.
    np.testing.assert_array_equal(rev.vectors[:n], bank.vectors)
    new = np.asarray(rev.splits).astype(str)[n:]
    assert set(new) == {"train"} and len(new) == int((splits == "train").sum())
    for d in set(docs[splits == "train"]):
        mine = np.flatnonzero(docs == d)
        copy = np.flatnonzero(np.asarray(rev.doc_ids) == f"rev:{d}")
        np.testing.assert_array_equal(rev.positions[copy], np.arange(len(mine)))
        # Position k of the copy is position n-1-k of the original.
        order = mine[np.argsort(bank.positions[mine])]
        np.testing.assert_array_equal(rev.vectors[copy], bank.vectors[order[::-1]])
        assert list(np.asarray(rev.texts)[copy]) == list(np.asarray(bank.texts)[order[::-1]])
    cfg = WindowConfig(context=4, min_context=2)
    for s in ("val", "test"):
        assert len(make_windows(rev, s, cfg)) == len(make_windows(bank, s, cfg))
    assert len(make_windows(rev, "train", cfg)) == 2 * len(make_windows(bank, "train", cfg))
    assert rev.meta["corpus"]["source"] == "reversed_train"
