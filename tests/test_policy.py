import json
import random

import numpy as np
import pytest
import torch

import ospo.policy as policy_mod
import ospo.policy.logprobs as logprobs_mod
from ospo.demos import best_demo, rejection_sample_demos
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
    tiny.model.transformer.h[0].eval()  # a mixed-mode model keeps each module's mode
    a = tiny.generate(MESSAGES, num_generations=2, max_new_tokens=10, do_sample=False)
    assert tiny.training and tiny.model.training and not tiny.model.transformer.h[0].training
    tiny.eval()
    b = tiny.generate(MESSAGES, num_generations=2, max_new_tokens=10, do_sample=False)
    assert not tiny.model.training
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_ids[0], a.completion_ids[1])
    # greedy picks the argmax of the unpadded model, also for the left-padded prompt (row 0)
    assert a.prompt_mask[0, 0] == 0
    for i in range(len(a)):
        p = a.prompt_ids[i][a.prompt_mask[i].bool()]
        n = int(a.completion_mask[i].sum())
        c = a.completion_ids[i, :n]
        logits = tiny.model(torch.cat([p, c])[None]).logits[0, len(p) - 1 : len(p) - 1 + n]
        assert torch.equal(logits.argmax(-1), c)
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
    V = len(tiny.tokenizer)
    assert int(r.completion_mask.sum()) > 3  # several chunks below
    monkeypatch.setattr(logprobs_mod, "_MAX_LOGITS", 3 * V)  # 3 valid tokens per chunk
    lp_c, ent_c = tiny.token_logprobs(*args, with_entropy=True)
    (lp_c.sum() + ent_c.sum()).backward()
    assert torch.allclose(lp, lp_c, atol=1e-6) and torch.allclose(ent, ent_c, atol=1e-6)
    for g, p in zip(grads, tiny.parameters(), strict=True):
        assert torch.isfinite(p.grad).all()
        assert torch.allclose(g, p.grad, atol=1e-5)
    tiny.zero_grad()


def test_shared_prompt_pass_matches_plain_pass_and_grads(tiny, eos_boost):
    """group_size=G runs each prompt once; values and gradients equal the plain pass."""
    torch.manual_seed(6)
    G = 3
    r = tiny.generate(MESSAGES, num_generations=G, max_new_tokens=10)
    args = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    results = []
    for group_size in (1, G):
        tiny.zero_grad()
        lp, ent = tiny.token_logprobs(*args, with_entropy=True, group_size=group_size)
        (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
        results.append((lp.detach(), ent.detach(), [p.grad.clone() for p in tiny.parameters()]))
    (lp1, ent1, g1), (lpG, entG, gG) = results
    assert torch.allclose(lp1, lpG, atol=1e-5) and torch.allclose(ent1, entG, atol=1e-4)
    for a, b in zip(g1, gG, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    tiny.zero_grad()
    # rows that do not repeat their prompt fall back to the plain pass
    swapped = [x[[0, G] + list(range(1, G)) + list(range(G + 1, len(x)))] for x in args]
    lp_s = tiny.token_logprobs(*swapped, group_size=G)
    assert torch.allclose(
        lp_s, lp1[[0, G] + list(range(1, G)) + list(range(G + 1, len(lp1)))], atol=1e-5
    )


def test_shared_prefill_generation_matches_plain(tiny, monkeypatch):
    """Prefilling each prompt once samples the same tokens as prefilling every row."""
    torch.manual_seed(7)
    shared = tiny.generate(MESSAGES, num_generations=3, max_new_tokens=10)
    monkeypatch.setattr(Policy, "_checkpointing", lambda self: True)  # forces the plain path
    torch.manual_seed(7)
    plain = tiny.generate(MESSAGES, num_generations=3, max_new_tokens=10)
    assert torch.equal(shared.completion_ids, plain.completion_ids)


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


def _lora_tiny(arch: str = "gpt2"):
    """A tiny policy with LoRA on its attention, B matrices non-zero so the adapters matter:
    the tiny GPT-2 (Conv1D layers) or a tiny Llama (nn.Linear layers, as SmolLM2) with the
    same tokenizer."""
    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator
    if arch == "gpt2":
        pol = build_tiny(TEXTS, seed=0, lora={"r": 4, "alpha": 8, "target_modules": ["c_attn"]})
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from ospo.policy.loading import _finish

        tok = build_tiny(TEXTS, seed=0).tokenizer
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
        pol = _finish(model, tok, lora, gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in pol.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return pol


@pytest.mark.parametrize("arch, cast_per_layer", [("llama", 7), ("gpt2", 4)])
def test_store_frozen_is_bit_identical_under_autocast(arch, cast_per_layer):
    """Frozen linear weights stored in bf16 give the same rollouts, log-probs, entropies and
    LoRA gradients as float32 weights cast by autocast at every call; merged weights stay
    exact. Llama: q, k, v, o (q and v under LoRA: their base), gate, up, down; GPT-2: c_attn
    (under LoRA), attn and mlp c_proj, c_fc."""
    results = []
    for cast in (False, True):
        pol = _lora_tiny(arch)
        merged_before = pol.merged_state_dict()
        if cast:
            n = pol.store_frozen(torch.bfloat16)
            assert n == 2 * cast_per_layer
            frozen = [p for p in pol.parameters() if p.dtype == torch.bfloat16]
            assert len(frozen) == n and not any(p.requires_grad for p in frozen)
            assert pol.lm_head.weight.dtype == torch.float32  # tied embedding: left alone
            assert all(p.dtype == torch.float32 for p in pol.trainable_parameters())
            merged = pol.merged_state_dict()
            assert merged.keys() == merged_before.keys()
            assert all(torch.equal(merged[k], merged_before[k]) for k in merged)
            with pol.full_precision_frozen():  # float32 again, e.g. outside autocast
                assert all(
                    torch.equal(v, merged_before[k]) for k, v in pol.merged_state_dict().items()
                )
                assert not any(p.dtype == torch.bfloat16 for p in pol.parameters())
            assert sum(p.dtype == torch.bfloat16 for p in pol.parameters()) == n
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(0)
            ro = pol.generate(MESSAGES, num_generations=3, max_new_tokens=8)
            lp, ent = pol.token_logprobs(
                ro.prompt_ids,
                ro.prompt_mask,
                ro.completion_ids,
                ro.completion_mask,
                with_entropy=True,
                group_size=3,
            )
        (lp.sum() + ent.sum()).backward()
        grads = [p.grad.clone() for p in pol.trainable_parameters()]
        results.append((ro.completion_ids, lp.detach(), ent.detach(), grads))
    (ids0, lp0, ent0, g0), (ids1, lp1, ent1, g1) = results
    assert torch.equal(ids0, ids1) and torch.equal(lp0, lp1) and torch.equal(ent0, ent1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert any(float(g.abs().sum()) > 0 for g in g1)


def test_output_layer_cast_once_per_generate_is_exact(monkeypatch):
    """Generation under autocast with the output layer cast once per call samples exactly
    what per-step casting samples, and the policy's own output layer is put back."""
    import contextlib

    from ospo.policy import sampling

    pol = _lora_tiny("llama")
    head = pol.lm_head
    seen = []
    hook = pol.causal_lm.register_forward_hook(lambda m, i, o: seen.append(type(m.lm_head)))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(0)
            return pol.generate(MESSAGES, num_generations=3, max_new_tokens=8)

    fast = run()
    assert seen and all(t is sampling._Linear for t in seen)  # the cast copy was used
    monkeypatch.setattr(sampling, "autocast_output_layer", lambda p: contextlib.nullcontext())
    slow = run()
    hook.remove()
    assert torch.equal(fast.completion_ids, slow.completion_ids) and fast.texts == slow.texts
    assert pol.lm_head is head and pol.lm_head.weight is pol.causal_lm.get_input_embeddings().weight


def test_gradient_checkpointing_with_lora_matches(tiny):
    lora = {"r": 4, "alpha": 8}  # default GPT-2 targets: c_attn, c_proj
    plain = build_tiny(TEXTS, seed=0, lora=lora)
    ckpt = build_tiny(TEXTS, seed=0, lora=lora, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    torch.manual_seed(0)
    r = plain.generate(MESSAGES, num_generations=2, max_new_tokens=6)
    args = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    grads = []
    for pol in (plain, ckpt):
        pol.train()
        pol.token_logprobs(*args).sum().backward()
        grads.append([p.grad for p in pol.trainable_parameters()])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


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
    pol.save(tmp_path / "lora", merged=False)
    pol.save(tmp_path / "lora", merged=False)  # overwriting an existing save is fine
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
    fresh = build_tiny(TEXTS, seed=0, lora=lora)
    with torch.no_grad():
        assert torch.allclose(fresh.load(tmp_path / "lora").token_logprobs(*args), before)
    with pytest.raises(ValueError, match="LoRA"):
        build_tiny(TEXTS, seed=0).load(tmp_path / "lora")
    with pytest.raises(FileNotFoundError):
        fresh.load(tmp_path / "missing")

    # merged save (the default): full weights with the LoRA deltas, the live model unchanged
    live = {k: v.clone() for k, v in pol.state_dict().items()}
    pol.save(tmp_path / "merged")
    assert all(torch.equal(v, pol.state_dict()[k]) for k, v in live.items())
    with torch.no_grad():
        plain = build_tiny(TEXTS, seed=0).load(tmp_path / "merged")
        assert torch.allclose(plain.token_logprobs(*args), before, atol=1e-5)
        reopened = load_hf(str(tmp_path / "merged"), dtype="float32")
        assert torch.allclose(reopened.token_logprobs(*args), before, atol=1e-5)
        assert _tied_ok(reopened)
    with pytest.raises(ValueError, match="merged"):
        fresh.load(tmp_path / "merged")


def _tied_ok(pol):
    lm = pol.causal_lm
    return lm.get_output_embeddings().weight is lm.get_input_embeddings().weight


def test_load_hf_round_trip(tiny, tmp_path):
    tiny.save(tmp_path / "hf")
    from transformers import GenerationConfig

    # hub sampling defaults must not leak into the policy's sampling distribution
    GenerationConfig(do_sample=True, top_k=1, repetition_penalty=2.0, min_p=0.5).save_pretrained(
        tmp_path / "hf"
    )
    pol = load_hf(str(tmp_path / "hf"), dtype="float32")
    gc = pol.model.generation_config
    assert gc.top_k is None and gc.repetition_penalty is None and gc.min_p is None
    assert gc.eos_token_id == tiny.eos_token_ids
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
    rng = torch.random.get_rng_state()
    policy_mod.convert_smollm2(tmp_path / "smol")
    # converting draws nothing from the global generator: a first run trains as a cached one
    assert torch.equal(torch.random.get_rng_state(), rng)
    pol = policy_mod.load_smollm2(cache_dir=tmp_path / "smol")
    marker = tmp_path / "smol" / "ospo_complete.json"
    stamp = (marker.stat().st_mtime_ns, (tmp_path / "smol").stat().st_ino)
    pol = policy_mod.load_smollm2(cache_dir=tmp_path / "smol")
    # the second load reads the cache: nothing was converted or rewritten
    assert (marker.stat().st_mtime_ns, (tmp_path / "smol").stat().st_ino) == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol"]  # no temporary folder left
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


# ---- rejection-sampled demonstrations ---------------------------------------------------
class LengthReward:
    """Fake reward: a text's length in characters / 100, plus 1 for request q1 (checks that
    completions are paired with their own sample)."""

    def __init__(self):
        self.calls = []

    def score_texts(self, texts, samples):
        assert len(texts) == len(samples)
        self.calls.append((list(texts), [s.qid for s in samples]))
        return np.array(
            [len(t.strip()) / 100 + (s.qid == "q1") for t, s in zip(texts, samples, strict=True)]
        )

    def score_queries(self, texts, samples):  # the samples have no prefix: queries = texts
        return self.score_texts(texts, samples)


def demo_samples(n=3):
    from ospo.data import Sample

    return [
        Sample(qid=f"q{i}", request="ab", messages=MESSAGES[i % 2], gains={"p": 1.0})
        for i in range(n)
    ]


def test_best_demo_rules():
    texts = ["a", "b", "c", "  "]
    rewards = np.array([0.5, 0.9, 0.7, 1.0])
    assert best_demo(texts, rewards, [True] * 4, raw_reward=0.6) == 1
    assert best_demo(texts, rewards, [True, False, True, True], raw_reward=0.6) == 2
    assert best_demo(texts, rewards, [True] * 4, raw_reward=0.95) is None  # blank text skipped
    assert best_demo(texts, rewards, [True] * 4, raw_reward=0.6, threshold=0.2) == 1
    assert best_demo(texts, rewards, [True] * 4, 0.0, threshold=0.95, relative_to_raw=False) is None
    assert best_demo(texts, rewards, [True] * 4, 9.0, threshold=0.9, relative_to_raw=False) == 1
    with pytest.raises(ValueError, match="length"):
        best_demo(texts, rewards[:2], [True] * 4, 0.0)


def test_rejection_sample_demos_writes_best_per_request(tiny, tmp_path):
    from ospo.data import load_demos

    reward = LengthReward()
    samples = demo_samples(3)
    path = tmp_path / "demos" / "train.jsonl"
    torch.manual_seed(0)
    stats = rejection_sample_demos(
        tiny,
        reward,
        samples,
        num_samples=4,
        format_check=lambda text, ended: True,
        max_new_tokens=8,
        batch_size=2,
        path=path,
        progress=False,
    )
    assert stats["requests"] == 3 and 0 < stats["with_demo"] <= 3
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == stats["with_demo"] and [p.name for p in path.parent.iterdir()] == [
        path.name
    ]
    assert load_demos(path) == stats["demos"]
    # each demo is the best of its request's samples and beats the raw request
    sampled = {}
    for texts, qids in reward.calls:
        for t, q in zip(texts, qids, strict=True):
            if t != "ab":
                sampled.setdefault(q, []).append(t)
    assert all(len(v) == 4 for v in sampled.values())
    for row in lines:
        extra = row["qid"] == "q1"
        best = max(len(t.strip()) for t in sampled[row["qid"]])
        assert row["reward"] == pytest.approx(best / 100 + extra)
        assert len(row["demo"]) == best and row["reward"] > 0.02 + extra

    stats = rejection_sample_demos(
        tiny,
        reward,
        samples,
        num_samples=2,
        max_new_tokens=4,
        path=path,
        progress=False,
        format_check=lambda text, ended: False,
    )
    assert stats["with_demo"] == 0 and path.read_text() == ""


@pytest.mark.slow
def test_demos_command_line(tmp_path):
    from ospo.data import load_demos
    from ospo.demos import main

    out = tmp_path / "demos.jsonl"
    stats = main(
        ["--out", str(out), "--limit", "4", "--num-samples", "2", "--absolute",
         "--threshold", "0.0", "model=tiny", "data.num_products=600"]
    )  # fmt: skip
    assert stats["requests"] == 4 and out.exists()
    assert len(load_demos(out)) == stats["with_demo"]


def test_inverse_cdf_sampler_draws_softmax_and_never_a_masked_token():
    """InverseCDFSample draws from softmax(scores): frequencies of 40,000 draws match, tokens
    at -inf (outside the nucleus) never come, and a seed repeats its draws."""
    from ospo.policy.sampling import InverseCDFSample

    scores = torch.tensor([2.0, 1.0, 0.0, float("-inf"), -1.0, float("-inf")])
    rows = scores.repeat(40_000, 1)  # (R, V)
    torch.manual_seed(0)
    out = InverseCDFSample()(None, rows)
    assert torch.equal((out == 0).sum(1), torch.ones(len(rows), dtype=torch.long))
    drawn = out.argmax(1)
    freq = torch.bincount(drawn, minlength=6).double() / len(rows)
    probs = scores.double().softmax(0)
    assert freq[3] == 0 and freq[5] == 0
    assert torch.allclose(freq, probs, atol=0.01)  # 5 standard errors at most
    torch.manual_seed(0)
    assert torch.equal(InverseCDFSample()(None, rows).argmax(1), drawn)


def test_generate_with_inverse_cdf_sampler(tiny, eos_boost):
    """The inverse-CDF path samples (not greedy), is seeded, honours top-p and EOS."""
    torch.manual_seed(3)
    a = tiny.generate(MESSAGES, num_generations=4, max_new_tokens=8, sampler="inverse_cdf")
    torch.manual_seed(3)
    b = tiny.generate(MESSAGES, num_generations=4, max_new_tokens=8, sampler="inverse_cdf")
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert len({tuple(r) for r in a.completion_ids[:4].tolist()}) > 1  # draws, not argmax
    greedy = tiny.generate(MESSAGES, num_generations=1, max_new_tokens=8, do_sample=False)
    torch.manual_seed(3)
    top = tiny.generate(
        MESSAGES, num_generations=4, max_new_tokens=8, sampler="inverse_cdf", top_p=1e-6
    )
    # a vanishing nucleus keeps the most likely token only: greedy decoding
    assert torch.equal(top.completion_ids[::4], greedy.completion_ids)
    with pytest.raises(ValueError, match="sampler='gumbel'"):
        tiny.generate(MESSAGES, sampler="gumbel")
    from ospo.rollout import HFRollout

    with pytest.raises(ValueError, match="rollout.sampler='x'"):
        HFRollout(sampler="x")
