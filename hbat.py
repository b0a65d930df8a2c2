"""
The alignment schedules as plain lists of stages (docs/method.md §2).

A schedule is data, not code: train.py walks the list and runs each stage with the one training loop, and everything
that decides how a stage trains is a field of its `Stage`. Reading the lists below is reading the paper's Figure 1:

    two-stage   IFA(all of D_IFA)  ->  HPA(all of D_HPA)                               (§2.1, the baseline)
    hbat        IFA_1 -> HPA_1 -> IFA_2 -> HPA_2 -> ... -> IFA_N -> HPA_N               (§2.2, paper §3.1)
                with the modified EWC penalty on every stage but IFA_1                  (§3.2)
    multi-task  one stage; each step sums an IFA loss and an HPA loss                    (§2.4)

and the cheap alternatives a reader asks about next (docs/method.md §7):

    averaged    no training: (1 − α)·θ_SFT + α·θ_two-stage for each α of --average-alphas   (weight averaging)
    rpo         two-stage whose HPA stage adds α·NLL of the chosen answer to DPO              (RPO)
    alright     one stage whose every step draws IFA or DPO at random, weighted by λ          (ALRIGHT)

"Hbat without EWC" (alternation alone) is `hbat` with `--ewc none`; the other EWC variants (original, freeze,
random) come through `--ewc` too, since they change how a stage is held near its start, not the order of the stages.
`split` cuts D_IFA and D_HPA into the N subsets (§2.2 step 1); `steps` lays a stage's batches out as optimizer steps;
`stage_seed` seeds each stage's randomness.
"""
import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

SCHEDULES = ("two-stage", "hbat", "multi-task", "averaged", "rpo", "alright")
DPO_ONLY = ("multi-task", "rpo", "alright")  # they need an offline HPA loss


@dataclass(frozen=True)
class Stage:
    name: str        # what the logs and results.json call it: "IFA_1", "HPA_1", "IFA", "MT"
    kind: str        # how its steps are made (`steps`): "ifa" (SFT on demonstrations), "hpa" (DPO or PPO on
                     # preferences), "multi" (both losses in every step), "alternate" (IFA and DPO steps in turn)
    subset: int      # which of the N data subsets it trains on (docs/method.md §2.2 step 1)
    epochs_ifa: int  # passes over that subset of D_IFA (0: none)
    epochs_hpa: int  # passes over that subset of D_HPA (0: none)
    ewc: bool        # whether it is held near its start by the other objective's importance (§3.2)
    rpo_alpha: float = 0.0  # weight of the chosen answer's NLL added to the DPO loss (rpo; §7.2)
    alright_lambda: float = 0.5  # an "alternate" stage's weight of drawing a DPO step over an IFA step (§7.3)


def sft_stage(e_ifa: int) -> Stage:
    """§2.1's first stage, SFT on all demonstrations: the SFT model that PPO's reward model and `averaged` start
    from is this stage's result (train.py keeps it as OUT/sft.pt)."""
    return Stage("IFA", "ifa", 0, e_ifa, 0, ewc=False)


def two_stage(e_ifa: int, e_hpa: int) -> list[Stage]:
    """§2.1: SFT on all demonstrations, then preference alignment on all pairs. No EWC: nothing alternates."""
    return [sft_stage(e_ifa), Stage("HPA", "hpa", 0, 0, e_hpa, ewc=False)]


def hbat(n: int, e_ifa: int, e_hpa: int, use_ewc: bool = True) -> list[Stage]:
    """§2.2: for i = 1..N, IFA_i on D_IFA^i then HPA_i on D_HPA^i. §3.2: IFA_1 has nothing to protect yet;
    every later stage (HPA_1 included, protecting what IFA_1 learned) carries the penalty."""
    stages = []
    for i in range(n):
        stages.append(Stage(f"IFA_{i + 1}", "ifa", i, e_ifa, 0, ewc=use_ewc and i > 0))
        stages.append(Stage(f"HPA_{i + 1}", "hpa", i, 0, e_hpa, ewc=use_ewc))
    return stages


def multi_task(e_ifa: int, e_hpa: int) -> list[Stage]:
    """§2.4: one stage over both datasets: each step pairs an IFA batch with an HPA batch, the HPA batches cycled
    so that each pair is seen e_hpa times over the e_ifa passes over D_IFA (the data of the other schedules)."""
    return [Stage("MT", "multi", 0, e_ifa, e_hpa, ewc=False)]


def rpo(e_ifa: int, e_hpa: int, alpha: float) -> list[Stage]:
    """§7.2: two-stage, its DPO stage with α·(mean token NLL of the chosen answers) added (Pang et al. 2024)."""
    return [sft_stage(e_ifa), Stage("HPA", "hpa", 0, 0, e_hpa, ewc=False, rpo_alpha=alpha)]


def alright(e_ifa: int, e_hpa: int, lam: float = 0.5) -> list[Stage]:
    """§7.3: one stage over both datasets whose every step draws its objective at random, DPO with weight λ and IFA
    with 1 − λ (Fernando et al. 2024). Every IFA batch of e_ifa passes and every DPO batch of e_hpa passes is taken
    once, as in two-stage (`interleave`): λ moves the DPO steps earlier (λ > 1/2) or later, it does not change
    how many there are."""
    return [Stage("ALT", "alternate", 0, e_ifa, e_hpa, ewc=False, alright_lambda=lam)]


def build(name: str, n: int, e_ifa: int, e_hpa: int, use_ewc: bool, rpo_alpha: float = 1.0,
          alright_lambda: float = 0.5) -> tuple[list[Stage], int]:
    """Return (stages, number of data subsets the schedule splits each dataset into). `averaged` trains nothing
    (train.py evaluates it from two-stage's models): no stages."""
    if name == "two-stage":
        return two_stage(e_ifa, e_hpa), 1
    if name == "hbat":
        return hbat(n, e_ifa, e_hpa, use_ewc), n
    if name == "multi-task":
        return multi_task(e_ifa, e_hpa), 1
    if name == "rpo":
        return rpo(e_ifa, e_hpa, rpo_alpha), 1
    if name == "alright":
        return alright(e_ifa, e_hpa, alright_lambda), 1
    if name == "averaged":
        return [], 1
    raise ValueError(f"--schedule: unknown schedule {name!r} (choose from {', '.join(SCHEDULES)})")


# -----------------------------------------------------------------------------
# the data of a schedule and of a stage


def split(items: list, n: int, seed: int) -> list[list]:
    """§2.2 step 1: N disjoint seeded random subsets that together hold every item; sizes differ by at most one,
    the first len(items) % n subsets one larger (10 items, N = 4 -> 3, 3, 2, 2)."""
    if not 1 <= n <= len(items):
        raise ValueError(f"cannot split {len(items)} records into {n} subsets (need 1 <= N <= number of records)")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    q, r = divmod(len(items), n)
    cuts = [k * q + min(k, r) for k in range(n + 1)]
    return [[items[i] for i in order[a:b]] for a, b in zip(cuts, cuts[1:])]


def interleave(n_a: int, n_b: int, lam: float, seed: int) -> list[int]:
    """The order of alright's steps: n_a zeros (IFA) and n_b ones (DPO), each step drawn at random: DPO with
    probability λ·b / (λ·b + (1 − λ)·a), where a and b are the IFA and DPO steps still to take, so that every batch is
    taken exactly once whatever λ (equal data). λ = 1/2 draws every order alike; λ = 0 puts every IFA step first (the
    order of two-stage), λ = 1 every DPO step first. Each kind keeps its own batch order."""
    rng, order, a, b = random.Random(seed), [], n_a, n_b
    while a or b:
        dpo = b and (not a or rng.random() * (lam * b + (1 - lam) * a) < lam * b)
        order.append(1 if dpo else 0)
        a, b = a - (not dpo), b - bool(dpo)
    return order


class Objective(NamedTuple):
    """One objective of a stage: its loss, loss_fn(module, *loss arguments) -> (loss, metrics), its batches (an
    iterator of (micro-batches, shares) as data.batches_of makes them; a micro-batch is (example indices, *loss
    arguments)), how many, and its peak lr."""
    loss_fn: Callable
    batches: Iterator
    n_batches: int
    lr: float


def steps(kind: str, objectives: dict[str, Objective], lam: float = 0.5, seed: int = 0):
    """A stage's optimizer steps, laid out from its objectives' batches by its kind: {"ifa": ..., "hpa": ...}, or the
    one objective of a stage of one. Yields (objective, micro-steps, shares, examples): the objective whose lr the
    step takes; for each micro-step of the step's gradient accumulation the parts whose losses it sums,
    [(objective, loss arguments, weight)], and its share; the number of examples the step uses.

        one objective   each batch is a step, each of its micro-batches a micro-step of one part, weight 1
        alternate       IFA and HPA batches in the order `interleave(.., lam, seed)` draws, each a step of its own
                        (ALRIGHT, §7.3)
        multi           every IFA batch with an HPA batch, cycling through the HPA batches (§2.4): micro-step i
                        sums micro-batch i of each, each weighted by its share of its batch; at the IFA lr
    """
    def one(objective, micros, shares):
        return objective, [[(objective, micro[1:], 1.0)] for micro in micros], shares, sum(len(m[0]) for m in micros)

    batches = {k: o.batches for k, o in objectives.items()}
    if kind in batches:
        for micros, shares in batches[kind]:
            yield one(kind, micros, shares)
    elif kind == "alternate":
        for k in interleave(objectives["ifa"].n_batches, objectives["hpa"].n_batches, lam, seed):
            objective = "hpa" if k else "ifa"
            yield one(objective, *next(batches[objective]))
    elif kind == "multi":
        hpa = list(batches["hpa"])
        for i, (micros, shares) in enumerate(batches["ifa"]):
            hpa_micros, hpa_shares = hpa[i % len(hpa)]
            pairs = itertools.zip_longest(zip(micros, shares), zip(hpa_micros, hpa_shares), fillvalue=(None, 0.0))
            parts = [[(objective, micro[1:], share) for objective, (micro, share) in zip(("ifa", "hpa"), pair)
                      if micro is not None] for pair in pairs]
            yield "ifa", parts, [1.0] * len(parts), sum(len(m[0]) for m in micros + hpa_micros)
    else:
        raise ValueError(f"a {kind!r} stage needs {kind} batches")


def n_steps(kind: str, objectives: dict[str, Objective]) -> int:
    """How many steps `steps` makes: the lr schedule's horizon."""
    return objectives["ifa"].n_batches if kind == "multi" else sum(o.n_batches for o in objectives.values())


# -----------------------------------------------------------------------------
# no training: weight averaging, and the seeds


def average(sft: dict, final: dict, alpha: float) -> dict:
    """§7.1, weight averaging (Lin et al. 2024): the state_dict (1 − α)·θ_SFT + α·θ_final, tensor by tensor, in
    fp32 so that α = 0 gives θ_SFT and α = 1 gives θ_final bit for bit."""
    if sft.keys() != final.keys():
        raise ValueError("averaged: the two models have different tensors")
    return {k: ((1 - alpha) * sft[k].float() + alpha * final[k].float()).to(sft[k].dtype) for k in sft}


def stage_seed(seed: int, *parts) -> int:
    """The seed of one stage's randomness (batch order, sampling), from --seed and the stage's name and kind: every
    stage draws from its own generators, so a run resumed at a stage boundary goes on with the same numbers."""
    return int(hashlib.sha256(repr((seed,) + parts).encode()).hexdigest()[:8], 16)
