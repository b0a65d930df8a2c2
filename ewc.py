"""Hbat's modified elastic weight consolidation (docs/method.md §3, paper §3.2), original EWC and two ablations.

The functional core, each a pure function that a test can call with hand-made tensors:
    parameter_change  Ω_n = mean over elements of (θ_n^after − θ_n^before)²               §3.1
    normalise         F_n = F_max · Ω_n / max_m Ω_m,  or  F_max · softmax_n(s² · Ω)          §3.3
    ewc_penalty       L_EWC = Σ_n F_n · Σ_elements (λ · (θ_n − θ*_n))²                     §3.3
    fisher_diag       F_i = mean over examples of (∂ log p(y|x) / ∂θ_i)²                   §3.5
and `EWC`, the small stateful part the schedule drives: the two never-reset accumulators Ω^IFA and Ω^HPA (§3.1),
which of them weighs which stage's penalty (§3.2), the anchor θ*, and the methods of `--ewc`:
    modified  the penalty above (Hbat)
    uniform   the control: the same penalty and total weight Σ_n F_n, spread equally over the tensors (a plain L2
              pull to θ*): the importance weighting matters only where modified beats it
    original  (λ/2) · Σ_i F_i (θ_i − θ*_i)², F the diagonal empirical Fisher (§3.5, Kirkpatrick et al. 2017)
    freeze    no penalty: the top `freeze_frac` of tensors ranked by Ω are held at θ* (§3.6, Hbat-Freeze)
    random    normalise(Ω) replaced by F_max · softmax(u), u ~ U(0, 1) per tensor, seeded (§3.6, Hbat-Random)
    none      alternation alone

Element-wise importance (an ablation, §3.3 "Granularity"): the same functions take `elementwise=True` / dicts
of tensors, keeping Ω per element and normalising over all elements of all tensors. Importance is keyed by the
names of `model.named_parameters()`; only parameters with requires_grad take part.

Distributed: under DDP pass the unwrapped module; every rank holds the whole anchor. Under FSDP (train.py --fsdp)
every parameter is a DTensor of which each rank holds a shard: the anchor is cloned from the parameters and so is
sharded the same way, the penalty is computed on each rank's shards (`shard_of`), and Ω's per-tensor sums are added
over ranks. Element-wise importance and original EWC keep per-element state on the CPU and are one-process only.
"""
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

import data

METHODS = ("modified", "uniform", "original", "none", "freeze", "random")
# F_max of HPA stages and of IFA stages, as the earlier study chose them (docs/results-earlier.md); the release
# uses 100 for IFA's
F_MAX, F_MAX_IFA = 1.0, 10.0


def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def shard_of(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP parameter (a DTensor); any other tensor as it is. Differentiable."""
    return t.to_local() if isinstance(t, DTensor) else t


# -----------------------------------------------------------------------------
# functional core

def parameter_change(before: dict[str, Tensor], after: dict[str, Tensor], elementwise=False) -> dict:
    """Ω_n = mean over the elements of tensor n of (after_n − before_n)² (§3.1), in fp32 whatever their dtype.

    Example: before {"w": [0, 0]}, after {"w": [1, 3]} gives {"w": 5.0}. With elementwise=True the squares are
    returned as fp32 tensors of each parameter's shape instead of their means ({"w": tensor([1., 9.])}).
    """
    change = {n: (shard_of(after[n]).float() - shard_of(before[n]).float()).square() for n in before}
    if elementwise:
        return change
    if not any(isinstance(t, DTensor) for t in before.values()):
        return {n: c.mean().item() for n, c in change.items()}
    sums = torch.stack([c.sum() for c in change.values()])
    dist.all_reduce(sums)  # FSDP: each rank summed its shards; the mean is over the whole tensor
    return {n: s / before[n].numel() for n, s in zip(change, sums.tolist())}


def normalise(importance: dict, f_max: float, norm="max", scale=1.0) -> dict:
    """F = F_max · normalise(Ω) over all tensors (§3.3). Floats in, floats out; tensors (element-wise) in,
    tensors out.

    "max":     F_n = F_max · Ω_n / max_m Ω_m, so F_max is the largest weight and the rest are graded.
    "softmax": F_n = F_max · exp(s²·Ω_n) / Σ_m exp(s²·Ω_m). Ω is a mean squared change (1e-6 for a stage that
               moves each weight by 1e-3), so at the release's s = 1e10 the logits s²·Ω are ~1e14 and differ between
               tensors by far more than 1: numerically one-hot, the whole penalty falls on the most-changed
               tensor. At s = 1 the same softmax is nearly uniform, F_n ≈ F_max / #tensors.
    Element-wise, the max / softmax runs over every element of every tensor (the log-sum-exp is taken per tensor
    and then combined, so the elements are never concatenated).
    """
    as_floats = not any(torch.is_tensor(v) for v in importance.values())
    dtype = torch.float64 if as_floats else torch.float32
    omega = {n: torch.as_tensor(v, dtype=dtype) for n, v in importance.items()}
    if norm == "max":
        top = torch.stack([w.max() for w in omega.values()]).max()
        top = top.clamp_min(torch.finfo(top.dtype).tiny)  # a stage that moved nothing gives F = 0, not NaN
        weights = {n: f_max * w / top for n, w in omega.items()}                     # §3.3 "max"
    elif norm == "softmax":
        logits = {n: scale**2 * w for n, w in omega.items()}
        lse = torch.logsumexp(torch.stack([torch.logsumexp(z.flatten(), 0) for z in logits.values()]), 0)
        weights = {n: f_max * torch.exp(z - lse) for n, z in logits.items()}         # §3.3 "softmax"
    else:
        raise ValueError(f"norm must be 'max' or 'softmax', got {norm!r}")
    return {n: w.item() for n, w in weights.items()} if as_floats else weights


class _WeightedSquaredDistance(torch.autograd.Function):
    """Σ w ⊙ (θ − θ*)² accumulated in fp32, w a float or a tensor shaped like θ.

    Plain autograd would keep every (θ − θ*) alive until backward: one more copy of the weights per step. This
    backward recomputes it from θ and θ*, which exist anyway, so only one tensor's temporaries live at a time.
    The value is computed in fp32; the gradient comes back in θ's dtype, as any other gradient would.
    """

    @staticmethod
    def forward(ctx, theta, anchor, w):
        ctx.save_for_backward(theta, anchor)
        ctx.w = w
        return (theta.float() - anchor.float()).square_().mul_(w).sum()

    @staticmethod
    def backward(ctx, grad):
        theta, anchor = ctx.saved_tensors
        return (theta - anchor).mul_(ctx.w).mul_(2 * grad), None, None  # d/dθ Σ w (θ − θ*)² = 2 w (θ − θ*)


def ewc_penalty(model: nn.Module, anchor: dict[str, Tensor], weights: dict, lam: float) -> Tensor:
    """L_EWC = Σ_n weights[n] · Σ_elements (λ · (θ_n − anchor[n]))² over the trainable parameters named in
    `weights` (§3.3, λ inside the square as released). weights[n] is a float (per tensor) or a tensor shaped like
    θ_n (element-wise / Fisher). Returns an fp32 scalar; its gradient is 2·weights[n]·λ²·(θ_n − anchor[n]).
    Under FSDP it is the part of L_EWC on this rank's shards: the ranks' parts sum to L_EWC, and the gradient of
    each part is the exact gradient of L_EWC on that rank's shards (no averaging over ranks applies to it).
    """
    params = {n: p for n, p in trainable(model).items() if n in weights}
    terms = [_WeightedSquaredDistance.apply(shard_of(p), shard_of(anchor[n]), weights[n]) for n, p in params.items()]
    return lam**2 * torch.stack(terms).sum()                                          # §3.3 L_EWC


def fisher_diag(model: nn.Module, examples, logp_fn) -> dict[str, Tensor]:
    """Diagonal empirical Fisher F_i = (1/K) Σ_k (∂ log p(y_k|x_k) / ∂θ_i)² over K examples (§3.5), fp32.

    logp_fn(model, example) -> scalar log-likelihood of the example's response. One backward per example: the
    square must be taken per example (E[g²]), since squaring the batch-mean gradient (E[g]²) lets gradients of
    different examples cancel. Uses autograd.grad, so the parameters' .grad is left untouched.
    """
    params = trainable(model)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for example in examples:
        logp = logp_fn(model, example)
        grads = torch.autograd.grad(logp, list(params.values()), allow_unused=True, materialize_grads=True)
        for f, g in zip(fisher.values(), grads):
            f.add_(g.float().square())                                                # §3.5 (∂ log p / ∂θ_i)²
    return {n: f / len(examples) for n, f in fisher.items()}


def stage_fisher(model: nn.Module, examples, n_max=256) -> dict[str, Tensor]:
    """§3.5: fisher_diag of a stage's objective on up to n_max of its tokenised examples: the log-likelihood of each
    demonstration's response (of each pair's chosen answer)."""
    device = next(model.parameters()).device
    return fisher_diag(model, examples[:n_max], lambda m, ex: m.token_logprobs(
        *(t.to(device) for t in data.ifa_batch([ex[:2]]))).sum())


# -----------------------------------------------------------------------------
# the state the schedule carries from stage to stage

class EWC:
    """The EWC side of the Hbat schedule: begin_stage, then penalty() and after_step() every step, then end_stage.

    f_max caps the penalty of HPA stages (weighted by Ω^IFA: it holds what IFA learned), f_max_ifa that of IFA stages
    (weighted by Ω^HPA): a stage is penalised with the other objective's importance (§3.2), so IFA_1 has no penalty
    (and its Stage says so).
    For "original", end_stage takes the Fisher of the stage just finished on that stage's examples (stage_fisher);
    Fishers of stages of the same kind are summed and weigh the penalty of the later stages of the other kind.
    Memory: the anchor is one copy of the trainable weights in their dtype and on their device (§3.4), held from
    begin_stage to end_stage; element-wise and Fisher weights add an fp32 copy. Accumulators stay on the CPU.
    """

    def __init__(self, method="modified", f_max=F_MAX, f_max_ifa=F_MAX_IFA, lam=1.0, norm="max", scale=1.0,
                 elementwise=False, freeze_frac=0.2, seed=0):
        assert method in METHODS, f"method must be one of {METHODS}, got {method!r}"
        assert norm in ("max", "softmax"), f"norm must be 'max' or 'softmax', got {norm!r}"
        assert not elementwise or method == "modified", "element-wise importance is a variant of 'modified' only"
        self.method, self.norm, self.scale, self.lam = method, norm, scale, lam
        self.f_max = {"hpa": f_max, "ifa": f_max_ifa}  # keyed by the kind of the stage being penalised
        self.elementwise, self.freeze_frac = elementwise, freeze_frac
        self.importance = {"ifa": {}, "hpa": {}}  # Ω^IFA, Ω^HPA: never reset (§3.1)
        self.fisher = {"ifa": {}, "hpa": {}}      # original EWC only: summed Fisher of the stages of each kind
        self.rng = torch.Generator().manual_seed(seed)
        self.kind, self.anchor, self.weights, self.frozen = None, {}, {}, set()

    def begin_stage(self, kind: str, model: nn.Module, penalised: bool = True):
        """A stage of `kind` ("ifa", "hpa") begins: θ* is the model now; where `penalised` (its hbat.Stage.ewc) F too."""
        assert kind in ("ifa", "hpa") and self.kind is None, f"begin_stage({kind!r}) while {self.kind!r} is open"
        self.kind = kind
        if self.method == "none":
            return
        params = trainable(model)
        # θ* (§3.3), also the "before" of §3.1: one copy on the parameters' device, in their dtype (§3.4)
        self.anchor = {n: p.detach().clone() for n, p in params.items()}
        other = "hpa" if kind == "ifa" else "ifa"  # §3.2: a stage is penalised with the other objective's importance
        omega, f_max = self.importance[other], self.f_max[kind]
        if not (penalised and omega):
            return  # IFA_1: the other objective has learned nothing yet, and its Stage is not penalised (§3.2)
        if self.method in ("modified", "uniform"):
            weights = normalise(omega, f_max, self.norm, self.scale)               # §3.3 F = F_max · normalise(Ω)
            if self.method == "uniform":
                weights = dict.fromkeys(weights, sum(weights.values()) / len(weights))
        elif self.method == "random":
            u = torch.rand(len(omega), generator=self.rng, dtype=torch.float64)
            weights = normalise(dict(zip(omega, u.tolist())), f_max, "softmax")    # §3.6 F = F_max · softmax(u)
        elif self.method == "original":
            weights = self.fisher[other]                                           # §3.5 F = Fisher
        else:  # freeze
            ranked = sorted(omega, key=omega.get, reverse=True)
            self.frozen = set(ranked[:round(self.freeze_frac * len(ranked))])      # §3.6 top 20% (release) by Ω
            weights = {}
        self.weights = {n: w.to(params[n].device) if torch.is_tensor(w) else w for n, w in weights.items()}

    def end_stage(self, kind: str, model: nn.Module, examples=(), fisher: dict[str, Tensor] | None = None):
        """Ω^kind += the stage's change; original EWC also sums `fisher`, by default stage_fisher(model, examples)."""
        assert kind == self.kind, f"end_stage({kind!r}) closes a stage begun as {self.kind!r}"
        if self.method != "none":
            change = parameter_change(self.anchor, trainable(model), self.elementwise)
            _accumulate(self.importance[kind], change)                             # §3.1 Ω^kind += change
        if self.method == "original":
            assert fisher is not None or examples, "original EWC needs the stage's Fisher or its examples (§3.5)"
            _accumulate(self.fisher[kind], fisher if fisher is not None else stage_fisher(model, examples))
        self.kind, self.anchor, self.weights, self.frozen = None, {}, {}, set()

    @property
    def active(self) -> bool:
        return bool(self.weights or self.frozen)

    @property
    def total_weight(self) -> float:
        """Σ_n F_n of the open stage (summed over elements where F is per element): the strength to match when
        methods are compared. 0 for freeze and for a stage without penalty."""
        return float(sum(w.sum().item() if torch.is_tensor(w) else w for w in self.weights.values()))

    def penalty(self, model: nn.Module) -> Tensor:
        if not self.weights:
            return torch.zeros((), device=next(model.parameters()).device)
        if self.method == "original":
            # §3.5 (λ/2)·Σ_i F_i (θ_i − θ*_i)²: λ outside the square, unlike §3.3
            return self.lam / 2 * ewc_penalty(model, self.anchor, self.weights, 1.0)
        return ewc_penalty(model, self.anchor, self.weights, self.lam)             # §3.3 L_EWC

    @torch.no_grad()
    def after_step(self, model: nn.Module):
        """Hbat-Freeze: put θ* back into the frozen tensors, undoing whatever the optimizer did (weight decay and
        Adam's momentum included). Their gradients still count in a global gradient-norm clip."""
        for n, p in model.named_parameters():
            if n in self.frozen:
                p.copy_(self.anchor[n])

    def state_dict(self) -> dict:
        """The accumulators, Fishers and random state: plain floats and tensors (torch.load(weights_only=True)).
        Resume happens at stage boundaries, so the anchor is not saved."""
        return {"importance": self.importance, "fisher": self.fisher, "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict):
        """Takes the state however it was loaded (map_location): tensors go back to the CPU, where they add up."""
        self.importance, self.fisher = {"ifa": {}, "hpa": {}}, {"ifa": {}, "hpa": {}}
        for kind in ("ifa", "hpa"):
            _accumulate(self.importance[kind], state["importance"][kind])
            _accumulate(self.fisher[kind], state["fisher"][kind])
        self.rng.set_state(state["rng"].cpu())


def _accumulate(total: dict, new: dict):
    """total[n] += new[n] for floats or tensors; tensors are kept on the CPU in fp32."""
    for n, v in new.items():
        v = v.detach().float().cpu() if torch.is_tensor(v) else v
        total[n] = total[n] + v if n in total else v
