"""Text -> sentences -> chunks (one chunk = one concept = one vector in the bank).

Rule-based and deterministic on purpose: the same text always gives the same chunks, so the
per-document embedding cache in ingest.py stays valid across runs and machines. The sentence
splitter is pluggable: the built-in regex rules (default), or `pysbd` / `blingfire` when installed
(pip install lvm_ray[splitters]); the bank records which one made its chunks.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

# Abbreviations whose period never ends a sentence when a capitalised word or a digit follows
# ("Mr. Lincoln", "St. Louis", "Jan. 5"). Lower-case, without the final period.
_ABBREVIATIONS = frozenset(
    """
    mr mrs ms messrs mme dr prof rev hon gen col maj capt lt sgt adm cmdr gov sen rep pres supt
    st mt vs cf jan feb mar apr jun jul aug sep sept oct nov dec
    """.split()
)
# Abbreviations that end no sentence only when a number follows ("No. 5", "Art. 3").
_NUMBER_ABBREVIATIONS = frozenset({"no", "nos", "art", "sec", "vol", "fig", "p", "pp", "ch"})

# A run of stops, then any closing quotes / brackets, then whitespace or the end of the text.
_STOP = re.compile(r"[.!?]+[\"'\u201d\u2019\u00bb)\]]*(?=\s|$)")
_DOTTED = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]$")  # "U.S", "e.g", "D.C" (final period cut)
_OPENERS = "\"'\u201c\u2018\u00ab(["
_PARAGRAPH = re.compile(r"\n\s*\n")
_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w")


def _ends_sentence(para: str, stop: re.Match) -> bool:
    nxt = para[stop.end() + 1 : stop.end() + 2]  # first character of the next word
    if nxt and nxt.islower():
        return False  # '"Why?" he asked.' and "approx. five" continue the sentence
    if "!" in stop.group() or "?" in stop.group():
        return True  # only a period can belong to an abbreviation
    token = para[: stop.start()].rsplit(" ", 1)[-1].lstrip(_OPENERS)
    if token.lower() in _ABBREVIATIONS or _DOTTED.match(token):
        return False
    if len(token) == 1 and token.isupper():  # a middle initial: "Harry S. Truman"
        return False
    if token.lower() in _NUMBER_ABBREVIATIONS and nxt.isdigit():
        return False
    return True


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, in order, whitespace collapsed. Paragraph breaks (a blank line)
    always end a sentence; ., ! and ? end one unless an abbreviation, an initial, a dotted
    acronym (U.S.) or a lower-case next word says otherwise. Decimals (3.5) never split."""
    out: list[str] = []
    for raw in _PARAGRAPH.split(text):
        para = _SPACE.sub(" ", raw).strip()
        start = 0
        for stop in _STOP.finditer(para):
            if _ends_sentence(para, stop):
                sentence = para[start : stop.end()].strip()
                if sentence:
                    out.append(sentence)
                start = stop.end()
        tail = para[start:].strip()
        if tail:
            out.append(tail)
    return out


SPLITTERS = ("regex", "pysbd", "blingfire")


@functools.lru_cache(maxsize=4)
def sentence_splitter(name: str = "regex") -> Callable[[str], list[str]]:
    """text -> sentences, by the named splitter. Every splitter's sentences are split again at
    paragraph breaks and have their whitespace collapsed, so chunks look alike whichever made
    them."""
    if name == "regex":
        return split_sentences
    if name == "pysbd":
        try:
            import pysbd
        except ImportError as e:
            raise ValueError("corpus.splitter 'pysbd' needs the pysbd package: "
                             "pip install lvm_ray[splitters]") from e
        seg = pysbd.Segmenter(language="en", clean=False)
        split = seg.segment
    elif name == "blingfire":
        try:
            import blingfire
        except ImportError as e:
            raise ValueError("corpus.splitter 'blingfire' needs the blingfire package: "
                             "pip install blingfire") from e

        def split(text: str) -> list[str]:
            return blingfire.text_to_sentences(text).split("\n")
    else:
        raise ValueError(f"unknown sentence splitter {name!r}; choose from {SPLITTERS}")

    def sentences(text: str) -> list[str]:
        out = []
        for raw in _PARAGRAPH.split(text):
            out += [s for s in (_SPACE.sub(" ", x).strip() for x in split(raw)) if s]
        return out

    return sentences


def _split_long(chunk: str, max_chars: int) -> list[str]:
    """Greedy word packing into pieces <= max_chars; a single longer word is cut hard."""
    pieces: list[str] = []
    current = ""
    for word in chunk.split(" "):
        while len(word) > max_chars:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(word[:max_chars])
            word = word[max_chars:]
        if not word:
            continue
        if not current:
            current = word
        elif len(current) + 1 + len(word) <= max_chars:
            current = f"{current} {word}"
        else:
            pieces.append(current)
            current = word
    if current:
        pieces.append(current)
    return pieces


def chunk_document(text: str, sentences_per_chunk: int = 1, max_chunk_chars: int = 400,
                   splitter: str = "regex") -> list[str]:
    """Consecutive groups of `sentences_per_chunk` sentences (as `splitter` finds them); any
    group longer than `max_chunk_chars` is split at word boundaries. Sentences without a letter
    or digit (separator lines such as "." or "* * *") carry no concept and are dropped."""
    if sentences_per_chunk < 1 or max_chunk_chars < 1:
        raise ValueError("sentences_per_chunk and max_chunk_chars must be >= 1")
    sentences = [s for s in sentence_splitter(splitter)(text) if _WORD.search(s)]
    chunks: list[str] = []
    for i in range(0, len(sentences), sentences_per_chunk):
        chunk = " ".join(sentences[i : i + sentences_per_chunk])
        chunks.extend(_split_long(chunk, max_chunk_chars) if len(chunk) > max_chunk_chars
                      else [chunk])
    return [c for c in chunks if _WORD.search(c)]
