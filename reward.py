"""The reward model for PPO (docs/method.md §1, §4.2): the policy's trunk with a scalar head, trained once on all of D_HPA
with the Bradley–Terry loss and then kept fixed. The PPO critic starts as a copy of it (`values`).

The score of a response is the head's output at its last response token (EOS when the answer finished), minus an
`offset` that makes the mean score over the training responses 0 (`set_offset`): PPO adds the score to a KL
penalty, so kl_coef means the same thing whatever constant the Bradley–Terry loss (blind to shifts) left in.

Simplified: the trunk keeps its vocabulary head (`trunk.output`) so that any Transformer can be wrapped and saved
as is, but nothing here calls it: it gets no gradient and only costs its memory.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import pair_values
from infra import checkpoint
from model import ModelArgs, Transformer


def last_true_index(mask):
    """mask (B, T) bool -> (B,) long, the position of the last True in each row.

    Example: [[F, T, T, F], [F, T, F, F]] -> [2, 1]. A row with no True has no response to score: ValueError."""
    T = mask.shape[1]
    idx = torch.where(mask, torch.arange(T, device=mask.device), -1).max(-1).values
    if (idx < 0).any():
        raise ValueError("a row of the mask has no True: there is no response token to read the score at")
    return idx


class RewardModel(nn.Module):
    """trunk: a Transformer (usually a copy of the SFT model); its `hidden` states feed a Linear(D, 1) head."""

    def __init__(self, trunk: Transformer):
        super().__init__()
        self.args = trunk.args  # the trunk's config, which its checkpoint records
        self.trunk = trunk
        self.head = nn.Linear(trunk.args.dim, 1)
        self.register_buffer("offset", torch.zeros(()))  # set by set_offset; saved with the weights

    def values(self, tokens, pad_mask=None):
        """tokens (B, T) long -> (B, T) float32, the scalar head at every position, minus the offset. The PPO
        critic reads it at every response token; `score` reads it at the last one. pad_mask: as in model.hidden."""
        return self.head(self.trunk.hidden(tokens, pad_mask)).squeeze(-1).float() - self.offset

    def score(self, tokens, mask, pad_mask=None):
        """tokens, mask (B, T) (mask True on response tokens, as from data.hpa_batch) -> (B,) float32 scores read
        at each row's last response token, so whatever follows it (padding) cannot change the score."""
        return self.values(tokens, pad_mask).gather(1, last_true_index(mask)[:, None]).squeeze(1)

    @classmethod
    def from_pretrained(cls, path):
        """Load a reward model saved in our model-file layout (infra/checkpoint.py `save`: trunk, head and offset; on
        the CPU: move it with .to(device))."""
        params, state = checkpoint.load(path)
        with torch.device("meta"):  # no random init for weights that are about to be replaced
            rm = cls(Transformer(ModelArgs(**params)))
        rm.load_state_dict(state, assign=True)
        return rm


# -----------------------------------------------------------------------------
# Training and evaluation


def bradley_terry_loss(chosen_scores, rejected_scores):
    """(B,), (B,) -> (B,) losses −log σ(r_chosen − r_rejected) (docs/method.md §1; Bradley–Terry).
    Example: r_chosen = 2, r_rejected = 1 -> log(1 + e^−1) ≈ 0.3133; equal scores -> log 2."""
    return -F.logsigmoid(chosen_scores - rejected_scores)  # docs/method.md §1


def rm_step_loss(rm, tokens, mask):
    """Bradley–Terry loss on a data.hpa_batch (tokens, mask (2B, T); rows 0..B-1 chosen) -> (loss, metrics):
    loss and accuracy, the share of pairs whose chosen response scores strictly higher."""
    chosen_scores, rejected_scores = rm.score(tokens, mask).chunk(2)
    loss = bradley_terry_loss(chosen_scores, rejected_scores).mean()
    return loss, {"loss": loss.item(), "accuracy": (chosen_scores > rejected_scores).float().mean().item()}


@torch.no_grad()
def pair_scores(rm, examples, batch_size, device):
    """HPA examples -> (N, 2) float32 scores [chosen, rejected], in data order."""
    return pair_values(rm.score, examples, batch_size, device)


@torch.no_grad()
def set_offset(rm, examples, batch_size, device):
    """Set rm.offset so that the mean score over these (training) examples' chosen and rejected responses is 0.
    Returns the offset."""
    rm.offset.zero_()
    rm.offset.fill_(pair_scores(rm, examples, batch_size, device).mean())
    return rm.offset.item()


def pairwise_accuracy(rm, examples, batch_size, device):
    """Share of (held-out) pairs whose chosen response scores strictly higher than the rejected one."""
    scores = pair_scores(rm, examples, batch_size, device)
    return (scores[:, 0] > scores[:, 1]).float().mean().item()
