"""What every schedule of a run starts from, made once and kept: the task (tokenizer, D_IFA, D_HPA, held-out prompts
and, on the embedded world, its gold judge), the tiny base model pretrained here when no --model is given (cached
under --cache-dir), and under PPO the SFT model and the reward model trained from it (kept in --out).

These models are trained by train.py's loop, which is handed in (`optimize`, `run_stage`): this file says what is
trained from what, on which data, and where it is kept; train.py says how a step is taken. § refers to
docs/method.md.
"""
import hashlib
import os
from dataclasses import asdict

import torch
from tqdm import tqdm

import checkpoint
import data
import dpo
import hbat
import parallel
import reward
import rundir
from model import ModelArgs, Transformer


def load_task(args, rt):
    """(tokenizer, tokenised D_IFA, tokenised D_HPA, held-out test records, the embedded world or None for real data
    (its gold judge scores answers), the world's unlabeled corpus or None)."""
    if args.ifa_data:
        tok, ifa, hpa, test = data.load_real_task(args.model, args.tokenizer, args.ifa_data, args.hpa_data,
                                                  args.test_data, args.n_test)
        world, corpus = None, None
    else:
        world = data.make_world(seed=args.world_seed, n_ifa=args.n_ifa, n_hpa=args.n_hpa, n_test=args.n_test,
                                alignment_tax=args.alignment_tax, ifa_styled_fraction=args.ifa_styled)
        ifa, hpa, test, corpus = world.ifa, world.hpa, world.test, world.corpus
        if rt.rank == 0:  # rank 0 trains and caches the tokenizer, then every rank reads the cache
            data.train_tokenizer(world.tokenizer_texts(), cache_dir=args.cache_dir)
        parallel.barrier(rt)
        tok = data.train_tokenizer(world.tokenizer_texts(), cache_dir=args.cache_dir)
    return (tok, data.tokenize_ifa(ifa, tok, args.max_seq_len), data.tokenize_hpa(hpa, tok, args.max_seq_len), test,
            world, corpus)


def tiny_model_args(args, vocab_size):
    return ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                     vocab_size=vocab_size, multiple_of=16, max_seq_len=args.max_seq_len)


def tiny_base(args, rt, tok, corpus, log, optimize):
    """The base model of the embedded world (without --model): a tiny LLaMA pretrained once on the world's
    unlabeled corpus (next-token loss on packed windows), cached under --cache-dir keyed by everything it depends
    on. On the CPU under FSDP (every copy a run makes is placed from it), else on the device."""
    margs = tiny_model_args(args, tok.vocab_size)
    stream = torch.tensor([t for text in corpus for t in [tok.bos_id] + tok.encode(text) + [tok.eos_id]])
    block = min(64, args.max_seq_len)
    key = hashlib.sha256(repr((vars(margs), args.pretrain_steps, args.pretrain_batch, block, args.world_seed,
                               stream.sum().item(), len(stream))).encode()).hexdigest()[:16]
    path = os.path.join(args.cache_dir, f"base-{key}.pt")
    if not os.path.exists(path):
        torch.manual_seed(args.world_seed)
        model = parallel.place(rt, Transformer(margs))
        g = torch.Generator().manual_seed(args.world_seed)

        def windows():  # the same global batches whatever the world size: each rank takes its rows of them
            for _ in range(args.pretrain_steps):
                starts = torch.randint(len(stream) - block - 1, (args.pretrain_batch,), generator=g)[rt.rank::rt.world]
                yield (list(torch.stack([stream[s:s + block + 1] for s in starts.tolist()]).to(rt.device)
                            .chunk(args.grad_accum)), [1 / args.grad_accum] * args.grad_accum)

        m, _ = optimize(model, dpo.lm_step_loss, windows(), args.pretrain_steps, 1e-3, "pretrain", rt, args.warmup,
                        args.grad_clip, log=lambda step, m: log({"schedule": "base", "stage": "pretrain",
                                                                 "stage_index": 0, "step": step, **m}))
        state = parallel.full_state(rt, model)
        if rt.rank == 0:
            tqdm.write(f"pretrained the tiny base: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                       f"params, final loss {m['loss']:.3f}, cached at {path}")
            checkpoint.save(asdict(margs), state, path)
        parallel.barrier(rt)
    return Transformer.from_pretrained(path).to("cpu" if rt.fsdp else rt.device)


def on_meta(margs):
    """An unplaced model of this shape on the meta device (no memory, no random init): parallel.place fills it."""
    with torch.device("meta"):
        return Transformer(margs)


def sft_model(args, rt, base, ifa_ex, tok, log, run_stage):
    """What PPO's reward model starts from (§1): the SFT model, that is two-stage's IFA stage (the same seed, so
    the same model as two-stage's), trained once per run and kept in OUT/sft.pt."""
    path = os.path.join(args.out, "sft.pt")
    if not os.path.exists(path):
        model = parallel.place(rt, on_meta(base.args), base.state_dict())  # no copy: filled from rank 0's base
        mid = rundir.MidStage(args.out, "sft", 0, 0, args.save_every, rt)  # --save-every: resume inside it too
        run_stage(args, rt, hbat.two_stage(args.epochs_ifa, args.epochs_hpa)[0], model, None,
                  {"ifa": hbat.split(ifa_ex, 1, args.seed), "hpa": [[]]}, None, None, tok, None,
                  lambda step, m: log({"schedule": "sft", "stage": "IFA", "stage_index": 0, "step": step, **m}), mid)
        state = parallel.full_state(rt, model)
        if rt.rank == 0:
            checkpoint.save(asdict(base.args), state, path)
        mid.clear()
        parallel.barrier(rt)
    sft = parallel.lean(rt, lambda: Transformer.from_pretrained(path), lambda margs: Transformer(ModelArgs(**margs)))
    return sft if rt.fsdp else sft.to(rt.device)


def averaged(args, rt, base, final, ifa_ex, tok, log, run_stage):
    """§7.1 weight averaging, nothing trained: for each α of --average-alphas, (its name "averaged@<α>", the placed
    model (1 − α)·θ_SFT + α·θ_two-stage). θ_SFT is two-stage's IFA stage (OUT/sft.pt; trained here if no earlier
    stage wrote it), `final` two-stage's whole state_dict (under FSDP only rank 0's counts)."""
    sft = sft_model(args, rt, base, ifa_ex, tok, log, run_stage)
    for alpha in args.average_alphas:
        state = hbat.average(sft.state_dict(), final, alpha) if rt.rank == 0 or not rt.fsdp else None
        yield f"averaged@{alpha:g}", parallel.place(rt, on_meta(base.args), state)


def train_reward_model(args, rt, sft, hpa_ex, log, optimize):
    """§1: the reward model is trained once on D_HPA from the SFT model (Bradley–Terry, scalar head at the last
    response token) and kept fixed; PPO then uses only D_HPA's prompts. A tenth of the pairs is held out to
    measure its accuracy."""
    path = os.path.join(args.out, "reward_model.pt")
    n_val = max(1, len(hpa_ex) // 10)
    train_ex, val_ex = hpa_ex[:-n_val], hpa_ex[-n_val:]
    if not os.path.exists(path):
        torch.manual_seed(hbat.stage_seed(args.seed, "rm"))
        mid = rundir.MidStage(args.out, "reward", 0, 0, args.save_every, rt)
        rm = reward.RewardModel(sft)  # the SFT model is not needed after this
        rm = parallel.place(rt, rm, rm.state_dict())
        local, batch = data.shard_of(train_ex, rt.rank, rt.world), args.batch_size // rt.world
        optimize(rm, lambda m, b: reward.rm_step_loss(m, b[1], b[2]),
                 data.batches_of(local, batch, args.rm_epochs, hbat.stage_seed(args.seed, "rm"), data.hpa_batch,
                                 args.grad_accum, rt.device),
                 data.n_batches(len(local), batch, args.rm_epochs), args.lr_ifa, "RM", rt, args.warmup,
                 args.grad_clip, mid=mid,
                 log=lambda step, m: log({"schedule": "reward", "stage": "RM", "stage_index": 0, "step": step, **m}))
        reward.set_offset(rm, train_ex, args.batch_size, rt.device)
        state = parallel.full_state(rt, rm)
        if rt.rank == 0:
            checkpoint.save(asdict(rm.args), state, path)
        mid.clear()
        parallel.barrier(rt)
    rm = parallel.lean(rt, lambda: reward.RewardModel.from_pretrained(path),
                       lambda margs: reward.RewardModel(Transformer(ModelArgs(**margs))))
    rm = parallel.place(rt, rm, rm.state_dict()).eval().requires_grad_(False)
    acc = reward.pairwise_accuracy(rm, val_ex, args.batch_size, rt.device)
    if rt.rank == 0:
        tqdm.write(f"reward model: held-out pairwise accuracy {acc:.3f} on {len(val_ex)} pairs")
    return rm, acc
