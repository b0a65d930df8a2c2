"""dpo.py: the losses by hand and by finite differences, the shared log-prob helper against a naive loop, and DPO
steps on a tiny model (margin rises; the cached reference equals a live one), and RPO's added NLL."""
import copy
import math

import pytest
import torch

from conftest import random_pairs, tiny_transformer
from data import hpa_batch
from dpo import dpo_loss, dpo_step_loss, ifa_step_loss, reference_logps, sft_loss

# -----------------------------------------------------------------------------
# The losses as pure functions


def test_dpo_loss_hand_example():
    """β = 0.5, ε = 0, two pairs:
    pair 0: log π = (−1, −3), log π_ref = (−2, −2): logits = 2 − 0 = 2, z = 1, loss = log(1 + e^−1) = 0.31326168751822286,
            rewards 0.5·(−1+2) = 0.5 and 0.5·(−3+2) = −0.5; ∂loss/∂log π(y_w) = −β·σ(−z) = −0.5·0.26894 = −0.13447071068499755.
    pair 1: log π = (−4, −2), log π_ref = (−3, −3): logits = −2, z = −1, loss = log(1 + e) = 1.3132616875182228,
            rewards −0.5 and 0.5.
    """
    pc = torch.tensor([-1.0, -4.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-3.0, -2.0], dtype=torch.float64)
    rc = torch.tensor([-2.0, -3.0], dtype=torch.float64)
    rr = torch.tensor([-2.0, -3.0], dtype=torch.float64)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.31326168751822286, 1.3132616875182228], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.5, -0.5], dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.5, 0.5], dtype=torch.float64), rtol=0, atol=1e-15)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses[0].backward()
    assert pc.grad[0].item() == pytest.approx(-0.13447071068499755, abs=1e-15)


def test_dpo_loss_label_smoothing_hand_example():
    """ε = 0.25, z = 1 (pair 0 above): 0.75·log(1 + e^−1) + 0.25·log(1 + e) = log(1 + e^−1) + 0.25·z = 0.5632616875182228,
    using log(1 + e^z) = z + log(1 + e^−z)."""
    losses, _, _ = dpo_loss(*torch.tensor([[-1.0], [-3.0], [-2.0], [-2.0]], dtype=torch.float64), beta=0.5,
                            label_smoothing=0.25)
    assert losses.item() == pytest.approx(0.5632616875182228, abs=1e-15)


def test_ipo_hand_example():
    """IPO: loss = (logits − 1/(2β))². β = 0.5 (target logits 1): logits 2 -> 1, logits −2 -> 9.
    β = 0.25 (target 2): logits 2 -> 0. Rewards are the same as DPO's: β·(log π − log π_ref)."""
    pc, pr = torch.tensor([-1.0, -4.0], dtype=torch.float64), torch.tensor([-3.0, -2.0], dtype=torch.float64)
    rc = rr = torch.tensor([-2.0, -3.0], dtype=torch.float64)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.5, ipo=True)
    torch.testing.assert_close(losses, torch.tensor([1.0, 9.0], dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.5, -0.5], dtype=torch.float64), rtol=0, atol=1e-15)
    losses, _, _ = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.25, ipo=True)
    assert losses.item() == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1, ipo=True)


def _dpo_formula(pc, pr, rc, rr, beta, eps):
    """docs/method.md §4.1 written independently with python floats: the oracle for the finite differences."""
    z = beta * ((pc - rc) - (pr - rr))
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (2.0, 0.2)])
def test_dpo_loss_gradient_matches_finite_differences(beta, eps):
    """Autograd of dpo_loss (float64) against central differences (h = 1e-5) of the formula written out
    separately: truncation error O(h²·β³) ≈ 1e-10, rounding ≈ eps·|loss|/h ≈ 1e-9 for losses up to ~40."""
    torch.manual_seed(0)
    inputs = [(-20 * torch.rand(4, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    losses, _, _ = dpo_loss(*inputs, beta=beta, label_smoothing=eps)
    losses.sum().backward()
    h = 1e-5
    for b in range(4):
        point = [x[b].item() for x in inputs]
        assert losses[b].item() == pytest.approx(_dpo_formula(*point, beta, eps), abs=1e-13)
        for k in range(4):
            up, down = list(point), list(point)
            up[k] += h
            down[k] -= h
            numeric = (_dpo_formula(*up, beta, eps) - _dpo_formula(*down, beta, eps)) / (2 * h)
            assert inputs[k].grad[b].item() == pytest.approx(numeric, abs=1e-8)


def test_label_smoothing_half_gives_zero_gradient_at_reference():
    """ε = 0.5 says the labels are coin flips: at policy = reference (z = 0, the start of every stage) the gradient
    is exactly 0, whereas plain DPO's is −β/2 on log π(y_w); away from z = 0 cDPO-0.5 pulls z back to 0."""
    ref = torch.tensor([-5.0, -7.0], dtype=torch.float64)
    for eps, expected in [(0.5, 0.0), (0.0, -0.05)]:
        pc, pr = ref[:1].clone().requires_grad_(), ref[1:].clone().requires_grad_()
        losses, _, _ = dpo_loss(pc, pr, ref[:1], ref[1:], beta=0.1, label_smoothing=eps)
        losses.sum().backward()
        assert pc.grad.item() == pytest.approx(expected, abs=1e-15)
        assert pr.grad.item() == pytest.approx(-expected, abs=1e-15)
    pc = torch.tensor([-4.0], dtype=torch.float64, requires_grad=True)  # z = 0.1 > 0
    losses, _, _ = dpo_loss(pc, ref[1:], ref[:1], ref[1:], beta=0.1, label_smoothing=0.5)
    losses.sum().backward()
    assert pc.grad.item() > 0  # gradient descent lowers log π(y_w), back towards z = 0


def test_sft_loss_hand_example():
    """token_logprobs [[0, −1, −2], [0, −3, 0]], mask [[F, T, T], [F, T, F]]: (1 + 2 + 3) / 3 = 2. The −50 under
    the mask must not count."""
    logprobs = torch.tensor([[0.0, -1.0, -2.0], [-50.0, -3.0, 0.0]])
    mask = torch.tensor([[False, True, True], [False, True, False]])
    assert sft_loss(logprobs, mask).item() == 2.0


def test_sft_loss_warns_on_all_masked_batch():
    logprobs = torch.full((2, 3), -1.0, requires_grad=True)
    with pytest.warns(UserWarning, match="no response tokens"):
        loss = sft_loss(logprobs, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()  # a training loop that hits such a batch must not crash


# -----------------------------------------------------------------------------
# The shared log-prob helper and DPO steps on a tiny model


def test_token_logprobs_summed_matches_naive_loop_and_ignores_right_padding():
    """Sequence log-prob = model.token_logprobs(...).sum(-1), against scoring every response token from a forward
    pass over its unpadded prefix alone; then with 5 more columns of right padding (pad ids 3, mask False)."""
    model = tiny_transformer()
    examples = random_pairs(4, seed=1)
    tokens, mask = hpa_batch(examples, pad_id=3)
    with torch.no_grad():
        fast = model.token_logprobs(tokens, mask).sum(-1)
        naive = []
        for prompt, response in [(p, c) for p, c, _ in examples] + [(p, r) for p, _, r in examples]:
            total = 0.0
            for j, token in enumerate(response):
                prefix = torch.tensor([prompt + response[:j]])
                total += model(prefix)[0, -1].double().log_softmax(-1)[token].item()
            naive.append(total)
        torch.testing.assert_close(fast, torch.tensor(naive, dtype=torch.float32), rtol=0, atol=1e-5)
        padded = torch.cat([tokens, torch.full((len(tokens), 5), 3)], 1)
        padded_mask = torch.cat([mask, torch.zeros(len(mask), 5, dtype=torch.bool)], 1)
        torch.testing.assert_close(model.token_logprobs(padded, padded_mask).sum(-1), fast, rtol=0, atol=1e-5)


def test_ifa_step_loss_is_mean_token_nll():
    model = tiny_transformer()
    tokens, mask = hpa_batch(random_pairs(3, seed=2))
    loss, metrics = ifa_step_loss(model, tokens, mask)
    with torch.no_grad():
        logp = model(tokens)[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        expected = -logp[mask[:, 1:]].mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert metrics == {"loss": loss.item()}


def dpo_steps(model, examples, ref_logps, n_steps, lr=3e-3, beta=0.1):
    """n_steps full-batch DPO steps with Adam; returns the metrics before each step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    tokens, mask = hpa_batch(examples)
    history = []
    for _ in range(n_steps):
        loss, metrics = dpo_step_loss(model, tokens, mask, ref_logps, beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(metrics)
    return history


def test_dpo_steps_raise_the_margin():
    """At the reference every reward is 0 and the loss log 2; ten steps on 16 random pairs must open a clear margin
    on them, with the chosen reward above the rejected on nearly every pair."""
    model = tiny_transformer()
    examples = random_pairs(16, seed=3)
    ref_logps = reference_logps(model, examples, batch_size=5, device="cpu")
    history = dpo_steps(model, examples, ref_logps, n_steps=10)
    first = history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/accuracy"] == 0.0  # a tie is not a win
    _, last = dpo_step_loss(model, *hpa_batch(examples), ref_logps, beta=0.1)
    print("\nstep  loss  chosen  rejected  margin  accuracy")
    for step, m in enumerate(history + [last]):
        print(f"{step:>4}  {m['loss']:.4f}  {m['rewards/chosen']:+.3f}  {m['rewards/rejected']:+.3f}  "
              f"{m['rewards/margin']:.3f}  {m['rewards/accuracy']:.2f}")
    assert last["rewards/margin"] > 0.5
    assert last["rewards/accuracy"] >= 0.9
    assert last["loss"] < first["loss"] - 0.2
    assert last["rewards/margin"] == pytest.approx(last["rewards/chosen"] - last["rewards/rejected"], abs=1e-6)


def test_cached_reference_equals_live_reference():
    """reference_logps (computed in batches of 3, so with other padding) indexed by the examples' positions gives
    the same loss and gradient as a live copy of the reference, for a policy that has moved away from it."""
    reference = tiny_transformer()
    examples = random_pairs(10, seed=4)
    ref_logps = reference_logps(reference, examples, batch_size=3, device="cpu")
    assert ref_logps.shape == (10, 2)
    policy = copy.deepcopy(reference)
    dpo_steps(policy, examples, ref_logps, n_steps=2)
    idx = [7, 2, 5, 0]
    tokens, mask = hpa_batch([examples[i] for i in idx])
    results = []
    for kwargs in [dict(ref_logps=ref_logps[idx]), dict(ref_logps=None, ref_model=reference)]:
        policy.zero_grad()
        loss, metrics = dpo_step_loss(policy, tokens, mask, beta=0.1, label_smoothing=0.1, **kwargs)
        loss.backward()
        results.append((loss.detach(), metrics, [p.grad.clone() for p in policy.parameters()]))
    (loss_a, m_a, g_a), (loss_b, m_b, g_b) = results
    assert abs(loss_a.item() - math.log(2)) > 1e-3  # the policy really differs from the reference
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
    assert m_a == pytest.approx(m_b, abs=1e-6)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in reference.parameters())


# -----------------------------------------------------------------------------
# RPO: DPO plus the chosen answer's NLL


class FixedLogprobs:
    """A stand-in policy whose token_logprobs are given numbers, so that the loss can be worked out by hand."""

    def __init__(self, values):
        self.values = values

    def token_logprobs(self, tokens, mask):
        return torch.where(mask, self.values, 0.0)



def test_rpo_adds_alpha_times_the_chosen_answers_mean_token_nll():
    """One pair: chosen tokens log-probs (−1, −2) and rejected (−3) over 3 response positions; the reference's
    summed log-probs (−2, −2). DPO with β = 0.5: logits = (−3 − (−3)) − 0 ... worked below; NLL of the chosen
    answer = (1 + 2) / 2 = 1.5, so with α = 2 the loss is the DPO loss + 3."""
    values = torch.tensor([[0.0, -1.0, -2.0], [0.0, -3.0, -5.0]])  # row 0 chosen, row 1 rejected
    mask = torch.tensor([[False, True, True], [False, True, False]])  # the rejected answer has one token: −3
    ref = torch.tensor([[-2.0, -2.0]])
    # policy: chosen −3, rejected −3 -> logits = (−3 − −3) − (−2 − −2) = 0, z = 0, loss = log 2
    plain, m0 = dpo_step_loss(FixedLogprobs(values), None, mask, ref, beta=0.5)
    assert plain.item() == pytest.approx(math.log(2))
    loss, m = dpo_step_loss(FixedLogprobs(values), None, mask, ref, beta=0.5, rpo_alpha=2.0)
    assert m["nll_chosen"] == pytest.approx(1.5)
    assert loss.item() == pytest.approx(math.log(2) + 3.0) and m["loss"] == pytest.approx(loss.item())
    assert "nll_chosen" not in m0

