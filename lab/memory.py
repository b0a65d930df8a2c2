"""Memory per GPU on paper: the parameter count of a LLaMA config and what each GPU holds to train it with train.py.

    python -m lab.memory llama-2-7b --algo dpo --world 8 --micro-batch 1 --seq-len 512     # DDP and fully sharded
    python -m lab.memory llama-2-13b --algo ppo --world 8 --micro-batch 1 --seq-len 512
    python -m lab.memory path/to/meta_or_hf_dir_or_ours.pt --algo dpo --world 8 ...

It prints the plan (`plan`, then `format_plan`) under DDP and under train.py --fsdp, one after the other. Nothing
here builds a model or reads a weight tensor: `read_params` reads params.json, config.json or our checkpoint's
model_args, and `param_count` counts.

What the lines assume (P parameters, L layers, D dim, F FFN hidden, H heads, K key/value heads, Hd = D/H, V vocab;
B micro-batch, T seq_len, N = T/2 response tokens; a = 2 bytes under bf16 autocast, 4 in fp32):
- Training state as train.py keeps it under bf16 autocast: fp32 master weights, fp32 gradients, AdamW's exp_avg and
  exp_avg_sq in the weights' dtype (fp32), and the EWC anchor θ*, one copy of the weights in their dtype
  (docs/method.md §3.4; ewc.EWC holds it through every stage of an hbat run). With mixed_bf16=False everything is fp32 (train.py
  --dtype fp32).
- Frozen models (DPO's live reference, PPO's reference policy and reward model) are counted in bf16 (fp32 without
  mixed_bf16): they only run under autocast, so a run at this scale casts them.
- The reward model and PPO's critic (a trainable copy of it, ppo.make_critic) are the trunk, vocabulary head included
  (reward.py keeps it, unused), plus Linear(D, 1); the critic's vocabulary head gets no gradient and no AdamW state.
- Activations: the bytes autograd saves for backward, counted per op of model.py the way Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", §4.1) count them for GPT, whose 34·D bytes per
  token and layer (16-bit, with dropout masks) become `layer_bytes` here: an fp32 residual stream and norms,
  SwiGLU, autocast's own bf16 copy of the input of each Linear, and SDPA's flash / memory-efficient kernels (no T²
  scores). tests/test_memory.py checks the count against the tensors autograd saves on the CPU (CUDA's kernels save
  the same tensors; memory-efficient attention pads its logsumexp). The head scores only the N response positions
  (model.token_logprobs). DPO runs chosen and rejected together: 2B sequences.
- Autocast also keeps a bf16 copy of every Linear weight from the forward to the backward (its weight cache), and
  DDP all-reduces through buckets that hold a second copy of the gradients (gradient_as_bucket_view=False, the
  default train.py uses).
- fsdp=True: fully_shard (ZeRO-3) divides the training state, the anchor and the frozen models by world; activations
  are not divided. It assumes MixedPrecisionPolicy(param_dtype=bf16): each layer is all-gathered in bf16 and freed
  after use, replacing the autocast copies (plain autocast over fully_shard would keep them unsharded).
- PPO's rollout generates with a KV cache of B sequences of T tokens. The total adds every line, though the cache
  (rollout) and the activations (update) are never alive together: an upper bound by the smaller of the two.

Simplified: no CUDA context (~0.5-1 GiB), allocator fragmentation, NCCL buffers or AdamW's foreach temporaries; no
activation checkpointing; transients are left out (at the head's backward two fp32 (N, V) gradients, 8·V·N bytes;
PPO's padding mask, a (B, 1, T, T) bias per layer); so are the few floats per pair of DPO's cached reference.
"""
import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from model import ModelArgs

GiB = 2 ** 30

# Meta's params.json for Llama 2 (docs/formats.md §2.1) with vocab_size set (Meta writes -1) and the 4096-token context
LLAMA2 = {
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-5,
                       max_seq_len=4096),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, norm_eps=1e-5,
                        max_seq_len=4096),
    "llama-2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
                        ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=4096),
}


# --- the config ---------------------------------------------------------------------------------------------------

def hf_params(cfg: dict) -> dict:
    """A Hugging Face config.json (dict) -> ModelArgs keywords, mapped as checkpoint._load_hf maps them (a test
    checks that the two agree). multiple_of = intermediate_size makes ffn_hidden_dim equal it: Meta's rule rounds
    int(8·dim/3) up to a multiple of it, after a multiplier < 1 shrinks a smaller size."""
    dim, hidden = cfg["hidden_size"], cfg["intermediate_size"]
    base = int(2 * 4 * dim / 3)
    rope = cfg.get("rope_parameters") or {}  # newer writers move rope_theta in here
    return dict(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"], multiple_of=hidden,
                ffn_dim_multiplier=hidden / base if hidden < base else None, norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=cfg.get("rope_theta") or rope.get("rope_theta", 10000.0),
                max_seq_len=cfg.get("max_position_embeddings", 2048))


def read_params(path_or_name) -> dict:
    """ModelArgs keywords of a LLAMA2 name, our checkpoint file, a Meta directory (params.json) or a Hugging Face
    directory (config.json). Reads no weight tensor (our file is memory-mapped and only its model_args read)."""
    if str(path_or_name) in LLAMA2:
        return dict(LLAMA2[str(path_or_name)])
    path = Path(path_or_name)
    if path.is_file():
        params = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model_args"]
    elif (path / "params.json").is_file():
        params = json.loads((path / "params.json").read_text())
        if params.get("vocab_size", -1) < 0:  # the tokenizer decides; checkpoint.py reads the embedding instead
            print(f"note: {path}/params.json has vocab_size -1 (the tokenizer decides); assuming LLaMA's 32000",
                  file=sys.stderr)
            params["vocab_size"] = 32000
    elif (path / "config.json").is_file():
        params = hf_params(json.loads((path / "config.json").read_text()))
    else:
        raise FileNotFoundError(f"{path_or_name}: not one of {', '.join(LLAMA2)}, a checkpoint file, or a directory "
                                f"with params.json (Meta) or config.json (Hugging Face)")
    names = {f.name for f in fields(ModelArgs)}  # a Meta params.json may carry keys we have no use for
    return {k: v for k, v in params.items() if k in names}


def param_count(args: ModelArgs) -> int:
    """Exactly sum(p.numel() for p in Transformer(args).parameters()): untied embedding and output head, per layer
    wq and wo (D·D each), wk and wv (D·K·Hd each), SwiGLU's w1, w2, w3 (D·F each) and two RMSNorm gains, a final norm."""
    D, L, V, F = args.dim, args.n_layers, args.vocab_size, args.ffn_hidden_dim
    kv = (args.n_kv_heads or args.n_heads) * (D // args.n_heads)
    return 2 * V * D + D + L * (2 * D * D + 2 * D * kv + 3 * D * F + 2 * D)


# --- activations: what autograd keeps for backward ----------------------------------------------------------------

def layer_bytes(args: ModelArgs, mixed_bf16: bool = True) -> int:
    """Bytes one TransformerBlock saves for backward per token (a = 2 under bf16 autocast, 4 in fp32):
    (2 × 8D + 8) + (10D or 8D) + a·(2D + 2·K·Hd) + 4H + 4a·F; for Llama-2-7B under autocast 227,464 ≈ 55.5·D."""
    D, H, F = args.dim, args.n_heads, args.ffn_hidden_dim
    kv = (args.n_kv_heads or H) * (D // H)
    a = 2 if mixed_bf16 else 4
    norms = 2 * (4 * D + 4 * D + 4)  # each RMSNorm: its fp32 input (the residual stream, as the embedding is fp32),
    # its fp32 normalised output (for the gain's gradient) and rsqrt per token
    linear_inputs = 5 * a * D if mixed_bf16 else 2 * 4 * D  # autocast casts the normed input once per Linear
    # (wq, wk, wv, w1, w3); in fp32 wq/wk/wv share one input and w1/w3 another
    attention = a * (2 * D + 2 * kv) + 4 * H  # SDPA keeps q, k, v, its output (wo reads a view of it), fp32 logsumexp
    ffn = 4 * a * F  # silu's input and output, w3's output, w2's input
    return norms + linear_inputs + attention + ffn


def sequence_bytes(args: ModelArgs, seq_len: int, n_scored: int, mixed_bf16: bool = True, entropy: bool = False,
                   value_head: bool = False) -> int:
    """Bytes autograd saves for one sequence of seq_len tokens through model.token_logprobs (the output head on
    n_scored positions only: their hidden rows, in autocast's dtype, and the fp32 log-softmax, (N, V); entropy=True
    adds its exp, as ppo_loss asks) or, with value_head=True, through RewardModel.values (a Linear(D, 1) everywhere).
    Per token also the final norm and the int64 token id; per scored position four int64 indices (b, t, t - 1, the
    gathered token)."""
    a = 2 if mixed_bf16 else 4
    per_token = args.n_layers * layer_bytes(args, mixed_bf16) + (8 * args.dim + 4) + 8
    if value_head:
        return seq_len * (per_token + a * args.dim)
    per_scored = a * args.dim + 4 * args.vocab_size * (2 if entropy else 1) + 32
    return seq_len * per_token + n_scored * per_scored


# --- the plan -----------------------------------------------------------------------------------------------------

def plan(args: ModelArgs, algo: str, world: int, micro_batch: int, seq_len: int, mixed_bf16: bool = True,
         fsdp: bool = False, live_ref: bool = False, gpu_gb: float = 80.0) -> dict:
    """Memory per GPU for an HPA stage of an hbat run (the largest: IFA stages hold no reference and half the
    sequences of DPO). Returns {"params": P, "rows": [(what, GiB)], "total": GiB, "fits": total <= gpu_gb, ...};
    gpu_gb is in GiB (an "80 GB" A100 holds 80 GiB). The module docstring states what each line assumes."""
    if algo not in ("dpo", "ppo"):
        raise ValueError(f"algo must be 'dpo' or 'ppo', got {algo!r}")
    if min(world, micro_batch, seq_len) < 1:
        raise ValueError(f"world, micro_batch and seq_len must be >= 1, got {world}, {micro_batch}, {seq_len}")
    P, D, L, V = param_count(args), args.dim, args.n_layers, args.vocab_size
    kv = (args.n_kv_heads or args.n_heads) * (D // args.n_heads)
    a = 2 if mixed_bf16 else 4  # activations, the KV cache, autocast's copies and the frozen models
    frozen = "bf16" if mixed_bf16 else "fp32"
    shard = world if fsdp else 1
    n_resp = seq_len // 2
    rm = P + D + 1  # reward model = critic: trunk (vocabulary head included) + Linear(D, 1)
    per_layer = (P - 2 * V * D - D) // L
    rows = [("policy weights (fp32)", 4 * P / shard),
            ("policy gradients (fp32)", 4 * P / shard),
            ("policy AdamW moments (2 x fp32)", 8 * P / shard),
            ("EWC anchor θ* (fp32, docs/method.md §3.4)", 4 * P / shard)]
    cast = P - V * D - (2 * L + 1) * D  # the Linear weights autocast copies: not the embedding, not the norms
    trained = P  # parameters with requires_grad: what DDP's buckets hold
    if algo == "dpo":
        if live_ref:
            rows.append((f"live DPO reference ({frozen}, frozen)", a * P / shard))
        activations = [(f"activations: {2 * micro_batch} seq (chosen + rejected) x {seq_len}",
                        2 * micro_batch * sequence_bytes(args, seq_len, n_resp, mixed_bf16))]
    else:
        critic_trained = rm - V * D  # its vocabulary head is never called
        rows += [("critic weights (fp32)", 4 * rm / shard),
                 ("critic gradients (fp32)", 4 * critic_trained / shard),
                 ("critic AdamW moments (2 x fp32)", 8 * critic_trained / shard),
                 (f"reference policy ({frozen}, frozen)", a * P / shard),
                 (f"reward model ({frozen}, frozen)", a * rm / shard)]
        activations = [(f"activations: policy, {micro_batch} seq x {seq_len}",
                        micro_batch * sequence_bytes(args, seq_len, n_resp, mixed_bf16, entropy=True)),
                       (f"activations: critic, {micro_batch} seq x {seq_len}",
                        micro_batch * sequence_bytes(args, seq_len, n_resp, mixed_bf16, value_head=True)),
                       (f"KV cache for the rollout ({micro_batch} x {seq_len})",
                        2 * L * micro_batch * seq_len * kv * a)]
        cast += critic_trained - V * D - (2 * L + 1) * D  # the critic's Linears that run: trunk and value head
        trained += rm
    if fsdp:  # the root group (embedding, output head) stays gathered; one layer computes while the next arrives
        rows.append((f"FSDP all-gathered weights ({'bf16' if mixed_bf16 else 'fp32'}: root + 2 layers)",
                     a * (2 * V * D + 2 * per_layer) * (2 if algo == "ppo" else 1)))
    else:
        if mixed_bf16:
            rows.append(("autocast bf16 weight copies (kept for backward)", 2 * cast))
        if world > 1:
            rows.append(("DDP gradient buckets (fp32)", 4 * trained))
    rows += activations
    rows = [(name, b / GiB) for name, b in rows]
    total = sum(g for _, g in rows)
    how = (f"FSDP: training state and frozen models / {world}" if fsdp else
           "DDP: nothing sharded" if world > 1 else "one process")
    setup = (f"{algo.upper()} on {world} GPU{'s' if world > 1 else ''} ({how}), "
             f"micro-batch {micro_batch} x {seq_len} tokens, {'bf16 autocast' if mixed_bf16 else 'fp32'}"
             + (", live reference" if live_ref and algo == "dpo" else ""))
    return {"params": P, "rows": rows, "total": total, "fits": total <= gpu_gb, "gpu_gb": gpu_gb, "setup": setup}


def format_plan(result: dict, title: str | None = None) -> str:
    """The plan as a table: a header, the parameter count in billions, one line per row in GiB, the total and
    whether it fits."""
    width = max(len(name) for name, _ in result["rows"]) + 2
    lines = [f"{title + ': ' if title else ''}{result['setup']}", f"parameters: {result['params'] / 1e9:.2f} B"]
    lines += [f"  {name:<{width}}{gib:8.2f} GiB" for name, gib in result["rows"]]
    lines += [f"  {'-' * (width + 12)}", f"  {'total':<{width}}{result['total']:8.2f} GiB",
              f"fits in {result['gpu_gb']:g} GiB: {'yes' if result['fits'] else 'no'}"]
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Memory per GPU, on paper, of training a LLaMA config with train.py, "
                                "under DDP and fully sharded (--fsdp).")
    p.add_argument("model", help=f"one of {', '.join(LLAMA2)}, our .pt, a Meta or a Hugging Face directory")
    p.add_argument("--algo", choices=["dpo", "ppo"], default="dpo", help="the HPA objective")
    p.add_argument("--world", type=int, default=8, help="GPUs (processes)")
    p.add_argument("--micro-batch", type=int, default=1, help="examples (DPO: pairs) per GPU per forward: train.py's "
                   "--batch-size / (world x --grad-accum)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence, half of them response")
    p.add_argument("--fp32", action="store_true", help="train.py --dtype fp32 instead of bf16 autocast")
    p.add_argument("--live-ref", action="store_true", help="DPO: a live reference model instead of cached log-probs")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU in GiB")
    o = p.parse_args()
    try:
        margs = ModelArgs(**read_params(o.model))
    except (OSError, ValueError, KeyError) as e:
        print(f"lab.memory: error: {e}", file=sys.stderr)
        sys.exit(2)
    for fsdp in (False, True):
        print(format_plan(plan(margs, o.algo, o.world, o.micro_batch, o.seq_len, not o.fp32, fsdp, o.live_ref,
                               o.gpu_gb), title=o.model) + "\n")
