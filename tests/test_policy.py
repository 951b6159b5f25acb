import random
import time

import pytest
import torch

import ospo.policy as policy_mod
from ospo.policy import Policy, Rollouts, build_tiny, load_hf, token_char_spans

TEXTS = [
    "warm insulated kids ski jacket waterproof red",
    "men's slim fit cotton t-shirt blue organic",
    "café crème mug ceramic naïve déjà vu 😀 €5 größe",
    "wireless noise cancelling headphones over ear black",
    "stainless steel water bottle 1l leak proof",
] * 20
MESSAGES = [
    [{"role": "system", "content": "Rewrite the request."}, {"role": "user", "content": "jacket"}],
    [{"role": "user", "content": "a warm waterproof jacket for my daughter's ski trip please"}],
]


@pytest.fixture(scope="module")
def tiny() -> Policy:
    return build_tiny(TEXTS, seed=0)


@pytest.fixture
def eos_boost(tiny):
    """Make EOS likely so completions stop at random lengths."""
    eos = tiny.eos_token_ids[0]

    def hook(_module, _inputs, out):
        out = out.clone()
        out[..., eos] += 4.0
        return out

    handle = tiny.lm_head.register_forward_hook(hook)
    yield
    handle.remove()


def naive_logprobs(policy, rollouts, temperature=1.0):
    """Per row: full forward over the unpadded [prompt; completion], log_softmax, gather."""
    rows, ents = [], []
    T = rollouts.completion_ids.shape[1]
    for i in range(len(rollouts)):
        p = rollouts.prompt_ids[i][rollouts.prompt_mask[i].bool()]
        n = int(rollouts.completion_mask[i].sum())
        c = rollouts.completion_ids[i, :n]
        logits = policy.model(torch.cat([p, c])[None]).logits[0].float() / temperature
        logp_all = logits[len(p) - 1 : len(p) - 1 + n].log_softmax(-1)  # (n, V)
        lp = torch.zeros(T)
        lp[:n] = logp_all.gather(-1, c[:, None])[:, 0]
        ent = torch.zeros(T)
        ent[:n] = -(logp_all.exp() * logp_all).sum(-1)
        rows.append(lp)
        ents.append(ent)
    return torch.stack(rows), torch.stack(ents)


def check_spans(text, spans, n_tokens):
    assert len(spans) == n_tokens
    assert "".join(text[s:e] for s, e in spans) == text
    pos = 0
    for s, e in spans:
        assert s == pos and e >= s
        pos = e
    assert pos == len(text)


# ---- generate ---------------------------------------------------------------------------
def test_generate_shapes_group_order_and_left_padding(tiny):
    torch.manual_seed(0)
    r = tiny.generate(MESSAGES, num_generations=3, max_new_tokens=12)
    assert isinstance(r, Rollouts)
    N = 6
    assert r.prompt_ids.shape[0] == r.completion_ids.shape[0] == N and len(r.texts) == N
    assert r.completion_ids.shape[1] <= 12
    assert r.group.tolist() == [0, 0, 0, 1, 1, 1]
    for g in range(2):  # rows of one group share the prompt
        rows = r.prompt_ids[3 * g : 3 * g + 3]
        assert (rows == rows[0]).all()
    # left padding: the shorter prompt is padded at the front; every row ends with real tokens
    assert (r.prompt_mask[:, -1] == 1).all()
    assert r.prompt_mask[0, 0] == 0 and (r.prompt_mask[3] == 1).all()
    assert (r.prompt_ids[r.prompt_mask == 0] == tiny.pad_token_id).all()
    first = tiny.tokenizer.decode(r.prompt_ids[0][r.prompt_mask[0].bool()])
    assert first == tiny.chat_prompts(MESSAGES[:1])[0]
    assert first.endswith("<|im_start|>assistant\n")
    for i in range(N):
        check_spans(r.texts[i], r.token_spans[i], int(r.completion_mask[i].sum()))


def test_generate_stops_at_eos_and_masks(tiny, eos_boost):
    torch.manual_seed(1)
    r = tiny.generate(MESSAGES, num_generations=8, max_new_tokens=16)
    eos = tiny.eos_token_ids[0]
    lengths = r.completion_mask.sum(1)
    assert r.ended.any() and lengths.min() < lengths.max()
    for i in range(len(r)):
        ids, mask = r.completion_ids[i], r.completion_mask[i]
        n = int(mask.sum())
        assert (mask[:n] == 1).all() and (mask[n:] == 0).all()
        assert (ids[n:] == tiny.pad_token_id).all()
        eos_at = (ids == eos).nonzero().flatten().tolist()
        if r.ended[i]:
            assert eos_at == [n - 1]  # the first EOS is the last valid token
            assert r.token_spans[i][-1] == (len(r.texts[i]), len(r.texts[i]))
        else:
            assert eos_at == [] and n == r.completion_ids.shape[1]
        assert "<|im_end|>" not in r.texts[i]
        assert r.texts[i] == tiny.tokenizer.decode(ids[:n], skip_special_tokens=True)
        check_spans(r.texts[i], r.token_spans[i], n)


def test_greedy_is_deterministic_and_mode_restored(tiny):
    tiny.train()
    a = tiny.generate(MESSAGES, num_generations=2, max_new_tokens=10, do_sample=False)
    assert tiny.training and tiny.model.training
    tiny.eval()
    b = tiny.generate(MESSAGES, num_generations=2, max_new_tokens=10, do_sample=False)
    assert not tiny.model.training
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_ids[0], a.completion_ids[1])
    # greedy picks the argmax: every valid token has the highest log-prob at its position
    lp = tiny.token_logprobs(a.prompt_ids, a.prompt_mask, a.completion_ids, a.completion_mask)
    naive, ent = naive_logprobs(tiny, a)
    assert torch.allclose(lp, naive, atol=1e-5)
    assert (ent[a.completion_mask.bool()] > 0).all()


def test_sampling_is_seed_reproducible(tiny):
    torch.manual_seed(123)
    a = tiny.generate(MESSAGES, num_generations=4, max_new_tokens=10, temperature=1.0, top_p=0.9)
    torch.manual_seed(123)
    b = tiny.generate(MESSAGES, num_generations=4, max_new_tokens=10, temperature=1.0, top_p=0.9)
    torch.manual_seed(124)
    c = tiny.generate(MESSAGES, num_generations=4, max_new_tokens=10, temperature=1.0, top_p=0.9)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert len(set(a.texts)) > 1  # samples within a group differ


def test_generate_validates_arguments(tiny):
    with pytest.raises(ValueError, match="num_generations"):
        tiny.generate(MESSAGES, num_generations=0)
    with pytest.raises(ValueError, match="temperature"):
        tiny.generate(MESSAGES, temperature=0.0)


# ---- token spans ------------------------------------------------------------------------
def byte_level_chars() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the other bytes map
    in order to the code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def test_token_spans_rebuild_text_for_random_ids(tiny):
    rng = random.Random(0)
    V = len(tiny.tokenizer)
    for _ in range(200):
        ids = [rng.randrange(V) for _ in range(rng.randrange(0, 40))]
        text, spans = token_char_spans(tiny.tokenizer, ids)
        assert text == tiny.tokenizer.decode(ids, skip_special_tokens=True)
        check_spans(text, spans, len(ids))


def test_token_spans_split_multibyte_chars(tiny):
    byte_tok = byte_level_chars()
    vocab = tiny.tokenizer.get_vocab()

    def byte_ids(s):
        return [vocab[byte_tok[b]] for b in s.encode("utf-8")]

    ids = byte_ids("a") + byte_ids("€") + byte_ids("b") + byte_ids("😀")
    text, spans = token_char_spans(tiny.tokenizer, ids)
    assert text == "a€b😀"
    # the first two bytes of "€" (3 bytes) are zero-width; the third covers the character
    assert spans == [(0, 1), (1, 1), (1, 1), (1, 2), (2, 3), (3, 3), (3, 3), (3, 3), (3, 4)]
    eos = tiny.eos_token_ids[0]
    text, spans = token_char_spans(tiny.tokenizer, byte_ids("é") + [eos])
    assert text == "é" and spans == [(0, 0), (0, 1), (1, 1)]
    # random byte soup, including invalid UTF-8 that never completes (U+FFFD in the text)
    rng = random.Random(1)
    pieces = ["é", "€", "😀", "ß", "a", " "]
    for _ in range(100):
        ids = []
        for _ in range(rng.randrange(1, 12)):
            b = byte_ids(rng.choice(pieces))
            ids += b[: rng.randrange(1, len(b) + 1)]  # sometimes a truncated character
        text, spans = token_char_spans(tiny.tokenizer, ids)
        check_spans(text, spans, len(ids))


class BytesTokenizer:
    """Each id is one raw byte; decode is UTF-8 with replacement (pure byte-level check)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [self.decode(s) for s in seqs]


def test_token_spans_bytes_tokenizer():
    tok = BytesTokenizer()
    text, spans = token_char_spans(tok, list("h€".encode()))
    assert spans == [(0, 1), (1, 1), (1, 1), (1, 2)]
    rng = random.Random(2)
    alphabet = "aé€😀ß\n ".encode() + bytes([0xFF, 0x80, 0xC3])
    for _ in range(300):
        ids = [rng.choice(alphabet) for _ in range(rng.randrange(0, 30))]
        text, spans = token_char_spans(tok, ids)
        assert text == bytes(ids).decode("utf-8", errors="replace")
        check_spans(text, spans, len(ids))


# ---- log-probs --------------------------------------------------------------------------
def test_token_logprobs_match_naive_and_entropy(tiny, eos_boost):
    torch.manual_seed(3)
    r = tiny.generate(MESSAGES, num_generations=3, max_new_tokens=12)
    tiny.eval()
    lp, ent = tiny.token_logprobs(
        r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, with_entropy=True
    )
    naive_lp, naive_ent = naive_logprobs(tiny, r)
    assert lp.shape == ent.shape == r.completion_ids.shape
    assert torch.allclose(lp, naive_lp, atol=1e-5)
    assert torch.allclose(ent, naive_ent, atol=1e-4)
    assert (lp[r.completion_mask == 0] == 0).all() and (ent[r.completion_mask == 0] == 0).all()
    lp2 = tiny.token_logprobs(
        r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, temperature=2.0
    )
    assert torch.allclose(lp2, naive_logprobs(tiny, r, temperature=2.0)[0], atol=1e-5)


def test_token_logprobs_padding_invariant(tiny):
    torch.manual_seed(4)
    r = tiny.generate(MESSAGES, num_generations=2, max_new_tokens=10)
    tiny.eval()
    base = tiny.token_logprobs(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    extra = 7  # more left padding, and right padding on the completion
    pad = torch.full((len(r), extra), tiny.pad_token_id)
    zeros = torch.zeros((len(r), extra), dtype=r.prompt_mask.dtype)
    lp = tiny.token_logprobs(
        torch.cat([pad, r.prompt_ids], 1),
        torch.cat([zeros, r.prompt_mask], 1),
        torch.cat([r.completion_ids, pad], 1),
        torch.cat([r.completion_mask, zeros], 1),
    )
    assert torch.allclose(lp[:, : base.shape[1]], base, atol=1e-5)
    assert (lp[:, base.shape[1] :] == 0).all()


def test_token_logprobs_chunked_matches_and_grads(tiny, monkeypatch):
    torch.manual_seed(5)
    r = tiny.generate(MESSAGES, num_generations=3, max_new_tokens=8)
    tiny.eval()
    args = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    tiny.zero_grad()
    lp, ent = tiny.token_logprobs(*args, with_entropy=True)
    (lp.sum() + ent.sum()).backward()
    grads = [p.grad.clone() for p in tiny.parameters()]
    tiny.zero_grad()
    V, T = len(tiny.tokenizer), r.completion_ids.shape[1]
    monkeypatch.setattr(policy_mod, "_MAX_LOGITS", 2 * T * V)  # 2 rows per chunk
    lp_c, ent_c = tiny.token_logprobs(*args, with_entropy=True)
    (lp_c.sum() + ent_c.sum()).backward()
    assert torch.allclose(lp, lp_c, atol=1e-6) and torch.allclose(ent, ent_c, atol=1e-6)
    for g, p in zip(grads, tiny.parameters(), strict=True):
        assert torch.isfinite(p.grad).all()
        assert torch.allclose(g, p.grad, atol=1e-5)
    tiny.zero_grad()


def test_token_logprobs_rejects_bad_shapes(tiny):
    ids = torch.zeros((2, 3), dtype=torch.long)
    with pytest.raises(ValueError, match="completion_mask"):
        tiny.token_logprobs(ids, ids, ids, torch.zeros((2, 4), dtype=torch.long))


# ---- LoRA, save/load, load_hf -----------------------------------------------------------
def test_lora_wrapper_on_tiny():
    pol = build_tiny(TEXTS, seed=0, lora={"r": 4, "alpha": 8, "target_modules": ["c_attn"]})
    assert pol.is_peft
    trainable = [n for n, p in pol.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.manual_seed(0)
    r = pol.generate(MESSAGES, num_generations=2, max_new_tokens=6)
    lp = pol.token_logprobs(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    assert torch.allclose(lp, naive_logprobs(pol, r)[0], atol=1e-5)
    lp.sum().backward()
    assert all(p.grad is not None for p in pol.trainable_parameters())
    assert all(p.grad is None for p in pol.parameters() if not p.requires_grad)


def test_save_load_round_trip_full_and_lora(tmp_path):
    torch.manual_seed(0)
    pol = build_tiny(TEXTS, seed=0)
    r = pol.generate(MESSAGES, num_generations=2, max_new_tokens=6)
    args = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    with torch.no_grad():
        for p in pol.parameters():
            p.add_(0.01 * torch.randn_like(p))
        before = pol.token_logprobs(*args)
    pol.save(tmp_path / "full")
    fresh = build_tiny(TEXTS, seed=0)
    with torch.no_grad():
        assert not torch.allclose(fresh.token_logprobs(*args), before)
        assert torch.allclose(fresh.load(tmp_path / "full").token_logprobs(*args), before)

    lora = {"r": 4, "alpha": 8, "target_modules": ["c_attn"]}
    pol = build_tiny(TEXTS, seed=0, lora=lora)
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
        before = pol.token_logprobs(*args)
    pol.save(tmp_path / "lora")
    pol.save(tmp_path / "lora")  # overwriting an existing save is fine
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
    fresh = build_tiny(TEXTS, seed=0, lora=lora)
    with torch.no_grad():
        assert torch.allclose(fresh.load(tmp_path / "lora").token_logprobs(*args), before)
    with pytest.raises(ValueError, match="LoRA"):
        build_tiny(TEXTS, seed=0).load(tmp_path / "lora")
    with pytest.raises(FileNotFoundError):
        fresh.load(tmp_path / "missing")


def test_load_hf_round_trip(tiny, tmp_path):
    tiny.save(tmp_path / "hf")
    pol = load_hf(str(tmp_path / "hf"), dtype="float32")
    assert pol.eos_token_ids == tiny.eos_token_ids and pol.pad_token_id == tiny.pad_token_id
    assert pol.tokenizer.chat_template == tiny.tokenizer.chat_template
    a = tiny.generate(MESSAGES, num_generations=1, max_new_tokens=8, do_sample=False)
    b = pol.generate(MESSAGES, num_generations=1, max_new_tokens=8, do_sample=False)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    with torch.no_grad():
        args = (a.prompt_ids, a.prompt_mask, a.completion_ids, a.completion_mask)
        assert torch.allclose(tiny.token_logprobs(*args), pol.token_logprobs(*args), atol=1e-6)
    lora = load_hf(str(tmp_path / "hf"), dtype="bf16", lora={"r": 2, "target_modules": ["c_attn"]})
    assert lora.is_peft and next(lora.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_hf(str(tmp_path / "hf"), dtype="float8")


def test_build_tiny_is_seeded_and_keeps_global_rng(tiny):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    other = build_tiny(TEXTS, seed=0)
    assert torch.equal(torch.rand(3), expected)
    for a, b in zip(tiny.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert other.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    assert tiny.tokenizer.eos_token == "<|im_end|>" and tiny.tokenizer.pad_token == "<|pad|>"


# ---- SmolLM2 (slow) ---------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_convert_cache_generate(tmp_path):
    t0 = time.perf_counter()
    pol = policy_mod.load_smollm2(cache_dir=tmp_path / "smol")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    pol = policy_mod.load_smollm2(cache_dir=tmp_path / "smol")
    second = time.perf_counter() - t0
    assert second < 2.0, f"cached load took {second:.2f}s (first {first:.1f}s)"
    tok = pol.tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.convert_ids_to_tokens(pol.eos_token_ids) == ["<|im_end|>"]
    assert tok.pad_token_id not in pol.eos_token_ids
    prompt = pol.chat_prompts([[{"role": "user", "content": "hi"}]])[0]
    assert prompt.endswith("<|im_start|>assistant\n")
    lm = pol.causal_lm
    assert torch.equal(lm.lm_head.weight, lm.model.embed_tokens.weight)
    msgs = [
        [
            {"role": "system", "content": "Rewrite the shopping request as a search query."},
            {"role": "user", "content": "something warm for my daughter's ski trip"},
        ]
    ]
    torch.manual_seed(0)
    r = pol.generate(msgs, num_generations=2, max_new_tokens=24)
    assert r.completion_ids.shape[0] == 2
    for i in range(2):
        check_spans(r.texts[i], r.token_spans[i], int(r.completion_mask[i].sum()))
    lp = pol.token_logprobs(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    assert torch.isfinite(lp).all() and (lp <= 0).all()
