"""ewc.py: each formula of docs/method.md §3 by hand, the penalty's gradient against its closed form, the stage bookkeeping
(which accumulator weighs which stage), original EWC's Fisher, Freeze, Random, element-wise importance, and the
state round trip. A two-layer MLP stands in for the transformer."""
import math

import pytest
import torch
from torch import nn

from ewc import EWC, ewc_penalty, fisher_diag, normalise, parameter_change, trainable


def tiny_model(dtype=torch.float32):
    """Weights on a grid of 1/16, so that adding 0.25, 0.5, 1, 2 or 3 is exact and Ω can be compared with ==."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p * 16) / 16)
    return model.to(dtype)


@torch.no_grad()
def shift(model, offsets):
    """Add a constant to every element of the named tensors, so that tensor's Ω is exactly offset²."""
    params = dict(model.named_parameters())
    for n, c in offsets.items():
        params[n].add_(c)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -----------------------------------------------------------------------------
# the functional core by hand


def test_parameter_change_by_hand():
    """a: changes (1, −1, 2, 0) → (1 + 1 + 4 + 0)/4 = 1.5; b: change 2 → 4."""
    before = {"a": torch.zeros(2, 2), "b": torch.tensor([1.0])}
    after = {"a": torch.tensor([[1.0, -1.0], [2.0, 0.0]]), "b": torch.tensor([3.0])}
    assert parameter_change(before, after) == {"a": 1.5, "b": 4.0}
    elementwise = parameter_change(before, after, elementwise=True)
    assert torch.equal(elementwise["a"], torch.tensor([[1.0, 1.0], [4.0, 0.0]]))


def test_parameter_change_is_fp32_for_bf16_weights():
    """1 + 2⁻⁷ is a bf16 number; its square 1 + 2⁻⁶ + 2⁻¹⁴ is not (bf16 would round it to 1 + 2⁻⁶)."""
    before = {"w": torch.zeros(4, dtype=torch.bfloat16)}
    after = {"w": torch.full((4,), 1 + 2**-7, dtype=torch.bfloat16)}
    assert parameter_change(before, after)["w"] == 1 + 2**-6 + 2**-14


def test_normalise_max_by_hand():
    """Ω = (1, 4, 2), F_max = 10: F = 10·Ω/4 = (2.5, 10, 5)."""
    assert normalise({"a": 1.0, "b": 4.0, "c": 2.0}, 10.0, "max") == {"a": 2.5, "b": 10.0, "c": 5.0}


def test_normalise_softmax_by_hand():
    """s = 2, Ω = (0, ln(3)/4): s²·Ω = (0, ln 3), softmax = (1/4, 3/4), F_max = 2: F = (0.5, 1.5).
    The scale enters squared: with s = 1 the answer would differ."""
    f = normalise({"a": 0.0, "b": math.log(3) / 4}, 2.0, "softmax", scale=2.0)
    assert f["a"] == pytest.approx(0.5, rel=1e-12) and f["b"] == pytest.approx(1.5, rel=1e-12)


def test_softmax_at_release_scale_is_one_hot():
    """Realistic Ω (mean squared changes ~1e-6, 10% apart) at s = 1e10: s²·Ω are ~1e14 and 1e13 apart, so every
    tensor but the most-changed one gets exactly 0 and that one exactly F_max. At s = 1 the softmax is uniform."""
    omega = {"a": 1.0e-6, "b": 1.1e-6, "c": 0.9e-6}
    assert normalise(omega, 100.0, "softmax", scale=1e10) == {"a": 0.0, "b": 100.0, "c": 0.0}
    for f in normalise(omega, 100.0, "softmax", scale=1.0).values():
        assert f == pytest.approx(100.0 / 3, rel=1e-6)


def test_normalise_elementwise_runs_over_all_elements():
    """max: the largest element of all tensors (4) maps to F_max; softmax: one softmax over all five elements."""
    omega = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[4.0, 0.0], [3.0, 1.0]])}
    f = normalise(omega, 10.0, "max")
    assert torch.equal(f["a"], torch.tensor([2.5, 5.0]))
    assert torch.equal(f["b"], torch.tensor([[10.0, 0.0], [7.5, 2.5]]))
    f = normalise(omega, 10.0, "softmax", scale=0.5)
    expected = 10.0 * torch.softmax(0.25 * torch.cat([omega["a"], omega["b"].flatten()]), 0)
    torch.testing.assert_close(torch.cat([f["a"], f["b"].flatten()]), expected, rtol=1e-6, atol=0)


def test_ewc_penalty_by_hand():
    """First layer moved by +0.5 everywhere (12 + 4 elements), weight F = 2, λ = 3:
    Σ_elements (λ·0.5)² = 12·2.25 = 27 for the weight, 4·2.25 = 9 for the bias; L = 2·27 + 0.25·9 = 56.25.
    The second layer moved too but is not in `weights`, so it does not count."""
    model = tiny_model()
    anchor = snapshot(model)
    shift(model, {"0.weight": 0.5, "0.bias": 0.5, "2.weight": 1.0})
    penalty = ewc_penalty(model, anchor, {"0.weight": 2.0, "0.bias": 0.25}, lam=3.0)
    assert penalty.dtype == torch.float32 and penalty.item() == pytest.approx(56.25, rel=1e-6)


def test_penalty_and_gradient_are_zero_at_the_anchor():
    model = tiny_model()
    weights = {n: 5.0 for n in trainable(model)}
    penalty = ewc_penalty(model, snapshot(model), weights, lam=2.0)
    penalty.backward()
    assert penalty.item() == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


@pytest.mark.parametrize("elementwise", [False, True])
def test_gradient_is_2_f_lambda2_delta(elementwise):
    """Autograd through the custom backward equals the closed form 2·F_n·λ²·(θ − θ*)."""
    model = tiny_model()
    anchor = snapshot(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = trainable(model)
    weights = {n: (torch.rand_like(p) if elementwise else float(i + 1)) for i, (n, p) in enumerate(params.items())}
    ewc_penalty(model, anchor, weights, lam=1.5).backward()
    for n, p in params.items():
        torch.testing.assert_close(p.grad, 2 * weights[n] * 1.5**2 * (p.detach() - anchor[n]), rtol=1e-6, atol=0)


def test_bf16_penalty_accumulates_in_fp32():
    """bf16 weights: the value matches an fp64 computation to fp32 precision, the gradient comes back in bf16."""
    model = tiny_model(torch.bfloat16)
    anchor = snapshot(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = {n: 3.0 for n in trainable(model)}
    penalty = ewc_penalty(model, anchor, weights, lam=1.0)
    penalty.backward()
    exact = sum(3.0 * (p.double() - anchor[n].double()).square().sum() for n, p in model.named_parameters())
    assert penalty.dtype == torch.float32 and penalty.item() == pytest.approx(exact.item(), rel=1e-6)
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad.float(), (6.0 * (p.detach() - anchor[n])).float(), rtol=2**-7, atol=0)


def test_penalty_keeps_no_copy_of_the_weights_for_backward():
    """Every tensor the graph saves for backward is a parameter or the anchor itself (plain autograd would save each
    θ − θ*, one more copy of the weights until backward)."""
    model = tiny_model(torch.bfloat16)
    anchor = snapshot(model)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ewc_penalty(model, anchor, {n: 1.0 for n in anchor}, lam=2.0)
    existing = {p.data_ptr() for p in model.parameters()} | {a.data_ptr() for a in anchor.values()}
    assert saved and all(t.data_ptr() in existing for t in saved)


def test_fisher_squares_before_averaging():
    """log p = y·(w·x) with w a 1×2 weight, so ∂ log p/∂w = y·x. Two examples with x = (1, 2), y = ±1: the gradients
    are ±(1, 2) and average to 0, but F = mean of squares = (1, 4). Averaging first would give (0, 0)."""
    model = nn.Linear(2, 1, bias=False)
    examples = [(torch.tensor([1.0, 2.0]), 1.0), (torch.tensor([1.0, 2.0]), -1.0)]
    fisher = fisher_diag(model, examples, lambda m, ex: ex[1] * m(ex[0]).sum())
    assert torch.equal(fisher["weight"], torch.tensor([[1.0, 4.0]]))
    assert model.weight.grad is None


# -----------------------------------------------------------------------------
# the stage bookkeeping


def run_stage(ewc, kind, model, offsets, fisher=None):
    ewc.begin_stage(kind, model)
    weights, active = dict(ewc.weights), ewc.active
    shift(model, offsets)
    ewc.end_stage(kind, model, fisher=fisher)
    return weights, active


def test_accumulators_sum_over_stages_of_their_kind():
    """IFA_1 moves 0.weight by 1, HPA_1 by 2, IFA_2 by 3: Ω^IFA = 1 + 9 = 10, Ω^HPA = 4; untouched tensors 0."""
    model, ewc = tiny_model(), EWC()
    run_stage(ewc, "ifa", model, {"0.weight": 1.0})
    run_stage(ewc, "hpa", model, {"0.weight": 2.0})
    run_stage(ewc, "ifa", model, {"0.weight": 3.0, "2.bias": 0.5})
    assert ewc.importance["ifa"] == {"0.weight": 10.0, "0.bias": 0.0, "2.weight": 0.0, "2.bias": 0.25}
    assert ewc.importance["hpa"] == {"0.weight": 4.0, "0.bias": 0.0, "2.weight": 0.0, "2.bias": 0.0}


def test_which_accumulator_weighs_which_stage():
    """§3.2: IFA_1 has no penalty; HPA_1 uses exactly IFA_1's change with F_max (HPA); IFA_2 uses Ω^HPA with
    F_max (IFA); HPA_2 uses IFA_1 + IFA_2. The penalty's anchor is the stage's start."""
    model, ewc = tiny_model(), EWC(f_max=2.0, f_max_ifa=100.0)
    w, active = run_stage(ewc, "ifa", model, {"0.weight": 1.0, "2.weight": 0.5})
    assert not active and w == {}
    ewc.begin_stage("hpa", model)
    assert ewc.weights == {"0.weight": 2.0, "0.bias": 0.0, "2.weight": 0.5, "2.bias": 0.0}  # 2·(1, 0, .25, 0)/1
    assert ewc.penalty(model).item() == 0.0
    shift(model, {"0.bias": 1.0, "2.bias": 1.0})
    assert ewc.penalty(model).item() == 0.0  # the change fell on tensors IFA never moved
    shift(model, {"0.weight": 0.5})
    assert ewc.penalty(model).item() == pytest.approx(2.0 * 12 * 0.25)
    ewc.end_stage("hpa", model)
    w, _ = run_stage(ewc, "ifa", model, {"0.weight": 1.0})
    assert w == {"0.weight": 25.0, "0.bias": 100.0, "2.weight": 0.0, "2.bias": 100.0}  # Ω^HPA = (.25, 1, 0, 1)
    w, _ = run_stage(ewc, "hpa", model, {})
    assert w == {"0.weight": 2.0, "0.bias": 0.0, "2.weight": 0.25, "2.bias": 0.0}  # Ω^IFA = (2, 0, .25, 0)


def test_none_never_penalises():
    model, ewc = tiny_model(), EWC("none")
    for kind in ("ifa", "hpa", "ifa"):
        _, active = run_stage(ewc, kind, model, {"0.weight": 1.0})
        assert not active
    ewc.begin_stage("hpa", model)
    assert ewc.penalty(model).item() == 0.0


def test_original_ewc_uses_summed_fisher_of_the_other_kind():
    """Fishers of IFA_1 and IFA_2 sum to weigh HPA_2's penalty; penalty (λ/2)·Σ F (θ − θ*)² with λ = 4."""
    model, ewc = tiny_model(), EWC("original", lam=4.0)
    ones = {n: torch.ones_like(p) for n, p in trainable(model).items()}
    w, active = run_stage(ewc, "ifa", model, {}, fisher=ones)
    assert not active
    w, _ = run_stage(ewc, "hpa", model, {}, fisher={n: 5 * f for n, f in ones.items()})
    assert all(torch.equal(w[n], ones[n]) for n in ones)
    w, _ = run_stage(ewc, "ifa", model, {}, fisher={n: 2 * f for n, f in ones.items()})
    assert all(torch.equal(w[n], 5 * ones[n]) for n in ones)
    ewc.begin_stage("hpa", model)
    shift(model, {"2.weight": 0.5})  # 8 elements
    assert ewc.penalty(model).item() == pytest.approx(4.0 / 2 * 3.0 * 8 * 0.25)


def test_freeze_leaves_frozen_tensors_bit_identical_after_adamw():
    """Ω^IFA = (9, 1, 4, 0.25): freeze_frac 0.5 freezes the top two, 0.weight and 2.weight. Two AdamW steps with
    weight decay then leave them bit-identical, while the other tensors move."""
    model, ewc = tiny_model(), EWC("freeze", freeze_frac=0.5)
    run_stage(ewc, "ifa", model, {"0.weight": 3.0, "0.bias": 1.0, "2.weight": 2.0, "2.bias": 0.5})
    ewc.begin_stage("hpa", model)
    assert ewc.active and ewc.frozen == {"0.weight", "2.weight"} and ewc.penalty(model).item() == 0.0
    start = snapshot(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(2):
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        ewc.after_step(model)
    params = dict(model.named_parameters())
    assert torch.equal(params["0.weight"], start["0.weight"]) and torch.equal(params["2.weight"], start["2.weight"])
    assert not torch.equal(params["0.bias"], start["0.bias"]) and not torch.equal(params["2.bias"], start["2.bias"])


def test_random_is_seeded_softmax_of_uniform():
    """F = F_max·softmax(u), u ~ U(0, 1): weights sum to F_max, lie within e^±1 of F_max/#tensors, repeat for the
    same seed, differ for another seed and from one penalised stage to the next."""
    def draws(seed):
        model, ewc = tiny_model(), EWC("random", f_max=8.0, seed=seed)
        run_stage(ewc, "ifa", model, {"0.weight": 1.0})
        return [run_stage(ewc, kind, model, {"0.weight": 1.0})[0] for kind in ("hpa", "ifa", "hpa")]
    first = draws(0)
    assert first == draws(0) and first != draws(1)
    assert first[0] != first[2]
    assert sum(first[0].values()) == pytest.approx(8.0)
    assert all(2.0 / math.e < f < 2.0 * math.e for f in first[0].values())


def test_elementwise_importance():
    """Ω^IFA per element: 0.weight's first row moved by 2 (Ω = 4), everything else by 1 or not at all; with "max"
    those four elements get F_max and the rest 1/4 of it or 0. The penalty weighs each element by its own F."""
    model, ewc = tiny_model(), EWC(f_max=8.0, elementwise=True)
    ewc.begin_stage("ifa", model)
    with torch.no_grad():
        model[0].weight[0].add_(2.0)
        model[0].weight[1:].add_(1.0)
    ewc.end_stage("ifa", model)
    ewc.begin_stage("hpa", model)
    expected = torch.tensor([8.0] * 3 + [2.0] * 9).reshape(4, 3)
    assert torch.equal(ewc.weights["0.weight"], expected) and torch.count_nonzero(ewc.weights["2.weight"]) == 0
    with torch.no_grad():
        model[0].weight[:2].add_(0.5)  # 3 elements at F = 8, 3 at F = 2
    assert ewc.penalty(model).item() == pytest.approx((3 * 8.0 + 3 * 2.0) * 0.25)


@pytest.mark.parametrize("method,elementwise", [("modified", True), ("original", False), ("random", False)])
def test_state_dict_round_trip(tmp_path, method, elementwise):
    """Saved after HPA_1 and loaded with weights_only=True into a fresh EWC, the next stage gets the same F."""
    model = tiny_model()
    fisher = {n: torch.rand_like(p) for n, p in trainable(model).items()}
    ewc = EWC(method, elementwise=elementwise)
    run_stage(ewc, "ifa", model, {"0.weight": 1.0, "2.bias": 0.5}, fisher)
    run_stage(ewc, "hpa", model, {"2.weight": 0.25}, fisher)
    torch.save(ewc.state_dict(), tmp_path / "ewc.pt")
    resumed = EWC(method, elementwise=elementwise)
    resumed.load_state_dict(torch.load(tmp_path / "ewc.pt", weights_only=True))
    for e in (ewc, resumed):
        e.begin_stage("ifa", model)
    assert resumed.weights.keys() == ewc.weights.keys()
    for n, w in ewc.weights.items():
        assert torch.equal(torch.as_tensor(resumed.weights[n]), torch.as_tensor(w))


def test_uniform_spreads_the_modified_total_weight_equally():
    """--ewc uniform, the control: IFA_1 moves 0.weight by 1 and 2.weight by 0.5, so modified's HPA_1 weights with
    F_max 2 are (2, 0, 0.5, 0) (Σ 2.5); uniform gives every tensor 2.5 / 4 = 0.625, the same total weight."""
    for method, want in (("modified", {"0.weight": 2.0, "0.bias": 0.0, "2.weight": 0.5, "2.bias": 0.0}),
                         ("uniform", dict.fromkeys(("0.weight", "0.bias", "2.weight", "2.bias"), 0.625))):
        model, ewc = tiny_model(), EWC(method, f_max=2.0)
        run_stage(ewc, "ifa", model, {"0.weight": 1.0, "2.weight": 0.5})
        ewc.begin_stage("hpa", model)
        assert ewc.weights == pytest.approx(want) and ewc.total_weight == pytest.approx(2.5)
