"""The embedded shopping task: a synthetic catalog with latent intents (``data=shop``, default).

Neither ESCI nor H&M can be downloaded without an account, so the default run uses this
generator. Everything is a pure function of ``seed`` (numpy ``Generator`` streams seeded with
``[seed, stream]``; Python's ``hash()`` is never used), needs no file and no network, and takes about a second.

How it is built (numbered as in :meth:`ShopData.__init__`):

1. Attribute tables. Every product has a category and one value of each intent attribute:
   audience (kids / women / men / unisex), feature (insulated, waterproof, lightweight, ...)
   and use (ski, hiking, running, yoga, ...), drawn from the values its category allows
   (:data:`CATEGORIES`), plus distractors (brand, colour, material). Each attribute value has a
   canonical word, synonyms for product text, and indirect cue phrases for requests.
2. Products. An intent is a combination (category, audience, feature, use). Products are
   spread over the intents: a random subset of intents gets 3-8 products each, the rest of the
   ``num_products`` fall on uniformly random intents. Titles and descriptions name each
   attribute twice, each time with the canonical word (title p=0.9, description p=0.85) or a
   synonym, so naming the canonical word is what helps BM25 most. Product ids ("P00042") are
   assigned in random order, so catalog order says nothing about relevance.
3. Splits. Intents with 3-10 matching products are eligible. Eligible intents are shuffled and
   cut into test, val and train intents: val and test intents are attribute COMBINATIONS never
   seen in training (every single attribute value is seen in training; this is checked).
4. Requests state the intent indirectly: a template filled with one cue phrase per attribute
   ("a coat" / "my daughter" / "that keeps the cold out" / "for the slopes"). Cue phrases avoid
   the canonical words, so the raw request scores low.
5. Labels, ESCI-style: E (gain 1.0) = all four intent attributes match; S (0.1) = same
   category and at least one of audience/feature/use; C (0.01) = a complementary category
   (:data:`COMPLEMENTS`, e.g. ski jacket -> gloves, beanie, socks) with the same use; I: every
   other product (not stored).
6. Demonstrations (supervised warm-up): the request, then a partial and noisy list of attribute
   words: each intent word kept with probability ``demo_keep``, plus 0-2 plausible wrong words
   (another value of the same attribute the category allows), shuffled. The warm-up teaches the
   format without handing over the optimal policy.

``python -m ospo.data.shop --stats`` prints the data set and, as its last line, BM25 NDCG@10 on
the test split of the raw requests, of request + intent words (oracle) and of the demos.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

from ospo.data import (
    SPLITS,
    Dataset,
    Sample,
    build_pool,
    check_completion,
    default_prompt,
    make_messages,
)


@dataclass(frozen=True)
class Value:
    """One attribute value: canonical word, synonyms for product text, cue phrases for requests."""

    word: str
    synonyms: tuple[str, ...]
    cues: tuple[str, ...]


@dataclass(frozen=True)
class Category:
    """A product category and the attribute values its products can take."""

    value: Value
    audiences: tuple[str, ...]
    features: tuple[str, ...]
    uses: tuple[str, ...]


# 1. Attribute tables ------------------------------------------------------------------------
# Audience cues are noun phrases ("for my daughter"); feature cues are relative clauses ("a coat
# that keeps the cold out"); use cues are "for ..." phrases; category cues are noun phrases.

AUDIENCES: dict[str, Value] = {
    v.word: v
    for v in (
        Value(
            "kids",
            ("children", "youth", "junior", "boys' and girls'"),
            ("my daughter", "my son", "my little one", "my nephew", "my niece", "our toddler"),
        ),
        Value(
            "women",
            ("ladies'", "female", "womens"),
            ("my wife", "my mom", "my sister", "my girlfriend", "my grandmother", "my aunt"),
        ),
        Value(
            "men",
            ("gents'", "male", "mens"),
            ("my husband", "my dad", "my brother", "my boyfriend", "my grandfather", "my uncle"),
        ),
        Value(
            "unisex",
            ("gender-neutral", "all-gender", "shared-fit"),
            ("the whole family", "anyone in our house", "both of us to share", "our household"),
        ),
    )
}

FEATURES: dict[str, Value] = {
    v.word: v
    for v in (
        Value(
            "insulated",
            ("thermal", "warm-lined", "quilted"),
            ("that keeps the cold out", "that holds heat on frosty days", "that stays toasty"),
        ),
        Value(
            "waterproof",
            ("water-resistant", "rainproof", "weather-sealed"),
            ("that survives a downpour", "that keeps out the rain", "that shrugs off puddles"),
        ),
        Value(
            "lightweight",
            ("ultralight", "featherweight", "low-weight"),
            ("that barely weighs anything", "that won't weigh me down", "that is simple to carry"),
        ),
        Value(
            "breathable",
            ("ventilated", "airy", "mesh-vented"),
            ("that doesn't get sweaty", "that lets air flow through", "that stays cool"),
        ),
        Value(
            "durable",
            ("rugged", "hard-wearing", "tough"),
            ("that lasts for years", "that can take a beating", "that won't fall apart"),
        ),
        Value(
            "cushioned",
            ("padded", "shock-absorbing", "plush"),
            ("that is gentle on the joints", "that feels like clouds", "that absorbs impact"),
        ),
        Value(
            "reflective",
            ("high-visibility", "hi-vis", "glow-trim"),
            ("that cars can see in the dark", "that shows up at night", "that glows in headlights"),
        ),
        Value(
            "packable",
            ("foldable", "compressible", "collapsible"),
            ("that folds into a tiny pouch", "that squeezes into a carry-on", "that takes no room"),
        ),
        Value(
            "wireless",
            ("cordless", "bluetooth", "cable-free"),
            ("without any cables", "with no cords to tangle", "that pairs with my phone"),
        ),
        Value(
            "grippy",
            ("non-slip", "anti-slip", "tacky"),
            ("that won't slide around", "that does not shift when I sweat", "that stays put"),
        ),
        Value(
            "stretchy",
            ("elastic", "flexible", "supple"),
            ("that moves with me", "that gives when I bend", "that isn't restrictive"),
        ),
    )
}

USES: dict[str, Value] = {
    v.word: v
    for v in (
        Value(
            "ski",
            ("skiing", "alpine", "snowsport"),
            ("for the slopes", "for a week in the Alps", "for our winter holiday in the mountains"),
        ),
        Value(
            "hiking",
            ("trekking", "trail", "backcountry"),
            ("for long walks in the hills", "for weekend treks", "for climbing up peaks on foot"),
        ),
        Value(
            "running",
            ("jogging", "marathon", "road-race"),
            ("for my morning jogs", "for getting ready for a 10k", "for laps around the park"),
        ),
        Value(
            "yoga",
            ("pilates", "studio", "meditation"),
            ("for my downward dog sessions", "for my Sunday flow class", "for sun salutations"),
        ),
        Value(
            "commute",
            ("commuting", "city", "urban"),
            ("for getting to the office", "for the daily train to work", "for the walk to work"),
        ),
        Value(
            "travel",
            ("travelling", "vacation", "journey"),
            ("for a long-haul flight", "for a month abroad", "for weekend getaways"),
        ),
        Value(
            "camping",
            ("campsite", "outdoor", "overnight"),
            ("for nights under the stars", "for a weekend in the woods", "for a scout jamboree"),
        ),
        Value(
            "gym",
            ("workout", "training", "fitness"),
            ("for lifting weights", "for sessions at the health club", "for crossfit classes"),
        ),
        Value(
            "cycling",
            ("biking", "bike", "cyclist"),
            ("for long rides on two wheels", "for rides to the lake on the saddle", "for spin"),
        ),
        Value(
            "party",
            ("evening", "occasion", "celebration"),
            ("for a wedding reception", "for a night out", "for a birthday dinner"),
        ),
    )
}

_ALL = ("kids", "women", "men", "unisex")

CATEGORIES: dict[str, Category] = {
    c.value.word: c
    for c in (
        Category(
            Value(
                "jacket",
                ("coat", "parka", "shell"),
                ("an outer layer", "something to wear over everything", "a jacket"),
            ),
            _ALL,
            ("insulated", "waterproof", "packable", "reflective"),
            ("ski", "hiking", "commute", "cycling"),
        ),
        Category(
            Value(
                "boots",
                ("booties", "high-tops", "bootees"),
                (
                    "sturdy footwear that covers the ankles",
                    "something heavy-duty for the feet",
                    "boots",
                ),
            ),
            _ALL,
            ("insulated", "waterproof", "durable", "lightweight"),
            ("hiking", "ski", "commute", "camping"),
        ),
        Category(
            Value(
                "backpack",
                ("rucksack", "daypack", "knapsack"),
                ("a bag to carry on the back", "something to haul gear in", "a backpack"),
            ),
            _ALL,
            ("waterproof", "lightweight", "durable", "packable"),
            ("hiking", "commute", "travel", "camping", "cycling"),
        ),
        Category(
            Value(
                "tent",
                ("shelter", "dome", "canopy"),
                ("somewhere to sleep outside", "something to pitch at night", "a tent"),
            ),
            ("unisex", "kids"),
            ("waterproof", "lightweight", "durable", "insulated"),
            ("camping", "hiking", "travel"),
        ),
        Category(
            Value(
                "sneakers",
                ("trainers", "shoes", "kicks"),
                ("everyday lace-ups", "something sporty for the feet", "sneakers"),
            ),
            _ALL,
            ("cushioned", "breathable", "lightweight", "waterproof", "reflective"),
            ("running", "gym", "commute", "travel"),
        ),
        Category(
            Value(
                "dress",
                ("frock", "sundress", "gown"),
                ("a one-piece outfit", "something to wear instead of a skirt and top", "a dress"),
            ),
            ("women", "kids"),
            ("breathable", "lightweight", "stretchy", "packable"),
            ("travel", "commute", "party"),
        ),
        Category(
            Value(
                "sweater",
                ("jumper", "pullover", "knitwear"),
                ("a knit top", "something cosy to pull on", "a sweater"),
            ),
            _ALL,
            ("insulated", "breathable", "lightweight", "stretchy"),
            ("ski", "hiking", "commute", "travel"),
        ),
        Category(
            Value(
                "gloves",
                ("mittens", "mitts", "handwear"),
                ("something for the hands", "something to cover the fingers", "gloves"),
            ),
            _ALL,
            ("insulated", "waterproof", "reflective", "grippy"),
            ("ski", "cycling", "running", "hiking", "gym"),
        ),
        Category(
            Value(
                "bottle",
                ("flask", "canteen", "tumbler"),
                ("something to drink from", "a vessel for drinks", "a bottle"),
            ),
            ("unisex", "kids"),
            ("insulated", "lightweight", "durable", "packable"),
            ("hiking", "gym", "cycling", "running", "camping"),
        ),
        Category(
            Value(
                "mat",
                ("pad", "rug", "roll"),
                ("something to lay on the floor", "a spot on the floor to practise on", "a mat"),
            ),
            ("unisex", "kids"),
            ("grippy", "cushioned", "lightweight", "packable"),
            ("yoga", "gym", "camping", "travel"),
        ),
        Category(
            Value(
                "headphones",
                ("earbuds", "headset", "earphones"),
                ("something to listen to music with", "a way to hear my podcasts", "headphones"),
            ),
            ("unisex", "kids"),
            ("wireless", "waterproof", "cushioned", "lightweight"),
            ("running", "gym", "commute", "travel"),
        ),
        Category(
            Value(
                "leggings",
                ("tights", "joggers", "pants"),
                ("something snug for the legs", "sporty bottoms", "leggings"),
            ),
            ("women", "kids", "men"),
            ("stretchy", "breathable", "insulated", "reflective"),
            ("running", "yoga", "gym", "ski", "cycling"),
        ),
        Category(
            Value(
                "socks",
                ("hosiery", "crew-cut", "ankle-cut"),
                ("something to wear inside footwear", "a few pairs for the feet", "socks"),
            ),
            _ALL,
            ("insulated", "cushioned", "breathable", "waterproof"),
            ("ski", "hiking", "running", "commute"),
        ),
        Category(
            Value(
                "beanie",
                ("hat", "toque", "headwear"),
                ("something for the head", "a woolly cap", "a beanie"),
            ),
            _ALL,
            ("insulated", "breathable", "reflective", "lightweight"),
            ("ski", "running", "hiking", "commute"),
        ),
    )
}

COMPLEMENTS: dict[str, tuple[str, ...]] = {
    "jacket": ("gloves", "beanie", "socks"),
    "boots": ("socks", "backpack"),
    "backpack": ("bottle", "tent"),
    "tent": ("mat", "backpack", "bottle"),
    "sneakers": ("socks", "leggings", "headphones"),
    "dress": ("sweater", "jacket"),
    "sweater": ("jacket", "beanie"),
    "gloves": ("jacket", "beanie"),
    "bottle": ("backpack", "mat"),
    "mat": ("bottle", "leggings"),
    "headphones": ("sneakers", "bottle"),
    "leggings": ("sneakers", "mat", "bottle"),
    "socks": ("boots", "sneakers"),
    "beanie": ("jacket", "gloves"),
}
"""Category -> complementary categories (label C when they share the request's use)."""

BRANDS = (
    "Nordkap",
    "Alpenglow",
    "Trailhead",
    "Cobalt",
    "Fjellro",
    "Summitco",
    "Urbanist",
    "Kestrel",
    "Larkspur",
    "Pinecrest",
    "Bluewater",
    "Ironbark",
    "Meridian",
    "Solstice",
    "Tundra",
    "Wayfarer",
)
COLOURS = (
    "black",
    "navy",
    "red",
    "olive",
    "grey",
    "white",
    "teal",
    "mustard",
    "burgundy",
    "sand",
    "charcoal",
    "pink",
)
MATERIALS = (
    "nylon",
    "polyester",
    "merino wool",
    "cotton",
    "recycled polyester",
    "leather",
    "neoprene",
    "stainless steel",
    "natural rubber",
    "fleece",
    "ripstop",
    "bamboo fibre",
)
# Filler sentences name no attribute word, so they only add realistic noise.
FILLERS = (
    "Machine washable, classic fit.",
    "Backed by a full warranty.",
    "A clean look for every day.",
    "Thoughtful details throughout.",
    "Our best seller, now updated.",
    "Made to be used and loved.",
    "Designed in Norway.",
    "Customers praise the quality.",
)

REQUEST_TEMPLATES = (
    "{cat} for {aud} {feat}, {use}",
    "need {cat} {feat} - it is for {aud}, {use}",
    "{aud} wants {cat} {use} {feat}",
    "gift for {aud}: {cat} {feat}, {use}",
    "looking for {cat} {use} for {aud}, ideally one {feat}",
    "any suggestions? {cat} {feat} {use}, for {aud}",
)
"""Request templates: {cat}, {aud}, {feat} and {use} take one cue phrase each."""

GAIN_EXACT, GAIN_SUBSTITUTE, GAIN_COMPLEMENT = 1.0, 0.1, 0.01
MIN_EXACT, MAX_EXACT = 3, 10


# 2. Products --------------------------------------------------------------------------------


def _intents() -> list[tuple[str, str, str, str]]:
    """Every valid (category, audience, feature, use) combination, in table order."""
    return [
        (cat, aud, feat, use)
        for cat, spec in CATEGORIES.items()
        for aud in spec.audiences
        for feat in spec.features
        for use in spec.uses
    ]


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _mention(rng: np.random.Generator, value: Value, p_canonical: float) -> str:
    """The canonical word with probability ``p_canonical``, else a random synonym."""
    if rng.random() < p_canonical:
        return value.word
    return _pick(rng, value.synonyms)


def product_text(
    rng: np.random.Generator,
    intent: tuple[str, str, str, str],
    p_title: float = 0.9,
    p_desc: float = 0.85,
) -> str:
    """Title + short description of a product with the given intent attributes."""
    cat, aud, feat, use = intent
    cval, aval, fval, uval = CATEGORIES[cat].value, AUDIENCES[aud], FEATURES[feat], USES[use]
    brand, colour, material = _pick(rng, BRANDS), _pick(rng, COLOURS), _pick(rng, MATERIALS)
    a, f, u, c = (_mention(rng, v, p_title) for v in (aval, fval, uval, cval))
    if rng.random() < 0.5:
        title = f"{brand} {a} {f} {u} {c}"
    else:
        title = f"{brand} {u} {c} for {a} - {f}, {colour}"
    a, f, u, c = (_mention(rng, v, p_desc) for v in (aval, fval, uval, cval))
    sentences = [
        f"A {f} {c} in {colour} {material}.",
        f"Built for {u}.",
        f"Sized for {a}.",
        _pick(rng, FILLERS),
    ]
    order = rng.permutation(3)
    desc = " ".join([sentences[int(i)] for i in order] + [sentences[3]])
    return f"{title}. {desc}"


def generate_catalog(
    rng: np.random.Generator, num_products: int
) -> tuple[list[str], list[str], np.ndarray]:
    """Products spread over the intents.

    Returns (product ids, texts, intent index of each product (num_products,)). Ids are assigned
    in a random order of the products.
    """
    intents = _intents()
    counts = np.zeros(len(intents), dtype=np.int64)  # (I,)
    active = rng.permutation(len(intents))[: max(1, num_products // 6)]
    counts[active] = rng.integers(3, 9, size=len(active))
    excess = int(counts.sum()) - num_products
    while excess > 0:  # too few products for the planned intents: trim random ones
        nonzero = np.flatnonzero(counts)
        counts[nonzero[rng.integers(len(nonzero))]] -= 1
        excess -= 1
    if excess < 0:
        counts += rng.multinomial(-excess, np.full(len(intents), 1.0 / len(intents)))
    product_intent = np.repeat(np.arange(len(intents)), counts)  # (P,)
    product_intent = product_intent[rng.permutation(len(product_intent))]
    width = max(5, len(str(num_products - 1)))
    ids = [f"P{i:0{width}d}" for i in range(num_products)]
    texts = [product_text(rng, intents[int(k)]) for k in product_intent]
    return ids, texts, product_intent


# 4-6. Requests, labels, demonstrations ------------------------------------------------------


def make_request(rng: np.random.Generator, intent: tuple[str, str, str, str]) -> str:
    """An indirect request for ``intent``: one cue phrase per attribute in a random template."""
    cat, aud, feat, use = intent
    text = _pick(rng, REQUEST_TEMPLATES).format(
        cat=_pick(rng, CATEGORIES[cat].value.cues),
        aud=_pick(rng, AUDIENCES[aud].cues),
        feat=_pick(rng, FEATURES[feat].cues),
        use=_pick(rng, USES[use].cues),
    )
    return text[0].upper() + text[1:]


def intent_words(intent: tuple[str, str, str, str]) -> list[str]:
    """Canonical words of an intent, in the order audience, feature, use, category."""
    cat, aud, feat, use = intent
    return [aud, feat, use, cat]


def make_demo(
    rng: np.random.Generator,
    request: str,
    intent: tuple[str, str, str, str],
    keep: float,
    noise: tuple[float, ...],
) -> str:
    """The request followed by a partial, noisy, shuffled list of attribute words.

    Each intent word is kept with probability ``keep``; then ``j`` wrong words are added with
    probability ``noise[j]``: each another value of a random attribute (audience, feature or
    use) that the category allows, so the mistake is plausible.
    """
    cat, aud, feat, use = intent
    spec = CATEGORIES[cat]
    words = [w for w in intent_words(intent) if rng.random() < keep]
    num_wrong = int(rng.choice(len(noise), p=np.asarray(noise) / np.sum(noise)))
    alternatives = [
        [a for a in spec.audiences if a != aud],
        [f for f in spec.features if f != feat],
        [u for u in spec.uses if u != use],
    ]
    for _ in range(num_wrong):
        options = [opts for opts in alternatives if opts]
        opts = options[int(rng.integers(len(options)))]
        wrong = opts.pop(int(rng.integers(len(opts))))
        words.append(wrong)
    words = [words[int(i)] for i in rng.permutation(len(words))]
    return " ".join([request, *words])


def intent_gains(
    intent: tuple[str, str, str, str], attrs: np.ndarray, ids: list[str]
) -> dict[str, float]:
    """ESCI-style graded gains of the products for one intent (label I omitted).

    attrs: (P, 4) category, audience, feature, use of each product; ids: (P,) product ids.
    E (1.0): all four match; S (0.1): same category and at least one of audience, feature, use;
    C (0.01): a complementary category (:data:`COMPLEMENTS`) with the same use.
    """
    cat = intent[0]
    same = [attrs[:, j] == v for j, v in enumerate(intent)]  # 4 x (P,) bool
    exact = same[0] & same[1] & same[2] & same[3]
    substitute = same[0] & ~exact & (same[1] | same[2] | same[3])
    complement = np.isin(attrs[:, 0], COMPLEMENTS.get(cat, ())) & same[3]
    gains: dict[str, float] = {}
    for mask, gain in ((complement, GAIN_COMPLEMENT), (substitute, GAIN_SUBSTITUTE)):
        gains.update(dict.fromkeys([ids[i] for i in np.flatnonzero(mask)], gain))
    gains.update(dict.fromkeys([ids[i] for i in np.flatnonzero(exact)], GAIN_EXACT))
    return gains


class ShopData(Dataset):
    """The embedded synthetic shopping task (see the module docstring).

    Args:
        seed: every random choice derives from it (independent streams for the catalog, the
            splits, the requests, the demos and the pools, so e.g. ``num_train`` does not change
            the catalog).
        num_products: catalog size (>= 5,000 by default, 14 categories).
        num_train, num_val, num_test: requests per split. Val and test have one request per
            held-out intent while intents last; train cycles over its intents.
        val_intent_fraction, test_intent_fraction: share of eligible intents held out for val
            and test (at least enough for one request each when possible).
        pool_size: None (rank the whole catalog) or the candidate-pool size (judged + seeded
            negatives, see :func:`ospo.data.build_pool`).
        completion: what the policy writes (:data:`ospo.data.COMPLETION_FORMATS`): "append"
            (only the attribute words; query = request + completion) or "rewrite" (the whole
            query; demonstrations are request + words).
        system_prompt, user_template: chat messages (``user_template`` takes ``{request}``);
            ``system_prompt`` None = the completion format's default, "" = no system message.
        demo_keep: probability of keeping each intent word in a demonstration.
        demo_noise: probabilities of adding 0, 1, 2, ... wrong words to a demonstration.
    """

    def __init__(
        self,
        seed: int = 0,
        num_products: int = 6000,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 500,
        val_intent_fraction: float = 0.12,
        test_intent_fraction: float = 0.2,
        pool_size: int | None = None,
        completion: str = "append",
        system_prompt: str | None = None,
        user_template: str = "{request}",
        demo_keep: float = 0.85,
        demo_noise: tuple[float, ...] | list[float] = (0.5, 0.35, 0.15),
    ) -> None:
        if num_products < 100:
            raise ValueError(f"num_products must be >= 100, got {num_products}")
        for name, n in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if n < 0:
                raise ValueError(f"{name} must be >= 0, got {n}")
        if not 0.0 <= demo_keep <= 1.0:
            raise ValueError(f"demo_keep must be a probability in [0, 1], got {demo_keep}")
        check_completion(completion)
        system_prompt = default_prompt(completion, system_prompt)
        noise = tuple(float(p) for p in demo_noise)
        if not noise or min(noise) < 0 or sum(noise) <= 0:
            raise ValueError(f"demo_noise must be non-negative weights, got {demo_noise!r}")
        self.seed = seed
        # independent streams: [seed, 0] catalog, [seed, 1] intent split, [seed, 2 + split, j]
        # request order / text / demo / pool of each split
        rng_catalog, rng_split = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
        # 2. products
        self.intents = _intents()
        ids, texts, product_intent = generate_catalog(rng_catalog, num_products)
        self.product_intent = product_intent  # (P,)
        catalog = dict(zip(ids, texts, strict=True))
        # 3. eligible intents and held-out combinations
        exact_counts = np.bincount(product_intent, minlength=len(self.intents))  # (I,)
        eligible = np.flatnonzero((exact_counts >= MIN_EXACT) & (exact_counts <= MAX_EXACT))
        eligible = eligible[rng_split.permutation(len(eligible))]
        n_test = _held_out(len(eligible), test_intent_fraction, num_test)
        n_val = _held_out(len(eligible) - n_test, val_intent_fraction, num_val)
        groups = {
            "test": eligible[:n_test],
            "val": eligible[n_test : n_test + n_val],
            "train": eligible[n_test + n_val :],
        }
        _move_unseen_to_train(groups, self.intents)
        wanted = {"train": num_train, "val": num_val, "test": num_test}
        for name, group in groups.items():
            if wanted[name] and len(group) == 0:
                raise ValueError(
                    f"no intent left for the {name} split: {len(eligible)} intents have "
                    f"{MIN_EXACT}-{MAX_EXACT} products; raise num_products (got {num_products})"
                )
        # 4-6. requests, labels, demos, pools
        attrs = np.array(self.intents, dtype=object)[product_intent]  # (P, 4)
        gains_cache: dict[int, dict[str, float]] = {}
        splits: dict[str, list[Sample]] = {}
        for k, name in enumerate(SPLITS):
            group = groups[name]
            rng_order, rng_request, rng_demo, rng_pool = (
                np.random.default_rng([seed, 2 + k, j]) for j in range(4)
            )
            order = _request_intents(rng_order, group, wanted[name])  # (wanted,)
            samples = []
            for j, intent_id in enumerate(order):
                intent_id = int(intent_id)
                intent = self.intents[intent_id]
                if intent_id not in gains_cache:
                    gains_cache[intent_id] = intent_gains(intent, attrs, ids)
                gains = dict(gains_cache[intent_id])  # a copy per sample
                request = make_request(rng_request, intent)
                pool = None if pool_size is None else build_pool(gains, ids, pool_size, rng_pool)
                samples.append(
                    Sample(
                        qid=f"shop-{name}-{j:05d}",
                        request=request,
                        messages=make_messages(request, system_prompt, user_template),
                        gains=gains,
                        pool=pool,
                        intent_words=intent_words(intent),
                        demo=make_demo(rng_demo, request, intent, demo_keep, noise),
                    )
                )
            splits[name] = samples
        self.split_intents = {k: [self.intents[int(i)] for i in v] for k, v in groups.items()}
        super().__init__("shop", catalog, splits, completion)


def _request_intents(rng: np.random.Generator, group: np.ndarray, count: int) -> np.ndarray:
    """Intent of each of ``count`` requests: shuffled passes over ``group`` (each intent is used
    once before any is used twice).  # (count,)"""
    if count == 0 or len(group) == 0:
        return np.zeros(0, dtype=np.int64)
    passes = -(-count // len(group))
    return np.concatenate([group[rng.permutation(len(group))] for _ in range(passes)])[:count]


def _held_out(available: int, fraction: float, wanted: int) -> int:
    """Intents to hold out: ``fraction`` of those available, at least min(wanted, 1) and never
    more than ``wanted`` (one request per intent suffices) nor all of them."""
    if wanted == 0 or available <= 1:
        return 0
    n = max(1, int(round(fraction * available)))
    return min(n, wanted, available - 1)


def _move_unseen_to_train(groups: dict[str, np.ndarray], intents: list) -> None:
    """Move to train every held-out intent with an attribute value that no training intent has,
    so that held-out intents are new COMBINATIONS of seen values (a no-op at the default size)."""
    seen = [{intents[int(i)][j] for i in groups["train"]} for j in range(4)]
    moved = True
    while moved:
        moved = False
        for name in ("val", "test"):
            keep = []
            for i in groups[name]:
                intent = intents[int(i)]
                if all(v in seen[j] for j, v in enumerate(intent)):
                    keep.append(i)
                else:
                    groups["train"] = np.append(groups["train"], i)
                    for j, v in enumerate(intent):
                        seen[j].add(v)
                    moved = True
            groups[name] = np.asarray(keep, dtype=np.int64)


# --stats ------------------------------------------------------------------------------------


def ndcg_report(data: Dataset, split: str = "test", k: int = 10) -> dict[str, float]:
    """Mean BM25 NDCG@k of the raw requests, the oracle (request + intent words) and the demos."""
    from ospo.metrics import ndcg_at_k
    from ospo.retriever import BM25
    from ospo.reward import join_texts

    retriever = BM25()
    retriever.index(data.catalog)
    doc_ids = np.array(retriever.doc_ids)
    col_of = {d: i for i, d in enumerate(retriever.doc_ids)}
    samples = data.split(split)
    variants = {
        "raw": [s.request for s in samples],
        "oracle": [f"{s.request} {' '.join(s.intent_words or [])}" for s in samples],
        "demo": [join_texts(s.prefix, s.demo) if s.demo else s.request for s in samples],
    }
    out = {}
    for name, texts in variants.items():
        scores = retriever.score(texts)  # (Q, D)
        values = []
        for row, sample in zip(scores, samples, strict=True):
            if sample.pool is not None:
                cols = np.array([col_of[p] for p in sample.pool])
                ranked = doc_ids[cols[np.argsort(-row[cols], kind="stable")[:k]]]
            else:
                ranked = doc_ids[np.argsort(-row, kind="stable")[:k]]
            values.append(ndcg_at_k(list(ranked), sample.gains, k))
        out[f"{name}_ndcg@{k}"] = float(np.mean(values)) if values else 0.0
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded shopping task.")
    parser.add_argument("--stats", action="store_true", help="print statistics and BM25 NDCG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-products", type=int, default=6000)
    parser.add_argument("--pool-size", type=int, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data = ShopData(seed=args.seed, num_products=args.num_products, pool_size=args.pool_size)
    elapsed = time.perf_counter() - start
    print(f"built {data!r} in {elapsed:.2f}s (seed={args.seed})")
    if not args.stats:
        return
    cats: dict[str, int] = {}
    for intent_id in data.product_intent:
        cat = data.intents[int(intent_id)][0]
        cats[cat] = cats.get(cat, 0) + 1
    print(f"catalog: {len(data.catalog)} products in {len(cats)} categories")
    print("categories: " + ", ".join(f"{c}={n}" for c, n in sorted(cats.items())))
    print(
        "splits: "
        + ", ".join(
            f"{s}={len(data.split(s))} ({len(data.split_intents[s])} intents)"
            for s in ("train", "val", "test")
        )
    )
    exact = [sum(g == GAIN_EXACT for g in s.gains.values()) for s in data.split("test")]
    print(
        f"exact products per test request: min={min(exact)} max={max(exact)} mean={np.mean(exact):.1f}"
    )
    first_id = next(iter(data.catalog))
    print(f"example product {first_id}: {data.catalog[first_id]}")
    for sample in data.split("test")[:2]:
        print(f"request: {sample.request}")
        print(f"  intent: {' '.join(sample.intent_words or [])}")
        print(f"  demo:   {sample.demo}")
    report = ndcg_report(data, "test")
    print(" ".join(f"{k}={v:.3f}" for k, v in report.items()))


if __name__ == "__main__":
    main()
