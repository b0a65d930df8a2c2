"""A LLaMA-style decoder-only transformer that trains, samples, and loads Meta and Hugging Face LLaMA checkpoints.

The architecture is Meta's llama/model.py: pre-norm blocks with RMSNorm, rotary position embeddings in Meta's
interleaved-pair convention, grouped-query attention, a SwiGLU feed-forward and an untied output head. Parameter
names are Meta's state-dict keys, so a Meta checkpoint loads without renaming; infra/checkpoint.py reads and writes the
file formats.

Simplified: no dropout, no tensor parallelism, no rotary scaling (Llama 3.1 `use_scaled_rope` / HF `rope_scaling`
are refused), and rotary angles are computed per call rather than read from a table, so a model has no buffers.

Shape letters, used throughout:
    B batch, T time (tokens in this call), Tp longest prompt, S cache length (Tp + new tokens), L keys attended,
    V vocab, D model dim, H query heads, K key/value heads, Hd head dim (D / H), N scored positions.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from infra import checkpoint


@dataclass
class ModelArgs:
    """Hyperparameters under Meta's params.json names; the defaults are Llama 2 7B."""
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None means n_heads (plain multi-head attention); Llama 2 70B uses 8
    vocab_size: int = 32000
    multiple_of: int = 256  # the FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # 1.3 for Llama 2 70B
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # generate stops here (Meta's cap); rotary itself has no table to outgrow

    def __post_init__(self):  # otherwise a bad split still runs, as a different model from the one asked for
        if self.dim % (2 * self.n_heads) or self.n_heads % (self.n_kv_heads or self.n_heads):
            raise ValueError(f"dim must split into n_heads heads of even size, n_heads into n_kv_heads groups: {self}")

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's FeedForward rule: 2/3 of 4·dim, times the multiplier, rounded up (11008 for 7B, 28672 for 70B)."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B or 1, T) long -> cos, sin (B or 1, T, 1, Hd/2) float32 of angle position·θ^(-2i/Hd) for pair i."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, Hd) in Meta's convention: pair i is (x[2i], x[2i+1]), read as one complex number.

    Computed in float32 and cast back, as Meta does. (HF's rotate_half pairs x[i] with x[i + Hd/2] instead, which is
    why HF checkpoints store wq/wk rows permuted; see checkpoint.permute_qk.)"""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, Hd/2) each
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def attention_mask(pad_mask: torch.Tensor) -> torch.Tensor:
    """pad_mask (B, T) bool, True on real tokens -> (B, 1, T, T) bool, True where query t may read key s.

    Query t reads the real keys s <= t. Each query also reads itself: a query with only padding before it (left
    padding) would otherwise have an empty row, which softmax turns into NaN on some backends; its output is unused."""
    T = pad_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=pad_mask.device).tril()
    itself = torch.eye(T, dtype=torch.bool, device=pad_mask.device)
    return ((causal & pad_mask[:, None, :]) | itself)[:, None]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None,
                top_k: int = 0) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): argmax at temperature 0, else a draw from the nucleus, the most likely
    tokens whose mass before each is <= top_p (so the top token always stays; top_p = 1 keeps all), among the
    top_k likeliest (0: all). As in Hugging Face's sampling, top-k cuts first and top-p sees the renormalised rest."""
    if temperature == 0:
        return logits.argmax(-1)
    p_sorted, order = (logits.float() / temperature).softmax(-1).sort(-1, descending=True)
    if 0 < top_k < p_sorted.shape[-1]:
        p_sorted[:, top_k:] = 0
        p_sorted /= p_sorted.sum(-1, keepdim=True)
    if top_p < 1.0:  # (at 1, rounding in cumsum could still drop the tail)
        p_sorted[p_sorted.cumsum(-1) - p_sorted > top_p] = 0  # multinomial renormalises what is left
    return order.gather(-1, torch.multinomial(p_sorted, 1, generator=generator)).squeeze(-1)


# --- the network ------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps) in float32, cast back to x's dtype, then times a learned gain (Meta's order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads or args.n_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        """x (B, T, D) -> (B, T, D). mask (B, 1, T, L) bool, True = may attend, or None for plain causal attention.

        With cache = (keys, values), each (B, K, S, Hd), this call's keys and values are written at [start, start + T)
        and the queries read cache[:start + T], so L = start + T."""
        B, T, _ = x.shape
        q = apply_rotary(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or K, T, Hd)
        if cache is not None:
            cache[0][:, :, start:start + T] = k
            cache[1][:, :, start:start + T] = v
            k, v = cache[0][:, :, :start + T], cache[1][:, :, :start + T]
        # enable_gqa: query head h reads key/value head h // (H / K), Meta's repeat_kv without materialising copies
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.checkpointing = False

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        if self.checkpointing and torch.is_grad_enabled() and cache is None:
            # keep only the block's input; backward runs the block again: one more forward, about a third more
            # compute, for activations of one (B, T, D) tensor per block instead of all its intermediates. Inside
            # forward, so that the recomputation runs where FSDP has gathered (and cast) this block's weights
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, mask, use_reentrant=False)
        return self._forward(x, cos, sin, mask, cache, start)

    def _forward(self, x, cos, sin, mask, cache=None, start=0):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2 init: residual-branch outputs shrink with depth so the residual stream stays O(1)
                deep = name.endswith(("wo.weight", "w2.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * args.n_layers) if deep else 0.02)

    def _trunk(self, tokens, cos, sin, mask, caches=None, start=0):
        """tokens (B, T) -> final-normed hidden states (B, T, D); caches: one (keys, values) pair per layer."""
        x = self.tok_embeddings(tokens)
        for layer, cache in zip(self.layers, caches or [None] * len(self.layers)):
            x = layer(x, cos, sin, mask, cache, start)
        return self.norm(x)

    @property
    def checkpointing(self) -> bool:
        """Activation checkpointing of every block in training (train.py --activation-checkpointing)."""
        return self.layers[0].checkpointing

    @checkpointing.setter
    def checkpointing(self, on: bool):
        for layer in self.layers:
            layer.checkpointing = on

    def hidden(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) long -> final-normed hidden states (B, T, D), for the output head or a scalar head.

        pad_mask (B, T) bool, True on real tokens. None means no padding or right padding only: causal attention
        already keeps real tokens from reading pads to their right. With it, a row's first real token has position 0
        and no query reads a padding key, so each sequence gets exactly what it gets unpadded."""
        if pad_mask is None:
            positions, mask = torch.arange(tokens.shape[1], device=tokens.device)[None], None
        else:
            positions, mask = (pad_mask.long().cumsum(-1) - 1).clamp(min=0), attention_mask(pad_mask)
        cos, sin = rotary(positions, self.args.dim // self.args.n_heads, self.args.rope_theta)
        return self._trunk(tokens, cos, sin, mask)

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) long -> logits (B, T, V) in the weights' dtype; see `hidden` for pad_mask."""
        return self.output(self.hidden(tokens, pad_mask))

    def next_token_logprobs(self, tokens: torch.Tensor, positions: tuple[torch.Tensor, torch.Tensor],
                            pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The whole next-token distribution log p(· | tokens[b, :t]) at N positions: (N, V) float32, row i the one
        token_logprobs reads tokens[b_i, t_i] from. positions: (b, t), (N,) long each, as mask.nonzero(as_tuple=True)
        gives them for a mask aligned with tokens (so t > 0: the first token has no prefix to be predicted from).
        Only these N rows go through the output head (never the full (B, T, V) logits), log-softmax in float32.
        Example: tokens [bos, a, b, eos, pad], mask [F, F, T, T, F]: 2 rows, from the hidden states at t = 1, 2."""
        b, t = positions
        if (t == 0).any():
            raise ValueError("mask[:, 0] must be False: the first token has no prefix to be predicted from")
        return self.output(self.hidden(tokens, pad_mask)[b, t - 1]).float().log_softmax(-1)

    def token_logprobs(self, tokens: torch.Tensor, mask: torch.Tensor, pad_mask: torch.Tensor | None = None,
                       with_entropy: bool = False):
        """out[b, t] = log p(tokens[b, t] | tokens[b, :t]) where mask[b, t], else 0: (B, T) float32; the
        log-prob helper of SFT, DPO and PPO (PPO's rollout gathers from next_token_logprobs itself). mask (B, T)
        bool marks the tokens to score (mask[:, 0] False). Example: tokens [bos, a, b, eos, pad], mask
        [F, F, T, T, F] scores b and eos. with_entropy=True also returns the entropy (B, T) of the whole next-token
        distribution at the same places."""
        b, t = mask.nonzero(as_tuple=True)  # (N,) each
        logp = self.next_token_logprobs(tokens, (b, t), pad_mask)  # (N, V)
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=logp.device)
        out = zeros.index_put((b, t), logp.gather(-1, tokens[b, t, None]).squeeze(-1))
        if not with_entropy:
            return out
        return out, zeros.index_put((b, t), -(logp.exp() * logp).sum(-1))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_id: int | None = None, generator: torch.Generator | None = None,
                 top_k: int = 0) -> list[list[int]]:
        """Continue each prompt; return only the new tokens per prompt, each list ending at eos_id (included) if it
        was emitted. Greedy at temperature 0, nucleus (and top-k) sampling otherwise (pass a seeded torch.Generator
        on the weights' device to reproduce a draw). Prompts are left-padded into one batch and decoded with a key/value
        cache preallocated for prompt + new tokens; the total never exceeds max_seq_len, as in Meta's generation."""
        if not prompts or min(map(len, prompts)) == 0:
            raise ValueError("generate needs at least one prompt, each of at least one token (e.g. bos)")
        B, Tp = len(prompts), max(map(len, prompts))
        if Tp > self.args.max_seq_len:
            raise ValueError(f"a prompt of {Tp} tokens is longer than max_seq_len {self.args.max_seq_len}")
        S = min(Tp + max_new_tokens, self.args.max_seq_len)
        weight = self.tok_embeddings.weight
        dev = weight.device
        tokens = torch.tensor([[0] * (Tp - len(p)) + list(p) for p in prompts], device=dev)  # (B, Tp) left-padded
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        key_valid = torch.ones(B, S, dtype=torch.bool, device=dev)  # False on left padding; new tokens are real
        key_valid[:, :Tp] = torch.arange(Tp, device=dev) >= (Tp - lengths)[:, None]
        cos, sin = rotary((key_valid.long().cumsum(-1) - 1).clamp(min=0), self.args.dim // self.args.n_heads,
                          self.args.rope_theta)  # (B, S, 1, Hd/2): every step only slices these
        attn = self.layers[0].attention
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else weight.dtype
        caches = [tuple(torch.empty(B, attn.n_kv_heads, S, attn.head_dim, dtype=dtype, device=dev) for _ in "kv")
                  for _ in self.layers]
        was_training = self.training
        self.eval()
        try:
            h = self._trunk(tokens, cos[:, :Tp], sin[:, :Tp], attention_mask(key_valid[:, :Tp]), caches, 0)
            new, done = [], torch.zeros(B, dtype=torch.bool, device=dev)
            for t in range(Tp, S):  # token t is sampled from the hidden state of token t - 1
                nxt = sample_next(self.output(h[:, -1]), temperature, top_p, generator, top_k)  # (B,)
                new.append(nxt)
                if eos_id is not None:
                    done |= nxt == eos_id
                    if done.all():  # the one host sync per token
                        break
                if t + 1 < S:
                    h = self._trunk(nxt[:, None], cos[:, t:t + 1], sin[:, t:t + 1], key_valid[:, None, None, :t + 1],
                                    caches, t)
        finally:
            self.train(was_training)
        rows = torch.stack(new, 1).tolist() if new else [[] for _ in prompts]
        # a finished row keeps being decoded with the others; everything after its first eos is dropped here
        return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in rows]

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None) -> "Transformer":
        """Load one of our model files (infra/checkpoint.py `save`), a Meta LLaMA directory (params.json +
        consolidated.*.pth) or a Hugging Face LLaMA directory (config.json + safetensors or .bin weights);
        infra/checkpoint.py reads the formats. Weights come back on CPU in dtype (float32 if None); move the model with
        .to(device)."""
        params, state = checkpoint.load(path)
        names = {f.name for f in fields(ModelArgs)}  # a Meta params.json may carry keys we have no use for
        with torch.device("meta"):  # no memory and no random init for weights that are about to be replaced
            model = cls(ModelArgs(**{k: v for k, v in params.items() if k in names}))
        expected = model.state_dict()
        if expected.keys() != state.keys():
            missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
            raise ValueError(f"{path}: missing tensors {missing[:3]}, unexpected tensors {extra[:3]}")
        for name, w in state.items():
            if w.shape != expected[name].shape or not w.is_floating_point():
                raise ValueError(f"{path}: tensor {name} is {w.dtype} {tuple(w.shape)}; this config needs a "
                                 f"floating-point {tuple(expected[name].shape)}")
        model.load_state_dict({n: w.to(dtype or torch.float32, copy=True) for n, w in state.items()}, assign=True)
        return model
