"""lab/conflict.py: the cosine between the IFA and the DPO gradient against a direct computation, and by hand."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import data
import dpo
from conftest import random_pairs, tiny_transformer
from lab import conflict


def test_grad_cosine_against_a_direct_computation():
    """conflict.grad_cosine against flattened autograd gradients and F.cosine_similarity, with the DPO gradient in
    its closed form at the reference: −β/(2K) · ∇Σ_k (log π(y_w) − log π(y_l)); per block too. The model's .grad
    fields are left empty."""
    model = tiny_transformer(seed=3)
    demos = [ex[:2] for ex in random_pairs(6, seed=1)]
    pairs = random_pairs(5, seed=2)
    total, blocks = conflict.grad_cosine(model, demos, pairs, beta=0.1, device="cpu", autocast=nullcontext())
    assert all(p.grad is None for p in model.parameters())
    for chunk in (1, 2, 4):  # a few examples per forward pass, accumulated: the same gradients
        chunked = conflict.grad_cosine(model, demos, pairs, beta=0.1, device="cpu", autocast=nullcontext(),
                                       chunk=chunk)
        assert chunked[0] == pytest.approx(total, abs=1e-6) and chunked[1] == pytest.approx(blocks, abs=1e-6), chunk
    params = dict(model.named_parameters())
    tokens, mask = data.ifa_batch(demos)
    g_ifa = torch.autograd.grad(dpo.sft_loss(model.token_logprobs(tokens, mask), mask), list(params.values()))
    pt, pm = data.hpa_batch(pairs)
    logps = model.token_logprobs(pt, pm).sum(-1)
    margin = (logps[:5] - logps[5:]).sum()
    g_dpo = [-0.1 / (2 * 5) * g for g in torch.autograd.grad(margin, list(params.values()))]
    flat = [torch.cat([g.flatten() for g in gs]) for gs in (g_ifa, g_dpo)]
    assert total == pytest.approx(F.cosine_similarity(*flat, dim=0).item(), abs=1e-5)
    assert -1 <= total <= 1
    names = list(params)
    assert list(blocks) == ["tok_embeddings", "layers.0", "layers.1", "norm", "output"]
    for block, value in blocks.items():
        idx = [i for i, n in enumerate(names) if conflict.block_of(n) == block]
        a, b = (torch.cat([gs[i].flatten() for i in idx]) for gs in (g_ifa, g_dpo))
        assert value == pytest.approx(F.cosine_similarity(a, b, dim=0).item(), abs=1e-5), block



def test_cosines_by_hand():
    """a = (1, 0 | 2), b = (0, 1 | 2) over blocks x and y: overall 4 / (√5 · √5) = 0.8; block x 0, block y 1."""
    g_a = {"x.a": torch.tensor([1.0, 0.0]), "y.b": torch.tensor([2.0])}
    g_b = {"x.a": torch.tensor([0.0, 1.0]), "y.b": torch.tensor([2.0])}
    total, blocks = conflict.cosines(g_a, g_b)
    assert total == pytest.approx(0.8) and blocks == {"x": pytest.approx(0.0), "y": pytest.approx(1.0)}
    assert conflict.cosines({"x": torch.zeros(2)}, {"x": torch.ones(2)})[0] == 0.0  # a zero gradient: 0, not NaN

