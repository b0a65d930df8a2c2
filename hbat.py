"""
The alignment schedules as plain lists of stages (docs/method.md §2).

A schedule is data, not code: train.py walks the list and runs each stage with the one training loop. Reading
the lists below is reading the paper's Figure 1:

    two-stage   IFA(all of D_IFA)  ->  HPA(all of D_HPA)                               (§2.1, the baseline)
    hbat        IFA_1 -> HPA_1 -> IFA_2 -> HPA_2 -> ... -> IFA_N -> HPA_N               (§2.2, paper §3.1)
                with the modified EWC penalty on every stage but IFA_1                  (§3.2)
    multi-task  one stage; each step sums an IFA loss and an HPA loss                    (§2.4)

"Hbat without EWC" (alternation alone) is `hbat` with `--ewc none`; the other EWC variants (original, freeze,
random) come through `--ewc` too, since they change how a stage is protected, not the order of the stages.
`split` cuts D_IFA and D_HPA into the N subsets (§2.2 step 1); `stage_seed` seeds each stage's randomness.
"""
import hashlib
import random
from dataclasses import dataclass

SCHEDULES = ("two-stage", "hbat", "multi-task")


@dataclass(frozen=True)
class Stage:
    name: str    # what the logs and results.json call it: "IFA_1", "HPA_1", "IFA", "MT"
    kind: str    # "ifa" (SFT on demonstrations), "hpa" (DPO or PPO on preferences), "multi" (both at once)
    subset: int  # which of the N data subsets the stage trains on (docs/method.md §2.2 step 1)
    epochs: int  # passes over that subset
    ewc: bool    # whether the stage is held near its start by the other objective's importance (§3.2)


def two_stage(e_ifa: int, e_hpa: int) -> list[Stage]:
    """§2.1: SFT on all demonstrations, then preference alignment on all pairs. No EWC: nothing alternates."""
    return [Stage("IFA", "ifa", 0, e_ifa, ewc=False), Stage("HPA", "hpa", 0, e_hpa, ewc=False)]


def hbat(n: int, e_ifa: int, e_hpa: int, use_ewc: bool = True) -> list[Stage]:
    """§2.2: for i = 1..N, IFA_i on D_IFA^i then HPA_i on D_HPA^i. §3.2: IFA_1 has nothing to protect yet;
    every later stage (HPA_1 included, protecting what IFA_1 learned) carries the penalty."""
    stages = []
    for i in range(n):
        stages.append(Stage(f"IFA_{i + 1}", "ifa", i, e_ifa, ewc=use_ewc and i > 0))
        stages.append(Stage(f"HPA_{i + 1}", "hpa", i, e_hpa, ewc=use_ewc))
    return stages


def multi_task(e_ifa: int, e_hpa: int) -> list[Stage]:
    """§2.4: one stage over both datasets; `epochs` counts passes over D_IFA, the HPA batches are spread over the
    same steps so that each pair is seen e_hpa times (the data and compute of the other schedules)."""
    return [Stage("MT", "multi", 0, e_ifa, ewc=False)]


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


def build(name: str, n: int, e_ifa: int, e_hpa: int, use_ewc: bool) -> tuple[list[Stage], int]:
    """Return (stages, number of data subsets the schedule splits each dataset into)."""
    if name == "two-stage":
        return two_stage(e_ifa, e_hpa), 1
    if name == "hbat":
        return hbat(n, e_ifa, e_hpa, use_ewc), n
    if name == "multi-task":
        return multi_task(e_ifa, e_hpa), 1
    raise ValueError(f"--schedule: unknown schedule {name!r} (choose from {', '.join(SCHEDULES)})")


def stage_seed(seed: int, *parts) -> int:
    """The seed of one stage's randomness (batch order, sampling), from --seed and the stage's name and kind: every
    stage draws from its own generators, so a run resumed at a stage boundary goes on with the same numbers."""
    return int(hashlib.sha256(repr((seed,) + parts).encode()).hexdigest()[:8], 16)
