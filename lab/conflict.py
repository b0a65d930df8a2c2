"""An instrument for the paper's premise: do the IFA and HPA objectives pull against each other? (docs/method.md §7.4)

At the start and at the end of every stage of a DPO run, train.py measures the cosine between the gradient of the IFA
loss and the gradient of the DPO loss, each on the same fixed probe batch (the first K demonstrations and the first K
pairs of the data) for every stage and schedule, over all trainable parameters and per block. A negative cosine means that
a step down one loss is, to first order, a step up the other: the conflict that the alignment tax comes from.

The DPO gradient is taken with the reference at the model itself (what an HPA stage starting there would use), so
it is −β/2 · ∇(log π(y_w) − log π(y_l)) summed over the pairs: its direction, and so the cosine, does not depend on
β, label smoothing or IPO.
"""
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import data
import dpo


def block_of(name):
    """The block a parameter belongs to: "layers.<i>" for a transformer block, else its module
    ("tok_embeddings", "norm", "output")."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def gradients(model, loss_fn):
    """{parameter name: d loss_fn(model) / d parameter, as this rank holds it (its shard under FSDP, which averages
    the ranks' gradients as in training)}. Through backward(), which FSDP's hooks need; the .grad fields are None
    again afterwards, as the training loop leaves them between steps."""
    loss_fn(model).backward()
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads[n] = (g.to_local() if isinstance(g, DTensor) else g).detach().float().clone()
            p.grad = None
    return grads


def cosines(g_a, g_b, sharded=False):
    """(cosine over every parameter, {block: cosine over its parameters}) of two gradients given as {name: tensor}.
    With `sharded` (FSDP: each rank holds a part of every tensor) the dot products and norms are summed over ranks
    first. A block whose gradients are both zero gets 0."""
    blocks = list(dict.fromkeys(block_of(n) for n in g_a))  # in the model's order: embeddings, layers, head
    device = next(iter(g_a.values())).device  # NCCL reduces only tensors on the GPU
    sums = torch.zeros(len(blocks), 3, dtype=torch.float64, device=device)  # per block: a·b, |a|², |b|²
    for n in g_a:
        a, b = g_a[n].double().flatten(), g_b[n].double().flatten()
        sums[blocks.index(block_of(n))] += torch.stack([a @ b, a @ a, b @ b])
    if sharded:
        dist.all_reduce(sums)
    sums = sums.cpu()

    def cos(s):
        return (s[0] / (s[1] * s[2]).sqrt()).item() if s[1] > 0 and s[2] > 0 else 0.0

    return cos(sums.sum(0)), {b: cos(s) for b, s in zip(blocks, sums)}


def probe(model, probes, beta, rt, suffix=""):
    """grad_cosine on the probe batches (ifa_probe, hpa_probe) as a stage record's entries, {"grad_cosine<suffix>":
    the cosine over every parameter, "grad_cosine<suffix>_blocks": {block: cosine}}; rt: where the model runs
    (infra/parallel.Runtime)."""
    total, blocks = grad_cosine(model, *probes, beta, rt.device, rt.autocast(), sharded=rt.fsdp)
    return {f"grad_cosine{suffix}": total, f"grad_cosine{suffix}_blocks": blocks}


def grad_cosine(model, ifa_probe, hpa_probe, beta, device, autocast, sharded=False):
    """cos(∇L_IFA, ∇L_DPO) at the model's current weights on the probe batches (lists of demonstrations and of
    pairs, as in data.py). Returns (cosine over all parameters, {block: cosine}). Under FSDP (`sharded`) every rank
    must call it with the same probes."""
    tokens, mask = (t.to(device) for t in data.ifa_batch(ifa_probe))
    pair_tokens, pair_mask = (t.to(device) for t in data.hpa_batch(hpa_probe))
    with autocast:
        with torch.no_grad():  # the reference is the model itself: the first step of an HPA stage starting here
            ref = model.token_logprobs(pair_tokens, pair_mask).sum(-1).view(2, -1).t()  # (K, 2)
        g_ifa = gradients(model, lambda m: dpo.ifa_step_loss(m, tokens, mask)[0])
        g_dpo = gradients(model, lambda m: dpo.dpo_step_loss(m, pair_tokens, pair_mask, ref, beta)[0])
    return cosines(g_ifa, g_dpo, sharded)
