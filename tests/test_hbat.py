"""hbat.py: the schedules as lists of stages (docs/method.md §2), how a stage's batches become its steps, the N-way
split of the data, weight averaging, and how walking a schedule drives the EWC state of ewc.py (§3.2).

Pure and fast: no training, only the lists of stages, batches of labels, and a two-parameter module moved by hand.
"""
import pytest
import torch
from torch import nn

import data
import hbat
from ewc import EWC


def summary(stages):
    return [(s.name, s.kind, s.subset, s.epochs_ifa, s.epochs_hpa, s.ewc) for s in stages]


# -----------------------------------------------------------------------------
# the schedules as data


def test_hbat_alternates_ifa_and_hpa_over_the_n_subsets():
    """§2.2: IFA_1 on subset 0, HPA_1 on subset 0, IFA_2 on subset 1, ... with E_IFA / E_HPA passes each;
    §3.2: every stage but IFA_1 carries the EWC penalty."""
    stages, n = hbat.build("hbat", 3, 2, 1, use_ewc=True)
    assert n == 3
    assert summary(stages) == [
        ("IFA_1", "ifa", 0, 2, 0, False),
        ("HPA_1", "hpa", 0, 0, 1, True),
        ("IFA_2", "ifa", 1, 2, 0, True),
        ("HPA_2", "hpa", 1, 0, 1, True),
        ("IFA_3", "ifa", 2, 2, 0, True),
        ("HPA_3", "hpa", 2, 0, 1, True),
    ]


def test_hbat_without_ewc_keeps_the_order_and_drops_every_penalty():
    """§2.4 "Hbat without EWC": the same alternation, no stage penalised."""
    stages, n = hbat.build("hbat", 3, 2, 1, use_ewc=False)
    assert n == 3
    assert [s.name for s in stages] == ["IFA_1", "HPA_1", "IFA_2", "HPA_2", "IFA_3", "HPA_3"]
    assert [s.ewc for s in stages] == [False] * 6


@pytest.mark.parametrize("use_ewc", [True, False])
def test_two_stage_is_ifa_then_hpa_on_all_data_without_ewc(use_ewc):
    """§2.1: one IFA stage and one HPA stage over the whole datasets (one subset), never an EWC penalty."""
    stages, n = hbat.build("two-stage", 5, 3, 1, use_ewc=use_ewc)
    assert n == 1
    assert summary(stages) == [("IFA", "ifa", 0, 3, 0, False), ("HPA", "hpa", 0, 0, 1, False)]
    assert stages[0] == hbat.sft_stage(3)  # the SFT model is this stage's result


def test_multi_task_is_one_stage_over_all_data():
    """§2.4: a single stage whose steps sum an IFA and an HPA loss, over E_IFA passes of D_IFA and E_HPA of D_HPA."""
    stages, n = hbat.build("multi-task", 5, 3, 1, use_ewc=True)
    assert n == 1
    assert summary(stages) == [("MT", "multi", 0, 3, 1, False)]



def test_rpo_is_two_stage_with_the_nll_weight_on_its_hpa_stage():
    stages, n = hbat.build("rpo", 4, 2, 3, use_ewc=True, rpo_alpha=0.5)
    assert n == 1 and stages[0] == hbat.sft_stage(2)
    assert [(s.name, s.kind, s.subset, s.epochs_ifa, s.epochs_hpa, s.ewc, s.rpo_alpha) for s in stages] == [
        ("IFA", "ifa", 0, 2, 0, False, 0.0), ("HPA", "hpa", 0, 0, 3, False, 0.5)]


def test_alright_is_one_alternating_stage_and_averaged_trains_nothing():
    stages, n = hbat.build("alright", 4, 2, 3, use_ewc=True)
    assert (n, summary(stages)) == (1, [("ALT", "alternate", 0, 2, 3, False)])
    assert hbat.build("averaged", 4, 2, 3, use_ewc=True) == ([], 1)


def test_unknown_schedule_raises_naming_it():
    with pytest.raises(ValueError, match="three-stage"):
        hbat.build("three-stage", 3, 1, 1, use_ewc=True)


# -----------------------------------------------------------------------------
# a stage's steps


def batches(name, sizes, n_micro=2):
    """Fake batches as data.batches_of makes them: batch i of `sizes[i]` examples, in micro-batches (indices,
    "<name><i>.<j>") of data.micro_split's sizes, with their shares."""
    out = []
    for i, size in enumerate(sizes):
        parts = data.micro_split(size, n_micro)
        out.append(([(torch.arange(k), f"{name}{i}.{j}") for j, k in enumerate(parts)], [k / size for k in parts]))
    return out


def objectives(ifa=(), hpa=(), n_micro=2):
    made = {"ifa": hbat.Objective(None, iter(batches("i", ifa, n_micro)), len(ifa), 1.0),
            "hpa": hbat.Objective(None, iter(batches("h", hpa, n_micro)), len(hpa), 2.0)}
    return {k: o for k, o in made.items() if o.n_batches}


def test_a_stage_of_one_objective_takes_each_batch_as_a_step():
    """Batches of 4 and 3 examples in micro-batches of 2 + 2 and 2 + 1: two steps, each micro-batch a micro-step of
    one part with weight 1 (its loss arguments without the indices), its share of the batch, the examples counted."""
    got = list(hbat.steps("ifa", objectives(ifa=[4, 3])))
    assert got == [("ifa", [[("ifa", ("i0.0",), 1.0)], [("ifa", ("i0.1",), 1.0)]], [0.5, 0.5], 4),
                   ("ifa", [[("ifa", ("i1.0",), 1.0)], [("ifa", ("i1.1",), 1.0)]], [2 / 3, 1 / 3], 3)]
    assert hbat.n_steps("ifa", objectives(ifa=[4, 3])) == 2


def test_alright_takes_ifa_and_dpo_batches_in_the_drawn_order():
    """2 IFA and 4 DPO batches: the steps follow interleave(2, 4, λ, seed), each batch once and in its own order, each
    step at its own objective's lr."""
    got = list(hbat.steps("alternate", objectives(ifa=[2, 2], hpa=[2, 2, 2, 2], n_micro=1), 0.5, 3))
    order, names = hbat.interleave(2, 4, 0.5, 3), {0: iter(["i0.0", "i1.0"]), 1: iter([f"h{i}.0" for i in range(4)])}
    assert [(objective, parts[0][0][1][0]) for objective, parts, _, _ in got] == [
        ("hpa" if k else "ifa", next(names[k])) for k in order]
    assert sum(n for *_, n in got) == 12 and hbat.n_steps("alternate", objectives(ifa=[2, 2], hpa=[2] * 4)) == 6


def test_multi_task_sums_micro_batch_i_of_an_ifa_and_an_hpa_batch():
    """3 IFA batches (4, 4, 1 examples) and 2 HPA batches (2, 4), in micro-batches of at most 2: step i pairs IFA batch
    i with HPA batch i % 2; micro-step j sums micro-batch j of each, each weighted by its share of its own batch, so
    each micro-step's share is 1; where one batch has fewer micro-batches, the other's stands alone. Every step takes
    the IFA lr; the examples count both batches, the HPA ones as often as they are cycled."""
    got = list(hbat.steps("multi", objectives(ifa=[4, 4, 1], hpa=[2, 4])))
    assert [objective for objective, *_ in got] == ["ifa"] * 3
    assert got[0][1:] == ([[("ifa", ("i0.0",), 0.5), ("hpa", ("h0.0",), 0.5)],
                           [("ifa", ("i0.1",), 0.5), ("hpa", ("h0.1",), 0.5)]], [1.0, 1.0], 6)
    assert got[1][1] == [[("ifa", ("i1.0",), 0.5), ("hpa", ("h1.0",), 0.5)],
                         [("ifa", ("i1.1",), 0.5), ("hpa", ("h1.1",), 0.5)]]
    assert got[2][1:] == ([[("ifa", ("i2.0",), 1.0), ("hpa", ("h0.0",), 0.5)], [("hpa", ("h0.1",), 0.5)]],
                          [1.0, 1.0], 3)
    assert hbat.n_steps("multi", objectives(ifa=[4, 4, 1], hpa=[2, 4])) == 3




@pytest.mark.parametrize("n_a,n_b", [(74, 74), (16, 5), (5, 16), (1, 1), (0, 2), (2, 0)])
@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_interleave_takes_every_step_once_whatever_lambda(n_a, n_b, lam):
    """Equal data: n_a IFA and n_b DPO steps, each once, at every λ; seeded; λ = 0 is two-stage's order, λ = 1 its
    reverse."""
    order = hbat.interleave(n_a, n_b, lam, seed=1)
    assert (order.count(0), order.count(1)) == (n_a, n_b) and order == hbat.interleave(n_a, n_b, lam, seed=1)
    if lam in (0.0, 1.0):
        assert order == sorted(order, reverse=lam == 1.0)


def test_interleave_draws_dpo_with_probability_lambda_weighted_by_the_steps_left():
    """The first step is DPO with probability λ·b / (λ·b + (1 − λ)·a): with a = 3 IFA and b = 1 DPO steps left and
    λ = 0.75, 0.75 / (0.75 + 0.75) = 1/2; with λ = 0.5 every one of the 4 orders is equally likely (1/4 each). Over
    4000 seeds the frequencies lie within 4 standard errors."""
    firsts = [hbat.interleave(3, 1, 0.75, seed)[0] for seed in range(4000)]
    assert abs(sum(firsts) / 4000 - 0.5) < 4 * (0.25 / 4000) ** 0.5
    orders = [tuple(hbat.interleave(3, 1, 0.5, seed)) for seed in range(4000)]
    for k in range(4):
        share = orders.count(tuple(int(i == k) for i in range(4))) / 4000
        assert abs(share - 0.25) < 4 * (0.25 * 0.75 / 4000) ** 0.5


def test_a_larger_lambda_moves_the_dpo_steps_earlier():
    """The mean position of the DPO steps among 40 + 40 falls as λ grows (the equal-data form of ALRIGHT's λ)."""
    def mean_dpo_position(lam):
        return sum(i for seed in range(50) for i, k in enumerate(hbat.interleave(40, 40, lam, seed)) if k) / 2000
    positions = [mean_dpo_position(lam) for lam in (0.25, 0.5, 0.75)]
    assert positions[0] > positions[1] > positions[2] and abs(positions[1] - 39.5) < 2


# -----------------------------------------------------------------------------
# the N-way split


def test_split_is_seeded_disjoint_and_keeps_every_item():
    items = list(range(103))
    parts = hbat.split(items, 4, seed=7)
    assert parts == hbat.split(items, 4, seed=7) and parts != hbat.split(items, 4, seed=8)
    assert [len(p) for p in parts] == [26, 26, 26, 25]  # the 3 left over by 103 // 4 go to the first subsets
    assert sorted(x for p in parts for x in p) == items
    assert hbat.split(items, 1, seed=0)[0] != items and sorted(hbat.split(items, 1, seed=0)[0]) == items
    assert [len(p) for p in hbat.split(list(range(100)), 4, seed=7)] == [25] * 4


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_every_schedule_sees_every_example_as_often(n):
    """Equal data: N subsets of 103 examples, each cut into batches of 8 for 2 epochs (the last batch of an epoch
    smaller), use every example exactly twice, as one subset of all 103 does; so do its micro-batches, with shares
    that sum to 1 and are proportional to their sizes."""
    examples = [([1, i], [i, 2]) for i in range(103)]
    used = []
    for subset in hbat.split(examples, n, seed=0):
        batches = list(data.batches_of(subset, 8, 2, seed=n, collate=data.ifa_batch, n_micro=3, device="cpu"))
        assert len(batches) == data.n_batches(len(subset), 8, 2)
        for micros, shares in batches:
            sizes = [len(m[0]) for m in micros]
            assert sum(shares) == pytest.approx(1) and shares == pytest.approx([k / sum(sizes) for k in sizes])
            used += [subset[i][0][1] for m in micros for i in m[0].tolist()]
    assert sorted(used) == sorted(list(range(103)) * 2)


@pytest.mark.parametrize("n", [0, -1, 4])
def test_split_rejects_bad_n(n):
    with pytest.raises(ValueError, match="cannot split 3 records"):
        hbat.split([1, 2, 3], n, seed=0)



# -----------------------------------------------------------------------------
# weight averaging


def test_average_is_exact_at_the_ends_and_linear_between():
    a = {"w": torch.tensor([1.0, -2.0, 0.3]), "b": torch.tensor([7.0])}
    b = {"w": torch.tensor([3.0, 2.0, 0.1]), "b": torch.tensor([-1.0])}
    assert all(torch.equal(hbat.average(a, b, 0.0)[k], a[k]) for k in a)
    assert all(torch.equal(hbat.average(a, b, 1.0)[k], b[k]) for k in a)
    mid = hbat.average(a, b, 0.25)
    assert torch.allclose(mid["w"], torch.tensor([1.5, -1.0, 0.25])) and torch.allclose(mid["b"], torch.tensor([5.0]))
    with pytest.raises(ValueError, match="different tensors"):
        hbat.average(a, {"w": b["w"]}, 0.5)



# -----------------------------------------------------------------------------
# walking a schedule drives the EWC state


class Two(nn.Module):
    """Two parameter tensors: a (2 elements) and b (1 element), starting at zero."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2))
        self.b = nn.Parameter(torch.zeros(1))


def test_walking_hbat_makes_hpa1_importance_exactly_the_ifa1_change():
    """§3.1 and §3.2, by hand. IFA_1 moves a from [0, 0] to [1, 3] and b from [0] to [2]:
        Ω^IFA_a = (1² + 3²) / 2 = 5,   Ω^IFA_b = 2² = 4.
    IFA_1 itself has no penalty (Ω^HPA is empty). At the start of HPA_1 (max normalisation, F_max = 0.1):
        F_a = 0.1 · 5/5 = 0.1,   F_b = 0.1 · 4/5 = 0.08,   θ* = ([1, 3], [2]).
    Moving a to [2, 4] and b to [2.5] inside HPA_1 (λ = 1):
        L_EWC = 0.1 · (1² + 1²) + 0.08 · 0.5² = 0.2 + 0.02 = 0.22."""
    model = Two()
    stages, _ = hbat.build("hbat", 3, 1, 1, use_ewc=True)
    e = EWC(method="modified", f_max=0.1, f_max_ifa=7.0, lam=1.0, norm="max")

    ifa_1, hpa_1 = stages[0], stages[1]
    e.begin_stage(ifa_1.kind, model, ifa_1.ewc)
    assert not e.active
    assert e.penalty(model).item() == 0.0
    with torch.no_grad():
        model.a.copy_(torch.tensor([1.0, 3.0]))
        model.b.copy_(torch.tensor([2.0]))
    e.end_stage(ifa_1.kind, model)
    assert e.importance["ifa"] == pytest.approx({"a": 5.0, "b": 4.0}, rel=1e-12)
    assert e.importance["hpa"] == {}

    e.begin_stage(hpa_1.kind, model, hpa_1.ewc)
    assert e.active
    assert e.weights == pytest.approx({"a": 0.1, "b": 0.08}, rel=1e-6)
    assert e.penalty(model).item() == 0.0  # at θ* itself
    with torch.no_grad():
        model.a.copy_(torch.tensor([2.0, 4.0]))
        model.b.copy_(torch.tensor([2.5]))
    assert e.penalty(model).item() == pytest.approx(0.22, rel=1e-6)


@pytest.mark.parametrize("method", ["modified", "none"])
def test_ewc_is_active_on_exactly_the_stages_marked_ewc(method):
    """Walk all six stages of hbat(N=3), each moving every parameter: the EWC state penalises a stage iff the
    schedule marks it (modified: every stage after IFA_1; --ewc none, i.e. use_ewc False: no stage)."""
    model = Two()
    stages, _ = hbat.build("hbat", 3, 1, 1, use_ewc=method != "none")
    e = EWC(method=method, f_max=0.1, f_max_ifa=0.1)
    seen = []
    for k, stage in enumerate(stages):
        e.begin_stage(stage.kind, model, stage.ewc)
        seen.append((stage.name, e.active))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(k + 1.0)
        e.end_stage(stage.kind, model)
    assert seen == [(s.name, s.ewc) for s in stages]

