"""Speed of model.py, side by side with transformers' LlamaForCausalLM on the same weights, in one process.

    pip install transformers                          # for the side-by-side only; the core never imports it
    OMP_NUM_THREADS=1 python -m lab.bench --threads 1   # tiny config, about 1.5 minutes on one CPU core
    python -m lab.bench --threads 2 --pairs 15          # both cores (targets: training >= 1.1x, generation >= 3x)
    python -m lab.bench --config small --pairs 3        # dim 512, 8 layers, vocab 32000 (58M params, slow on CPU)
    python -m lab.bench --profile                       # top ops of a training step and a generate call, each side
    python -m lab.bench --compile                       # ours with every block compiled (train.py --compile)

What it measures, each on random weights (speed does not depend on what they hold):
  train     one step, forward + backward + AdamW on a batch of 8 x 256 tokens, next-token cross-entropy at every
            position (float32 logits, F.cross_entropy, the same code for both models); tokens/s = 8·256 / step time.
  generate  8 prompts of 32 random tokens, 96 new tokens each, greedy, no eos, KV cache: ours model.generate, theirs
            generate(do_sample=False, min/max_new_tokens=96, use_cache=True); new tokens/s = 8·96 / call time
            (the prompt pass is inside the call, so it is timed but not counted).
  dpo       ours only: dpo.dpo_step_loss + backward + AdamW on 4 pairs of 256-token rows (8 rows, so the same tokens
            as a training step), with reference log-probs cached once by dpo.reference_logps vs computed live by a
            frozen copy of the model (ref_model=...); pairs/s.
  matmul    the fp32 matmul peak, (1024 x 1024) @ (1024 x 1024) at the same thread count, flops/s.

The machines are noisy (+-20-40% between runs minutes apart), so every measurement is a round robin in one process:
each round times one call of every contender (the matmul peak included), in an order that rotates from round to
round, after one untimed warm-up call each. Reported: per-round ratios (ours speed / theirs speed, median [min, max]),
each side's median speed, and MFU = model flops/s / the matmul peak of the same round (median over rounds). Model
flops count matmuls only: N = parameters of every weight matrix except the embedding table (a lookup, not a matmul);
training 6·N per token plus causal attention 6·L·D·T (QKᵀ and AV, half of PaLM's 12·L·D·T); generation 2·N per new
token (attention over the cache and the prompt pass, 32 tokens per 96 new ones, left out: an underestimate).
Also printed: the median minor page faults per call. On CPU each is a fresh 4 KiB page from the OS, because glibc
hands big blocks back after every use (the 8 x 256 x V float32 logits are 32 MiB); that is time outside any op.

Peak memory, per contender, over one extra call after the timed rounds: on CUDA max_memory_allocated minus what was
allocated before the call; on CPU (Linux) the growth of the resident set's high-water mark (VmHWM, reset through
/proc/self/clear_refs, after malloc_trim so memory freed by the previous contender does not hide this one's).
The CPU figure includes allocator slack, so compare it between contenders rather than read it as tensor bytes.
"""
import argparse
import ctypes
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import dpo
from data import hpa_batch
from infra import checkpoint
from model import ModelArgs, Transformer

CONFIGS = {
    # int(8 * 256 / 3) = 682, rounded up to a multiple of 16: FFN 688
    "tiny": ModelArgs(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=4096, multiple_of=16, max_seq_len=512),
    # int(8 * 512 / 3) = 1365 -> FFN 1376
    "small": ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=32, max_seq_len=512),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # What to run
    p.add_argument("--config", default="tiny", choices=list(CONFIGS), help="model size (tiny: 6.5M params)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    p.add_argument("--pairs", type=int, default=10, help="timed rounds per measurement (after one warm-up each)")
    p.add_argument("--compile", action="store_true", help="compile each of our blocks, as train.py --compile does "
                   "(compilation happens in the untimed warm-up calls and is reported apart)")
    p.add_argument("--no-reference", action="store_true", help="time ours only, even if transformers is importable")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, profile 2 training steps and 1 generate call of each side")
    p.add_argument("--atol", type=float, default=1e-4, help="max |logit difference| allowed between ours and theirs")
    # Shapes: a tiny config, so that a run takes seconds on a laptop CPU
    p.add_argument("--batch", type=int, default=8, help="sequences per training step / prompts per generate call")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (T)")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per generation prompt")
    p.add_argument("--new-tokens", type=int, default=96, help="tokens generated per prompt")
    p.add_argument("--dpo-prompt-len", type=int, default=64, help="prompt tokens of each DPO row (rest: response)")
    args = p.parse_args()
    if args.batch % 2:
        p.error("--batch must be even: a DPO batch holds batch/2 pairs, chosen and rejected rows")
    if args.prompt_len + args.new_tokens > CONFIGS[args.config].max_seq_len:
        p.error(f"--prompt-len + --new-tokens exceeds max_seq_len {CONFIGS[args.config].max_seq_len}")
    if not 0 < args.dpo_prompt_len < args.seq_len:
        p.error("--dpo-prompt-len must be in (0, --seq-len)")
    return args


# -----------------------------------------------------------------------------
# Timing and memory


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def round_robin(fns: dict, rounds: int, device: str) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Seconds per call of each fn, and the minor page faults during it: `rounds` values each. One untimed warm-up
    call each, then every round calls all fns once, starting one further along each round, so that no contender
    always runs first (or right after the same other one). On CPU a page fault is a fresh page the allocator got
    from the OS (big blocks go back to it after each use): time spent outside any op."""
    names = list(fns)
    for fn in fns.values():
        fn()
    times, faults = {n: [] for n in names}, {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            faults_before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            fns[n]()
            sync(device)
            times[n].append(time.perf_counter() - start)
            faults[n].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    return times, faults


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def peak_memory(fn, device: str) -> float | None:
    """Peak memory one call of fn adds (MiB): the CUDA allocator's peak, or on Linux the CPU resident high-water
    mark; None where neither is available."""
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync(device)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, else it absorbs this call's allocations
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            before = _status_kib("VmRSS")
            fn()
            peak = (_status_kib("VmHWM") - before) / 1024
        except OSError:
            peak = None
    return peak


def matmul_peak(device: str, n: int = 1024, reps: int = 4):
    """A timed fn doing `reps` fp32 (n x n) @ (n x n) matmuls, and the flops of one call."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return (lambda: [a @ b for _ in range(reps)]), 2 * n**3 * reps


def summary(values) -> str:
    return f"{statistics.median(values):.2f}x [{min(values):.2f}, {max(values):.2f}]"


# -----------------------------------------------------------------------------
# The contenders


def load_reference(model: Transformer, device: str):
    """transformers' LlamaForCausalLM holding model's weights (through checkpoint.export_hf), float32, SDPA; or None
    with a message when transformers is not importable."""
    try:
        import transformers
        from transformers import LlamaForCausalLM
    except ImportError:
        print("transformers is not importable: timing ours only (pip install transformers for the side-by-side)")
        return None
    with tempfile.TemporaryDirectory() as d:
        checkpoint.export_hf(model, d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").float().to(device)
    hf.generation_config.pad_token_id = 0  # else every generate call warns that it is missing
    print(f"reference: transformers {transformers.__version__} LlamaForCausalLM, attn_implementation "
          f"{hf.config._attn_implementation}")
    return hf


def check_logits(model, hf, V: int, device: str, atol: float) -> None:
    tokens = torch.randint(0, V, (2, 64), device=device)
    with torch.no_grad():
        diff = (model(tokens) - hf(input_ids=tokens).logits).abs().max().item()
    print(f"logits agree: max |ours - theirs| = {diff:.2e} (atol {atol:g})")
    if not diff <= atol:
        sys.exit("the two models disagree, so their speeds are not comparable; stopping")


def train_step_fn(logits_of, params, tokens):
    """One training step on tokens (B, T + 1): forward on tokens[:, :-1], cross-entropy against tokens[:, 1:]."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        logits = logits_of(tokens[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def dpo_fns(model, args, device):
    """The two DPO steps (cached reference log-probs, live reference model) on one batch of batch/2 pairs."""
    V, Tp, Tr = model.args.vocab_size, args.dpo_prompt_len, args.seq_len - args.dpo_prompt_len
    g = torch.Generator().manual_seed(1)
    examples = [tuple(torch.randint(1, V, (n,), generator=g).tolist() for n in (Tp, Tr, Tr))
                for _ in range(args.batch // 2)]
    tokens, mask = (x.to(device) for x in hpa_batch(examples))  # (2B, T)
    start = time.perf_counter()
    ref_logps = dpo.reference_logps(model, examples, args.batch // 2, device)  # once per HPA stage in training
    sync(device)
    print(f"dpo.reference_logps for the batch: {(time.perf_counter() - start) * 1e3:.0f} ms, once per stage")
    ref_model = Transformer(model.args).to(device)  # not a deepcopy: compiled blocks would share their code
    ref_model.load_state_dict(model.state_dict())
    ref_model.eval().requires_grad_(False)
    if args.compile:
        for layer in ref_model.layers:
            layer.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step(**ref):
        loss, _ = dpo.dpo_step_loss(model, tokens, mask, beta=0.1, **ref)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"cached": lambda: step(ref_logps=ref_logps), "live": lambda: step(ref_logps=None, ref_model=ref_model)}


# -----------------------------------------------------------------------------
# Reporting


def report(title, section, work, unit, flops_per_unit, ours="ours", theirs="theirs"):
    """Print each side's median speed, MFU, page faults and peak memory, and the per-round speed ratio ours / theirs.
    section: timed_section's result; work: units (tokens, pairs) per call; flops_per_unit None: no MFU."""
    times, faults, mem, mm_flops = section
    peak = [mm_flops / t for t in times["matmul"]]
    print(f"{title}")
    for name in (ours, theirs):
        if name not in times:
            continue
        speed = [work / t for t in times[name]]
        mfu = [s * flops_per_unit / p for s, p in zip(speed, peak)] if flops_per_unit else None
        line = f"  {name:7s} {statistics.median(speed):10.1f} {unit}  ({statistics.median(times[name]) * 1e3:7.1f} ms)"
        if mfu:
            line += f"  MFU {100 * statistics.median(mfu):5.1f}%"
        line += f"  {statistics.median(faults[name]):6.0f} faults"
        line += f"  peak mem +{mem[name]:.0f} MiB" if mem[name] is not None else "  peak mem n/a"
        print(line)
    if theirs in times:
        ratios = [t_theirs / t_ours for t_ours, t_theirs in zip(times[ours], times[theirs])]
        print(f"  {ours} / {theirs} speed, per round: {summary(ratios)} (median [min, max] over {len(ratios)} rounds)")
    return ratios if theirs in times else None


def timed_section(fns, args, mm, mm_flops):
    """Round robin of fns and the matmul peak, then one more call of each fn for its peak memory."""
    times, faults = round_robin({**fns, "matmul": mm}, args.pairs, args.device)
    return times, faults, {n: peak_memory(fn, args.device) for n, fn in fns.items()}, mm_flops


def profile(train, generate):
    """Print the top ops by self time of 2 training steps and 1 generate call of each contender."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    for what, fns, reps in (("training step", train, 2), ("generate call", generate, 1)):
        for name, fn in fns.items():
            fn()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(reps):
                    fn()
            print(f"--- {name}, {reps} x {what}, top ops by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    torch.manual_seed(0)
    model = Transformer(CONFIGS[args.config]).to(device)
    a, V = model.args, model.args.vocab_size
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "tok_embeddings.weight")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; config {args.config}: "
          f"{n_params / 1e6:.2f}M params, {n_matmul / 1e6:.2f}M in matmuls")
    hf = None if args.no_reference else load_reference(model, device)
    if hf is not None:
        check_logits(model, hf, V, device, args.atol)

    tokens = torch.randint(0, V, (args.batch, args.seq_len + 1), device=device)
    prompts = torch.randint(0, V, (args.batch, args.prompt_len), device=device)
    if args.compile:
        for layer in model.layers:
            layer.compile()
        start = time.perf_counter()
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)
        model.generate(prompts.tolist(), args.new_tokens)
        sync(device)
        print(f"compiling our blocks for training and generation: {time.perf_counter() - start:.1f} s (untimed)")
    train = {"ours": train_step_fn(model, model.parameters(), tokens)}
    generate = {"ours": lambda: model.generate(prompts.tolist(), args.new_tokens)}
    if hf is not None:
        hf.train()  # from_pretrained returns it in eval mode; ours is in train mode (neither has dropout)
        train["theirs"] = train_step_fn(lambda x: hf(input_ids=x).logits, hf.parameters(), tokens)
        generate["theirs"] = lambda: hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                 use_cache=True)
    if args.profile:
        return profile(train, generate)
    mm, mm_flops = matmul_peak(device)

    # 1. Training
    tokens_per_step = args.batch * args.seq_len
    train_flops = 6 * n_matmul + 6 * a.n_layers * a.dim * args.seq_len
    section = timed_section(train, args, mm, mm_flops)
    peaks = [mm_flops / t for t in section[0]["matmul"]]
    print(f"\nmatmul peak (fp32 1024^3, {torch.get_num_threads()} threads): median {statistics.median(peaks) / 1e9:.1f}"
          f" GFLOP/s, max {max(peaks) / 1e9:.1f} (during the training rounds)")
    print(f"model flops: training {train_flops / 1e6:.1f} MFLOP/token (6N + causal attention), generation "
          f"{2 * n_matmul / 1e6:.1f} MFLOP/token (2N)\n")
    train_ratio = report(f"train, {args.batch} x {args.seq_len} tokens, forward + backward + AdamW", section,
                         tokens_per_step, "tok/s", train_flops)

    # 2. Generation
    if hf is not None:  # greedy on the same weights: the same tokens, unless two logits are a float-rounding tie
        hf.eval()
        ours_out = torch.tensor(model.generate(prompts.tolist(), args.new_tokens), device=device)
        theirs_out = generate["theirs"]()[:, args.prompt_len:]
        print(f"\ngreedy tokens identical in {(ours_out == theirs_out).all(-1).sum().item()}/{args.batch} rows "
              f"(theirs made {theirs_out.shape[1]} new tokens per row)")
    gen_ratio = report(f"generate, {args.batch} prompts x {args.prompt_len} tokens + {args.new_tokens} new, greedy",
                       timed_section(generate, args, mm, mm_flops), args.batch * args.new_tokens, "new tok/s",
                       2 * n_matmul)

    # 3. DPO: cached reference log-probs vs a live reference model
    hf = train = generate = None  # frees the reference model and both optimizers' state
    print()
    report(f"dpo, {args.batch // 2} pairs x {args.seq_len} tokens, forward + backward + AdamW",
           timed_section(dpo_fns(model, args, device), args, mm, mm_flops), args.batch // 2, "pairs/s", None,
           ours="cached", theirs="live")

    if train_ratio:
        verdict = ["met" if statistics.median(r) >= target else "MISSED" for r, target in ((train_ratio, 1.1),
                                                                                          (gen_ratio, 3))]
        print(f"\ntargets (for tiny on 2 CPU cores): training >= 1.1x: {verdict[0]}; "
              f"generation >= 3x: {verdict[1]}")


if __name__ == "__main__":
    main()
