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


def gradients(model, loss_fns):
    """{parameter name: d Σ_i loss_fns[i](model) / d parameter, as this rank holds it (its shard under FSDP, which
    averages the ranks' gradients as in training)}: one backward() per part, so that only one part's activations are
    alive at a time, accumulated in .grad as in gradient accumulation. Through backward(), which FSDP's hooks need;
    the .grad fields are None again afterwards, as the training loop leaves them between steps."""
    for loss_fn in loss_fns:
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


def probe(model, probes, beta, rt, suffix="", chunk=None):
    """grad_cosine on the probe batches (ifa_probe, hpa_probe) as a stage record's entries, {"grad_cosine<suffix>":
    the cosine over every parameter, "grad_cosine<suffix>_blocks": {block: cosine}}; rt: where the model runs
    (infra/parallel.Runtime); chunk: examples per forward pass (train.py: a training micro-batch's)."""
    total, blocks = grad_cosine(model, *probes, beta, rt.device, rt.autocast(), sharded=rt.fsdp, chunk=chunk)
    return {f"grad_cosine{suffix}": total, f"grad_cosine{suffix}_blocks": blocks}


def grad_cosine(model, ifa_probe, hpa_probe, beta, device, autocast, sharded=False, chunk=None):
    """cos(∇L_IFA, ∇L_DPO) at the model's current weights on the probe batches (lists of demonstrations and of
    pairs, as in data.py). Returns (cosine over all parameters, {block: cosine}). Under FSDP (`sharded`) every rank
    must call it with the same probes. The batches go through the model `chunk` examples at a time (default: all at
    once), each chunk's loss weighted by its share, so that ∇L is the whole batch's and a probe holds no more
    activations than a training micro-batch: the IFA loss is a mean over all response tokens (a chunk weighs its
    share of them), the DPO loss a mean over pairs."""
    chunk = chunk or max(len(ifa_probe), len(hpa_probe), 1)
    ifa = [[t.to(device) for t in data.ifa_batch(ifa_probe[i:i + chunk])] for i in range(0, len(ifa_probe), chunk)]
    n_tokens = sum(mask.sum() for _, mask in ifa)
    pairs = [[t.to(device) for t in data.hpa_batch(hpa_probe[i:i + chunk])] for i in range(0, len(hpa_probe), chunk)]

    def ifa_part(tokens, mask):  # this chunk's share of the mean over all response tokens
        return lambda m: dpo.ifa_step_loss(m, tokens, mask)[0] * (mask.sum() / n_tokens)

    def dpo_part(tokens, mask, ref):  # this chunk's share of the mean over all pairs
        return lambda m: dpo.dpo_step_loss(m, tokens, mask, ref, beta)[0] * (len(ref) / len(hpa_probe))
    with autocast:
        with torch.no_grad():  # the reference is the model itself: the first step of an HPA stage starting here
            refs = [model.token_logprobs(tokens, mask).sum(-1).view(2, -1).t() for tokens, mask in pairs]  # (k, 2)
        g_ifa = gradients(model, [ifa_part(*batch) for batch in ifa])
        g_dpo = gradients(model, [dpo_part(*batch, ref) for batch, ref in zip(pairs, refs)])
    return cosines(g_ifa, g_dpo, sharded)
