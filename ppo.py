"""PPO for the HPA stages, every detail visible: textbook RLHF PPO (docs/method.md §4.2); with
`--ppo-variant release`, the paper's release's critic-free variant (§4.3), which produced the paper's PPO numbers;
and with `--ppo-variant grpo`, GRPO (Shao et al. 2024; §4.4): K answers per prompt, advantages relative to the
group, the KL to π_ref in the loss, no critic.

One PPO iteration, as train.py runs it (the loop owns the optimizer, LR schedule, EWC penalty, clipping, DDP):

    state = StageState(cfg, seed, device)  # made once per stage: sampling generator, KL coefficient, reward queue
    ro, metrics = rollout(policy, ref_model, critic, reward_model, prompts, cfg, eos_id, pad_id, state.generator,
                          queue=state.queue)
    state.after_rollout(metrics["kl"], len(prompts))  # the adaptive KL coefficient moves, if there is one
    for epoch in range(cfg.epochs):
        for mb in minibatches(ro, cfg.minibatch_size, state.generator):
            loss, mb_metrics = minibatch_loss({"policy": policy, "critic": critic}, mb, cfg)
            ...stop the update when mb_metrics["approx_kl"] > cfg.target_kl

The textbook critic is a trainable copy of the reward model (`make_critic` says why); the reference is the frozen
model at the start of the stage (§2.3). Textbook PPO here is that of Ziegler et al. 2019 / Stiennon et al. 2020 /
Ouyang et al. 2022, simplified: one sampled response per prompt; the KL penalty uses the sampled tokens' log-probs
(the exact full-vocabulary KL is only reported); no reward whitening.

Shapes: B rollout batch, Tq prompt length (left-padded), Tr response length (right-padded), V vocab, D model dim.
"""

import contextlib
import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


@dataclass
class PPOConfig:
    # Reward shaping (§4.2)
    kl_coef: float = 0.2            # as stable as 0.05 and avoided the one-word exploit once (docs/design-notes.md)
    kl_estimator: str = "k1"        # "k1" or "k3", see kl_estimate
    eos_penalty: float | None = -1.0  # score given to responses that never emit EOS; None keeps the RM's score
    # GAE
    gamma: float = 1.0              # no discounting inside a 20-token episode
    lam: float = 0.95
    # Update
    clip: float = 0.2               # ε of the clipped surrogate
    vf_clip: float = 0.2            # clip of value changes, on the score's scale
    vf_coef: float = 0.1            # separate critic under Adam: mostly sets its share of the clipped grad norm
    ent_coef: float = 0.0           # entropy bonus; 0 is the RLHF norm: the KL penalty already holds π near π_ref
    epochs: int = 2                 # PPO epochs over each rollout batch
    minibatch_size: int = 32
    target_kl: float | None = None  # stop an update when the approximate KL(π_old‖π) of a minibatch passes this
    # Sampling
    max_new_tokens: int = 20
    temperature: float = 1.0        # §4.2; the ratio uses π's own log-probs, so any other value would be off-policy
    top_k: int = 0                  # 0: the whole vocabulary (textbook); the release samples with top-k 50, top-p 0.95
    top_p: float = 1.0
    # The release's variant (§4.3; `release_config`): no critic, a decayed sequence reward, queue whitening
    variant: str = "textbook"       # or "release"
    reward_gamma: float = 0.95      # γ of the release's per-position decay of the score
    reward_clip: float = 10.0       # the release clips the RM score to [-10, 10]
    absolute_positions: bool = False  # True: the release's quirk, the decay counts the left-padded prompt too
    # Adaptive KL controller (Ziegler et al. 2019), run by the loop: see AdaptiveKLController
    adaptive_kl: bool = False
    kl_target: float = 6.0          # target sequence KL (nats)
    kl_horizon: int = 10000         # episodes over which the coefficient may move by ±20%
    critic: bool = True             # a value network and GAE (textbook); the release has none
    queue_size: int = 0             # the release whitens with its last 1000 non-zero per-token rewards; 0: no queue
    # GRPO (Shao et al. 2024): K answers per prompt, advantages normalised within each prompt's group, no critic
    group_size: int = 1             # K; 1 for PPO

    def __post_init__(self):
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.temperature != 1.0:  # model.token_logprobs has no temperature, so π_old would not be the sampler
            raise ValueError(f"PPO samples at temperature 1 (docs/method.md §4.2), got {self.temperature}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if (self.group_size > 1) != (self.variant == "grpo"):
            raise ValueError(f"group_size {self.group_size}: GRPO samples K >= 2 answers per prompt, PPO one")


# What each variant sets apart from the defaults above: the one place a variant is defined. The release's (§4.3): its
# sampling (top-k 50, top-p 0.95), β = 0.1, one epoch over each rollout, no EOS penalty (it scores whatever was
# sampled), no critic, and whitening by a queue of its last 1000 rewards.
VARIANTS = {"textbook": {},
            "release": dict(variant="release", kl_coef=0.1, epochs=1, top_k=50, top_p=0.95, eos_penalty=None,
                            critic=False, queue_size=1000),
            # GRPO (Shao et al. 2024, DeepSeekMath §4.1): K = 4 answers per prompt, β = 0.04 on a KL term in the loss
            # (not in the reward), one pass over each rollout, no critic
            "grpo": dict(variant="grpo", kl_coef=0.04, kl_estimator="k3", epochs=1, critic=False, group_size=4)}


def release_config(**overrides):
    """The release's settings (VARIANTS), with `overrides` as in PPOConfig."""
    return PPOConfig(**VARIANTS["release"] | overrides)


class Rollout(NamedTuple):
    """One rollout batch. Invalid positions hold 0 in every float field (no fill values to remember).

    queries      (B, Tq)     long  prompt tokens, left-padded with pad_id
    responses    (B, Tr)     long  sampled tokens, cut after the first EOS, right-padded with pad_id
    tokens       (B, Tq+Tr)  long  cat(queries, responses)
    pad_mask     (B, Tq+Tr)  bool  True on real tokens (prompt and response)
    masks        (B, Tr)     bool  True on response tokens, up to and including EOS
    logprobs     (B, Tr)     float log π_old(responses[:, j] | everything before it)
    ref_logprobs (B, Tr)     float the same under the frozen reference (the stage's starting model, §2.3)
    values       (B, Tr)     float critic's value of the state before response token j
    rewards      (B, Tr)     float -kl_coef·kl on every response token, + the score on the last one
    advantages   (B, Tr)     float GAE, whitened over valid tokens
    returns      (B, Tr)     float GAE advantages (before whitening) + values: the critic's target
    scores       (B,)        float RM score at the last response token (eos_penalty if no EOS)
    The release's variant (§4.3) fills rewards with release_token_rewards, advantages with their queue-whitened
    values and scores with the RM score clipped to ±reward_clip; values and returns are 0 (no critic).

    Alignment, a 5-token example: prompt [bos] left-padded to Tq = 2, response [a, eos] right-padded to Tr = 3.

        column t of tokens   0     1     2             3                  4
        tokens               pad   bos   a             eos                pad
        pad_mask             F     T     T             T                  F
        column j of masks                0             1                  2
        masks                            T             T                  F
        logprobs[j]                      log π(a|bos)  log π(eos|bos a)   0
        values[j]                        V(bos)        V(bos a)           0
        rewards[j]                       -β·kl[0]      -β·kl[1] + score   0

    Response token j sits at column t = Tq + j and is predicted from column t - 1: `token_logprobs` gets masks
    padded on the left by Tq columns and does that shift itself, and values[j] is the critic's output at column
    Tq - 1 + j, the state before token j, where the LM's logits predict it. The score lands on the last True.
    """
    queries: torch.Tensor
    responses: torch.Tensor
    tokens: torch.Tensor
    pad_mask: torch.Tensor
    masks: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor


# --- pure functions of tensors ---------------------------------------------------------------------------------

def masked_mean(x, mask):
    """Mean of x over positions where mask is True, any shape."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x, mask):
    """Population variance of x over positions where mask is True."""
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def whiten(x, mask):
    """(x - mean) / std over valid tokens only (population variance); padded positions come back as 0."""
    return (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + 1e-8) * mask


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), vectorised over the batch.

    rewards, values, mask: (B, T); mask is 1 on right-padded response tokens. The value of the state after the
    last valid token is 0 (the episode ends there). Returns (advantages, returns), both (B, T), 0 where mask is 0;
    returns = advantages + values (§4.2).
    Worked example, one row, T = 2, γ = λ = 1: r = [0, 1], V = [0.5, 0.2] → δ = [0 + 0.2 - 0.5, 1 + 0 - 0.2]
    = [-0.3, 0.8], A = [-0.3 + 0.8, 0.8] = [0.5, 0.8], returns = [1.0, 1.0].
    """
    mask = mask.to(values.dtype)
    # Zeroing past the end makes every padded δ and A exactly 0, so the recursion needs no per-row lengths.
    rewards, values = rewards * mask, values * mask
    B, T = rewards.shape
    advantages = torch.zeros_like(values)
    last_gae = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]      # TD error δ_t
        last_gae = delta + gamma * lam * last_gae                      # A_t = δ_t + γλ A_{t+1}
        advantages[:, t] = last_gae
    return advantages * mask, (advantages + values) * mask


def kl_estimate(logprobs, ref_logprobs, estimator):
    """Per-token estimate of KL(π‖π_ref) from a token sampled from π (Schulman 2020, "Approximating KL").

    k1 = log p - log p_ref: unbiased, negative whenever the sample is likelier under the reference.
    k3 = (r - 1) - log r with r = p_ref / p: unbiased too, never negative (log r ≤ r - 1), and of lower variance
    while π stays close to π_ref.
    """
    log_ratio = ref_logprobs - logprobs                                # log r
    return -log_ratio if estimator == "k1" else torch.expm1(log_ratio) - log_ratio  # PPOConfig admits only these


def token_rewards(scores, kl, masks, kl_coef):
    """Per-token rewards (§4.2): -kl_coef·kl on every response token, plus the score on the last one.

    scores (B,), kl and masks (B, Tr) with masks right-padded; returns (B, Tr), 0 on padding.
    Example: masks = [T, T, F], kl = [0.1, -0.2, 0], kl_coef = 0.5, score = 2 → [-0.05, 0.1 + 2, 0].
    """
    rewards = -kl_coef * kl * masks
    last = masks.sum(1) - 1                                            # index of the last response token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss, mean over valid tokens.

    All inputs (B, T). Returns (loss, clipfrac, approx_kl): clipfrac is the share of tokens where the clipped
    term is the active one, approx_kl the k3 estimate of KL(π_old‖π) on the rollout's tokens (both detached).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)  # §4.2, PPO eq. 7: the pessimistic bound
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses_clipped > pg_losses).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def value_loss(values, old_values, returns, mask, vf_clip):
    """Clipped value loss (the PPO2 baselines form): 0.5·max((V - R)², (V_clipped - R)²), mean over valid tokens.

    V_clipped = V_old + clamp(V - V_old, -vf_clip, vf_clip) keeps the critic near its rollout-time values, as the
    surrogate keeps the policy near π_old. All inputs (B, T); returns a scalar.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -vf_clip, vf_clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (values_clipped - returns) ** 2), mask)  # §4.2


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over valid tokens: 1 is a perfect critic, 0 no better than a constant, < 0 worse."""
    return (1 - masked_var(returns - values, mask) / masked_var(returns, mask)).item()


# --- the release's variant (§4.3): no critic, a decayed sequence reward, a one-sided REINFORCE-like update ------

def release_token_rewards(scores, logprobs, ref_logprobs, masks, kl_coef, gamma, offset=0):
    """The release's per-token pseudo reward (§4.3) on response token j, 0 after the response:

        R_j = r·γ^(offset + j + 1) − kl_coef·max(0, log π_old(a_j) − log π_ref(a_j))

    scores (B,): r, the RM score, already clipped; logprobs, ref_logprobs, masks (B, Tr), masks right-padded.
    offset = 0 counts j from the response's first token (our default). offset = Tq − 1 is the release as written:
    its position is the log-prob's column in the left-padded prompt + response, so the same answer is rewarded
    less the longer its batch's padded prompt (§4.3, "the position quirk").
    Example: r = 2, γ = 0.5, offset 0, log π_old − log π_ref = [0.4, −0.3, 0], masks [T, T, F], kl_coef = 0.1:
    R = [2·0.5 − 0.1·0.4, 2·0.25 − 0, 0] = [0.96, 0.5, 0].
    """
    decay = gamma ** (offset + 1 + torch.arange(masks.shape[1], device=masks.device, dtype=logprobs.dtype))
    kl = (logprobs - ref_logprobs).clamp(min=0)
    return (scores[:, None].to(logprobs.dtype) * decay - kl_coef * kl) * masks


def whiten_with_queue(rewards, masks, queue, size):
    """The release's whitening (§4.3): append the batch's non-zero rewards on response tokens to the FIFO `queue`
    (1-D, oldest first; only its last `size` values are kept), then (R − mean) / (std + 1e-8) with the mean and
    population std of the updated queue. rewards, masks (B, Tr). Returns (whitened (B, Tr), 0 on padding; the new
    queue). The first batch of a stage is whitened by its own rewards (train.py starts each stage with an empty queue).
    Example, size 3: queue [1], R = [[2, 3]] → queue [1, 2, 3], mean 2, std √(2/3) → [[0, 1.2247]].
    """
    new = rewards[masks.bool() & (rewards != 0)].detach().float()
    queue = torch.cat([queue.to(new.device, torch.float32), new])[-size:]
    mean, std = queue.mean(), queue.std(correction=0)
    return ((rewards - mean) / (std + 1e-8) * masks).to(rewards.dtype), queue


def release_policy_loss(logprobs, advantages, mask):
    """The release's actor loss (§4.3), as released: the masked mean over response tokens of

        max(−A·log π(a), −A·clamp(log π(a), 0.8, 1.2))

    logprobs (B, T) of the current policy (with gradient), advantages (B, T) = the whitened R, mask (B, T); returns
    a scalar. The release clips `log π` where PPO clips the ratio π/π_old. Since log π ≤ 0, the clamp is always 0.8,
    a constant: a token with A > 0 contributes −A·log π, a REINFORCE gradient −A·∇log π, and a token with A < 0
    contributes the constant −0.8·A and no gradient at all. The update only raises tokens whose whitened reward is
    above the queue's mean; it never lowers one. There is no ratio, so nothing keeps π near π_old but one epoch.
    Example: log π = [−1, −2], A = [1, −1], both valid: (max(1, −0.8) + max(−2, 0.8)) / 2 = 0.9, and
    ∂loss/∂log π = [−0.5, 0].
    """
    return masked_mean(torch.max(-advantages * logprobs, -advantages * logprobs.clamp(0.8, 1.2)), mask)


# --- GRPO (Shao et al. 2024): K answers per prompt, advantages relative to the group, KL to π_ref in the loss ---

def group_advantages(scores, group_size, eps=1e-4):
    """GRPO's outcome advantages: each answer's score normalised within its prompt's group, the K = group_size
    consecutive rows sampled for one prompt: (r − mean of the group) / (std of the group + eps), the std with
    Bessel's correction and eps as in TRL's GRPOTrainer. scores (B,), B a multiple of K; returns (B,). A group whose
    answers all score the same gets 0: it teaches nothing. The group's mean replaces PPO's critic as the baseline.
    Example, K = 2: scores [1, 3, 2, 2] -> [−1/√2, 1/√2, 0, 0] (std √2 and 0; eps aside).
    """
    groups = scores.view(-1, group_size)
    mean, std = groups.mean(1, keepdim=True), groups.std(1, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def grpo_policy_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip, kl_coef):
    """GRPO's loss (DeepSeekMath, eq. 3 with outcome supervision), the negative of

        (1/B) Σ_i (1/|o_i|) Σ_t [ min(ρ_it·A_i, clip(ρ_it, 1 − ε, 1 + ε)·A_i) − β·KL_it ]

    with ρ_it = π(o_it)/π_old(o_it), A_i the answer's group advantage (on each of its tokens), and
    KL_it = π_ref/π − log(π_ref/π) − 1, the k3 estimate of KL(π‖π_ref) on the sampled token (Schulman 2020), whose
    gradient flows through log π. Each answer's tokens are averaged first, then the answers: a long answer weighs
    no more than a short one. All inputs (B, T), advantages A_i on every token of answer i. Returns (loss,
    clipfrac, approx_kl, kl): the last three detached, approx_kl the k3 estimate of KL(π_old‖π), kl the mean KL_it.
    Example, one answer of two tokens, log π = log π_old = [−1, −2], log π_ref = [−1, −1], A = 0.5, β = 0.1:
    ρ = 1, log(π_ref/π) = [0, 1], KL = [0, e − 2], so loss = −(0.5 − 0.1·(e − 2)/2) ≈ −0.46409.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    a = advantages.to(logprobs.dtype)
    surrogate = torch.min(ratio * a, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * a)
    log_ref_ratio = ref_logprobs - logprobs
    kl = torch.expm1(log_ref_ratio) - log_ref_ratio
    per_answer = ((surrogate - kl_coef * kl) * mask).sum(1) / mask.sum(1).clamp(min=1)
    loss = -per_answer.mean()
    with torch.no_grad():
        clipfrac = masked_mean((ratio * a > torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * a).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clipfrac, approx_kl, masked_mean(kl.detach(), mask)


class RewardQueue:
    """The release's FIFO of recent per-token rewards (§4.3), cfg.queue_size long; train.py makes a new one at every
    stage's start."""

    def __init__(self, size):
        self.size, self.values = size, torch.zeros(0)

    def whiten(self, rewards, masks):
        whitened, self.values = whiten_with_queue(rewards, masks, self.values, self.size)
        return whitened


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019): β ← β·(1 + clip(KL/KL_target - 1, ±0.2)·n/horizon),
    with KL the rollout's mean sequence KL and n its number of episodes. Use: see the module docstring."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl, n_steps):
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon
        return self.value


class StageState:
    """What a PPO stage carries from one rollout to the next, saved with the stage's progress: the sampling generator
    (seeded by the stage, on the policy's device), the KL coefficient cfg.kl_coef where the adaptive controller moved
    it (every rank passes it the same mean KL), and the release's reward queue (new at every stage's start)."""

    def __init__(self, cfg, seed, device):
        self.cfg, self.generator = cfg, torch.Generator(device=device).manual_seed(seed)
        self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl else None
        self.queue = RewardQueue(cfg.queue_size) if cfg.queue_size else None

    def after_rollout(self, kl, n_episodes):
        if self.kl_ctl is not None:
            self.cfg.kl_coef = self.kl_ctl.update(kl, n_episodes)

    def state_dict(self):
        return {"generator": self.generator.get_state(), "kl_coef": self.cfg.kl_coef,
                "queue": None if self.queue is None else self.queue.values}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.cfg.kl_coef = state["kl_coef"]
        if self.kl_ctl is not None:
            self.kl_ctl.value = self.cfg.kl_coef
        if self.queue is not None:
            self.queue.values = state["queue"]


# --- rollout: sample, score, shape rewards, advantages (§4.2) --------------------------------------------------

def make_critic(reward_model, copy_fn=copy.deepcopy):
    """The value network: a trainable copy of the reward model (Stiennon et al. 2020; Ouyang et al. 2022). `copy_fn`
    makes the copy (train.py passes one that works for sharded models, which cannot be deep-copied).

    Why the RM and not the policy plus a fresh head: the RM already reads prompt + response and outputs a number
    on the score's scale, so at the first rollout its values are close to the returns (above all at the last
    token, where the return is the score), and the first advantages are not noise from an untrained head. A
    separate network also keeps the value loss from pulling on the policy's weights."""
    return copy_fn(reward_model).train().requires_grad_(True)


def collate(prompts, responses, pad_id, device=None):
    """Lists of ids -> (queries, responses, tokens, pad_mask, masks) as in `Rollout` (see its 5-token example).

    Prompts are left-padded and responses right-padded, so every response starts at column Tq."""
    Tq, Tr = max(map(len, prompts)), max(map(len, responses))
    tokens = torch.full((len(prompts), Tq + Tr), pad_id, dtype=torch.long)
    pad_mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, Tq - len(p):Tq + len(r)] = torch.tensor(p + r)
        pad_mask[i, Tq - len(p):Tq + len(r)] = True
    tokens, pad_mask = tokens.to(device), pad_mask.to(device)
    return tokens[:, :Tq], tokens[:, Tq:], tokens, pad_mask, pad_mask[:, Tq:]


def response_distributions(model, tokens, pad_mask, masks):
    """model.next_token_logprobs at the N response tokens of tokens (the Rollout example), in masks.nonzero() order:
    (N, V) float32, the rows token_logprobs reads the sampled tokens' log-probs from."""
    b, j = masks.nonzero(as_tuple=True)
    return model.next_token_logprobs(tokens, (b, tokens.shape[1] - masks.shape[1] + j), pad_mask)  # column Tq + j


def at_responses(x, masks):
    """(N,) values at the response tokens, in masks.nonzero() order -> (B, Tr) float32, 0 on padding."""
    return torch.zeros(masks.shape, device=x.device).index_put(masks.nonzero(as_tuple=True), x.float())


def response_logprobs(model, tokens, pad_mask, masks, with_entropy=False):
    """model.token_logprobs read at the response columns of tokens (the Rollout example): (B, Tr), 0 on padding;
    with_entropy=True also returns the next-token entropy there, (B, Tr)."""
    Tq = tokens.shape[1] - masks.shape[1]
    out = model.token_logprobs(tokens, F.pad(masks, (Tq, 0), value=False), pad_mask, with_entropy=with_entropy)
    return tuple(x[:, Tq:] for x in out) if with_entropy else out[:, Tq:]


def response_values(critic, tokens, pad_mask, masks):
    """The critic's value of the state before each response token, i.e. its output one column to the left of the
    token (the Rollout example): (B, Tr), 0 on padding."""
    return critic.values(tokens, pad_mask)[:, -masks.shape[1] - 1:-1] * masks


@contextlib.contextmanager
def eval_mode(*models):
    """Put models in eval mode inside the block and give each back the mode it had."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@torch.no_grad()
def rollout(policy, ref_model, critic, reward_model, prompts, cfg, eos_id, pad_id, generator=None, end_of_turn=None,
            queue=None):
    """One rollout batch (§4.2) for prompts (list of B id lists, each bos + prompt). Returns (Rollout, metrics).

    ref_model is the frozen model at the start of the stage (§2.3); critic has the reward model's interface
    (`values(tokens, pad_mask) -> (B, T)`); generator is the torch.Generator of the sampling (on the policy's device).
    With cfg.variant "release" (§4.3) critic is None, queue is the stage's RewardQueue, and steps 4-5 are the
    release's: decayed sequence reward minus the clamped KL, whitened by the queue, as the advantage itself. With
    "grpo" critic is None, prompts holds each prompt cfg.group_size times in a row, and the advantage of every token
    of an answer is its score normalised within its prompt's group (`group_advantages`).
    end_of_turn (real data): ids -> the ids before the prompt template's end-of-turn marker ("\n\nHuman:") when
    the answer wrote one, else None. Such an answer ends there, closed with EOS: the reward model was trained on
    answers that end in EOS, and the policy learns to end its turn with EOS rather than to write the next one.
    """
    device = next(policy.parameters()).device
    release, grpo = cfg.variant == "release", cfg.variant == "grpo"
    with eval_mode(*(m for m in (policy, ref_model, critic, reward_model) if m is not None)):
        # 1. Sample with the KV cache. generate cuts each row after its first EOS (EOS included), so a row without
        #    EOS is one that ran into max_new_tokens: a truncated answer.
        sampled = policy.generate(prompts, cfg.max_new_tokens, temperature=cfg.temperature, eos_id=eos_id,
                                  generator=generator, top_k=cfg.top_k, top_p=cfg.top_p)
        if min(map(len, sampled)) == 0:
            raise ValueError("a prompt leaves no room for a response within max_seq_len")
        cuts = [end_of_turn(r[:-1] if r[-1] == eos_id else r) if end_of_turn else None for r in sampled]
        sampled = [r if cut is None else cut + [eos_id] for r, cut in zip(sampled, cuts)]
        queries, responses, tokens, pad_mask, masks = collate(prompts, sampled, pad_id, device)
        # 2. Score at the last response token; an answer that never ended gets eos_penalty instead.
        has_eos = torch.tensor([r[-1] == eos_id for r in sampled], device=device)
        rm_scores = reward_model.score(tokens, F.pad(masks, (queries.shape[1], 0), value=False), pad_mask)
        scores = rm_scores if cfg.eos_penalty is None else torch.where(has_eos, rm_scores, cfg.eos_penalty)
        # 3. Log-probs of the sampled tokens under π_old and π_ref, one pass each: their whole next-token
        #    distributions, from which the policy's entropy and the exact KL (a diagnostic beside the estimate in the
        #    reward, only reported) come too.
        dist, ref_dist = (response_distributions(m, tokens, pad_mask, masks) for m in (policy, ref_model))  # (N, V)
        sampled_ids = responses[masks][:, None]
        logprobs, ref_logprobs = (at_responses(d.gather(-1, sampled_ids).squeeze(-1), masks) for d in (dist, ref_dist))
        entropy = at_responses(-(dist.exp() * dist).sum(-1), masks)
        kl_full = at_responses((dist.exp() * (dist - ref_dist)).sum(-1), masks)
        del dist, ref_dist  # (N, V) each, a real vocabulary's gigabytes: not held through the critic's pass
        kl = kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator) * masks
        if release:  # 4-5 (§4.3): R_j = r·γ^(j+1) - β·max(0, k1), whitened by the queue, is the advantage
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
            offset = queries.shape[1] - 1 if cfg.absolute_positions else 0
            rewards = release_token_rewards(scores, logprobs, ref_logprobs, masks, cfg.kl_coef, cfg.reward_gamma,
                                            offset)
            advantages = queue.whiten(rewards, masks)
            values = returns = torch.zeros_like(rewards)  # no critic
        elif grpo:  # 4-5 (GRPO): prompts come in groups of K; an answer's score against its group's is its advantage
            rewards = token_rewards(scores, torch.zeros_like(kl), masks, 0.0)  # the score; the KL is in the loss
            advantages = group_advantages(scores, cfg.group_size)[:, None] * masks
            values = returns = torch.zeros_like(rewards)  # no critic
        else:
            # 4. Per-token rewards: -kl_coef·kl everywhere, + the score on the last token (§4.2).
            values = response_values(critic, tokens, pad_mask, masks)
            rewards = token_rewards(scores, kl, masks, cfg.kl_coef)
            # 5. Advantages by GAE; returns before whitening are the critic's targets; whiten advantages (§4.2).
            advantages, returns = compute_gae(rewards, values, masks, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, masks)
    ro = Rollout(queries, responses, tokens, pad_mask, masks, logprobs, ref_logprobs, values, rewards, advantages,
                 returns, scores)
    metrics = {
        "score": rm_scores.mean().item(),                              # the RM's, before the EOS penalty
        "reward": rewards.sum(1).mean().item(),                        # what PPO maximises: score - kl_coef·KL
        "kl": kl.sum(1).mean().item(),                                 # per sequence, the estimate in the reward
        "kl_true": kl_full.sum(1).mean().item(),                       # per sequence, exact over the vocabulary
        "entropy": masked_mean(entropy, masks).item(),                 # per token
        "length": masks.sum(1).float().mean().item(),
        "eos_share": has_eos.float().mean().item(),                    # end-of-turn answers included
        "end_of_turn_share": sum(cut is not None for cut in cuts) / len(cuts),
        "kl_coef": cfg.kl_coef,
    } | ({"positive_share": masked_mean((advantages > 0).float(), masks).item(),  # tokens that get a gradient
          "queue_mean": queue.values.mean().item(), "queue_std": queue.values.std(correction=0).item()} if release
         else {"tied_groups": (scores.view(-1, cfg.group_size).std(1) == 0).float().mean().item()} if grpo  # A = 0
         else {"explained_variance": explained_variance(values, returns, masks)})
    return ro, metrics


# --- update: the per-minibatch loss -----------------------------------------------------------------------------

def minibatches(rollout, minibatch_size, generator=None):
    """One epoch over a rollout: shuffled minibatches of rows (the last may be smaller), each a Rollout."""
    B = rollout.scores.shape[0]
    order = torch.randperm(B, generator=generator, device=generator.device if generator else "cpu")
    for i in range(0, B, minibatch_size):
        idx = order[i:i + minibatch_size].to(rollout.scores.device)
        yield Rollout(*(field[idx] for field in rollout))


def split(mb, sizes):
    """A minibatch (a Rollout) cut into consecutive micro-batches of these row counts, for gradient accumulation."""
    return [Rollout(*fields) for fields in zip(*(field.split(sizes) for field in mb))]


def release_loss(policy, mb):
    """The release's loss on a minibatch (§4.3): release_policy_loss on the current policy's log-probs; no critic,
    no entropy term. approx_kl (π_old‖π, k3) is only reported, and read by --target-kl."""
    logprobs, entropy = response_logprobs(policy, mb.tokens, mb.pad_mask, mb.masks, with_entropy=True)
    loss = release_policy_loss(logprobs, mb.advantages, mb.masks)
    with torch.no_grad():
        log_ratio = logprobs - mb.logprobs
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mb.masks)
    return loss, {"policy_loss": loss.item(), "approx_kl": approx_kl.item(),
                  "entropy": masked_mean(entropy, mb.masks).item()}


def grpo_loss(policy, mb, cfg):
    """GRPO's loss on a minibatch (a Rollout): grpo_policy_loss on the current policy's log-probs, the rollout's
    π_old and π_ref log-probs and group advantages; no critic."""
    logprobs, entropy = response_logprobs(policy, mb.tokens, mb.pad_mask, mb.masks, with_entropy=True)
    loss, clipfrac, approx_kl, kl = grpo_policy_loss(logprobs, mb.logprobs, mb.ref_logprobs, mb.advantages, mb.masks,
                                                     cfg.clip, cfg.kl_coef)
    return loss, {"policy_loss": loss.item(), "kl_ref": kl.item(), "clipfrac": clipfrac.item(),
                  "approx_kl": approx_kl.item(), "entropy": masked_mean(entropy, mb.masks).item()}


def minibatch_loss(modules, mb, cfg):
    """The loss on a minibatch of the stage's variant: `ppo_loss`, GRPO's `grpo_loss` or the release's
    `release_loss` (neither with a critic). modules: {"policy": ..., "critic": ...} (an nn.ModuleDict in train.py);
    returns (loss, metrics)."""
    if cfg.critic:
        return ppo_loss(modules["policy"], modules["critic"], mb, cfg)
    if cfg.variant == "grpo":
        return grpo_loss(modules["policy"], mb, cfg)
    return release_loss(modules["policy"], mb)


def ppo_loss(policy, critic, mb, cfg):
    """PPO loss on a minibatch (a Rollout): clipped surrogate + vf_coef·clipped value loss - ent_coef·entropy.

    Recomputes the log-probs (and entropy) of the rollout's tokens under the current policy and the current
    critic's values, with the same helpers as `rollout`. Returns (loss scalar, dict of float metrics)."""
    logprobs, entropy = response_logprobs(policy, mb.tokens, mb.pad_mask, mb.masks, with_entropy=True)
    values = response_values(critic, mb.tokens, mb.pad_mask, mb.masks)
    pg_loss, clipfrac, approx_kl = policy_loss(logprobs, mb.logprobs, mb.advantages, mb.masks, cfg.clip)
    vf_loss = value_loss(values, mb.values, mb.returns, mb.masks, cfg.vf_clip)
    mean_entropy = masked_mean(entropy, mb.masks)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * mean_entropy
    return loss, {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "clipfrac": clipfrac.item(),
                  "approx_kl": approx_kl.item(), "entropy": mean_entropy.item()}
