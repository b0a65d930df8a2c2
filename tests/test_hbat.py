"""The schedules of hbat.py (docs/method.md §2) and how walking them drives the EWC state of ewc.py (§3.2).

Pure and fast: no training, only the lists of stages and a two-parameter module moved by hand.
"""
import pytest
import torch
from torch import nn

import ewc as ewc_lib
import hbat


def summary(stages):
    return [(s.name, s.kind, s.subset, s.epochs, s.ewc) for s in stages]


def test_hbat_alternates_ifa_and_hpa_over_the_n_subsets():
    """§2.2: IFA_1 on subset 0, HPA_1 on subset 0, IFA_2 on subset 1, ... with E_IFA / E_HPA passes each;
    §3.2: every stage but IFA_1 carries the EWC penalty."""
    stages, n = hbat.build("hbat", 3, 2, 1, use_ewc=True)
    assert n == 3
    assert summary(stages) == [
        ("IFA_1", "ifa", 0, 2, False),
        ("HPA_1", "hpa", 0, 1, True),
        ("IFA_2", "ifa", 1, 2, True),
        ("HPA_2", "hpa", 1, 1, True),
        ("IFA_3", "ifa", 2, 2, True),
        ("HPA_3", "hpa", 2, 1, True),
    ]


def test_hbat_without_ewc_keeps_the_order_and_drops_every_penalty():
    """§2.4 "Hbat without EWC": the same alternation, no stage protected."""
    stages, n = hbat.build("hbat", 3, 2, 1, use_ewc=False)
    assert n == 3
    assert [s.name for s in stages] == ["IFA_1", "HPA_1", "IFA_2", "HPA_2", "IFA_3", "HPA_3"]
    assert [s.ewc for s in stages] == [False] * 6


@pytest.mark.parametrize("use_ewc", [True, False])
def test_two_stage_is_ifa_then_hpa_on_all_data_without_ewc(use_ewc):
    """§2.1: one IFA stage and one HPA stage over the whole datasets (one subset), never an EWC penalty."""
    stages, n = hbat.build("two-stage", 5, 3, 1, use_ewc=use_ewc)
    assert n == 1
    assert summary(stages) == [("IFA", "ifa", 0, 3, False), ("HPA", "hpa", 0, 1, False)]


def test_multi_task_is_one_stage_over_all_data():
    """§2.4: a single stage whose steps sum an IFA and an HPA loss."""
    stages, n = hbat.build("multi-task", 5, 3, 1, use_ewc=True)
    assert n == 1
    assert len(stages) == 1
    assert (stages[0].kind, stages[0].subset, stages[0].ewc) == ("multi", 0, False)


def test_unknown_schedule_raises_naming_it():
    with pytest.raises(ValueError, match="three-stage"):
        hbat.build("three-stage", 3, 1, 1, use_ewc=True)


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
    e = ewc_lib.EWC(method="modified", f_max=0.1, f_max_ifa=7.0, lam=1.0, norm="max")

    ifa_1, hpa_1 = stages[0], stages[1]
    e.begin_stage(ifa_1.kind, model)
    assert not e.active
    assert e.penalty(model).item() == 0.0
    with torch.no_grad():
        model.a.copy_(torch.tensor([1.0, 3.0]))
        model.b.copy_(torch.tensor([2.0]))
    e.end_stage(ifa_1.kind, model)
    assert e.importance["ifa"] == pytest.approx({"a": 5.0, "b": 4.0}, rel=1e-12)
    assert e.importance["hpa"] == {}

    e.begin_stage(hpa_1.kind, model)
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
    e = ewc_lib.EWC(method=method, f_max=0.1, f_max_ifa=0.1)
    seen = []
    for k, stage in enumerate(stages):
        e.begin_stage(stage.kind, model)
        seen.append((stage.name, e.active))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(k + 1.0)
        e.end_stage(stage.kind, model)
    assert seen == [(s.name, s.ewc) for s in stages]
