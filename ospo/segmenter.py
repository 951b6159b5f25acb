"""Segmenters: a completion text -> players (character spans) + coalition structure (unions).

docs/design.md section 2.3. Two rule-based segmenters (config group `segmenter`):
* `PhraseSegmenter`:   players are attribute phrases / noun chunks, unions are the
                       sentences or clauses the phrases sit in.
* `SentenceSegmenter`: players are sentences, unions are lines, paragraphs or singletons.

Both read only the content of the first `<answer>...</answer>` when there is one, return
offsets into the full text, and cap the number of players at `max_segments` by merging
neighbours. Everything runs in time linear in the text (plus n log n for the merging).
"""

from __future__ import annotations

import heapq
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "GLUE_WORDS",
    "PhraseSegmenter",
    "Segmentation",
    "SentenceSegmenter",
    "answer_span",
    "merge_to_cap",
]


@dataclass(frozen=True)
class Segmentation:
    """Players as [start, end) character spans of the full completion text, plus unions.

    spans:  sorted, disjoint, non-empty spans.
    unions: partition of range(len(spans)); each union sorted, unions in text order.
    """

    spans: list[tuple[int, int]]
    unions: list[list[int]]

    def __post_init__(self) -> None:
        spans = [(int(s), int(e)) for s, e in self.spans]
        unions = [[int(p) for p in u] for u in self.unions]
        object.__setattr__(self, "spans", spans)
        object.__setattr__(self, "unions", unions)
        prev_end = None
        for j, (s, e) in enumerate(spans):
            if s < 0 or e <= s:
                raise ValueError(f"span {j} = ({s}, {e}) must satisfy 0 <= start < end")
            if prev_end is not None and s < prev_end:
                raise ValueError(
                    f"span {j} = ({s}, {e}) starts before the previous span ends ({prev_end}); "
                    "spans must be sorted and disjoint"
                )
            prev_end = e
        n = len(spans)
        flat = sorted(p for u in unions for p in u)
        if flat != list(range(n)):
            raise ValueError(
                f"unions {unions} must partition range({n}) (one union per player, no repeats)"
            )
        for k, u in enumerate(unions):
            if not u:
                raise ValueError(f"union {k} is empty; unions={unions}")
            if u != sorted(u):
                raise ValueError(f"union {k} = {u} must be sorted")
        firsts = [u[0] for u in unions]
        if firsts != sorted(firsts):
            raise ValueError(f"unions {unions} must be in text order (by first player)")

    @property
    def n(self) -> int:
        """Number of players."""
        return len(self.spans)

    def texts(self, text: str) -> list[str]:
        """The segment strings."""
        return [text[s:e] for s, e in self.spans]

    def coalition_text(self, text: str, mask) -> str:
        """`text` with the players outside the coalition (mask[j] false) taken out.

        Everything else stays: the kept players, and the context between players (glue words,
        punctuation, words the retriever does not read, text outside the answer region), so
        the full coalition is `text` itself and a coalition's query holds every word of the
        reward's query but the dropped players. Each cut joins the text on either side with one
        space; player spans end at word boundaries, so no two words run together and the
        retriever's tokens of the result are the context's plus the kept players'.
        """
        keep = np.asarray(mask, dtype=bool).reshape(-1)
        if keep.shape[0] != self.n:
            raise ValueError(f"mask has {keep.shape[0]} entries, expected n={self.n}")
        if keep.all():
            return text
        pieces, pos = [], 0
        for (s, e), k in zip(self.spans, keep, strict=True):
            if not k:
                pieces.append(text[pos:s])
                pos = e
        pieces.append(text[pos:])
        return " ".join(p.strip() for p in pieces if p and not p.isspace())


EMPTY = Segmentation(spans=[], unions=[])


# ----------------------------------------------------------------------------- answer region


def answer_span(text: str, tag: str | None = "answer") -> tuple[int, int]:
    """Span of the content of the first `<tag>...</tag>`, else of the whole text.

    A missing closing tag means "up to the end". Surrounding whitespace is stripped; the
    offsets index the original `text`. Empty content gives (s, s).
    """
    start, end = 0, len(text)
    if tag:
        opening = re.search(rf"<\s*{re.escape(tag)}\s*>", text, flags=re.IGNORECASE)
        if opening is not None:
            start = opening.end()
            closing = re.compile(rf"<\s*/\s*{re.escape(tag)}\s*>", flags=re.IGNORECASE)
            found = closing.search(text, start)
            end = found.start() if found is not None else len(text)
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


# ----------------------------------------------------------------------------- merging


def merge_to_cap(
    spans: Sequence[tuple[int, int]], union_ids: Sequence[int], cap: int | None
) -> Segmentation:
    """Merge adjacent players until there are at most `cap`, and build the Segmentation.

    `union_ids` is non-decreasing (unions are contiguous runs of players in text order).
    Each step merges the neighbour pair with the smallest combined span (first start to last
    end, so the glue between them becomes covered), preferring pairs inside one union; a merge
    across a union boundary merges the two unions. Uses a heap: O(n log n).
    """
    n = len(spans)
    starts = [s for s, _ in spans]
    ends = [e for _, e in spans]
    # new_union[j]: player j starts a new union (its union differs from the previous player's)
    new_union = [j == 0 or union_ids[j] != union_ids[j - 1] for j in range(n)]
    if cap is not None and n > cap:
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        version = [0] * n

        def push(heap: list, a: int) -> None:
            b = nxt[a]
            if b < n:
                key = (new_union[b], ends[b] - starts[a], starts[a], a, version[a], version[b])
                heapq.heappush(heap, key)

        heap: list = []
        for a in range(n - 1):
            push(heap, a)
        count = n
        while count > max(cap, 1) and heap:
            _, _, _, a, va, vb = heapq.heappop(heap)
            b = nxt[a]
            if not alive[a] or b >= n or version[a] != va or version[b] != vb:
                continue
            ends[a] = ends[b]  # merged player: union of its first part
            alive[b] = False
            nxt[a] = nxt[b]
            if nxt[b] < n:
                prv[nxt[b]] = a
            version[a] += 1
            count -= 1
            if prv[a] >= 0:
                push(heap, prv[a])
            push(heap, a)
        keep = [j for j in range(n) if alive[j]]
        starts = [starts[j] for j in keep]
        ends = [ends[j] for j in keep]
        new_union = [j == 0 or new_union[keep[j]] for j in range(len(keep))]
    unions: list[list[int]] = []
    for j, fresh in enumerate(new_union):
        if fresh:
            unions.append([])
        unions[-1].append(j)
    return Segmentation(spans=list(zip(starts, ends, strict=True)), unions=unions)


def _check_cap(max_segments: int | None) -> int | None:
    if max_segments is None:
        return None
    if isinstance(max_segments, bool) or not isinstance(max_segments, int) or max_segments < 1:
        raise ValueError(f"max_segments must be a positive int or None, got {max_segments!r}")
    return max_segments


Reads = Callable[[str], bool]  # does the retriever read anything in this text?


def _read_players(
    text: str, spans: list[tuple[int, int]], union_ids: list[int], reads: Reads | None
) -> tuple[list[tuple[int, int]], list[int]]:
    """Keep the spans in which `reads` finds a word (all of them when `reads` is None).

    A span the retriever does not read ("the", "my") has value 0 in every coalition; as a
    player it would only double the coalitions and take blame, so it stays context."""
    if reads is None:
        return spans, union_ids
    keep = [j for j, (s, e) in enumerate(spans) if reads(text[s:e])]
    return [spans[j] for j in keep], [union_ids[j] for j in keep]


# ----------------------------------------------------------------------------- phrases

# Words whose "." does not end a sentence (compared case-folded, without the final ".").
_ABBREVIATIONS = frozenset(
    "e.g i.e vs mr mrs ms dr st jr sr prof approx incl fig dept est ca cf al".split()
)

# Words that join phrases rather than describe the product: coordinating conjunctions and
# prepositions. They split phrases and belong to no span (neutral credit).
GLUE_WORDS = frozenset(
    """
    and or but nor plus & + n' 'n'
    for with without in on of to from by at under over near into onto upon about like
    via within between after before during above below across through against around per than
    vs versus among inside outside except beside besides beyond toward towards
    e.g i.e etc
    """.split()
)

_SEP = r"\s.,;:!?/|()\[\]{}<>\"“”«»–—…，、。！？；："
# A word: a run of characters that are no separator; ".", ",", ":" and "/" stay inside a word
# between digits (2.5, 1,000, 4:3, 24/7) and "." also before a letter (amazon.com).
_TOKEN = re.compile(
    rf"""
    (?P<nl>\n)
  | (?P<ws>[^\S\n]+)
  | (?P<word>(?:[^{_SEP}]|(?<=\d)[.,:/](?=\d)|\.(?=\w))+)
  | (?P<sent>[.!?…。！？]+)
  | (?P<clause>[;:；：])
  | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_ONLY_DASHES = re.compile(r"^[-_'’*~=#•·]+$")  # a word of these alone is glue


def _chunks(words: list[tuple[int, int]], size: int | None) -> list[tuple[int, int]]:
    """Cut a run of word spans into ceil(L / size) near-equal chunks -> phrase spans."""
    if size is None or len(words) <= size:
        return [(words[0][0], words[-1][1])]
    count = -(-len(words) // size)
    base, extra = divmod(len(words), count)
    out, i = [], 0
    for c in range(count):
        length = base + (c < extra)
        out.append((words[i][0], words[i + length - 1][1]))
        i += length
    return out


class PhraseSegmenter:
    """Players = attribute phrases; unions = the clause or sentence they sit in.

    Rule-based, linear time. Inside the answer region:
    * phrase boundaries: punctuation (, ; : . ! ? / | brackets, quotes, dashes between spaces),
      line breaks, and glue words (`GLUE_WORDS`: and, or, for, with, ...). Glue words and
      punctuation are in no span.
    * union boundaries: line breaks, sentence ends (. ! ?) and ; or :.
    * a run of more than `max_phrase_words` words is cut into near-equal chunks.
    * more than `max_segments` phrases: neighbours are merged (`merge_to_cap`).
    Example: "warm kids ski jacket, insulated waterproof, for winter" ->
    ["warm kids ski jacket", "insulated waterproof", "winter"], one union.
    """

    def __init__(
        self,
        max_segments: int | None = 10,
        answer_tag: str | None = "answer",
        max_phrase_words: int | None = 1,
        glue_words: Sequence[str] | None = None,
    ):
        self.max_segments = _check_cap(max_segments)
        self.answer_tag = answer_tag
        if max_phrase_words is not None and (
            not isinstance(max_phrase_words, int) or max_phrase_words < 1
        ):
            raise ValueError(
                f"max_phrase_words must be a positive int or None, got {max_phrase_words!r}"
            )
        self.max_phrase_words = max_phrase_words
        self.glue_words = (
            GLUE_WORDS if glue_words is None else frozenset(w.casefold() for w in glue_words)
        )

    def __call__(self, text: str, reads: Reads | None = None) -> Segmentation:
        """Players and unions of `text`; with `reads` (the training retriever's
        `Retriever.reads`), only spans it reads are players, before the cap is applied."""
        a, b = answer_span(text, self.answer_tag)
        if a >= b:
            return EMPTY
        region = text[a:b]
        spans: list[tuple[int, int]] = []
        union_ids: list[int] = []
        union = 0
        words: list[tuple[int, int]] = []  # the current run of content words
        last_word = ""

        def close_phrase() -> None:
            if words:
                for span in _chunks(words, self.max_phrase_words):
                    spans.append(span)
                    union_ids.append(union)
                words.clear()

        for tok in _TOKEN.finditer(region):
            kind = tok.lastgroup
            if kind == "ws":
                continue
            if kind == "word":
                word = last_word = tok.group()
                if word.casefold() in self.glue_words or _ONLY_DASHES.match(word):
                    close_phrase()
                else:
                    words.append((a + tok.start(), a + tok.end()))
                continue
            close_phrase()
            after_abbreviation = tok.group() == "." and last_word.casefold() in _ABBREVIATIONS
            if kind in ("nl", "sent", "clause") and not after_abbreviation:
                if union_ids and union_ids[-1] == union:
                    union += 1
            last_word = ""
        close_phrase()
        spans, union_ids = _read_players(text, spans, union_ids, reads)
        return merge_to_cap(spans, union_ids, self.max_segments)


# ----------------------------------------------------------------------------- sentences

# A sentence end: terminal punctuation plus closing quotes/brackets, then whitespace or the end
# (CJK terminals need no space after them).
_SENT_END = re.compile(r"(?:[.!?…]+[\"'”’)\]]*(?=\s|$)|[。！？]+[」』”’)\]]*)")


def _has_content(text: str, start: int, end: int) -> bool:
    """A letter, digit or symbol (emoji, currency) in text[start:end], not only punctuation."""
    return any(ch.isalnum() or unicodedata.category(ch)[0] == "S" for ch in text[start:end])


class SentenceSegmenter:
    """Players = sentences; unions = lines, paragraphs or singletons.

    Rule-based splitter: a sentence ends at . ! ? (and CJK 。！？) followed by whitespace or the
    end, and at every line break; a "sentence" of punctuation only is dropped. Decimals (2.5) and a few abbreviations (e.g., vs., Dr.) do not
    end a sentence. `unions`:
    * "line":      sentences on one line form a union,
    * "paragraph": sentences of a blank-line separated paragraph form a union,
    * "singleton": every sentence is its own union (Owen then equals Shapley).
    """

    UNION_MODES = ("line", "paragraph", "singleton")

    def __init__(
        self,
        max_segments: int | None = 8,
        unions: str = "line",
        answer_tag: str | None = "answer",
    ):
        if unions not in self.UNION_MODES:
            raise ValueError(f"unions must be one of {self.UNION_MODES}, got {unions!r}")
        self.max_segments = _check_cap(max_segments)
        self.unions = unions
        self.answer_tag = answer_tag

    def _sentences(self, line: str) -> list[tuple[int, int]]:
        """Stripped sentence spans within one line (offsets into `line`)."""
        out, start = [], 0
        for end_match in _SENT_END.finditer(line):
            if end_match.group() == "." and self._is_abbreviation(line, end_match.start()):
                continue
            out.append((start, end_match.end()))
            start = end_match.end()
        out.append((start, len(line)))
        stripped = []
        for s, e in out:
            while s < e and line[s].isspace():
                s += 1
            while e > s and line[e - 1].isspace():
                e -= 1
            if s < e and _has_content(line, s, e):
                stripped.append((s, e))
        return stripped

    @staticmethod
    def _is_abbreviation(line: str, dot: int) -> bool:
        i = dot
        while i > 0 and (line[i - 1].isalpha() or line[i - 1] == "."):
            i -= 1
        return line[i:dot].casefold() in _ABBREVIATIONS

    def __call__(self, text: str, reads: Reads | None = None) -> Segmentation:
        """Players and unions of `text`; with `reads`, only sentences the retriever reads are
        players (see `PhraseSegmenter.__call__`)."""
        a, b = answer_span(text, self.answer_tag)
        if a >= b:
            return EMPTY
        spans: list[tuple[int, int]] = []
        union_ids: list[int] = []
        union, paragraph_open, offset = -1, False, a
        for line in text[a:b].split("\n"):
            sentences = self._sentences(line)
            if not sentences:
                paragraph_open = False  # blank line: a paragraph break
            else:
                if self.unions == "line" or (self.unions == "paragraph" and not paragraph_open):
                    union += 1
                paragraph_open = True
                for s, e in sentences:
                    if self.unions == "singleton":
                        union += 1
                    spans.append((offset + s, offset + e))
                    union_ids.append(union)
            offset += len(line) + 1
        spans, union_ids = _read_players(text, spans, union_ids, reads)
        return merge_to_cap(spans, union_ids, self.max_segments)
