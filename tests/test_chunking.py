import pytest

from lvm_ray.data.chunking import chunk_document, split_sentences


def test_split_sentences_tricky_text():
    text = (
        "Mr. Smith paid $3.5 million to Dr. Jones of St. Louis on Jan. 5, 1990. The U.S. "
        'Government agreed!  "Is it over?" he asked. "Yes." (See No. 5.) Then Harry S. Truman '
        "spoke... No. We will not.\n\nA paragraph without a stop\nstill continues here"
        "\n\n  Last one?"
    )
    assert split_sentences(text) == [
        "Mr. Smith paid $3.5 million to Dr. Jones of St. Louis on Jan. 5, 1990.",
        "The U.S. Government agreed!",
        '"Is it over?" he asked.',
        '"Yes."',
        "(See No. 5.)",
        "Then Harry S. Truman spoke...",
        "No.",
        "We will not.",
        "A paragraph without a stop still continues here",
        "Last one?",
    ]


def test_split_sentences_closing_quotes_and_brackets_stay_with_their_sentence():
    text = "He said \u201cenough.\u201d Then he left. [It rained.] Next (maybe)."
    assert split_sentences(text) == [
        "He said \u201cenough.\u201d",
        "Then he left.",
        "[It rained.]",
        "Next (maybe).",
    ]


def test_split_sentences_empty_and_whitespace():
    assert split_sentences("") == []
    assert split_sentences(" \n\n \t ") == []


def test_chunk_groups_n_sentences():
    text = "One is here. Two is here. Three is here. Four is here. Five is here."
    assert chunk_document(text, sentences_per_chunk=2) == [
        "One is here. Two is here.",
        "Three is here. Four is here.",
        "Five is here.",
    ]
    assert chunk_document(text) == split_sentences(text)


def test_chunk_max_length_splits_at_word_boundaries():
    words = [f"word{i}" for i in range(200)]
    text = " ".join(words) + ". Short one."
    chunks = chunk_document(text, sentences_per_chunk=1, max_chunk_chars=50)
    assert all(0 < len(c) <= 50 for c in chunks)
    # Nothing lost, nothing reordered, no word cut in two.
    assert " ".join(chunks).split() == (" ".join(words) + ". Short one.").split()
    assert chunks[-1] == "Short one."


def test_chunk_cuts_a_single_overlong_word_hard():
    chunks = chunk_document("a " + "x" * 25 + " b.", max_chunk_chars=10)
    assert chunks == ["a", "x" * 10, "x" * 10, "x" * 5 + " b."]


def test_chunk_drops_empty_and_punctuation_only():
    assert chunk_document("Real text here.\n\n.\n\n* * *\n\nMore text.") == [
        "Real text here.",
        "More text.",
    ]
    assert chunk_document("   ") == []


def test_chunk_rejects_bad_settings():
    with pytest.raises(ValueError):
        chunk_document("Text.", sentences_per_chunk=0)
    with pytest.raises(ValueError):
        chunk_document("Text.", max_chunk_chars=0)
