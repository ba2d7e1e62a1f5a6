"""A SWORD commentary as an lvm_ray JSONL corpus: one document per chapter of one book, e.g.
C. H. Spurgeon's Treasury of David (Debian's sword-comm-tdavid: 150 psalms, long 19th-century
expository prose, ~2M words), read offline with SWORD's `diatheke`.

    sudo apt-get install diatheke sword-comm-tdavid
    python scripts/corpora/sword.py --module TDavid --book Psalms --chapters 150 \\
        --out data/tdavid.jsonl
    lvm ingest --set corpus.source=jsonl --set corpus.path=data/tdavid.jsonl \\
               --set bank_path=data/tdavid_bank.parquet

OSIS markup (<hi>, <div>, <title> ...) is dropped; paragraphs become blank-line breaks.

A small corpus of short documents: one document per labelled section ("Verses 3-5") of a whole
commentary, read from SWORD's `mod2imp` dump. Matthew Henry's Concise Commentary (Debian's
sword-comm-mhcc) is one: ~3,900 sections, most a paragraph of 2-10 sentences. Its verse index is
broken in Debian's build (diatheke prints "Error reading ulCompOffset" and files text under the
wrong verses), so sections are put in order by their paragraph ids, not by verse keys:

    sudo apt-get install libsword-utils sword-comm-mhcc
    mod2imp MHCC > data/mhcc.imp
    python scripts/corpora/sword.py --module MHCC --imp data/mhcc.imp --min-sentences 2 \
        --max-sentences 10 --max-docs 2000 --out data/mhcc_small.jsonl

The commentary's navigation is dropped too, because each piece would become a concept of its own
that repeats hundreds of times ("Verse 1.", "EXPOSITION", "— John Trapp.", a lone "2."), and a
model scores easy hits on such markers without predicting anything: section titles and
all-capital headings, labels ("Verse 3.", "Ver. 3.", "Whole Psalm.", "TITLE."), "( last clause )"
notes, and quotation credits that close a paragraph ("John Trapp, 1660.", "— Augustine.").
Enumerators ("1. They know ...", "II. The sinner ...") are written "1)" so that the sentence
splitter does not cut them off as sentences of their own.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ENTRY = re.compile(r"^(?P<ref>[1-3]?\s?[A-Za-z ]+ \d+:\d+): ?", re.M)
PARAGRAPH = re.compile(r"<div [^>]*type=\"x-p\"[^>]*/>")
TAG = re.compile(r"<[^>]+>")
TITLE = re.compile(r"<title[^>]*>.*?</title>", re.S)
# A bold run of at most four words is a label ("Verse 1.", "Whole Psalm."), not prose: TDavid
# sets only its labels in bold.
LABEL = re.compile(r"<hi type=\"bold\">\s*(?:\S+\s+){0,3}\S+\s*</hi>")
CLAUSE_NOTE = re.compile(r"\(\s*(?:first|second|third|last|middle|latter|former)"
                         r"(?:\s+\w+)?\s+clauses?\s*\)\.?", re.I)
# "Ver. 3." / "Verses 3, 4." when not in bold.
VERSE_LABEL = re.compile(r"^(?:Ver(?:ses?)?\.?|Whole Psalm\.|Title\.|Subject\.)\s*[\d,\s\-–]*\.?"
                         r"\s*(?:—\s*)?", re.I)
HEADING = re.compile(r"^[^a-z]*$")  # a paragraph without a lower-case letter: "HINTS TO PREACHERS."
# An enumerator at a paragraph's start or after punctuation, "and" or "or", before a capital.
ENUMERATOR = re.compile(r"(^|[.!?;:,—(]\s*|\b(?:and|or)\s+)(\d{1,2}|[IVXL]{1,5})\."
                        r"(?=\s+\W?[A-Z])")
# A paragraph's closing credit: after its last sentence, 2-7 capitalised words, initials, years or
# degrees ("John Trapp, 1660", "J. R. Macduff, D.D."), or 1-7 after a dash ("— Augustine.").
# Credits that name a book ("... in 'Letters,' 1861") vary too much to catch and stay.
NAME = r"(?:(?:[A-Z][\w'’.]*|\d{4}|of|de|van|von|and),?\s*)"
CREDIT = re.compile(rf"(?<=[.!?\"'”’)])\s+(?:—\s*{NAME}{{1,7}}|{NAME}{{2,7}})$")


def drop_markers(para: str) -> str:
    """One plain-text paragraph without verse labels, clause notes and a closing credit, its
    enumerators written "1)"."""
    if HEADING.match(para):
        return ""
    para = CLAUSE_NOTE.sub(" ", VERSE_LABEL.sub("", para)).strip()
    para = CREDIT.sub("", para)
    return ENUMERATOR.sub(r"\1\2)", para).strip()


def plain_text(osis: str) -> str:
    """OSIS/ThML markup -> plain text, paragraphs separated by blank lines, navigation
    (titles, labels, credits) dropped."""
    text = LABEL.sub(" ", TITLE.sub("\n\n", osis))
    text = html.unescape(TAG.sub(" ", PARAGRAPH.sub("\n\n", text)))
    paras = (drop_markers(re.sub(r"\s+", " ", p).strip()) for p in text.split("\n\n"))
    return "\n\n".join(p for p in paras if p)


def chapter_text(raw: str, module: str) -> str:
    """diatheke's output for one chapter ("Psalms 23:1: ..." per verse, then "(MODULE)") ->
    the chapter's commentary as plain text, entries in verse order."""
    raw = raw.replace(f"({module})", "")
    parts = ENTRY.split(raw)
    # split() with one group gives [before, ref1, body1, ref2, body2, ...]
    bodies = [parts[i] for i in range(2, len(parts), 2)]
    return "\n\n".join(t for t in (plain_text(b) for b in bodies) if t)


# One OSIS paragraph, <div sID="gen18" type="x-p"/> ... <div eID="gen18" type="x-p"/>.
IMP_PARAGRAPH = re.compile(r'<div sID="(?P<id>[A-Za-z]*(?P<n>\d+))" type="x-p"/>(?P<body>.*?)'
                           r'<div eID="(?P=id)" type="x-p"/>', re.S)
SECTION_LABEL = re.compile(r'<hi type="bold">\s*(?P<label>Verses?\b[^<]*?)\s*</hi>')
SENTENCE_END = re.compile(r"[.!?][\"'”’)]*(?:\s|$)")


def imp_sections(raw: str) -> list[tuple[str, str]]:
    """A mod2imp dump -> (label, plain text) per labelled section, in the module's order.

    A broken verse index repeats paragraphs under several keys and out of order, so paragraphs
    are read once each by their OSIS id, in id order. A paragraph holding a bold "Verse(s) ..."
    label opens a section; its prose and the paragraphs after it, up to the next label, are its
    text. Text before the first label (book introductions) and sections without prose are
    dropped."""
    paras: dict[int, str] = {}
    for m in IMP_PARAGRAPH.finditer(raw):
        paras.setdefault(int(m["n"]), m["body"])
    sections: list[tuple[str, list[str]]] = []
    for n in sorted(paras):
        label = SECTION_LABEL.search(paras[n])
        if label:
            sections.append((label["label"], []))
        if sections and (text := plain_text(paras[n])):  # plain_text drops the label itself
            sections[-1][1].append(text)
    return [(label, "\n\n".join(body)) for label, body in sections if body]


def sentence_count(text: str) -> int:
    """Roughly the concepts a section becomes (the ingest splits it with its own splitter)."""
    return len(SENTENCE_END.findall(text))


def read_chapter(diatheke: str, module: str, book: str, chapter: int) -> str:
    out = subprocess.run([diatheke, "-b", module, "-k", f"{book} {chapter}"],
                         capture_output=True, text=True, check=True).stdout
    return chapter_text(out, module)


def section_docs(args: argparse.Namespace) -> list[dict[str, str]]:
    """One document per labelled section of a mod2imp dump, kept by length, the first N."""
    raw = Path(args.imp).read_text(encoding="utf-8", errors="replace")
    docs = [{"id": f"{args.module}-{i:05d}", "title": label, "text": text}
            for i, (label, text) in enumerate(imp_sections(raw))
            if args.min_sentences <= sentence_count(text) <= args.max_sentences]
    return docs[:args.max_docs] if args.max_docs else docs


def chapter_docs(args: argparse.Namespace) -> list[dict[str, str]]:
    """One document per chapter 1..N of one book, read with diatheke; empty chapters skipped."""
    docs = []
    for ch in range(1, args.chapters + 1):
        text = read_chapter(args.diatheke, args.module, args.book, ch)
        if text:
            docs.append({"id": f"{args.module}-{ch:03d}", "title": f"{args.book} {ch}",
                         "text": text})
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", default="TDavid", help="the SWORD module (diatheke -b)")
    ap.add_argument("--book", default="Psalms")
    ap.add_argument("--chapters", type=int, default=150, help="chapters 1..N, one document each")
    ap.add_argument("--imp", help="a mod2imp dump: one document per labelled section instead "
                    "of one per chapter (diatheke is then not needed)")
    ap.add_argument("--min-sentences", type=int, default=1, help="with --imp: shorter sections "
                    "are dropped")
    ap.add_argument("--max-sentences", type=int, default=1_000_000, help="with --imp: longer "
                    "sections are dropped")
    ap.add_argument("--max-docs", type=int, default=0, help="with --imp: the first N sections "
                    "kept (0: all)")
    ap.add_argument("--out", default="data/tdavid.jsonl")
    ap.add_argument("--diatheke", default=shutil.which("diatheke") or "/usr/bin/diatheke")
    args = ap.parse_args(argv)
    if args.imp and not Path(args.imp).is_file():
        print(f"sword: {args.imp} not found; write it with `mod2imp {args.module} > {args.imp}` "
              "(apt-get install libsword-utils and the module's package)", file=sys.stderr)
        return 2
    if not args.imp and not Path(args.diatheke).is_file():
        print(f"sword: {args.diatheke} not found; install Debian's diatheke and the module's "
              "package (apt-get install diatheke sword-comm-tdavid) or pass --diatheke",
              file=sys.stderr)
        return 2
    docs = section_docs(args) if args.imp else chapter_docs(args)
    if not docs:
        where = args.imp or f"{args.book} 1-{args.chapters}"
        print(f"sword: module {args.module!r} gave no text for {where}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(d) + "\n" for d in docs))
    words = sum(len(d["text"].split()) for d in docs)
    print(f"wrote {out}: {len(docs)} documents, {words:,} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
