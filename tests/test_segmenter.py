"""Tests for ospo.segmenter: phrases, sentences, <answer> handling, the max_segments cap."""

from __future__ import annotations

import random

import numpy as np
import pytest

from ospo.segmenter import (
    GLUE_WORDS,
    PhraseSegmenter,
    Segmentation,
    SentenceSegmenter,
    answer_span,
    merge_to_cap,
)


def check_valid(seg: Segmentation, text: str, region: tuple[int, int] | None = None) -> None:
    """Invariants every segmentation must satisfy on `text`."""
    a, b = region if region is not None else (0, len(text))
    prev = -1
    for s, e in seg.spans:
        assert a <= s < e <= b
        assert s >= prev
        prev = e
        piece = text[s:e]
        assert piece and piece == piece.strip()
    assert sorted(p for u in seg.unions for p in u) == list(range(seg.n))
    assert all(u == sorted(u) for u in seg.unions)
    assert [u[0] for u in seg.unions] == sorted(u[0] for u in seg.unions)


def covered(seg: Segmentation, length: int) -> np.ndarray:
    mask = np.zeros(length, dtype=bool)
    for s, e in seg.spans:
        mask[s:e] = True
    return mask


# ----------------------------------------------------------------------------- Segmentation


def test_segmentation_helpers():
    text = "red dress, with pockets"
    seg = Segmentation(spans=[(0, 9), (16, 23)], unions=[[0, 1]])
    assert seg.n == 2
    assert seg.texts(text) == ["red dress", "pockets"]
    # the context (", with") stays in every coalition; the full coalition is the text itself
    assert seg.coalition_text(text, [True, True]) == text
    assert seg.coalition_text(text, np.array([False, True])) == ", with pockets"
    assert seg.coalition_text(text, [True, False]) == "red dress, with"
    assert seg.coalition_text(text, [False, False]) == ", with"
    with pytest.raises(ValueError, match="mask has 3 entries"):
        seg.coalition_text(text, [True, True, False])


def test_coalition_text_keeps_words_apart_and_tokens_add_up():
    """Cutting a player never glues two words together: the retriever's tokens of every
    coalition text are the context's plus the kept players', on texts with glue words,
    punctuation, stop words and text outside the answer tags."""
    from ospo.retriever import tokenize

    texts = [
        "wheels backpack under 100",
        "a warm jacket for the kids, with hood; size 10/12",
        "<answer>red t-shirt (cotton) without print</answer> thanks",
        "  leading and trailing  ",
    ]
    rng = np.random.default_rng(0)
    for text in texts:
        seg = PhraseSegmenter(max_segments=None)(text)
        context = tokenize(seg.coalition_text(text, np.zeros(seg.n, dtype=bool)))
        for _ in range(20):
            mask = rng.random(seg.n) < 0.5
            kept = [w for t, k in zip(seg.texts(text), mask, strict=True) if k for w in tokenize(t)]
            got = tokenize(seg.coalition_text(text, mask))
            assert sorted(got) == sorted(context + kept), (text, mask)


@pytest.mark.parametrize(
    "spans, unions, match",
    [
        ([(0, 3), (2, 5)], [[0, 1]], "sorted and disjoint"),
        ([(3, 5), (0, 2)], [[0, 1]], "sorted and disjoint"),
        ([(2, 2)], [[0]], "start < end"),
        ([(0, 2), (3, 5)], [[0]], "partition range"),
        ([(0, 2), (3, 5)], [[0, 1], [1]], "partition range"),
        ([(0, 2), (3, 5)], [[1, 0]], "must be sorted"),
        ([(0, 2), (3, 5)], [[1], [0]], "text order"),
    ],
)
def test_segmentation_validates(spans, unions, match):
    with pytest.raises(ValueError, match=match):
        Segmentation(spans=spans, unions=unions)


def test_segmentation_is_frozen():
    seg = Segmentation(spans=[(0, 1)], unions=[[0]])
    with pytest.raises(AttributeError):
        seg.spans = []  # type: ignore[misc]


# ----------------------------------------------------------------------------- answer_span


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer> red dress </answer>", "red dress"),
        ("think first\n<answer>\nred dress\n</answer>\nbye", "red dress"),
        ("<answer>red dress", "red dress"),
        ("<answer>a</answer> <answer>b</answer>", "a"),
        ("  plain text  ", "plain text"),
        ("<ANSWER>upper</ANSWER>", "upper"),
        ("<answer>   </answer>", ""),
        ("", ""),
    ],
)
def test_answer_span(text, expected):
    s, e = answer_span(text)
    assert text[s:e] == expected
    assert 0 <= s <= e <= len(text)


def test_answer_span_without_tag():
    text = " <answer>x</answer> "
    s, e = answer_span(text, tag=None)
    assert text[s:e] == "<answer>x</answer>"


# ----------------------------------------------------------------------------- phrases


# Phrase-level players (the segmenter's rules); the default is one word per player.
PHRASES = PhraseSegmenter(max_segments=8, max_phrase_words=None)


def test_phrase_example():
    text = "warm kids ski jacket, insulated waterproof, for winter"
    seg = PHRASES(text)
    check_valid(seg, text)
    assert seg.texts(text) == ["warm kids ski jacket", "insulated waterproof", "winter"]
    assert seg.unions == [[0, 1, 2]]


def test_default_players_are_words():
    """Each attribute word is its own player, so a wrong word never shares a player (and its
    credit) with a right one; glue words and punctuation still belong to none."""
    text = "kids insulated ski jacket, for winter"
    seg = PhraseSegmenter()(text)
    check_valid(seg, text)
    assert seg.texts(text) == ["kids", "insulated", "ski", "jacket", "winter"]
    assert seg.unions == [[0, 1, 2, 3, 4]]
    long = " ".join(f"w{i}" for i in range(14))
    assert PhraseSegmenter()(long).n == 10  # merged down to max_segments


def test_phrase_glue_words_are_not_covered():
    text = "red dress with pockets and belt for a wedding or party"
    seg = PhraseSegmenter(max_segments=None, max_phrase_words=None)(text)
    check_valid(seg, text)
    assert seg.texts(text) == ["red dress", "pockets", "belt", "a wedding", "party"]
    mask = covered(seg, len(text))
    for glue in ("with", "and", "for", "or"):
        start = text.index(f" {glue} ") + 1
        assert not mask[start : start + len(glue)].any(), glue
    assert {"and", "or", "for", "with", "&"} <= GLUE_WORDS


def test_phrase_punctuation_splits_and_unions():
    text = "red dress (midi) / blue; cotton - linen. Size M\nfor summer | beach"
    seg = PhraseSegmenter(max_segments=None, max_phrase_words=None)(text)
    check_valid(seg, text)
    assert seg.texts(text) == [
        "red dress",
        "midi",
        "blue",
        "cotton",
        "linen",
        "Size M",
        "summer",
        "beach",
    ]
    # union boundaries at ";", ". " and the line break
    assert seg.unions == [[0, 1, 2], [3, 4], [5], [6, 7]]


def test_phrase_keeps_word_internal_punctuation():
    text = "t-shirt 2.5 inch, 1,000 pcs, women's 24/7 e.g. Dr. Martens"
    seg = PhraseSegmenter(max_segments=None, max_phrase_words=None)(text)
    check_valid(seg, text)
    assert seg.texts(text)[:4] == ["t-shirt 2.5 inch", "1,000 pcs", "women's 24/7", "Dr"]
    assert seg.unions == [list(range(seg.n))]  # abbreviation dots end no clause


def test_phrase_word_chunking():
    text = "waterproof breathable lightweight hiking boots men wide toe box"  # 9 words, no commas
    seg = PhraseSegmenter(max_segments=None, max_phrase_words=4)(text)
    check_valid(seg, text)
    assert seg.texts(text) == [
        "waterproof breathable lightweight",
        "hiking boots men",
        "wide toe box",
    ]
    assert PhraseSegmenter(max_segments=None, max_phrase_words=None)(text).n == 1
    with pytest.raises(ValueError, match="max_phrase_words"):
        PhraseSegmenter(max_phrase_words=0)


def test_phrase_answer_tag_offsets_into_full_text():
    text = "<think>for kids, warm</think>\n<answer> ski jacket, insulated </answer> and more"
    seg = PHRASES(text)
    region = answer_span(text)
    check_valid(seg, text, region)
    assert seg.texts(text) == ["ski jacket", "insulated"]
    assert seg.spans[0][0] == text.index("ski jacket")
    whole = PhraseSegmenter(answer_tag=None, max_phrase_words=None)(text)
    assert whole.n > seg.n


def test_phrase_unclosed_answer():
    text = "<answer>red dress, with pockets"
    seg = PHRASES(text)
    assert seg.texts(text) == ["red dress", "pockets"]


# ----------------------------------------------------------------------------- sentences

MULTI = "Warm jacket for kids. Waterproof, e.g. Gore-Tex! Size 2.5 ok?\nSecond line. Yes\n\nNew para. End"
MULTI_SENTENCES = [
    "Warm jacket for kids.",
    "Waterproof, e.g. Gore-Tex!",
    "Size 2.5 ok?",
    "Second line.",
    "Yes",
    "New para.",
    "End",
]


@pytest.mark.parametrize(
    "mode, unions",
    [
        ("line", [[0, 1, 2], [3, 4], [5, 6]]),
        ("paragraph", [[0, 1, 2, 3, 4], [5, 6]]),
        ("singleton", [[i] for i in range(7)]),
    ],
)
def test_sentence_unions(mode, unions):
    seg = SentenceSegmenter(max_segments=None, unions=mode)(MULTI)
    check_valid(seg, MULTI)
    assert seg.texts(MULTI) == MULTI_SENTENCES
    assert seg.unions == unions


def test_sentence_bad_mode():
    with pytest.raises(ValueError, match="unions must be one of"):
        SentenceSegmenter(unions="clause")


def test_sentence_answer_and_cjk():
    text = "reasoning. <answer>\n  First one.  Second one!\n</answer>"
    seg = SentenceSegmenter()(text)
    check_valid(seg, text, answer_span(text))
    assert seg.texts(text) == ["First one.", "Second one!"]
    cjk = "保暖外套。适合儿童！滑雪"
    assert SentenceSegmenter()(cjk).texts(cjk) == ["保暖外套。", "适合儿童！", "滑雪"]


def test_sentence_quote_closing_and_ellipsis():
    text = 'She said "warm." Then... it rained? Sure.'
    seg = SentenceSegmenter(max_segments=None)(text)
    assert seg.texts(text) == ['She said "warm."', "Then...", "it rained?", "Sure."]


# ----------------------------------------------------------------------------- max_segments


@pytest.mark.parametrize("cap", [1, 2, 3, 5])
def test_cap_merges_neighbours(cap):
    text = "red dress; with pockets, midi length. blue or green\nsize M, cotton, for summer"
    full = PhraseSegmenter(max_segments=None)(text)
    seg = PhraseSegmenter(max_segments=cap)(text)
    assert full.n > 5
    check_valid(seg, text)
    assert seg.n == cap
    before, after = covered(full, len(text)), covered(seg, len(text))
    assert not (before & ~after).any()  # nothing that was covered is lost
    # what is newly covered lies strictly between merged players (glue), never outside them
    first, last = full.spans[0][0], full.spans[-1][1]
    assert not after[:first].any() and not after[last:].any()
    # every merged span is exactly the hull of a run of original players
    starts = {s for s, _ in full.spans}
    ends = {e for _, e in full.spans}
    assert all(s in starts and e in ends for s, e in seg.spans)


def test_cap_prefers_merges_within_a_union():
    spans = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    seg = merge_to_cap(spans, [0, 0, 1, 1, 1], 3)
    # smallest pairs are all equal; within-union merges come first, in text order
    assert seg.spans == [(0, 3), (4, 7), (8, 9)]
    assert seg.unions == [[0], [1, 2]]
    seg = merge_to_cap(spans, [0, 0, 1, 1, 1], 2)
    assert seg.spans == [(0, 3), (4, 9)]
    assert seg.unions == [[0], [1]]
    seg = merge_to_cap(spans, [0, 0, 1, 1, 1], 1)  # crosses the boundary: unions merge
    assert seg.spans == [(0, 9)] and seg.unions == [[0]]


def test_cap_merges_smallest_pair_and_crossing_merges_unions():
    spans = [(0, 10), (11, 12), (13, 14), (15, 30)]
    seg = merge_to_cap(spans, [0, 1, 2, 3], 3)
    assert seg.spans == [(0, 10), (11, 14), (15, 30)]
    assert seg.unions == [[0], [1], [2]]
    seg = merge_to_cap(spans, [0, 0, 1, 1], 3)
    assert seg.spans == [(0, 12), (13, 14), (15, 30)]  # within-union pair despite a longer span
    assert seg.unions == [[0], [1, 2]]


@pytest.mark.parametrize("cap", [1, 2, 4])
def test_sentence_cap(cap):
    seg = SentenceSegmenter(max_segments=cap, unions="singleton")(MULTI)
    check_valid(seg, MULTI)
    assert seg.n == cap
    assert seg.spans[0][0] == 0 and seg.spans[-1][1] == len(MULTI)
    assert len(seg.unions) <= cap


def test_bad_cap():
    with pytest.raises(ValueError, match="max_segments"):
        PhraseSegmenter(max_segments=0)
    with pytest.raises(ValueError, match="max_segments"):
        SentenceSegmenter(max_segments=-1)


# ----------------------------------------------------------------------------- edge cases


SEGMENTERS = [
    PhraseSegmenter(),
    PhraseSegmenter(max_segments=None),
    SentenceSegmenter(),
    SentenceSegmenter(max_segments=None, unions="paragraph"),
    SentenceSegmenter(max_segments=3, unions="singleton"),
]


@pytest.mark.parametrize("segmenter", SEGMENTERS, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize(
    "text", ["", "   ", "\n\n \t", "<answer></answer>", "<answer> , ; </answer>", "...\n!"]
)
def test_empty_inputs(segmenter, text):
    seg = segmenter(text)
    assert seg.spans == [] and seg.unions == []


@pytest.mark.parametrize("segmenter", SEGMENTERS, ids=lambda s: type(s).__name__)
def test_one_word(segmenter):
    text = "  jacket "
    seg = segmenter(text)
    assert seg.texts(text) == ["jacket"] and seg.unions == [[0]]


@pytest.mark.parametrize("segmenter", SEGMENTERS, ids=lambda s: type(s).__name__)
def test_unicode(segmenter):
    text = "Crème brûlée café, für Kinder 🎿🧥. 保暖儿童滑雪夹克，防水！ naïve—résumé 👍"
    seg = segmenter(text)
    check_valid(seg, text)
    assert seg.n >= 1
    joined = " ".join(seg.texts(text))
    assert "🎿🧥" in joined and "保暖儿童滑雪夹克" in joined


def test_phrase_unicode_pieces():
    text = "Crème brûlée café, für Kinder 🎿🧥. 保暖儿童滑雪夹克，防水"
    seg = PhraseSegmenter(max_segments=None, max_phrase_words=None)(text)
    assert seg.texts(text) == ["Crème brûlée café", "für Kinder 🎿🧥", "保暖儿童滑雪夹克", "防水"]
    assert seg.unions == [[0, 1], [2, 3]]


@pytest.mark.parametrize("segmenter", SEGMENTERS, ids=lambda s: type(s).__name__)
def test_long_text(segmenter):
    """10,000 words: valid spans, the cap met by merging only (timed in
    benchmarks/data_and_segmenter.py)."""
    rng = random.Random(0)
    vocab = "warm kids ski jacket for and with , . ; ! size 2.5 \n insulated é 雪 🔥".split(" ")
    text = " ".join(rng.choice(vocab) for _ in range(10_000))
    seg = segmenter(text)
    check_valid(seg, text)
    uncapped = type(segmenter)(max_segments=None, **_other_args(segmenter))(text)
    assert uncapped.n > 100
    assert seg.n == min(uncapped.n, segmenter.max_segments or uncapped.n)
    assert not (covered(uncapped, len(text)) & ~covered(seg, len(text))).any()


def test_random_texts_keep_invariants():
    """Property test: random texts with tags, punctuation and unicode, every segmenter."""
    rng = random.Random(1)
    pieces = [
        "red", "dress", "for", "and", "kids", ",", ".", ";", ":", "!", "?", "/", "-", "(", ")",
        "\n", "\n\n", "  ", "2.5", "e.g.", "t-shirt", "é", "雪", "。", "🔥", "<answer>",
        "</answer>", "&", "|", "...", '"', "—",
    ]  # fmt: skip
    segmenters = [
        PhraseSegmenter(max_segments=cap, max_phrase_words=w)
        for cap in (None, 1, 3, 8)
        for w in (None, 2)
    ] + [
        SentenceSegmenter(max_segments=cap, unions=mode)
        for cap in (None, 1, 3)
        for mode in SentenceSegmenter.UNION_MODES
    ]
    for _ in range(150):
        text = "".join(
            rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(0, 40))
        )
        region = answer_span(text)
        for segmenter in segmenters:
            seg = segmenter(text)
            check_valid(seg, text, region)
            if segmenter.max_segments is not None:
                assert seg.n <= segmenter.max_segments
            uncapped = type(segmenter)(max_segments=None, **_other_args(segmenter))(text)
            assert seg.n == min(uncapped.n, segmenter.max_segments or uncapped.n)
            # merging only adds glue between players: coverage grows, within the same hull
            assert not (covered(uncapped, len(text)) & ~covered(seg, len(text))).any()


def _other_args(segmenter) -> dict:
    if isinstance(segmenter, PhraseSegmenter):
        return {"max_phrase_words": segmenter.max_phrase_words}
    return {"unions": segmenter.unions}
