"""The King James Bible as an lvm_ray JSONL corpus: one document per book (66, in canonical
order, up to 2,461 verses each), verses separated by blank lines. Offline: the text comes from
Debian's bible-kjv packages, read with their `bible` program.

    sudo apt-get install bible-kjv                   # bible-kjv-text comes with it
    python scripts/corpora/kjv.py --out data/kjv.jsonl
    lvm ingest --set corpus.source=jsonl --set corpus.path=data/kjv.jsonl \\
               --set bank_path=data/kjv_bank.parquet

Without root: `apt-get download bible-kjv bible-kjv-text`, `dpkg -x` both into a folder, and
pass --bible FOLDER/usr/bin/bible --data FOLDER/usr/lib.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

# The `bible` program's book abbreviations, in canonical order, and the books' names.
BOOKS = [
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"),
    ("Deu", "Deuteronomy"), ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"),
    ("1Sm", "1 Samuel"), ("2Sm", "2 Samuel"), ("1Ki", "1 Kings"), ("2Ki", "2 Kings"),
    ("1Chr", "1 Chronicles"), ("2Chr", "2 Chronicles"), ("Ezra", "Ezra"), ("Neh", "Nehemiah"),
    ("Est", "Esther"), ("Job", "Job"), ("Psa", "Psalms"), ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"), ("SSol", "Song of Solomon"), ("Isa", "Isaiah"),
    ("Jer", "Jeremiah"), ("Lam", "Lamentations"), ("Eze", "Ezekiel"), ("Dan", "Daniel"),
    ("Hos", "Hosea"), ("Joel", "Joel"), ("Amos", "Amos"), ("Obad", "Obadiah"),
    ("Jonah", "Jonah"), ("Mic", "Micah"), ("Nahum", "Nahum"), ("Hab", "Habakkuk"),
    ("Zep", "Zephaniah"), ("Hag", "Haggai"), ("Zec", "Zechariah"), ("Mal", "Malachi"),
    ("Mat", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"), ("John", "John"), ("Acts", "Acts"),
    ("Rom", "Romans"), ("1Cor", "1 Corinthians"), ("2Cor", "2 Corinthians"),
    ("Gal", "Galatians"), ("Eph", "Ephesians"), ("Phi", "Philippians"), ("Col", "Colossians"),
    ("1Th", "1 Thessalonians"), ("2Th", "2 Thessalonians"), ("1Tim", "1 Timothy"),
    ("2Tim", "2 Timothy"), ("Titus", "Titus"), ("Phmn", "Philemon"), ("Heb", "Hebrews"),
    ("Jas", "James"), ("1Pet", "1 Peter"), ("2Pet", "2 Peter"), ("1Jn", "1 John"),
    ("2Jn", "2 John"), ("3Jn", "3 John"), ("Jude", "Jude"), ("Rev", "Revelation"),
]
VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def read_verses(bible: str, data: str | None) -> list[tuple[str, str]]:
    """(book abbreviation, verse text) for every verse, Genesis 1:1 to Revelation 22:21."""
    cmd = [bible, "-f", *(["-p", data] if data else []), "gen1:1-rev22:21"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    verses = []
    for line in out.splitlines():
        m = VERSE.match(line.strip())
        if m:
            verses.append((m.group(1), m.group(4).strip()))
    return verses


def to_documents(verses: list[tuple[str, str]]) -> list[dict[str, str]]:
    """One JSONL record per book, in canonical order: {"id", "title", "text"}."""
    names = dict(BOOKS)
    order = {abbr: i for i, (abbr, _) in enumerate(BOOKS)}
    by_book: dict[str, list[str]] = {}
    for abbr, text in verses:
        if abbr not in names:
            raise ValueError(f"unknown book abbreviation {abbr!r} in the bible output")
        by_book.setdefault(abbr, []).append(text)
    return [{"id": f"{order[a] + 1:02d}-{a}", "title": names[a], "text": "\n\n".join(v)}
            for a, v in sorted(by_book.items(), key=lambda kv: order[kv[0]])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/kjv.jsonl")
    ap.add_argument("--bible", default=shutil.which("bible") or "/usr/bin/bible",
                    help="the `bible` program of Debian's bible-kjv package")
    ap.add_argument("--data", help="folder of bible.data and bible.data.conc (default: the "
                                   "program's own)")
    args = ap.parse_args(argv)
    if not Path(args.bible).is_file():
        print(f"kjv: {args.bible} not found; install Debian's bible-kjv package "
              "(apt-get install bible-kjv) or pass --bible", file=sys.stderr)
        return 2
    docs = to_documents(read_verses(args.bible, args.data))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(d) + "\n" for d in docs))
    n = sum(d["text"].count("\n\n") + 1 for d in docs)
    print(f"wrote {out}: {len(docs)} books, {n} verses")
    return 0


if __name__ == "__main__":
    sys.exit(main())
