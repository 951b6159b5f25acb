"""Format check for generated search queries: one short line, no chat talk, ended at EOS.

A query expansion is fed straight to a retriever, so the policy should emit a single short line
of search terms and stop. Chat habits ("Sure! Here is ...", refusals, role names) are format
failures. Every rule is a keyword argument, so Hydra can configure it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

DEFAULT_BANNED_PHRASES: tuple[str, ...] = (
    "I'm sorry",
    "I am sorry",
    "I apologize",
    "I can't",
    "I cannot",
    "I'm unable",
    "I am unable",
    "as an AI",
    "language model",
    "Sure",
    "Certainly",
    "Of course",
    "Here is",
    "Here are",
    "here's",
    "I'd be happy",
    "I would be happy",
    "assistant",
    "query:",
    "search query",
)
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


class FormatCheck:
    """Is a completion a well-formed query? `reasons` lists every rule it breaks.

    The format also sets the generation budget `max_new_tokens` (`rl.max_new_tokens` reads it)
    and names the completion format its rules are written for (`completion`: append | rewrite,
    checked against `data.completion` by `ospo.config.validate`).
    Rules: ended at EOS (`require_eos`), min_words <= words <= max_words (whitespace split),
    at most max_chars characters (after stripping), a single line (`single_line`), and none of
    `banned_phrases` (case-insensitive, whole words, curly apostrophes read as straight).
    """

    def __init__(
        self,
        max_words: int = 32,
        max_chars: int = 256,
        single_line: bool = True,
        require_eos: bool = True,
        banned_phrases: Sequence[str] = DEFAULT_BANNED_PHRASES,
        min_words: int = 1,
        max_new_tokens: int = 40,
        completion: str = "rewrite",
    ):
        if min_words < 0 or max_words < min_words:
            raise ValueError(
                f"need 0 <= min_words <= max_words, got min_words={min_words}, "
                f"max_words={max_words}"
            )
        if max_chars < 1:
            raise ValueError(f"max_chars={max_chars} must be >= 1")
        self.max_words = int(max_words)
        self.max_chars = int(max_chars)
        self.single_line = bool(single_line)
        self.require_eos = bool(require_eos)
        self.min_words = int(min_words)
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        # the generation budget (`rl.max_new_tokens` reads it): a completion cut off there has
        # not ended, which `require_eos` rejects
        self.max_new_tokens = int(max_new_tokens)
        self.completion = completion  # the completion format (data.completion) these rules fit
        self.banned_phrases = tuple(str(p) for p in (banned_phrases or ()))
        self._banned = [(p, _phrase_regex(p)) for p in self.banned_phrases if p.strip()]

    def reasons(self, text: str, ended: bool = True) -> list[str]:
        """Names of the broken rules, e.g. ["no_eos", "too_many_words(40>32)"]; [] if ok."""
        out = []
        body = text.strip()
        if self.require_eos and not ended:
            out.append("no_eos")
        n_words = len(body.split())
        if n_words < self.min_words:
            out.append(f"too_few_words({n_words}<{self.min_words})")
        if n_words > self.max_words:
            out.append(f"too_many_words({n_words}>{self.max_words})")
        if len(body) > self.max_chars:
            out.append(f"too_many_chars({len(body)}>{self.max_chars})")
        if self.single_line and ("\n" in body or "\r" in body):
            out.append("multi_line")
        normalised = body.translate(_QUOTES)
        out.extend(f"banned_phrase({p!r})" for p, rx in self._banned if rx.search(normalised))
        return out

    def __call__(self, text: str, ended_with_eos: bool = True) -> bool:
        return not self.reasons(text, ended_with_eos)

    def rate(self, texts: Sequence[str], ended: Sequence[bool] | None = None) -> float:
        """Fraction of texts that pass (see `format_ok_rate`)."""
        return format_ok_rate(texts, ended, check=self)

    def __repr__(self) -> str:
        return (
            f"FormatCheck(max_words={self.max_words}, max_chars={self.max_chars}, "
            f"single_line={self.single_line}, require_eos={self.require_eos}, "
            f"min_words={self.min_words}, banned_phrases={len(self.banned_phrases)})"
        )


def _phrase_regex(phrase: str) -> re.Pattern:
    """Case-insensitive match of `phrase` as whole words (no word boundary is required next
    to a phrase end that is itself punctuation, so "query:" matches "query:red")."""
    p = phrase.strip().translate(_QUOTES)
    head = r"(?<!\w)" if re.match(r"\w", p) else ""
    tail = r"(?!\w)" if re.search(r"\w$", p) else ""
    return re.compile(head + re.escape(p) + tail, re.IGNORECASE)


def format_ok(
    texts: Sequence[str], ended: Sequence[bool] | None = None, check: FormatCheck | None = None
) -> list[bool]:
    """Whether each of `texts` passes `check` (default FormatCheck()): the one place that
    applies the check to a batch. `ended` (did generation stop at EOS) defaults to all True,
    e.g. for reference texts that were not generated."""
    check = check or FormatCheck()
    texts = list(texts)
    ended = [True] * len(texts) if ended is None else [bool(e) for e in ended]
    if len(ended) != len(texts):
        raise ValueError(f"len(ended)={len(ended)} != len(texts)={len(texts)}")
    return [check(t, e) for t, e in zip(texts, ended, strict=True)]


def format_ok_rate(
    texts: Sequence[str], ended: Sequence[bool] | None = None, check: FormatCheck | None = None
) -> float:
    """Fraction of `texts` that pass (`format_ok`); 0.0 for no texts."""
    flags = format_ok(texts, ended, check)
    return sum(flags) / len(flags) if flags else 0.0


__all__ = ["DEFAULT_BANNED_PHRASES", "FormatCheck", "format_ok", "format_ok_rate"]
