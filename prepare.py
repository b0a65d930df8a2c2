"""What every schedule of a run starts from, and the models it keeps beside them (docs/method.md §1, §6).

The task is the tokenizer, D_IFA, D_HPA and the held-out prompts: the embedded world's (world.py), whose gold judge
scores the answers, or real datasets read by infra/importers.py. The base model is --model, or else the tiny base
pretrained once on the world's unlabeled corpus and cached under --cache-dir, keyed by everything it depends on.
Nothing here trains: train.py pretrains the tiny base from `pretraining_batches` (then `cache_base`), and trains the
SFT and reward models into --out, which `load_reward_model` and `critic` read back for PPO and `averaged` turns into
weight averaging's models (§7.1).
"""
import hashlib
import os
from typing import NamedTuple

import torch
from tqdm import tqdm

import data
import hbat
import ppo
import reward
from infra import checkpoint, importers, parallel, rundir
from model import ModelArgs, Transformer
from world import World, make_world


class Task(NamedTuple):
    tok: data.Tokenizer
    ifa: list                     # D_IFA tokenised: [(prompt_ids, response_ids)]
    hpa: list                     # D_HPA tokenised: [(prompt_ids, chosen_ids, rejected_ids)]
    test: list[dict]              # held-out records: prompt, reference (and family on the world)
    world: World | None           # the embedded world, whose gold judge scores answers; None for real data
    corpus: list[str] | None      # the world's unlabeled pretraining text; None for real data
    val: list[dict]               # the world's validation prompts, as test (--n-val); none for real data


def load_task(args, rt) -> Task:
    """The embedded world (--world-seed, its sizes and --annotator-bias), or the files of --ifa-data/--hpa-data."""
    if args.ifa_data:
        tok, ifa, hpa, test = importers.load_real_task(args.model, args.tokenizer, args.ifa_data, args.hpa_data,
                                                       args.test_data, args.n_test)
        world, corpus, val = None, None, []
    else:
        world = make_world(seed=args.world_seed, n_ifa=args.n_ifa, n_hpa=args.n_hpa, n_test=args.n_test,
                           annotator_bias=args.annotator_bias, ifa_styled_fraction=args.ifa_styled, n_val=args.n_val,
                           pair_mix=args.pair_mix, ideal_chosen=args.ideal_chosen)
        ifa, hpa, test, corpus, val = world.ifa, world.hpa, world.test, world.corpus, world.val
        if rt.rank == 0:  # rank 0 trains and caches the tokenizer, then every rank reads the cache
            data.train_tokenizer(world.tokenizer_texts(), cache_dir=args.cache_dir)
        parallel.barrier(rt)
        tok = data.train_tokenizer(world.tokenizer_texts(), cache_dir=args.cache_dir)
    return Task(tok, data.tokenize_ifa(ifa, tok, args.max_seq_len), data.tokenize_hpa(hpa, tok, args.max_seq_len),
                test, world, corpus, val)


def on_meta(margs):
    """An unplaced model of this shape on the meta device (no memory, no random init): parallel.place fills it."""
    with torch.device("meta"):
        return Transformer(margs)


def lean_load(rt, path):
    """Transformer.from_pretrained(path), under --fsdp read by rank 0 only (parallel.lean), else on the device."""
    model = parallel.lean(rt, lambda: Transformer.from_pretrained(path), lambda margs: Transformer(ModelArgs(**margs)))
    return model if rt.fsdp else model.to(rt.device)


def load_reward_model(rt, path, held_out, batch_size):
    """PPO's fixed reward: the saved reward model (OUT/reward_model.pt), placed, in eval mode and without gradients,
    and its pairwise accuracy on the held-out pairs. Returns (the model, the accuracy)."""
    rm = parallel.lean(rt, lambda: reward.RewardModel.from_pretrained(path),
                       lambda margs: reward.RewardModel(Transformer(ModelArgs(**margs))))
    rm = parallel.place(rt, rm, rm.state_dict()).eval().requires_grad_(False)
    accuracy = reward.pairwise_accuracy(rm, held_out, batch_size, rt.device)
    if rt.rank == 0:
        tqdm.write(f"reward model: held-out pairwise accuracy {accuracy:.3f} on {len(held_out)} pairs")
    return rm, accuracy


def critic(rt, rm):
    """PPO's value network starts as a trainable copy of the reward model (ppo.make_critic says why)."""
    return ppo.make_critic(rm, copy_fn=lambda m: parallel.copy_of(rt, m, lambda: reward.RewardModel(on_meta(m.args))))


# -----------------------------------------------------------------------------
# the base model


def tiny_model_args(args, vocab_size):
    return ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                     vocab_size=vocab_size, multiple_of=16, max_seq_len=args.max_seq_len)


def corpus_stream(task):
    """The world's corpus as one stream of token ids, each text between bos and eos, what the tiny base reads."""
    tok = task.tok
    return torch.tensor([t for text in task.corpus for t in [tok.bos_id] + tok.encode(text) + [tok.eos_id]])


def window(args):
    """The tokens of one pretraining window: 64, or --max-seq-len when that is shorter."""
    return min(64, args.max_seq_len)


def base_path(args, task):
    """Where the tiny base is cached, keyed by everything it depends on."""
    stream = corpus_stream(task)
    key = hashlib.sha256(repr((vars(tiny_model_args(args, task.tok.vocab_size)), args.pretrain_steps,
                               args.pretrain_batch, window(args), args.world_seed, stream.sum().item(),
                               len(stream))).encode()).hexdigest()[:16]
    return os.path.join(args.cache_dir, f"base-{key}.pt")


def cache_base(args, rt, task, model, final_loss):
    """Keep a freshly pretrained tiny base under --cache-dir (base_path), for this run and every later one; returns it
    as loaded back (its vocabulary is the tokenizer's, so base_model's check is not needed)."""
    path = base_path(args, task)
    if rt.rank == 0:
        tqdm.write(f"pretrained the tiny base: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
                   f"final loss {final_loss:.3f}, cached at {path}")
    rundir.save_model(rt, path, model)
    return lean_load(rt, path)


def base_model(args, rt, task):
    """The base every schedule starts from: --model, or the cached tiny base; None while the tiny base is not
    pretrained yet. On the CPU under --fsdp (every copy a run makes is placed from it), else on the device."""
    path = args.model or base_path(args, task)
    if not os.path.exists(path):
        return None
    model = lean_load(rt, path)
    if task.tok.vocab_size > model.args.vocab_size:
        raise ValueError(f"the tokenizer has {task.tok.vocab_size} pieces, the model's vocabulary only "
                         f"{model.args.vocab_size}: --tokenizer does not belong to --model")
    return model


def pretraining_batches(args, rt, task):
    """--pretrain-steps batches of --pretrain-batch random windows of the packed corpus, each window (B, T + 1) for
    the next-token loss, as data.batches_of makes batches: ([(window starts, tokens)] per micro-batch, shares). The
    same global batches whatever the world size: each rank takes its rows of them."""
    stream, block = corpus_stream(task), window(args)
    g = torch.Generator().manual_seed(args.world_seed)
    for _ in range(args.pretrain_steps):
        starts = torch.randint(len(stream) - block - 1, (args.pretrain_batch,), generator=g)[rt.rank::rt.world]
        tokens = torch.stack([stream[s:s + block + 1] for s in starts.tolist()]).to(rt.device)
        yield (list(zip(starts.chunk(args.grad_accum), tokens.chunk(args.grad_accum))),
               [1 / args.grad_accum] * args.grad_accum)


# -----------------------------------------------------------------------------
# weight averaging (§7.1): nothing trained


def averaged(args, rt, margs):
    """For each α of --average-alphas, ("averaged@<α>", the placed model (1 − α)·θ_SFT + α·θ_two-stage), from
    OUT/sft.pt and OUT/two-stage.pt (under --fsdp read by rank 0 only)."""
    if rt.rank == 0 or not rt.fsdp:
        sft, final = (checkpoint.load(rundir.model_path(args.out, name))[1] for name in ("sft", "two-stage"))
    for alpha in args.average_alphas:
        state = hbat.average(sft, final, alpha) if rt.rank == 0 or not rt.fsdp else None
        yield f"averaged@{alpha:g}", parallel.place(rt, on_meta(margs), state)
