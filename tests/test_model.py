"""model.py: the forward pass against an independent naive LLaMA, the KV cache against recomputation, padding,
log-probs against a Python loop, activation checkpointing and compiled blocks, sampling."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_transformer
from model import ModelArgs, Transformer, apply_rotary, attention_mask, rotary, sample_next

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16, max_seq_len=64)


def tiny(seed=0, **changes) -> Transformer:
    """A random tiny model with large weights, so that attention (and with it every position and mask) moves the
    logits enough to change argmax, and gains away from 1, so that a norm loaded into the wrong place shows up."""
    model = tiny_transformer(seed=seed, args=ARGS, **changes).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0.0, 0.2)
    return model


def naive_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's llama/model.py for one unpadded sequence tokens (T,), written plainly: complex-number rotary on
    (x[2i], x[2i+1]) pairs, key/value heads repeated with repeat_kv's layout, and an explicit masked softmax."""
    a, w = model.args, model.state_dict()
    H, T = a.n_heads, len(tokens)
    K, hd = a.n_kv_heads or H, a.dim // H

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.norm_eps) * g

    freqs = 1.0 / (a.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))[:, None]  # (T, 1, hd/2)

    def rope(x):  # (T, heads, hd)
        return torch.view_as_real(torch.view_as_complex(x.reshape(T, -1, hd // 2, 2)) * cis).reshape(x.shape)

    x = w["tok_embeddings.weight"][tokens]
    for i in range(a.n_layers):
        p = {n.split(f"layers.{i}.")[1]: v for n, v in w.items() if n.startswith(f"layers.{i}.")}
        h = rms(x, p["attention_norm.weight"])
        q = rope((h @ p["attention.wq.weight"].T).view(T, H, hd))
        k = rope((h @ p["attention.wk.weight"].T).view(T, K, hd)).repeat_interleave(H // K, dim=1)
        v = (h @ p["attention.wv.weight"].T).view(T, K, hd).repeat_interleave(H // K, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / hd ** 0.5
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        x = x + torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, -1) @ p["attention.wo.weight"].T
        h = rms(x, p["ffn_norm.weight"])
        ffn = F.silu(h @ p["feed_forward.w1.weight"].T) * (h @ p["feed_forward.w3.weight"].T)
        x = x + ffn @ p["feed_forward.w2.weight"].T
    return rms(x, w["norm.weight"]) @ w["output.weight"].T


# --- the network ------------------------------------------------------------------------------------------------


def test_ffn_hidden_dim_follows_meta_rule():
    assert ModelArgs().ffn_hidden_dim == 11008  # Llama 2 7B
    assert ModelArgs(dim=5120, n_heads=40, n_layers=40).ffn_hidden_dim == 13824  # 13B
    assert ModelArgs(dim=8192, n_heads=64, n_kv_heads=8, n_layers=80, multiple_of=4096,
                     ffn_dim_multiplier=1.3).ffn_hidden_dim == 28672  # 70B
    assert ARGS.ffn_hidden_dim == 176  # int(8 * 64 / 3) = 170, rounded up to a multiple of 16


def test_forward_matches_naive_llama_with_repeated_kv_heads():
    model = tiny()
    assert model.args.n_kv_heads < model.args.n_heads  # grouped-query attention is what is being checked
    tokens = torch.randint(0, ARGS.vocab_size, (2, 11))
    with torch.no_grad():
        logits = model(tokens)
        for b in range(2):
            torch.testing.assert_close(logits[b], naive_logits(model, tokens[b]))


def test_rotary_depends_only_on_relative_position():
    torch.manual_seed(0)
    hd = 16
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def dot(m, n):
        rotated = [apply_rotary(x, *rotary(torch.tensor([[pos]]), hd, 10000.0)) for x, pos in ((q, m), (k, n))]
        return (rotated[0] * rotated[1]).sum()

    for shift in (1, 7, 300):
        torch.testing.assert_close(dot(3, 5), dot(3 + shift, 5 + shift))
    assert not torch.allclose(dot(3, 5), dot(3, 6))


def test_padding_gives_each_sequence_its_unpadded_logits():
    model = tiny()
    seqs = [torch.randint(0, ARGS.vocab_size, (n,)) for n in (5, 9, 2)]
    T = 9
    # pads hold random tokens: whatever they contain must not matter
    left, right = torch.randint(0, ARGS.vocab_size, (2, 3, T))
    left_mask, right_mask = torch.zeros(2, 3, T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        left[b, T - len(s):], left_mask[b, T - len(s):] = s, True
        right[b, :len(s)], right_mask[b, :len(s)] = s, True
    with torch.no_grad():
        from_left, from_right, from_right_masked = model(left, left_mask), model(right), model(right, right_mask)
        assert torch.isfinite(from_left).all()
        assert attention_mask(left_mask).any(-1).all()  # no empty softmax row (NaN on some backends) even for pads
        for b, s in enumerate(seqs):
            alone = model(s[None])[0]
            torch.testing.assert_close(from_left[b, T - len(s):], alone)
            torch.testing.assert_close(from_right[b, :len(s)], alone)
            torch.testing.assert_close(from_right_masked[b, :len(s)], alone)


def test_token_logprobs_match_naive_loop_and_ignore_padding():
    model = tiny()
    tokens = torch.randint(0, ARGS.vocab_size, (3, 8))
    mask = torch.rand(3, 8) < 0.6
    mask[:, 0] = False
    logprobs, entropy = model.token_logprobs(tokens, mask, with_entropy=True)
    assert logprobs.dtype == torch.float32 and logprobs.shape == (3, 8)
    with torch.no_grad():
        for b in range(3):
            for t in range(8):
                lp = model(tokens[b, :t][None])[0, -1].float().log_softmax(-1) if t else torch.zeros(ARGS.vocab_size)
                want = (lp[tokens[b, t]], -(lp.exp() * lp).sum()) if mask[b, t] else (0.0, 0.0)
                torch.testing.assert_close(logprobs[b, t], torch.tensor(float(want[0])))
                torch.testing.assert_close(entropy[b, t], torch.tensor(float(want[1])))
    # five pads on the right, then the same rows left-padded by three with a pad_mask
    right = torch.cat([tokens, torch.randint(0, ARGS.vocab_size, (3, 5))], 1)
    right_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], 1)
    torch.testing.assert_close(model.token_logprobs(right, right_mask)[:, :8], logprobs)
    assert (model.token_logprobs(right, right_mask)[:, 8:] == 0).all()
    left = torch.cat([torch.randint(0, ARGS.vocab_size, (3, 3)), tokens], 1)
    left_mask = torch.cat([torch.zeros(3, 3, dtype=torch.bool), mask], 1)
    pad_mask = torch.cat([torch.zeros(3, 3, dtype=torch.bool), torch.ones(3, 8, dtype=torch.bool)], 1)
    torch.testing.assert_close(model.token_logprobs(left, left_mask, pad_mask)[:, 3:], logprobs)
    logprobs.sum().backward()
    assert model.output.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mask"):
        model.token_logprobs(tokens, torch.ones_like(mask))


PROMPTS = [[1, 5, 9], [7], [3, 4, 5, 6, 7, 8, 2], [11, 12]]


def greedy_by_recomputation(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_kv_cache_generation_equals_full_recompute():
    model = tiny()
    model.train()
    out = model.generate(PROMPTS, max_new_tokens=6)
    assert model.training  # the mode is restored
    assert out == [greedy_by_recomputation(model, p, 6) for p in PROMPTS]
    # a row that emits eos stops there, eos included; the others go on
    eos = out[0][2]
    cut = [row[:row.index(eos) + 1] if eos in row else row for row in out]
    assert model.generate(PROMPTS, max_new_tokens=6, eos_id=eos) == cut
    assert cut[0][-1] == eos and any(len(row) == 6 for row in cut)


def test_activation_checkpointing_changes_memory_not_numbers():
    """model.checkpointing recomputes each block in backward: the same loss and the same gradients, and the
    autograd graph keeps fewer tensors (the point of it)."""
    tokens = torch.randint(0, ARGS.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    grads, saved = [], []
    for checkpointing in (False, True):
        model = tiny()
        model.checkpointing = checkpointing
        count = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.__setitem__(0, count[0] + 1) or t, lambda t: t):
            loss = model.token_logprobs(tokens, mask).sum()
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
        saved.append(count[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert saved[1] < saved[0] / 2, saved
    with torch.no_grad():  # generation never checkpoints
        assert model.generate(PROMPTS, max_new_tokens=3) == tiny().generate(PROMPTS, max_new_tokens=3)


@pytest.mark.slow
def test_compiled_blocks_compute_what_eager_blocks_do():
    """train.py --compile compiles each block in place (nn.Module.compile): forward, gradients and KV-cache
    generation as in eager mode, to float rounding."""
    tokens = torch.randint(0, ARGS.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    eager, compiled = tiny(), tiny()
    for layer in compiled.layers:
        layer.compile()
    outs = []
    for model in (eager, compiled):
        logits = model(tokens)
        logits.square().mean().backward()
        outs.append((logits.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert compiled.generate(PROMPTS, max_new_tokens=4) == eager.generate(PROMPTS, max_new_tokens=4)


def test_generation_sampling_is_reproducible_and_capped():
    model = tiny()
    draw = [model.generate(PROMPTS, 8, temperature=1.0, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert draw[0] == draw[1] and draw[0] != draw[2]
    # a nucleus smaller than any single token keeps only the most likely one: greedy
    assert model.generate(PROMPTS, 5, temperature=1.0, top_p=1e-9) == model.generate(PROMPTS, 5)
    assert model.generate(PROMPTS, 5, temperature=1.0, top_k=1) == model.generate(PROMPTS, 5)  # top-1: greedy too
    # prompt + new tokens never exceed max_seq_len
    assert [len(r) for r in model.generate([[1] * 60, [2]], 10)] == [4, 4]
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert all(len(r) == 3 for r in bf16.generate(PROMPTS, 3))


def test_top_k_then_top_p_by_hand():
    """Probabilities [0.4, 0.3, 0.2, 0.1] (ids 0-3): top-k 3 keeps {0, 1, 2}, renormalised [4/9, 3/9, 2/9]; then
    top-p 0.7 keeps the tokens whose mass before them is <= 0.7: 0 (0) and 1 (4/9), not 2 (7/9). Without top-k,
    top-p 0.71 keeps 0, 1 and 2 (the mass before 2 is 0.7). 4000 draws each."""
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    both = sample_next(logits, 1.0, 0.7, g, top_k=3)
    assert set(both.tolist()) == {0, 1} and (both == 0).float().mean().item() == pytest.approx(4 / 7, abs=0.03)
    assert set(sample_next(logits, 1.0, 1.0, g, top_k=3).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, 1.0, 0.71, g).tolist()) == {0, 1, 2}

