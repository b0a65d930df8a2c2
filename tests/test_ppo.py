"""PPO (ppo.py): the pure pieces against loops and hand-worked numbers, then the rollout and a short run."""

import numpy as np
import pytest
import torch

import ppo
from conftest import tiny_transformer
from model import ModelArgs


# --- GAE, whitening, KL estimators, rewards --------------------------------------------------------------------

def gae_reference(rewards, values, lengths, gamma, lam):
    """Plain reverse double loop over rows and time, reading only each row's first `length` tokens."""
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        gae = 0.0
        for t in reversed(range(lengths[b])):
            next_value = values[b, t + 1].item() if t + 1 < lengths[b] else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            gae = delta + gamma * lam * gae
            advantages[b, t] = gae
    returns = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        returns[b, :lengths[b]] = advantages[b, :lengths[b]] + values[b, :lengths[b]]
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0), (0.5, 0.3)])
def test_gae_matches_reverse_loop(gamma, lam):
    torch.manual_seed(0)
    lengths = [7, 1, 4, 7, 2, 5]
    B, T = len(lengths), max(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    # Garbage (not zeros) past each row's end: compute_gae must ignore it.
    rewards = torch.randn(B, T, dtype=torch.float64)
    values = torch.randn(B, T, dtype=torch.float64)
    advantages, returns = ppo.compute_gae(rewards, values, mask, gamma, lam)
    ref_advantages, ref_returns = gae_reference(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(advantages, ref_advantages, rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, ref_returns, rtol=0, atol=1e-12)


def test_gae_worked_example():
    """The docstring's example: r = [0, 1], V = [0.5, 0.2], γ = λ = 1 → A = [0.5, 0.8], returns = [1, 1]."""
    advantages, returns = ppo.compute_gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]),
                                          torch.tensor([[True, True]]), 1.0, 1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.8]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0]]))


def test_whiten_matches_numpy_over_valid_tokens():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(4, 6))
    mask = np.arange(6)[None, :] < np.array([6, 2, 4, 1])[:, None]
    valid = x[mask]
    expected = (x - valid.mean()) / np.sqrt(valid.var() + 1e-8)  # np.var: population variance
    expected = np.where(mask, expected, 0.0)
    out = ppo.whiten(torch.from_numpy(x), torch.from_numpy(mask))
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)


def test_kl_estimators_on_a_categorical():
    """Sample N = 200,000 tokens from p (5 classes) and estimate KL(p‖q) = Σ p log(p/q) from log p(x), log q(x).

    Both estimators are unbiased, so each sample mean must lie within 4 standard errors of the true KL, the
    standard error sqrt(Var_p[k] / N) computed exactly from p and q (a 4σ miss has probability ~6e-5). Per sample,
    k1 is negative wherever q(x) > p(x) while k3 = (r - 1) - log r is never negative.
    """
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    true_kl = (p * (p.log() - q.log())).sum()
    n = 200_000
    x = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(0))
    for estimator in ("k1", "k3"):
        per_class = ppo.kl_estimate(p.log(), q.log(), estimator)    # the estimator's value for each outcome
        std_err = ((p * (per_class - true_kl) ** 2).sum() / n).sqrt()
        k = ppo.kl_estimate(p.log()[x], q.log()[x], estimator)
        assert abs(k.mean() - true_kl) < 4 * std_err, (estimator, k.mean().item(), true_kl.item())
        if estimator == "k1":
            assert (k < 0).any()
        else:
            assert (k >= 0).all()


def test_token_rewards_put_the_score_on_the_last_token():
    """Row 0: masks [T, T, F], kl [0.1, -0.2, 9], kl_coef 0.5, score 2 → [-0.05, 0.1 + 2, 0].
    Row 1 (length 3): kl [0.4, 0, 0], score -1 → [-0.2, 0, -1]."""
    masks = torch.tensor([[True, True, False], [True, True, True]])
    kl = torch.tensor([[0.1, -0.2, 9.0], [0.4, 0.0, 0.0]])
    rewards = ppo.token_rewards(torch.tensor([2.0, -1.0]), kl, masks, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 2.1, 0.0], [-0.2, 0.0, -1.0]]))


# --- losses on hand-worked numbers -----------------------------------------------------------------------------

def test_policy_loss_hand_worked():
    """ε = 0.2; per token ratio r, advantage A, loss max(-A·r, -A·clip(r, 0.8, 1.2)):
    1. r = 1.5, A = +1: max(-1.5, -1.2) = -1.2   clipped (no gradient)
    2. r = 0.5, A = +1: max(-0.5, -0.8) = -0.5   unclipped: the bound never rewards lowering r further
    3. r = 0.5, A = -2: max( 1.0,  1.6) =  1.6   clipped (no gradient)
    4. r = 1.1, A = -1: max( 1.1,  1.1) =  1.1   inside the range
    5. r = 3.0, A = 10: masked out
    loss = (-1.2 - 0.5 + 1.6 + 1.1) / 4 = 0.25; clipfrac = 2/4; approx_kl = mean((r-1) - log r) = 0.1213798;
    d loss / d logprobs = -A·r/4 on unclipped tokens: [0, -0.125, 0, 0.275, 0].
    """
    old = torch.zeros(1, 5, dtype=torch.float64)
    logprobs = torch.tensor([[1.5, 0.5, 0.5, 1.1, 3.0]], dtype=torch.float64).log().requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -2.0, -1.0, 10.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, False]])
    loss, clipfrac, approx_kl = ppo.policy_loss(logprobs, old, advantages, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.25, abs=1e-12)
    assert clipfrac.item() == pytest.approx(0.5, abs=1e-12)
    assert approx_kl.item() == pytest.approx(0.12137976830185034, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.125, 0.0, 0.275, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_value_loss_hand_worked():
    """vf_clip = 0.2; per token V, V_old, R, V_clipped = V_old + clip(V - V_old, ±0.2), loss max((V-R)², (Vc-R)²):
    1. V =  1.0, V_old = 0.5, R = 2.0: Vc = 0.7;  max(1.00, 1.69) = 1.69   clipped branch active
    2. V =  1.0, V_old = 0.5, R = 0.0: Vc = 0.7;  max(1.00, 0.49) = 1.00
    3. V =  0.1, V_old = 0.0, R = 1.0: Vc = 0.1;  max(0.81, 0.81) = 0.81   inside the range
    4. V = -1.0, V_old = 0.0, R = 0.5: Vc = -0.2; max(2.25, 0.49) = 2.25
    5. masked out
    loss = 0.5 · (1.69 + 1 + 0.81 + 2.25) / 4 = 0.71875.
    """
    values = torch.tensor([[1.0, 1.0, 0.1, -1.0, 7.0]], dtype=torch.float64)
    old_values = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 0.0, 1.0, 0.5, -7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, False]])
    loss = ppo.value_loss(values, old_values, returns, mask, vf_clip=0.2)
    assert loss.item() == pytest.approx(0.71875, abs=1e-12)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(returns, 5.0), returns, mask) == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller():
    """KL far above target: β grows by the capped 20% times n/horizon; at the target it stays."""
    ctl = ppo.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert ctl.update(60.0, n_steps=100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert ctl.update(6.0, n_steps=100) == pytest.approx(0.1 * 1.02)


# --- rollout alignment -----------------------------------------------------------------------------------------

def test_collate_five_token_example():
    """Rollout's docstring example: prompt [bos] left-padded to Tq = 2, response [a, eos] right-padded to Tr = 3.
    bos = 1, eos = 2, pad = 3, a = 7; a second row (prompt [1, 8], response [9, 9, 2]) sets the widths."""
    queries, responses, tokens, pad_mask, masks = ppo.collate([[1], [1, 8]], [[7, 2], [9, 9, 2]], pad_id=3)
    assert tokens[0].tolist() == [3, 1, 7, 2, 3]
    assert pad_mask[0].tolist() == [False, True, True, True, False]
    assert masks[0].tolist() == [True, True, False]
    assert queries[0].tolist() == [3, 1] and responses[0].tolist() == [7, 2, 3]
    assert tokens[1].tolist() == [1, 8, 9, 9, 2] and masks[1].tolist() == [True, True, True]


ARGS = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=16, multiple_of=16, max_seq_len=32)  # the tiny models here


def test_rollout_alignment_against_unpadded_forward():
    """Every rollout tensor against the plain forward pass of each row alone, unpadded: logprobs[j] is log π of
    response token j given everything before it, values[j] the critic at the token before it, the score the RM at
    the last response token; rewards put -kl_coef·k1 on each token and the score on the last; kl_true is the
    full-vocabulary KL at each response position. Before any step, ppo_loss sees ratio 1 (approx_kl = clipfrac = 0).
    Also: the models come back in the modes they had."""
    from reward import RewardModel
    policy, ref_model = tiny_transformer(seed=0, args=ARGS), tiny_transformer(seed=1, args=ARGS)
    reward_model = RewardModel(tiny_transformer(seed=2, args=ARGS)).eval()
    torch.nn.init.normal_(reward_model.head.weight)
    critic = ppo.make_critic(RewardModel(tiny_transformer(seed=3, args=ARGS)))
    prompts = [[1, 5, 6, 7], [1], [1, 9, 4], [1, 4], [1, 12, 13, 14, 15], [1, 8]]
    cfg = ppo.PPOConfig(max_new_tokens=8, eos_penalty=None, kl_coef=0.3)
    ro, metrics = ppo.rollout(policy, ref_model, critic, reward_model, prompts, cfg, eos_id=2, pad_id=3,
                              generator=torch.Generator().manual_seed(0))
    assert policy.training and critic.training and not reward_model.training
    Tq = ro.queries.shape[1]
    kl_true = []
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            response = ro.responses[b, ro.masks[b]].tolist()
            seq = torch.tensor([prompt + response])
            for j in range(len(response)):
                t = len(prompt) + j                                       # position of response token j alone
                for model, field in ((policy, ro.logprobs), (ref_model, ro.ref_logprobs)):
                    expected = model(seq)[0, t - 1].log_softmax(-1)[seq[0, t]]
                    assert field[b, j].item() == pytest.approx(expected.item(), abs=1e-5)
                assert ro.values[b, j].item() == pytest.approx(critic.values(seq)[0, t - 1].item(), abs=1e-5)
            assert ro.scores[b].item() == pytest.approx(reward_model.values(seq)[0, -1].item(), abs=1e-5)
            logp, ref_logp = (m(seq)[0, len(prompt) - 1:-1].log_softmax(-1) for m in (policy, ref_model))
            kl_true.append((logp.exp() * (logp - ref_logp)).sum().item())
    assert metrics["kl_true"] == pytest.approx(np.mean(kl_true), abs=1e-5)
    assert not ro.masks[~ro.masks.cumprod(1).bool()].any()              # right-padded: no True after a False
    assert (ro.tokens[:, Tq:] == ro.responses).all() and (ro.pad_mask[:, Tq:] == ro.masks).all()
    for field in (ro.logprobs, ro.ref_logprobs, ro.values, ro.rewards, ro.advantages, ro.returns):
        assert (field[~ro.masks] == 0).all()
    valid = ro.advantages[ro.masks]                                     # whitened over valid tokens
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    expected_rewards = ppo.token_rewards(ro.scores, (ro.logprobs - ro.ref_logprobs) * ro.masks, ro.masks, 0.3)
    torch.testing.assert_close(ro.rewards, expected_rewards)
    _, m = ppo.ppo_loss(policy, critic, ro, cfg)
    assert m["approx_kl"] == pytest.approx(0.0, abs=1e-6) and m["clipfrac"] == 0.0
    value_error = ((ro.values - ro.returns) ** 2)[ro.masks].mean().item()  # critic unchanged: no clipping either
    assert m["value_loss"] == pytest.approx(0.5 * value_error, rel=1e-5)
    # The same draw with an EOS penalty: only the answers that never ended lose their score.
    cfg.eos_penalty = -5.0
    ro2, _ = ppo.rollout(policy, ref_model, critic, reward_model, prompts, cfg, eos_id=2, pad_id=3,
                         generator=torch.Generator().manual_seed(0))
    ended = torch.tensor([2 in r for r in ro.responses.tolist()])
    assert (ro2.responses == ro.responses).all() and 0 < ended.sum() < len(prompts)
    torch.testing.assert_close(ro2.scores, torch.where(ended, ro.scores, -5.0))


def test_rollout_ends_an_answer_at_the_end_of_turn_with_eos():
    """end_of_turn (real data: the template's "\n\nHuman:") cuts an answer that writes the next turn and closes it
    with EOS: that row is scored, rewarded and masked as the unpadded answer prefix + [EOS]; rows without the
    marker are untouched."""
    from reward import RewardModel
    policy, ref_model = tiny_transformer(seed=0, args=ARGS), tiny_transformer(seed=1, args=ARGS)
    reward_model = RewardModel(tiny_transformer(seed=2, args=ARGS)).eval()
    torch.nn.init.normal_(reward_model.head.weight)
    critic = ppo.make_critic(RewardModel(tiny_transformer(seed=3, args=ARGS)))
    prompts = [[1, 5, 6, 7], [1], [1, 9, 4], [1, 4], [1, 12, 13, 14, 15], [1, 8]]
    cfg = ppo.PPOConfig(max_new_tokens=8, eos_penalty=-5.0)
    draw = lambda **kw: ppo.rollout(policy, ref_model, critic, reward_model, prompts, cfg, eos_id=2, pad_id=3,  # noqa: E731
                                    generator=torch.Generator().manual_seed(0), **kw)
    plain, _ = draw()
    answers = [r[m].tolist() for r, m in zip(plain.responses, plain.masks)]
    # the marker: a token that some answers hold (not first, not as EOS) and others do not
    marker = next(t for t in range(4, 16) if 0 < sum(t in a[1:] for a in answers) < len(answers))
    cut, metrics = draw(end_of_turn=lambda ids: ids[:ids.index(marker)] if marker in ids else None)
    n_cut = 0
    for b, (prompt, answer) in enumerate(zip(prompts, answers)):
        body = answer[:-1] if answer[-1] == 2 else answer
        expected = body[:body.index(marker)] + [2] if marker in body else answer
        n_cut += marker in body
        got = cut.responses[b, cut.masks[b]].tolist()
        assert got == expected
        with torch.no_grad():
            seq = torch.tensor([prompt + expected])
            score = reward_model.values(seq)[0, -1].item() if expected[-1] == 2 else cfg.eos_penalty
            assert cut.scores[b].item() == pytest.approx(score, abs=1e-5)
            logp = policy(seq)[0, len(prompt) - 1:-1].log_softmax(-1).gather(1, seq[0, len(prompt):, None])
            torch.testing.assert_close(cut.logprobs[b, :len(expected)], logp.squeeze(1), rtol=0, atol=1e-5)
    assert n_cut > 0 and metrics["end_of_turn_share"] == pytest.approx(n_cut / len(prompts))
    assert metrics["eos_share"] >= metrics["end_of_turn_share"]


def test_minibatches_cover_every_row_once_per_epoch():
    """Rows keep their fields together (row i holds i everywhere), every row comes once, the order is shuffled."""
    ro = ppo.Rollout(*([torch.arange(10)[:, None].expand(10, 3)] * 11), torch.arange(10.0))
    seen = torch.cat([mb.scores for mb in ppo.minibatches(ro, 4, torch.Generator().manual_seed(0))])
    assert [len(mb.scores) for mb in ppo.minibatches(ro, 4)] == [4, 4, 2]
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all((mb.tokens[:, 0] == mb.scores.long()).all() for mb in ppo.minibatches(ro, 4))


def test_config_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="kl_estimator"):
        ppo.PPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="temperature"):
        ppo.PPOConfig(temperature=0.7)


# --- the release's variant (§4.3) -------------------------------------------------------------------------------

def release_rewards_as_released(score, logprobs, ref_logprobs, n_response, start, gamma, kl_coef):
    """The release's own loop on one left-padded row of T - 1 log-prob columns: the score is multiplied by γ once
    per column from column 0 (prompt and padding included) and added there, the clamped KL subtracted; the
    response's log-probs sit at columns start .. start + n_response - 1 with start = Tq - 1."""
    row, seq_reward = [], score
    for j in range(len(logprobs)):
        seq_reward *= gamma
        row.append(seq_reward - kl_coef * max(0.0, logprobs[j] - ref_logprobs[j]))
    return row[start:start + n_response]


def test_release_token_rewards_hand_worked_and_as_released():
    """The docstring's example by hand, then both position conventions against the release's loop on rows with 3
    prompt columns (Tq = 3, start = 2) and responses of 3 and 2 tokens."""
    got = ppo.release_token_rewards(torch.tensor([2.0]), torch.tensor([[0.4, -0.3, 0.0]]), torch.zeros(1, 3),
                                    torch.tensor([[True, True, False]]), kl_coef=0.1, gamma=0.5)
    torch.testing.assert_close(got, torch.tensor([[0.96, 0.5, 0.0]]))
    torch.manual_seed(0)
    Tq, Tr, gamma, beta = 3, 3, 0.95, 0.1
    full_lp, full_ref = -torch.rand(2, Tq - 1 + Tr, dtype=torch.float64), -torch.rand(2, Tq - 1 + Tr, dtype=torch.float64)
    masks = torch.tensor([[True, True, True], [True, True, False]])
    scores = torch.tensor([1.5, -4.0], dtype=torch.float64)
    lp, ref = full_lp[:, Tq - 1:], full_ref[:, Tq - 1:]                   # the response columns
    absolute = ppo.release_token_rewards(scores, lp, ref, masks, beta, gamma, offset=Tq - 1)
    relative = ppo.release_token_rewards(scores, lp, ref, masks, beta, gamma)
    for b in range(2):
        n = int(masks[b].sum())
        expected = release_rewards_as_released(scores[b].item(), full_lp[b].tolist(), full_ref[b].tolist(), n,
                                               Tq - 1, gamma, beta)
        assert absolute[b, :n].tolist() == pytest.approx(expected, abs=1e-12)
        # counted from the response's start, the same row as a release row whose prompt fills one column
        expected = release_rewards_as_released(scores[b].item(), lp[b].tolist(), ref[b].tolist(), n, 0, gamma, beta)
        assert relative[b, :n].tolist() == pytest.approx(expected, abs=1e-12)
    assert (absolute[~masks] == 0).all() and (relative[~masks] == 0).all()


def test_whiten_with_queue_hand_worked_fifo_and_restart():
    """The docstring's example; then a FIFO of size 4 across three batches against numpy on the values it must
    hold (zeros and padding never enter it), and a fresh queue whitening a batch by that batch alone."""
    w, q = ppo.whiten_with_queue(torch.tensor([[2.0, 3.0]]), torch.tensor([[True, True]]), torch.tensor([1.0]), 3)
    assert q.tolist() == [1.0, 2.0, 3.0]
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0 / (2 / 3) ** 0.5]]))
    batches = [(torch.tensor([[1.0, 0.0, 9.0]]), torch.tensor([[True, True, False]])),   # pushes [1]
               (torch.tensor([[2.0, 4.0], [-1.0, 5.0]]), torch.tensor([[True, True], [True, False]])),  # [2, 4, -1]
               (torch.tensor([[7.0, 0.5]]), torch.tensor([[True, True]]))]              # [7, 0.5]
    expected_queues = [[1.0], [1.0, 2.0, 4.0, -1.0], [4.0, -1.0, 7.0, 0.5]]
    q = torch.zeros(0)
    for (rewards, masks), held in zip(batches, expected_queues):
        w, q = ppo.whiten_with_queue(rewards, masks, q, size=4)
        assert q.tolist() == held
        mean, std = np.mean(held), np.std(held)
        expected = np.where(masks.numpy(), (rewards.numpy() - mean) / (std + 1e-8), 0.0)
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6, atol=1e-6)
    queue = ppo.RewardQueue(4)                                          # a new stage: an empty queue
    w = queue.whiten(*batches[2])
    np.testing.assert_allclose(w.numpy(), [[1.0, -1.0]], rtol=1e-6)     # [7, 0.5] whitened by itself
    assert queue.values.tolist() == [7.0, 0.5]


def test_release_policy_loss_hand_worked_and_one_sided():
    """The docstring's example: log π = [-1, -2], A = [1, -1] → loss 0.9, ∂/∂log π = [-0.5, 0]. Then, on random
    numbers, the gradient is exactly REINFORCE's -A/N on positive-advantage tokens and exactly 0 on the others and
    on padding: the update never lowers a token."""
    logprobs = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    loss = ppo.release_policy_loss(logprobs, torch.tensor([[1.0, -1.0]], dtype=torch.float64),
                                   torch.tensor([[True, True]]))
    loss.backward()
    assert loss.item() == pytest.approx(0.9, abs=1e-12)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, 0.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.manual_seed(0)
    logprobs = (-torch.rand(4, 6, dtype=torch.float64) * 5).requires_grad_()
    advantages = torch.randn(4, 6, dtype=torch.float64)
    mask = torch.rand(4, 6) < 0.8
    ppo.release_policy_loss(logprobs, advantages, mask).backward()
    n = mask.sum().item()
    expected = torch.where(mask & (advantages > 0), -advantages / n, torch.zeros_like(advantages))
    torch.testing.assert_close(logprobs.grad, expected, rtol=0, atol=1e-12)
    assert (logprobs.grad[mask & (advantages < 0)] == 0).all() and (advantages[mask] < 0).any()


def test_release_rollout_against_its_pieces():
    """A release rollout: no critic; the RM score clipped to [-10, 10] (the head is scaled up until some scores
    pass 10) with no EOS penalty; rewards = release_token_rewards of the rollout's own log-probs; advantages =
    those whitened by the stage's queue; values and returns 0; with absolute positions the decay counts Tq - 1 more
    columns. Sampling keeps to the top-k tokens: with top_k = 1 it is greedy."""
    from reward import RewardModel
    policy, ref_model = tiny_transformer(seed=0, args=ARGS), tiny_transformer(seed=1, args=ARGS)
    reward_model = RewardModel(tiny_transformer(seed=2, args=ARGS)).eval()
    torch.nn.init.normal_(reward_model.head.weight, std=4.0)
    prompts = [[1, 5, 6, 7], [1], [1, 9, 4], [1, 4], [1, 12, 13, 14, 15], [1, 8]]
    cfg = ppo.release_config(max_new_tokens=8)
    assert (cfg.kl_coef, cfg.epochs, cfg.top_k, cfg.top_p, cfg.eos_penalty) == (0.1, 1, 50, 0.95, None)
    draws = {}
    for absolute in (False, True):
        cfg.absolute_positions, queue = absolute, ppo.RewardQueue(cfg.queue_size)
        draws[absolute] = ro, m = ppo.rollout(policy, ref_model, None, reward_model, prompts, cfg, eos_id=2, pad_id=3,
                                              generator=torch.Generator().manual_seed(0), queue=queue)
        with torch.no_grad():
            raw = reward_model.score(ro.tokens, torch.nn.functional.pad(ro.masks, (ro.queries.shape[1], 0)),
                                     ro.pad_mask)
        assert (raw.abs() > 10).any() and (raw.abs() < 10).any()
        torch.testing.assert_close(ro.scores, raw.clamp(-10, 10))
        offset = ro.queries.shape[1] - 1 if absolute else 0
        expected = ppo.release_token_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.masks, 0.1, 0.95, offset)
        torch.testing.assert_close(ro.rewards, expected)
        whitened, held = ppo.whiten_with_queue(expected, ro.masks, torch.zeros(0), 1000)
        torch.testing.assert_close(ro.advantages, whitened)
        torch.testing.assert_close(queue.values, held)
        assert (ro.values == 0).all() and (ro.returns == 0).all() and "explained_variance" not in m
        assert m["positive_share"] == pytest.approx((whitened[ro.masks] > 0).float().mean().item())
        _, lm = ppo.release_loss(policy, ro)
        assert lm["approx_kl"] == pytest.approx(0.0, abs=1e-6) and "value_loss" not in lm
    assert (draws[False][0].responses == draws[True][0].responses).all()  # the same draw, another decay
    cfg.top_k = 1
    ro, _ = ppo.rollout(policy, ref_model, None, reward_model, prompts, cfg, 2, 3,
                        generator=torch.Generator().manual_seed(5), queue=ppo.RewardQueue(1000))
    greedy = policy.generate(prompts, 8, temperature=0.0, eos_id=2)
    assert [r[m].tolist() for r, m in zip(ro.responses, ro.masks)] == greedy


# --- GRPO -------------------------------------------------------------------------------------------------------

def test_group_advantages_hand_worked_and_per_group():
    """[1, 3, 2, 2] in groups of 2: (r − 2)/√2 in the first, a tied group gets 0; each group then has mean 0 and
    (Bessel) std 1, whatever the other groups hold."""
    a = ppo.group_advantages(torch.tensor([1.0, 3.0, 2.0, 2.0]), 2, eps=0.0)
    torch.testing.assert_close(a[:2], torch.tensor([-2 ** -0.5, 2 ** -0.5]))
    assert torch.equal(ppo.group_advantages(torch.tensor([1.0, 3.0, 2.0, 2.0]), 2)[2:], torch.zeros(2))
    scores = torch.randn(12, generator=torch.Generator().manual_seed(0)) * 5 + 3
    groups = ppo.group_advantages(scores, 4, eps=0.0).view(3, 4)
    torch.testing.assert_close(groups.mean(1), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(groups.std(1), torch.ones(3))


def grpo_loss_loop(logprobs, old_logprobs, ref_logprobs, advantages, lengths, clip, kl_coef):
    """DeepSeekMath eq. 3 written out answer by answer, token by token, in Python floats."""
    import math
    total = 0.0
    for i, n in enumerate(lengths):
        per_token = 0.0
        for t in range(n):
            ratio = math.exp(logprobs[i][t] - old_logprobs[i][t])
            a = advantages[i]
            surrogate = min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
            r = math.exp(ref_logprobs[i][t] - logprobs[i][t])
            per_token += surrogate - kl_coef * (r - math.log(r) - 1)
        total += per_token / n
    return -total / len(lengths)


def test_grpo_policy_loss_hand_worked_and_against_a_loop():
    """The docstring's example (−(0.5 − 0.1·(e − 2)/2)); then random ragged answers against the per-answer,
    per-token loop, its gradient against the loop's by finite differences, and padding that changes nothing."""
    import math
    lp = torch.tensor([[-1.0, -2.0]])
    loss, clipfrac, approx_kl, kl = ppo.grpo_policy_loss(lp, lp, torch.tensor([[-1.0, -1.0]]), torch.full((1, 2), 0.5),
                                                         torch.ones(1, 2, dtype=torch.bool), 0.2, 0.1)
    assert loss.item() == pytest.approx(-(0.5 - 0.1 * (math.e - 2) / 2)) and clipfrac == 0 and approx_kl == 0
    assert kl.item() == pytest.approx((math.e - 2) / 2)
    g = torch.Generator().manual_seed(0)
    lengths = [3, 1, 4, 2]
    mask = torch.tensor([[t < n for t in range(4)] for n in lengths])
    old, ref = -torch.rand(4, 4, generator=g) * 3, -torch.rand(4, 4, generator=g) * 3
    new = (old + torch.randn(4, 4, generator=g) * 0.3).double().requires_grad_(True)
    adv = torch.randn(4, generator=g)
    args = (old.double(), ref.double(), adv[:, None].double() * mask, mask, 0.2, 0.05)
    loss, *_ = ppo.grpo_policy_loss(new, *args)
    lists = [x.tolist() for x in (new.detach(), old, ref)]
    assert loss.item() == pytest.approx(grpo_loss_loop(*lists, adv.tolist(), lengths, 0.2, 0.05), rel=1e-9)
    loss.backward()
    h = 1e-6
    for i, t in [(0, 0), (0, 2), (2, 3), (3, 1)]:  # valid tokens: the gradient is the loop's slope
        up, down = (new.detach().clone() for _ in range(2))
        up[i, t] += h
        down[i, t] -= h
        slope = (grpo_loss_loop(up.tolist(), *lists[1:], adv.tolist(), lengths, 0.2, 0.05)
                 - grpo_loss_loop(down.tolist(), *lists[1:], adv.tolist(), lengths, 0.2, 0.05)) / (2 * h)
        assert new.grad[i, t].item() == pytest.approx(slope, rel=1e-5, abs=1e-8)
    assert new.grad[1, 1:].abs().sum() == 0  # padding: no gradient
    junk = new.detach().clone()
    junk[~mask] = 5.0
    assert ppo.grpo_policy_loss(junk, *args)[0].item() == pytest.approx(loss.item())


@pytest.mark.parametrize("n", [40, 44, 300, 1200])
def test_grpo_rollouts_sample_as_many_answers_as_ppo(n):
    """data.rollout_batches: with K = 1 PPO's shuffled batches exactly (also when the batch size does not divide n);
    with K = 4, rollout for rollout a quarter of PPO's prompts, so prompts × answers match PPO's in every rollout and
    in all (n × epochs: Hbat's 300-prompt subsets and two-stage's 1200 take the same answers); the draws are the
    same seeded shuffles in order, each prompt at most once more than another."""
    import data
    ppo_batches = data.rollout_batches(n, 64 if n >= 300 else 8, 3, seed=1)
    assert ppo_batches == list(data.shuffled(n, 64 if n >= 300 else 8, 3, 1))
    grpo_batches = data.rollout_batches(n, 64 if n >= 300 else 8, 3, seed=1, group_size=4)
    assert [len(b) * 4 for b in grpo_batches] == [len(b) for b in ppo_batches]
    drawn = [i for b in grpo_batches for i in b]
    assert drawn == [i for order in data.shuffled(n, n, 3, 1) for i in order][:len(drawn)] and len(drawn) * 4 == 3 * n
    counts = [drawn.count(i) for i in range(n)]
    assert max(counts) - min(counts) <= 1


def test_grpo_rollouts_round_up_where_k_does_not_divide_a_batch():
    import data
    sizes = [len(b) for b in data.rollout_batches(42, 8, 2, seed=0, group_size=4)]
    assert sizes == [2, 2, 2, 2, 2, 1] * 2  # PPO's [8, 8, 8, 8, 8, 2]: the last rollout 4 answers where PPO takes 2


def test_grpo_rollout_against_its_pieces():
    """A GRPO rollout of 3 prompts × K = 4: the rows come in groups of one prompt; each answer's advantage is its
    EOS-penalised score normalised in its group, on each of its tokens; no critic; its loss at the rollout's own
    policy is −(mean advantage) + β·KL, with ratio 1 and no clipping."""
    from reward import RewardModel
    policy, ref_model = tiny_transformer(seed=0, args=ARGS), tiny_transformer(seed=1, args=ARGS)
    reward_model = RewardModel(tiny_transformer(seed=2, args=ARGS)).eval()
    cfg = ppo.PPOConfig(**ppo.VARIANTS["grpo"] | dict(max_new_tokens=6))
    prompts = [p for p in ([1, 5, 6], [1], [1, 9, 4, 7]) for _ in range(4)]
    ro, m = ppo.rollout(policy, ref_model, None, reward_model, prompts, cfg, eos_id=2, pad_id=3,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(ro.queries.view(3, 4, -1), ro.queries.view(3, 4, -1)[:, :1].expand(3, 4, -1))
    torch.testing.assert_close(ro.advantages, ppo.group_advantages(ro.scores, 4)[:, None] * ro.masks)
    assert (ro.values == 0).all() and (ro.returns == 0).all() and "tied_groups" in m
    loss, lm = ppo.grpo_loss(policy, ro, cfg)
    log_r = ro.ref_logprobs - ro.logprobs  # log(π_ref/π) at the rollout's own policy
    kl = ((torch.expm1(log_r) - log_r) * ro.masks).sum(1) / ro.masks.sum(1)
    mean_advantage = (ro.advantages * ro.masks).sum(1) / ro.masks.sum(1)
    assert lm["approx_kl"] == pytest.approx(0.0, abs=1e-6) and lm["clipfrac"] == 0
    assert loss.item() == pytest.approx(-(mean_advantage - cfg.kl_coef * kl).mean().item(), abs=1e-5)


# --- a short run ----------------------------------------------------------------------------------------------
# On a synthetic task: on the embedded world the policy must first be pretrained and fine-tuned and the reward model
# trained, minutes on 2 cores; `python train.py --algo ppo` is that run.

class TargetTokenRM(torch.nn.Module):
    """A hand-made reward model: score = share of response tokens equal to `target` (a stand-in for "the RM likes
    the style words"), and a learnable per-token value table for the critic (zero at start)."""

    def __init__(self, vocab, target):
        super().__init__()
        self.target = target
        self.table = torch.nn.Embedding(vocab, 1)
        torch.nn.init.zeros_(self.table.weight)

    def values(self, tokens, pad_mask=None):
        return self.table(tokens).squeeze(-1)

    def score(self, tokens, mask, pad_mask=None):
        return ((tokens == self.target) & mask).sum(1) / mask.sum(1)


@pytest.mark.slow
def test_ppo_updates_raise_the_score_with_bounded_kl():
    """A tiny random policy (vocab 16) starts with the target token at ~1/16 of its response tokens. Eight
    rollouts of 32 prompts, each followed by 2 epochs of 4 minibatches (the loop train.py runs), must raise the
    mean score of a fixed 128-prompt sample while the full-vocabulary KL to the reference stays a few nats per
    sequence. With kl_coef β the KL-regularised optimum multiplies the target's probability by about
    exp(score per target token / β) = exp((1/7) / 0.05) ≈ 17, so the score can rise well past the margin below."""
    policy = tiny_transformer(seed=0, args=ARGS, dim=32)
    ref_model = tiny_transformer(seed=0, args=ARGS, dim=32).eval().requires_grad_(False)
    reward_model = TargetTokenRM(16, target=5)
    critic = ppo.make_critic(reward_model)
    cfg = ppo.PPOConfig(max_new_tokens=8, minibatch_size=8, eos_penalty=None, kl_coef=0.05)
    params = list(policy.parameters()) + list(critic.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    prompts = [[1, 4 + i % 12] for i in range(32)]

    def evaluate():
        _, m = ppo.rollout(policy, ref_model, critic, reward_model, prompts * 4, cfg, 2, 3,
                           generator=torch.Generator().manual_seed(1))
        return m

    before = evaluate()
    for _ in range(8):
        ro, _ = ppo.rollout(policy, ref_model, critic, reward_model, prompts, cfg, 2, 3, generator=g)
        for _ in range(cfg.epochs):
            for mb in ppo.minibatches(ro, cfg.minibatch_size, g):
                loss, _ = ppo.ppo_loss(policy, critic, mb, cfg)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
    after = evaluate()
    assert after["score"] > before["score"] + 0.15                    # measured 0.06 -> 0.30 (seeds 0-2: +0.23..0.25)
    assert after["kl_true"] < 5.0                                     # measured 2.3-2.6 nats per sequence
