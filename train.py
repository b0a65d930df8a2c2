"""
Hybrid Alignment Training: the one training loop.

    python train.py --algo dpo                    # the small-scale reproduction on the embedded world
    python train.py --algo ppo                    # the same with a reward model and PPO
    python train.py --algo dpo --preset smoke     # the whole pipeline in seconds
    torchrun --nproc_per_node 2 train.py --algo dpo --preset smoke            # DDP
    torchrun --nproc_per_node 8 train.py --fsdp --model /data/llama-2-7b ...  # sharded (parallel.py); README has it all

A run: tokenizer -> base model -> (PPO only) a reward model trained once on D_HPA -> each schedule of hbat.py from
the same base -> greedy evaluation on held-out prompts -> OUT/results.json and a side-by-side table. Every stage runs
the same loop (`optimize`): set lr -> loss (+ EWC penalty) -> backward -> clip -> step. `--algo` only picks which loss
the HPA stages call. After every stage a checkpoint is written atomically; re-running the same command with the same
--out resumes after the last completed stage and ends with the same numbers (all randomness is drawn from generators
seeded per stage, so nothing but the weights and the EWC accumulators needs restoring) on the same device and
thread count: training is chaotic enough that float rounding alone moves single runs (README, "Results").
"""
import argparse
import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import data
import dpo
import evaluate
import ewc as ewc_lib
import hbat
import memory
import parallel
import ppo
import reward
from checkpoint import atomic_save, atomic_write, export_hf
from model import ModelArgs, Transformer

# -----------------------------------------------------------------------------
# flags. Those marked "preset" take their value from --preset unless given.

PRESETS = {
    # the reproduction (HBAT.md §6): sizes and rates from the feasibility run of §6.1 / §6.2
    "default": dict(n_ifa=1200, n_hpa=1200, n_test=300, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                    pretrain_steps=1500, pretrain_batch=64, batch_size=32, epochs_ifa=2, epochs_hpa=2,
                    lr_ifa=2e-4, lr_hpa=2e-4, rm_epochs=2, ppo_epochs=2, rollout_batch=64, minibatch=32,
                    max_new_tokens=24, ifa_styled=0.0),
    # the whole pipeline in seconds, for tests and a first look
    "smoke": dict(n_ifa=64, n_hpa=64, n_test=16, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  pretrain_steps=30, pretrain_batch=16, batch_size=8, epochs_ifa=1, epochs_hpa=1,
                  lr_ifa=1e-3, lr_hpa=1e-3, rm_epochs=1, ppo_epochs=1, rollout_batch=16, minibatch=8,
                  max_new_tokens=12, ifa_styled=0.0),
}
# §6.2: 3 passes over the prompts, policy lr 3e-4; and 10% of the demonstrations in the style, since PPO can only
# reinforce what it samples: with none, the SFT policy samples no styled answer at all (README, "PPO")
PPO_OVERRIDES = dict(epochs_hpa=3, lr_hpa=3e-4, ifa_styled=0.1)


def die(message, code=2):
    """Bad input ends the run with one line and exit code 2 (a failed run: 1), never a traceback."""
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; one says why
        print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        die(message)


def get_args(argv=None):
    p = ArgumentParser(description="Hybrid Alignment Training (Hbat) and its baselines.")
    a = p.add_argument
    # what to run
    a("--algo", choices=["dpo", "ppo"], default="dpo", help="HPA objective: DPO on pairs, or PPO against a reward model")
    a("--schedule", default="both", help="comma-separated schedules from hbat.py (two-stage, hbat, multi-task); "
      "'both' = two-stage,hbat (the reproduction)")
    a("--preset", choices=list(PRESETS), default="default", help="sizes and rates for flags marked 'preset'")
    a("--out", default="out", help="output dir: results.json, metrics.jsonl, checkpoints; re-running resumes")
    a("--overwrite", action="store_true", help="start afresh in an --out whose saved config differs")
    a("--seed", type=int, default=0, help="training seed: splits, shuffles, heads, sampling")
    a("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    a("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 autocast on CUDA, fp32 on CPU")
    a("--fsdp", action="store_true", help="under torchrun, shard every model over the ranks (FSDP2 fully_shard: "
      "weights, gradients, AdamW state and the EWC anchor take 1/world each) instead of DDP's full copies")
    a("--compile", action="store_true", help="torch.compile each transformer block (pays off for long runs: the "
      "first steps of every new shape compile)")
    a("--activation-checkpointing", action="store_true", help="recompute each block in backward instead of keeping "
      "its activations: about a third more compute for much less memory")
    a("--cache-dir", default=os.path.expanduser("~/.cache/hbat"), help="where the tokenizer and tiny base are cached")
    # data: the embedded world (HBAT.md §6) unless files are given
    a("--ifa-data", help="IFA demonstrations (JSONL prompt/response, or Alpaca/TL;DR files)")
    a("--hpa-data", help="HPA pairs (JSONL prompt/chosen/rejected, or HH-RLHF/TL;DR/TRL files)")
    a("--test-data", help="held-out prompts with references (IFA format); default: the last --n-test IFA records")
    a("--n-ifa", type=int, help="preset: demonstrations in the embedded world")
    a("--n-hpa", type=int, help="preset: preference pairs in the embedded world")
    a("--n-test", type=int, help="preset: held-out evaluation prompts")
    a("--alignment-tax", type=float, default=0.5, help="c: how often annotators prefer a stylish wrong answer (0..1)")
    a("--world-seed", type=int, default=0, help="seed of the embedded world (kept fixed across --seed)")
    a("--ifa-styled", type=float, help="preset: share of the world's demonstrations written in the polite style "
      "(default 0; 0.1 under --algo ppo, which can only reinforce a style its samples show)")
    a("--max-seq-len", type=int, default=128, help="longest prompt+response; longer prompts keep their end")
    # model
    a("--model", help="base model: our .pt, a Meta or a Hugging Face LLaMA dir; default: a tiny base pretrained here")
    a("--tokenizer", help="sentencepiece tokenizer.model (default: next to --model, or trained on the world)")
    a("--dim", type=int, help="preset: tiny base width")
    a("--n-layers", type=int, help="preset: tiny base depth")
    a("--n-heads", type=int, help="preset: attention heads")
    a("--n-kv-heads", type=int, help="preset: key/value heads (GQA)")
    a("--pretrain-steps", type=int, help="preset: steps of next-token pretraining of the tiny base on the corpus")
    a("--pretrain-batch", type=int, help="preset: sequences per pretraining step")
    # schedule (HBAT.md §2)
    a("--n-splits", type=int, default=4, help="N: subsets of D_IFA and D_HPA that hbat alternates over (§2.2)")
    a("--epochs-ifa", type=int, help="preset: E_IFA, passes over each IFA subset")
    a("--epochs-hpa", type=int, help="preset: E_HPA, passes over each HPA subset")
    # optimisation (every stage restarts AdamW and its warm-up + linear decay, §2.2 and §6.1)
    a("--batch-size", type=int, help="preset: global batch (examples or pairs) per step")
    a("--lr-ifa", type=float, help="preset: peak learning rate of IFA stages")
    a("--lr-hpa", type=float, help="preset: peak learning rate of HPA stages")
    a("--warmup", type=float, default=0.1, help="share of each stage's steps spent warming up the lr")
    a("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    # EWC (HBAT.md §3)
    a("--ewc", choices=["modified", "original", "none", "freeze", "random"], default="modified",
      help="how hbat protects the other objective: modified EWC (§3.3), original EWC (§3.5), freeze/random (§3.6)")
    a("--ewc-norm", choices=["max", "softmax"], default="max", help="normalisation of the importance (§3.3)")
    a("--ewc-scale", type=float, default=1.0, help="s in softmax(s^2 * Omega); the release uses 1e10")
    a("--ewc-elementwise", action="store_true", help="importance per element instead of per tensor (§3.3)")
    a("--f-max", type=float, default=1.0, help="F_max of HPA stages: the largest per-tensor weight of the penalty "
      "that holds what IFA learned (default from the study in README.md)")
    a("--f-max-ifa", type=float, default=10.0, help="F_max of IFA stages: holds what HPA learned (the release: 100)")
    a("--ewc-lambda", type=float, default=1.0, help="lambda inside the square of the penalty (§3.3)")
    # DPO (HBAT.md §4.1)
    a("--beta", type=float, default=0.1, help="DPO beta: strength of the implicit KL to the reference")
    a("--label-smoothing", type=float, default=0.0, help="conservative DPO: assumed share of flipped labels")
    a("--ipo", action="store_true", help="IPO loss instead of DPO")
    a("--live-ref", action="store_true", help="keep a live reference model instead of cached log-probs")
    # PPO (HBAT.md §4.2)
    a("--kl-coef", type=float, default=0.2, help="PPO: weight of the per-token KL penalty to the reference")
    a("--rm-epochs", type=int, help="preset: reward-model epochs over D_HPA")
    a("--ppo-epochs", type=int, help="preset: PPO epochs over each rollout batch")
    a("--rollout-batch", type=int, help="preset: prompts per rollout")
    a("--minibatch", type=int, help="preset: PPO minibatch size")
    a("--target-kl", type=float, default=None, help="PPO: stop an update early when approx KL passes this")
    a("--kl-target", type=float, default=None, help="PPO: adapt --kl-coef towards this KL per sequence "
      "(Ziegler et al. 2019); default: a fixed --kl-coef")
    # evaluation
    a("--max-new-tokens", type=int, help="preset: cap on generated tokens (eval and PPO rollouts)")
    a("--eval-every", type=int, default=0, help="also evaluate every K optimizer steps (0: after each stage only)")
    a("--dry-run", action="store_true", help="print the parameter count and memory per GPU of this run (--model "
      "may also be llama-2-7b/13b/70b) for --gpus GPUs, then exit")
    a("--gpus", type=int, default=int(os.environ.get("WORLD_SIZE", 1)), help="--dry-run: GPUs to plan for")
    a("--gpu-gb", type=float, default=80.0, help="--dry-run: memory of one GPU in GiB")
    a("--judge", help="real data: a saved reward model (e.g. OUT/reward_model.pt of a PPO run) that scores the answers "
      "(hpa_score, win rates); default: the run's reward model under PPO, none under DPO")
    a("--export-hf", action="store_true", help="also write each aligned model to OUT/<schedule>-hf in the Hugging "
      "Face LLaMA layout (config.json, model.safetensors, tokenizer.model)")
    args = p.parse_args(argv)
    if args.ifa_styled is not None and args.ifa_data:
        p.error("--ifa-styled applies to the embedded world, not to --ifa-data")
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, PPO_OVERRIDES.get(k, v) if args.algo == "ppo" and args.preset == "default" else v)
    check_args(args, p)
    return args


def check_args(args, p):
    """Reject impossible combinations at once, naming the flag (STYLE.md principle 15)."""
    schedules = hbat.SCHEDULES[:2] if args.schedule == "both" else tuple(args.schedule.split(","))
    for s in schedules:
        if s not in hbat.SCHEDULES:
            p.error(f"--schedule: unknown schedule {s!r} (choose from both, {', '.join(hbat.SCHEDULES)})")
    args.schedules = schedules
    if args.n_splits < 1:
        p.error(f"--n-splits must be >= 1, got {args.n_splits}")
    for flag in ("f_max", "f_max_ifa", "ewc_lambda", "beta", "kl_coef", "lr_ifa", "lr_hpa"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if not 0 <= args.alignment_tax <= 1:
        p.error(f"--alignment-tax must be in [0, 1], got {args.alignment_tax}")
    if not 0 <= args.ifa_styled <= 1:
        p.error(f"--ifa-styled must be in [0, 1], got {args.ifa_styled}")
    if not 0 <= args.label_smoothing < 0.5:
        p.error(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.ipo and args.label_smoothing:
        p.error("--label-smoothing applies to DPO only, not with --ipo")
    if args.algo == "ppo" and "multi-task" in schedules:
        p.error("--schedule multi-task needs an offline HPA loss: use it with --algo dpo")
    if bool(args.ifa_data) != bool(args.hpa_data):
        p.error("--ifa-data and --hpa-data go together")
    if args.ifa_data and not args.model:
        p.error("--ifa-data/--hpa-data need --model (a tiny base is only pretrained on the embedded world)")
    if args.judge and not args.ifa_data:
        p.error("--judge applies to --ifa-data/--hpa-data runs (the embedded world has its gold judge)")
    if args.fsdp and not args.dry_run:
        if args.ewc == "original" or args.ewc_elementwise:
            p.error("--fsdp supports per-tensor importance only: not with --ewc original or --ewc-elementwise")
        if "RANK" not in os.environ:
            p.error("--fsdp needs torchrun, e.g. torchrun --nproc_per_node 8 train.py --fsdp ...")
    for flag in ("ifa_data", "hpa_data", "test_data", "model", "tokenizer", "judge"):
        path = getattr(args, flag)
        if path and not os.path.exists(path) and not (args.dry_run and path in memory.LLAMA2):
            p.error(f"--{flag.replace('_', '-')}: no such file or directory: {path}")


# -----------------------------------------------------------------------------
# evaluation (where models live, one process, DDP or FSDP: parallel.py)


def evaluate_model(args, model, *rest):
    """evaluate.evaluate, run by rank 0; under FSDP by every rank (each takes part in the gathers)."""
    with parallel.gathered(args, model):
        return evaluate.evaluate(model, *rest)


# -----------------------------------------------------------------------------
# the one optimisation loop


def lr_at(step, total, warmup_share):
    """Linear warm-up then linear decay to 0 (§6.1: a constant lr made scores jump between checkpoints)."""
    warmup = max(1, int(warmup_share * total))
    return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def optimize(args, module, loss_fn, batches, n_steps, lr, name, ewc=None, log=None, on_batch=None):
    """Run one stage: for each batch, `on_batch` may turn it into several updates (PPO: epochs x minibatches of a
    rollout); each update is a list of --grad-accum micro-batches, and one AdamW step on the sum of their
    loss_fn(module, micro) + the EWC penalty of the stage.
    Returns (the mean of the logged metrics over the stage, the number of optimizer steps taken)."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    policy = module.policy if isinstance(module, nn.ModuleDict) else module  # PPO also trains a critic: no EWC on it
    model = parallel.wrap(args, module)
    step, sums, count = 0, {}, 0
    bar = tqdm(total=n_steps, desc=name, leave=False, position=2, disable=None if args.rank == 0 else True)
    for batch in batches:
        updates = on_batch(batch) if on_batch else [batch]
        for update in updates:
            for g in opt.param_groups:
                g["lr"] = lr * lr_at(step, n_steps, args.warmup)
            metrics = {}
            for i, micro in enumerate(update):
                # gradients are synced across ranks on the last micro-step only, set before the forward
                with parallel.grad_sync(model, i == args.grad_accum - 1), args.autocast():
                    loss, m = model(loss_fn, micro)
                    if ewc is not None and ewc.active:
                        penalty = ewc.penalty(policy)  # under FSDP this rank's part of it: the log sums them
                        loss = loss + penalty
                        m["ewc_penalty"] = penalty.item() * (args.world if args.fsdp else 1)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{name}: non-finite loss {loss.item()} at step {step}")
                (loss / args.grad_accum).backward()
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + v / args.grad_accum
            metrics["grad_norm"] = parallel.clip_grad_norm(params, args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ewc is not None:
                ewc.after_step(policy)
            metrics = parallel.mean_over_ranks(metrics, args)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            if log:
                log(step, metrics)
            step += 1
            bar.update(1)
            if on_batch and args.target_kl and metrics.get("approx_kl", 0.0) > args.target_kl:
                break  # PPO: the policy moved too far from the rollout's; skip the rest of this rollout's updates
    bar.close()
    return {k: v / max(count, 1) for k, v in sums.items()}, count


def split_micro(rollout, n):
    """Split a PPO minibatch (a Rollout, every field (B, ...)) into n micro-batches along dim 0."""
    return [type(rollout)(*fields) for fields in zip(*(f.chunk(n) for f in rollout))]


# -----------------------------------------------------------------------------
# losses the loop calls: (module, batch) -> (loss, metrics). `--algo` picks the HPA one.


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    return loss, {"loss": loss.item()}


def ifa_loss(model, batch):
    _, tokens, mask = batch
    return dpo.ifa_step_loss(model, tokens, mask)


def make_dpo_loss(args, ref_logps, ref_model):
    def hpa_loss(model, batch):
        idx, tokens, mask = batch
        return dpo.dpo_step_loss(model, tokens, mask, None if ref_model is not None else ref_logps[idx], args.beta,
                                 args.label_smoothing, ipo=args.ipo, ref_model=ref_model)
    return hpa_loss


def make_multi_loss(hpa_loss):
    def multi_loss(model, batch):
        ifa_batch, hpa_batch = batch
        l1, m1 = ifa_loss(model, ifa_batch)
        l2, m2 = hpa_loss(model, hpa_batch)
        return l1 + l2, {"ifa/" + k: v for k, v in m1.items()} | {"hpa/" + k: v for k, v in m2.items()}
    return multi_loss


def ppo_loss(cfg):
    def loss(modules, mb):
        return ppo.ppo_loss(modules.policy, modules.critic, mb, cfg)
    return loss


def batches_of(examples, batch_size, epochs, collate, seed, args):
    """For `epochs` seeded shuffles of `examples` (this rank's shard of a stage's data: each rank owns
    subset[rank::world] for the whole stage, so cached reference log-probs are per rank too), yield each batch as a
    list of --grad-accum micro-batches (indices, *collate(examples)). Micro-batches are collated separately so that
    a DPO micro-batch keeps each chosen row with its rejected row."""
    g = torch.Generator().manual_seed(seed)
    local = batch_size // args.world
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=g).tolist()
        for start in range(0, len(order) - local + 1, local):  # drop the ragged last batch: equal steps per rank
            idx = order[start:start + local]
            micro = len(idx) // args.grad_accum
            yield [(torch.tensor(idx[j:j + micro]),) + tuple(t.to(args.device) for t in
                                                             collate([examples[i] for i in idx[j:j + micro]]))
                   for j in range(0, len(idx), micro)]


def n_batches(n_local, batch_size, epochs, args):
    return epochs * (n_local // (batch_size // args.world))


# -----------------------------------------------------------------------------
# run bookkeeping: config check, atomic checkpoints, metrics log


def stage_seed(args, *parts):
    return int(hashlib.sha256(repr((args.seed,) + parts).encode()).hexdigest()[:8], 16)


def save_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


RUN_KEYS_IGNORED = {"overwrite", "out", "device", "cache_dir", "rank", "world", "autocast", "eval_every", "export_hf",
                    "dry_run", "gpus", "gpu_gb", "fsdp", "bf16", "evaluates", "compile", "activation_checkpointing"}


def check_out_dir(args):
    """Refuse to resume into an --out written by a different configuration (unless --overwrite)."""
    config = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in RUN_KEYS_IGNORED}))
    path = os.path.join(args.out, "config.json")
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    parallel.barrier(args)  # every rank has read the old config before rank 0 replaces it
    if old is not None and old != config:
        if not args.overwrite:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            die(f"{args.out} holds a run with other settings ({', '.join(diff)}); use another --out or --overwrite")
        if args.rank == 0:
            for name in os.listdir(args.out):
                if name.endswith((".pt", ".jsonl", ".json")):
                    os.remove(os.path.join(args.out, name))
    if args.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        save_json(path, config)
    parallel.barrier(args)


class MetricsLog:
    """OUT/metrics.jsonl, one row per optimizer step. Rows of stages that did not complete are dropped on resume."""

    def __init__(self, args):
        self.path, self.on = os.path.join(args.out, "metrics.jsonl"), args.rank == 0

    def keep_only(self, done):  # done: {schedule: number of completed stages}
        if not (self.on and os.path.exists(self.path)):
            return
        rows = []
        with open(self.path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last row, torn by a kill
                if r["schedule"] not in done or r["stage_index"] < done[r["schedule"]]:
                    rows.append(r)
        atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))

    def write(self, row):
        if self.on:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# -----------------------------------------------------------------------------
# task and base model


def load_task(args):
    """Tokenizer, tokenised D_IFA / D_HPA, held-out test records, and the judge (the world's gold preference, or
    None for real data)."""
    if args.ifa_data:
        model_dir = os.path.abspath(args.model if os.path.isdir(args.model) else os.path.dirname(args.model))
        # Meta's download keeps tokenizer.model beside the llama-2-7b/ folder, Hugging Face's inside it
        found = [p for p in (os.path.join(d, "tokenizer.model") for d in (model_dir, os.path.dirname(model_dir)))
                 if os.path.exists(p)]
        if not (args.tokenizer or found):
            raise data.DataError(f"no tokenizer.model in or beside {model_dir}: give --tokenizer")
        tok = data.Tokenizer.load(args.tokenizer or found[0])
        ifa = data.load_records(args.ifa_data, kind="ifa")
        hpa = data.load_records(args.hpa_data, kind="hpa")
        if not args.test_data and len(ifa) <= args.n_test:
            raise data.DataError(f"{args.ifa_data}: {len(ifa)} demonstrations leave none for training after "
                                 f"--n-test {args.n_test}; lower --n-test or give --test-data")
        test = data.load_records(args.test_data, kind="ifa") if args.test_data else ifa[-args.n_test:]
        ifa = ifa if args.test_data else ifa[:-args.n_test]
        test = [{"prompt": r["prompt"], "reference": r["response"]} for r in test]
        world, corpus = None, None
    else:
        world = data.make_world(seed=args.world_seed, n_ifa=args.n_ifa, n_hpa=args.n_hpa, n_test=args.n_test,
                                alignment_tax=args.alignment_tax, ifa_styled_fraction=args.ifa_styled)
        ifa, hpa, test, corpus = world.ifa, world.hpa, world.test, world.corpus
        if args.rank == 0:
            tok = data.train_tokenizer(world.tokenizer_texts(), cache_dir=args.cache_dir)
        parallel.barrier(args)
        tok = data.train_tokenizer(world.tokenizer_texts(), cache_dir=args.cache_dir)
    ifa_ex = data.tokenize_ifa(ifa, tok, args.max_seq_len)
    hpa_ex = data.tokenize_hpa(hpa, tok, args.max_seq_len)
    return tok, ifa_ex, hpa_ex, test, world, corpus


def base_model(args, tok, corpus, log):
    """--model if given; else the tiny base for the embedded world, pretrained once on its unlabeled corpus
    (next-token loss on packed windows) and cached under --cache-dir keyed by everything it depends on."""
    device = "cpu" if args.fsdp else args.device  # under FSDP the base stays whole on the CPU; copies are placed
    if args.model:
        return Transformer.from_pretrained(args.model).to(device)
    margs = ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      vocab_size=tok.vocab_size, multiple_of=16, max_seq_len=args.max_seq_len)
    stream = torch.tensor([t for text in corpus for t in [tok.bos_id] + tok.encode(text) + [tok.eos_id]])
    block = min(64, args.max_seq_len)
    key = hashlib.sha256(repr((vars(margs), args.pretrain_steps, args.pretrain_batch, block, args.world_seed,
                               stream.sum().item(), len(stream))).encode()).hexdigest()[:16]
    path = os.path.join(args.cache_dir, f"base-{key}.pt")
    if not os.path.exists(path):
        torch.manual_seed(args.world_seed)
        model = parallel.place(args, Transformer(margs))
        g = torch.Generator().manual_seed(args.world_seed)

        def windows():  # the same global batches whatever the world size: each rank takes its rows of them
            for _ in range(args.pretrain_steps):
                starts = torch.randint(len(stream) - block - 1, (args.pretrain_batch,), generator=g)[args.rank::args.world]
                yield list(torch.stack([stream[s:s + block + 1] for s in starts.tolist()]).to(args.device)
                           .chunk(args.grad_accum))

        m, _ = optimize(args, model, lm_loss, windows(), args.pretrain_steps, 1e-3, "pretrain",
                     log=lambda step, metrics: log({"schedule": "base", "stage": "pretrain", "stage_index": 0,
                                                    "step": step, **metrics}))
        state = parallel.full_state(args, model)
        if args.rank == 0:
            tqdm.write(f"pretrained the tiny base: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                       f"params, final loss {m['loss']:.3f}, cached at {path}")
            checkpoint.save(asdict(margs), state, path)
        parallel.barrier(args)
    return Transformer.from_pretrained(path).to(device)


def train_reward_model(args, base, hpa_ex, log):
    """§1: the reward model is trained once on D_HPA (Bradley–Terry, scalar head at the last response token) and
    kept fixed; PPO then uses only D_HPA's prompts. A tenth of the pairs is held out to measure its accuracy."""
    path = os.path.join(args.out, "reward_model.pt")
    n_val = max(1, len(hpa_ex) // 10)
    train_ex, val_ex = hpa_ex[:-n_val], hpa_ex[-n_val:]
    if not os.path.exists(path):
        torch.manual_seed(stage_seed(args, "rm"))
        rm = parallel.place(args, reward.RewardModel(copy.deepcopy(base)))
        local = train_ex[args.rank::args.world]
        optimize(args, rm, lambda m, b: reward.rm_step_loss(m, b[1], b[2]),
                 batches_of(local, args.batch_size, args.rm_epochs, data.hpa_batch, stage_seed(args, "rm"), args),
                 n_batches(len(local), args.batch_size, args.rm_epochs, args), args.lr_ifa, "reward model",
                 log=lambda step, m: log({"schedule": "reward", "stage": "RM", "stage_index": 0, "step": step, **m}))
        reward.set_offset(rm, train_ex, args.batch_size, args.device)
        state = parallel.full_state(args, rm)
        if args.rank == 0:
            checkpoint.save(asdict(rm.args), state, path)  # reward.save_reward_model's layout
        parallel.barrier(args)
    rm = parallel.place(args, reward.RewardModel.from_pretrained(path)).eval().requires_grad_(False)
    acc = reward.pairwise_accuracy(rm, val_ex, args.batch_size, args.device)
    if args.rank == 0:
        tqdm.write(f"reward model: held-out pairwise accuracy {acc:.3f} on {len(val_ex)} pairs")
    return rm, acc


# -----------------------------------------------------------------------------
# one schedule: walk its stages (hbat.py), one `optimize` each, checkpoint after each


def run_stage(args, stage, model, sets, ewc, rm, tok, log, fresh):
    """Build the batches and the loss of one stage, then optimize. Returns the stage's mean metrics."""
    ifa_local, hpa_local = (shard_of(sets[kind][stage.subset], args) for kind in ("ifa", "hpa"))
    seed = stage_seed(args, stage.name, stage.kind)
    torch.manual_seed(seed)
    if stage.kind == "ifa":
        batches = batches_of(ifa_local, args.batch_size, stage.epochs, data.ifa_batch, seed, args)
        n = n_batches(len(ifa_local), args.batch_size, stage.epochs, args)
        return optimize(args, model, ifa_loss, batches, n, args.lr_ifa, stage.name, ewc, log)
    if args.algo == "ppo" and stage.kind == "hpa":
        return run_ppo_stage(args, stage, model, hpa_local, ewc, rm, tok, seed, log, fresh)
    # §2.3: DPO's reference is the model at the start of the stage; its log-probs are computed once, here
    ref_model = parallel.copy_of(args, model, fresh).eval().requires_grad_(False) if args.live_ref else None
    with args.autocast():  # the precision of the training step, so that the first step's ratio is exactly 1
        ref_logps = None if args.live_ref else dpo.reference_logps(model, hpa_local, args.batch_size, args.device)
    hpa_loss = make_dpo_loss(args, ref_logps, ref_model)
    hpa_batches = batches_of(hpa_local, args.batch_size, args.epochs_hpa if stage.kind == "multi" else stage.epochs,
                             data.hpa_batch, seed + 1, args)
    if stage.kind == "hpa":
        n = n_batches(len(hpa_local), args.batch_size, stage.epochs, args)
        return optimize(args, model, hpa_loss, hpa_batches, n, args.lr_hpa, stage.name, ewc, log)
    # multi-task (§2.4): pair every IFA batch with an HPA batch, cycling the shorter list
    n = n_batches(len(ifa_local), args.batch_size, stage.epochs, args)
    hpa_list = list(hpa_batches)
    pairs = (list(zip(b, hpa_list[i % len(hpa_list)])) for i, b in
             enumerate(batches_of(ifa_local, args.batch_size, stage.epochs, data.ifa_batch, seed, args)))
    return optimize(args, model, make_multi_loss(hpa_loss), pairs, n, args.lr_ifa, stage.name, ewc, log)


def run_ppo_stage(args, stage, model, hpa_local, ewc, rm, tok, seed, log, fresh):
    """§4.2: each batch of prompts becomes a rollout, and each rollout cfg.epochs x minibatches of updates.
    The KL reference is the model at the start of the stage (§2.3); the critic starts from the reward model."""
    cfg = ppo.PPOConfig(kl_coef=args.kl_coef, epochs=args.ppo_epochs, minibatch_size=args.minibatch // args.world,
                        max_new_tokens=args.max_new_tokens, target_kl=args.target_kl,
                        **(dict(adaptive_kl=True, kl_target=args.kl_target) if args.kl_target else {}))
    ref_model = parallel.copy_of(args, model, fresh).eval().requires_grad_(False)
    critic = ppo.make_critic(rm, copy_fn=lambda m: parallel.copy_of(args, m, lambda: reward.RewardModel(fresh())))
    modules = nn.ModuleDict(dict(policy=model, critic=critic))
    prompts = [ex[0] for ex in hpa_local]
    g = torch.Generator(device=args.device).manual_seed(seed)

    kl_ctl = ppo.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl else None

    def end_of_turn(ids):  # real data: an answer that writes the template's next turn ends where it begins
        ids, _, cut = data.cut_ids_at_end_of_turn(ids, tok)
        return ids if cut else None

    rollouts = []  # per-rollout metrics (score, KL, length, EOS share): the numbers to watch in PPO

    def on_batch(batch):
        idx = torch.cat([micro[0] for micro in batch]).tolist()
        # the update's precision, else the first ratio is not 1; under FSDP the policy stays gathered while decoding
        with args.autocast(), parallel.gathered(args, model):
            rollout, m = ppo.rollout(model, ref_model, modules.critic, rm, [prompts[i] for i in idx],
                                     cfg, tok.eos_id, tok.pad_id, generator=g, end_of_turn=end_of_turn)
        if kl_ctl is not None:
            cfg.kl_coef = kl_ctl.update(m["kl"], len(idx) * args.world)
        rollouts.append({"rollout/" + k: v for k, v in parallel.mean_over_ranks(m, args).items()})
        log(-1, rollouts[-1])
        return [split_micro(mb, args.grad_accum) for _ in range(cfg.epochs)
                for mb in ppo.minibatches(rollout, cfg.minibatch_size, g)]

    batches = batches_of(list(range(len(prompts))), args.rollout_batch, stage.epochs, lambda ex: (), seed, args)
    n_rollouts = n_batches(len(prompts), args.rollout_batch, stage.epochs, args)
    n = n_rollouts * cfg.epochs * (args.rollout_batch // args.minibatch)
    m, steps = optimize(args, modules, ppo_loss(cfg), batches, n, args.lr_hpa, stage.name, ewc, log,
                        on_batch=on_batch)
    return m | {k: sum(r[k] for r in rollouts) / len(rollouts) for k in rollouts[0]}, steps


def shard_of(examples, args):
    """This rank's share of a stage's examples, the same number on every rank (so every rank runs the same number
    of forward passes, which FSDP's gathers need): every world-th example from the rank's index on."""
    return examples[:len(examples) - len(examples) % args.world][args.rank::args.world]


def run_schedule(args, name, base, task, rm, log, judge=None):
    tok, ifa_ex, hpa_ex, test, world = task
    stages, n = hbat.build(name, args.n_splits, args.epochs_ifa, args.epochs_hpa, use_ewc=args.ewc != "none")
    sets = {"ifa": data.split(ifa_ex, n, args.seed), "hpa": data.split(hpa_ex, n, args.seed)}
    ewc = ewc_lib.EWC(method=args.ewc, f_max=args.f_max, f_max_ifa=args.f_max_ifa, lam=args.ewc_lambda,
                      norm=args.ewc_norm, scale=args.ewc_scale, elementwise=args.ewc_elementwise,
                      seed=args.seed) if name == "hbat" else None
    def fresh():  # an unsharded model of the schedule's shape (FSDP modules cannot be deep-copied)
        return copy.deepcopy(base)

    model = parallel.place(args, fresh())
    path = os.path.join(args.out, f"{name}.pt")
    ckpt = torch.load(path, map_location="cpu" if args.fsdp else args.device, weights_only=True) \
        if os.path.exists(path) else None
    if ckpt:
        parallel.load_full_state(args, model, ckpt["model"])
        if ewc is not None:
            ewc.load_state_dict(ckpt["ewc"])
    history, step0 = (ckpt["history"], ckpt["steps"]) if ckpt else ([], 0)
    last_eval = None  # (metrics, rows) of the last stage run here: the schedule's final evaluation
    for i in range(len(history), len(stages)):
        stage, t0 = stages[i], time.time()

        def log_step(step, m, stage=stage, i=i):
            log({"schedule": name, "stage": stage.name, "stage_index": i, "step": step0 + max(step, 0), **m})
            if args.eval_every and step >= 0 and (step0 + step) % args.eval_every == 0 and args.evaluates:
                quick = evaluate_model(args, model, tok, test[:100], world, args, rm, judge)[0]
                log({"schedule": name, "stage": stage.name, "stage_index": i, "step": step0 + step,
                     **{f"eval/{k}": quick[k] for k in ("ifa_score", "hpa_score") if k in quick}})

        if ewc is not None:
            ewc.begin_stage(stage.kind, model)
        try:
            m, steps = run_stage(args, stage, model, sets, ewc, rm, tok, log_step, fresh)
        except FloatingPointError as e:
            die(f"{name} stopped: {e}; the last good checkpoint is {path}", code=1)
        if ewc is not None:
            fisher = stage_fisher(args, stage, model, sets) if args.ewc == "original" else None
            ewc.end_stage(stage.kind, model, fisher)
        step0 += steps
        history.append({"name": stage.name, "kind": stage.kind, "ewc": stage.ewc, "seconds": time.time() - t0,
                        "metrics": m})
        if args.evaluates:  # where each stage leaves the model: the alignment tax is the IFA score HPA stages lose
            last_eval = evaluate_model(args, model, tok, test, world, args, rm, judge)
            history[-1]["eval"] = last_eval[0]
        state = parallel.full_state(args, model)
        if args.rank == 0:
            tqdm.write(f"{name:>10} {stage.name:<6} " + " ".join(f"{k} {v:.4g}" for k, v in m.items())
                       + f" | eval ifa {history[-1]['eval']['ifa_score']:.3f} hpa "
                       f"{history[-1]['eval'].get('hpa_score', float('nan')):.3f} ({time.time() - t0:.1f}s)")
            atomic_save({"model": state, "ewc": ewc.state_dict() if ewc else {}, "history": history,
                         "steps": step0}, path)
        parallel.barrier(args)
    return model, history, last_eval


def stage_fisher(args, stage, model, sets):
    """§3.5: the diagonal empirical Fisher of the stage's own objective, on (up to 256 of) its own examples."""
    if stage.kind == "ifa":
        examples = [(p, r) for p, r in sets["ifa"][stage.subset][:256]]
    else:
        examples = [(p, c) for p, c, _ in sets["hpa"][stage.subset][:256]]

    def logp(m, ex):
        tokens, mask = data.ifa_batch([ex])
        return m.token_logprobs(tokens.to(args.device), mask.to(args.device)).sum()
    return ewc_lib.fisher_diag(model, examples, logp)


# -----------------------------------------------------------------------------


def dry_run(args):
    """Memory per GPU on paper (memory.py) for this run's model, algorithm, batch and dtype, under DDP and under
    --fsdp (fully sharded), side by side whichever of the two the run asks for."""
    margs = ModelArgs(**memory.read_params(args.model)) if args.model else ModelArgs(
        dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, vocab_size=128,
        multiple_of=16, max_seq_len=args.max_seq_len)
    micro = max(1, args.batch_size // (args.gpus * args.grad_accum))
    for fsdp in (False, True):
        print(memory.format_plan(memory.plan(margs, args.algo, args.gpus, micro, args.max_seq_len,
                                             mixed_bf16=args.dtype != "fp32", fsdp=fsdp, live_ref=args.live_ref,
                                             gpu_gb=args.gpu_gb)) + "\n")


def main(argv=None):
    args = get_args(argv)
    if args.dry_run:
        return dry_run(args)
    parallel.setup(args)
    for flag in ("batch_size", "rollout_batch", "minibatch", "pretrain_batch"):
        if getattr(args, flag) % (args.world * args.grad_accum):
            die(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not divisible by world size x --grad-accum "
                f"= {args.world * args.grad_accum}")
    check_out_dir(args)
    log = MetricsLog(args)
    t_start = time.time()
    try:
        tok, ifa_ex, hpa_ex, test, world, corpus = load_task(args)
        judge = evaluate.load_judge(args.judge, tok, args.max_seq_len, args.device) if args.judge else None
    except (OSError, ValueError) as e:  # data.DataError is a ValueError
        die(str(e))
    smallest = min(len(ifa_ex), len(hpa_ex))
    if "hbat" not in args.schedules:
        args.n_splits = 1  # only hbat splits the data
    if args.n_splits > smallest:
        die(f"--n-splits {args.n_splits} is larger than the data ({len(ifa_ex)} IFA, {len(hpa_ex)} HPA examples)")
    batch = max(args.batch_size, args.rollout_batch if args.algo == "ppo" else 0)
    if smallest // args.n_splits < batch:
        die(f"--n-splits {args.n_splits} leaves subsets of {smallest // args.n_splits} examples, fewer than one "
            f"batch of {batch}")
    done = {}
    for name in args.schedules:
        p = os.path.join(args.out, f"{name}.pt")
        done[name] = len(torch.load(p, weights_only=True)["history"]) if os.path.exists(p) else 0
    log.keep_only(done)
    base = base_model(args, tok, corpus, log.write)
    if tok.vocab_size > base.args.vocab_size:
        die(f"the tokenizer has {tok.vocab_size} pieces, the model's vocabulary only {base.args.vocab_size}: "
            f"--tokenizer does not belong to --model")
    rm, rm_acc = train_reward_model(args, base, hpa_ex, log.write) if args.algo == "ppo" else (None, None)
    results = {"algo": args.algo, "config": {k: v for k, v in vars(args).items() if k not in RUN_KEYS_IGNORED},
               "reward_model_accuracy": rm_acc, "schedules": {}, "win_rates": {}}
    responses = {}
    for name in tqdm(args.schedules, desc="schedules", position=0, disable=None if args.rank == 0 else True):
        model, history, last_eval = run_schedule(args, name, base, (tok, ifa_ex, hpa_ex, test, world), rm, log.write,
                                                 judge)
        if args.evaluates and last_eval is None:  # finished by an earlier run: its answers were not kept
            last_eval = evaluate_model(args, model, tok, test, world, args, rm, judge)
        state = parallel.full_state(args, model) if args.export_hf else None
        if args.evaluates:
            responses[name] = [r["response"] for r in last_eval[1]]
        if args.rank == 0:
            metrics, rows = last_eval
            results["schedules"][name] = {"metrics": metrics, "stages": history, "samples": rows[:8]}
            with open(os.path.join(args.out, f"{name}.responses.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            if args.export_hf:
                hf_dir = os.path.join(args.out, f"{name}-hf")
                dtype = torch.bfloat16 if args.bf16 else torch.float32  # bf16 is how LLaMA weights are shipped
                export_hf(model, hf_dir, tok.bos_id, tok.eos_id, {k: v.to(dtype) for k, v in state.items()})
                atomic_write(os.path.join(hf_dir, "tokenizer.model"), lambda f: f.write(tok.model_proto))
    if args.evaluates:  # under FSDP the run's reward model is sharded: every rank takes part in judging
        judge = evaluate.pick_judge(judge, rm, tok, args.max_seq_len)  # real data: --judge, else the run's RM
        win_rate = world.win_rate if world is not None else judge.win_rate if judge is not None else None
        if "two-stage" in responses and win_rate is not None:
            for name in responses:
                if name != "two-stage":
                    results["win_rates"][f"{name}_vs_two-stage"] = win_rate(test, responses[name],
                                                                           responses["two-stage"])
    if args.rank == 0:
        results["seconds"] = time.time() - t_start
        save_json(os.path.join(args.out, "results.json"), results)
        print(evaluate.table(results))
    if args.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
