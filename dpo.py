"""The offline objectives: IFA (supervised fine-tuning) and DPO (docs/method.md §1, §4.1).

The losses are pure functions of tensors (log-probs in, per-example losses and detached diagnostics out), so tests
call them with hand-made numbers. The two `*_step_loss` functions are what the training loop calls: one forward
pass of the policy, then the loss and a dict of python-float metrics.

Every log-prob comes from the one helper `model.token_logprobs` (shared with PPO); a sequence's log-prob is its sum
over response tokens. Simplifications: the DPO reference is not a second model in memory but its log-probs, computed
once at the start of each HPA stage (docs/method.md §2.3, `reference_logps`); `dpo_step_loss(..., ref_model=...)` keeps a
live reference only to check that the two agree.
"""
import warnings

import torch
import torch.nn.functional as F

from data import pair_values

# -----------------------------------------------------------------------------
# Losses: pure functions of tensors


def sft_loss(token_logprobs, mask):
    """IFA loss (docs/method.md §1): mean token cross-entropy over response tokens, prompt tokens masked.

    token_logprobs: (B, T) log p(token | prefix) from model.token_logprobs; mask: (B, T) bool, True on response
    tokens (EOS included). Returns a scalar. The mean is over tokens, not sequences, so long answers weigh more.
    Example: token_logprobs [[0, -1, -2], [0, -3, 0]], mask [[F, T, T], [F, T, F]] -> (1 + 2 + 3) / 3 = 2.
    A batch with no response token warns and returns 0 (with a graph, so backward still works).
    """
    n_tokens = mask.sum()
    if n_tokens == 0:
        warnings.warn("sft_loss: the batch has no response tokens; the loss is 0 and teaches nothing")
    return -torch.where(mask, token_logprobs, 0.0).sum() / n_tokens.clamp(min=1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta, label_smoothing=0.0, ipo=False):
    """DPO loss per pair (docs/method.md §4.1), with conservative DPO (label smoothing) and IPO as options.

    Inputs: (B,) each, log-probs summed over response tokens of the policy π and the frozen reference π_ref,
    for the chosen y_w and the rejected y_l. beta: the KL strength β (0.1 by default in train.py).
    label_smoothing ε: the assumed share of flipped labels; ε = 0 is plain DPO, ε = 0.5 makes the labels carry
    no information (the loss is then minimal at z = 0, where the policy matches the reference).
    Returns (losses, chosen_rewards, rejected_rewards), each (B,); the rewards β·(log π − log π_ref) are detached.

        logits = (log π(y_w) − log π(y_l)) − (log π_ref(y_w) − log π_ref(y_l)),   z = β·logits
        DPO/cDPO: loss = −(1−ε)·log σ(z) − ε·log σ(−z)
        IPO:      loss = (logits − 1/(2β))²

    Example (β = 0.5, ε = 0): log π = (−1, −3), log π_ref = (−2, −2) -> logits = 2, z = 1,
    loss = log(1 + e^−1) ≈ 0.31326, chosen reward 0.5, rejected reward −0.5; with IPO, loss = (2 − 1)² = 1.
    """
    if ipo and label_smoothing:
        raise ValueError("label_smoothing applies to DPO only, not to IPO")
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2  # IPO, Azar et al. 2023 Eq. 17
    else:
        # DPO paper Eq. 7; label smoothing as in conservative DPO (Mitchell 2023, Eq. 3)
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


# -----------------------------------------------------------------------------
# The reference, cached once per HPA stage


@torch.no_grad()
def reference_logps(model, examples, batch_size, device):
    """The frozen reference's summed response log-probs for each HPA example, in data order: (N, 2) float32 on
    `device`, column 0 chosen, column 1 rejected.

    Call it on the model at the start of an HPA stage (docs/method.md §2.3: π_ref is that model) and index the result
    with the same example indices as the training batches. Right padding does not change a row's log-probs
    (causal attention), so the batching here need not match the training batches; other shapes only round
    differently (about 1e-6), which makes the first step's rewards/accuracy noise around ties rather than 0.
    """
    return pair_values(lambda tokens, mask: model.token_logprobs(tokens, mask).sum(-1), examples, batch_size, device)


# -----------------------------------------------------------------------------
# One training step's loss for each objective


def lm_step_loss(model, tokens):
    """Next-token loss on packed windows of text, tokens (B, T + 1): the pretraining of the tiny base."""
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    return loss, {"loss": loss.item()}


def ifa_step_loss(model, tokens, mask):
    """IFA loss on an `data.ifa_batch` (tokens, mask: (B, T)) -> (loss, {"loss"})."""
    loss = sft_loss(model.token_logprobs(tokens, mask), mask)
    return loss, {"loss": loss.item()}


def dpo_step_loss(model, tokens, mask, ref_logps=None, beta=0.1, label_smoothing=0.0, ipo=False, ref_model=None,
                  rpo_alpha=0.0):
    """DPO loss on an `data.hpa_batch` -> (loss, metrics); with rpo_alpha = α > 0, RPO's (docs/method.md §7.2):
    loss = mean DPO loss + α · sft_loss(chosen rows), the mean token NLL of the chosen answers (a mean over their
    tokens, as TRL's rpo_alpha), logged as nll_chosen.

    tokens, mask: (2B, T), rows 0..B-1 chosen and B..2B-1 rejected, so chosen and rejected share one forward
    pass. ref_logps: (B, 2) rows of `reference_logps` for these pairs. With ref_model given instead (and
    ref_logps None), the reference log-probs are computed live, to check the cache against. beta as in dpo_loss.
    Metrics (python floats, means over pairs): loss, rewards/chosen, rewards/rejected, rewards/margin and
    rewards/accuracy, the share of pairs whose chosen reward is strictly above the rejected one.
    """
    token_logps = model.token_logprobs(tokens, mask)  # (2B, T)
    logps = token_logps.sum(-1)  # (2B,)
    if ref_model is not None:
        with torch.no_grad():
            ref_logps = ref_model.token_logprobs(tokens, mask).sum(-1).view(2, -1).t()  # (B, 2)
    policy_chosen_logps, policy_rejected_logps = logps.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_logps[:, 0], ref_logps[:, 1], beta, label_smoothing, ipo)
    loss = losses.mean()
    margins = chosen_rewards - rejected_rewards
    metrics = {
        "loss": loss.item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margin": margins.mean().item(),
        "rewards/accuracy": (margins > 0).float().mean().item(),
    }
    if rpo_alpha:
        n = len(logps) // 2
        nll = sft_loss(token_logps[:n], mask[:n])
        loss = loss + rpo_alpha * nll
        metrics |= {"loss": loss.item(), "nll_chosen": nll.item()}
    return loss, metrics
