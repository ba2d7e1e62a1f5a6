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
