"""Time building the embedded shop task and segmenting a 10,000-word completion.

These were wall-clock bounds in the tests (``ShopData(seed=...)`` under 3 s, each segmenter
under 1 s on 10,000 words); a busy machine failed them, so the tests now check correctness only
and the timings live here.

* ``ospo.data.shop.ShopData()`` with its defaults (6,000 products, 2,000 / 64 / 200 requests),
  one seed per repetition so nothing is reused between builds;
* each segmenter configuration of ``tests/test_segmenter.py`` (``ospo.segmenter``) on the same
  seeded 10,000-word text of words, punctuation, line breaks and non-ASCII characters.

Repetitions alternate between the shop build and the segmenters so slow drift in the
machine's load hits all of them alike. Last line: ``shop_build_s=<x> segment_10k_words_ms=<y>``
(median shop build; median of the slowest segmenter).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from ospo.data.shop import ShopData
from ospo.segmenter import PhraseSegmenter, SentenceSegmenter

SEGMENTERS = {
    "PhraseSegmenter()": PhraseSegmenter(),
    "PhraseSegmenter(max_segments=None)": PhraseSegmenter(max_segments=None),
    "SentenceSegmenter()": SentenceSegmenter(),
    "SentenceSegmenter(None, paragraph)": SentenceSegmenter(max_segments=None, unions="paragraph"),
    "SentenceSegmenter(3, singleton)": SentenceSegmenter(max_segments=3, unions="singleton"),
}
VOCAB = "warm kids ski jacket for and with , . ; ! size 2.5 \n insulated é 雪 🔥".split(" ")


def long_text(words: int, seed: int) -> str:
    """``words`` random pieces of :data:`VOCAB` joined by spaces (the test's long text)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(words))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each")
    parser.add_argument("--words", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    text = long_text(args.words, args.seed)
    for segmenter in SEGMENTERS.values():  # warm-up: imports, regex compilation
        segmenter(text)
    shop: list[float] = []
    seg: dict[str, list[float]] = {name: [] for name in SEGMENTERS}
    segments: dict[str, int] = {}
    for rep in range(args.reps):
        t0 = time.perf_counter()
        data = ShopData(seed=args.seed + rep)
        shop.append(time.perf_counter() - t0)
        for name, segmenter in SEGMENTERS.items():
            t0 = time.perf_counter()
            segments[name] = segmenter(text).n
            seg[name].append(time.perf_counter() - t0)

    print(f"{args.reps} repetitions; shop task {data!r}; text of {args.words} words")
    print(f"| {'what':<56} | {'median':>10} | {'min':>10} | {'max':>10} |")
    print(f"|{'-' * 58}|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
    rows = [("ShopData() build, s", shop, 1.0)] + [
        (f"{name} ({segments[name]} segments), ms", times, 1e3) for name, times in seg.items()
    ]
    for label, times, scale in rows:
        med, lo, hi = (scale * f(times) for f in (statistics.median, min, max))
        print(f"| {label:<56} | {med:>10.3f} | {lo:>10.3f} | {hi:>10.3f} |")
    slowest = max(statistics.median(times) for times in seg.values())
    print(f"shop_build_s={statistics.median(shop):.3f} segment_10k_words_ms={1e3 * slowest:.2f}")


if __name__ == "__main__":
    main()
