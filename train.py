"""
Hybrid Alignment Training: the one training loop.

    python train.py --algo dpo                    # the small-scale reproduction on the embedded world
    python train.py --algo ppo                    # the same with a reward model and PPO
    python train.py --algo dpo --preset smoke     # the whole pipeline in seconds
    torchrun --nproc_per_node 2 train.py --algo dpo --preset smoke            # DDP
    torchrun --nproc_per_node 8 train.py --fsdp --model /data/llama-2-7b ...  # sharded; docs/real-data.md

Read it top to bottom: `train_step` is one AdamW step, the same in every stage (lr, micro-batches of loss + EWC
penalty, clip, step); `optimize` runs a stage's batches through it; `run_ppo_stage` is PPO's loop around it (rollout
-> epochs x minibatches -> early stop); `run_stage` builds a stage's batches and loss; `run_schedule` walks the stages
of hbat.py with a checkpoint after each; `main`: task -> base model -> (PPO) reward model -> each schedule ->
results.json and a table. Flags: config.py; the task, base and reward model: prepare.py; the run directory:
rundir.py; one process, DDP or FSDP: parallel.py.
Re-running a command with the same --out resumes after the last completed stage with the same numbers (same device
and thread count): each stage draws its randomness from generators seeded by the stage. § refers to docs/method.md.
"""
import itertools
import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import checkpoint
import config
import conflict
import data
import dpo
import evaluate
import ewc as ewc_lib
import hbat
import memory
import parallel
import ppo
import prepare
import reward
import rundir
from config import die
from model import ModelArgs, Transformer

# -----------------------------------------------------------------------------
# one optimizer step, the same in every stage


def lr_at(step, total, warmup_share):
    """Linear warm-up then linear decay to 0 (§6.1: a constant lr made scores jump between checkpoints)."""
    warmup = max(1, int(warmup_share * total))
    return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def train_step(model, opt, loss_fn, micros, shares, lr, grad_clip, rt, ewc=None, policy=None):
    """One AdamW step on Σ_i shares[i] · loss_fn(module, micros[i]) over the micro-batches (shares: each one's part
    of the batch, summing to 1), plus the stage's EWC penalty on `policy` (§3.3). model: parallel.wrap's wrapper.
    Returns the step's metrics (the same weighted means, then means over ranks), its lr and the gradient norm
    before clipping."""
    for g in opt.param_groups:
        g["lr"] = lr
    metrics = {}
    for i, (micro, share) in enumerate(zip(micros, shares)):
        # gradients are averaged over ranks on the last micro-step only, which must be known before the forward
        with parallel.grad_sync(model, i == len(micros) - 1), rt.autocast():
            loss, m = model(loss_fn, micro)
            if ewc is not None and ewc.active:
                penalty = ewc.penalty(policy)  # under FSDP this rank's part of it: the ranks' parts sum to L_EWC
                loss = loss + penalty
                m["ewc_penalty"] = penalty.item() * (rt.world if rt.fsdp else 1)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        (loss * share).backward()
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v * share
    metrics["grad_norm"] = parallel.clip_grad_norm([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ewc is not None:
        ewc.after_step(policy)  # Hbat-Freeze puts the frozen tensors back
    return parallel.mean_over_ranks(metrics, rt) | {"lr": lr}


def adamw(module, lr):
    """Every stage starts a fresh AdamW (§2.2 step 3)."""
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                             weight_decay=0.0)


def means(rows, prefix=""):
    """The mean of each metric over the rows of a stage that have it (alright's IFA and DPO steps log different
    metrics): what the stage reports."""
    keys = dict.fromkeys(k for r in rows for k in r)
    return {prefix + k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}


def optimize(module, loss_fn, batches, n_steps, lr, name, rt, warmup, grad_clip, ewc=None, log=None, mid=None):
    """One stage: one train_step per batch, (micro-batches, their shares), the peak lr (a number, or step -> number)
    warmed up and decayed over n_steps; `mid` (rundir.MidStage) saves its progress every --save-every steps and
    resumes from it. Returns (the stage's mean metrics, the number of steps taken)."""
    peak = lr if callable(lr) else lambda step: lr
    opt, model, rows, start = adamw(module, peak(0)), parallel.wrap(rt, module), [], 0
    if mid and (progress := mid.restore(module, opt, name)):
        start, rows = progress["step"], progress["rows"]
    bar = dict(desc=name, total=n_steps, initial=start, leave=False, position=2, disable=None if rt.rank == 0 else True)
    # a resumed stage skips the batches it trained on: the same order, and the same examples counted
    for step, (micros, shares) in enumerate(tqdm(itertools.islice(batches, start, None), **bar), start):
        try:
            m = train_step(model, opt, loss_fn, micros, shares, peak(step) * lr_at(step, n_steps, warmup), grad_clip,
                           rt, ewc, module)
        except FloatingPointError as e:
            raise FloatingPointError(f"{name}: {e} at step {step}") from None
        rows.append({k: v for k, v in m.items() if k != "lr"})  # the stage reports its mean metrics, not its lr
        if log:
            log(step, m)
        if mid and mid.due(step + 1):
            mid.save(module, opt, {"step": step + 1, "rows": rows})
    return means(rows), len(rows)


def run_ppo_stage(args, rt, stage, model, critic, prompts, ewc, rm, tok, seed, fresh, log, mid):
    """§4.2, cleanrl's loop: for each batch of prompts, a rollout, then cfg.epochs x minibatches of train steps,
    stopped early when the policy moved too far (--target-kl). The KL reference is the model at the start of the
    stage (§2.3); the critic is the schedule's (run_schedule), None for the release's variant (§4.3), whose reward
    queue restarts here. Returns (mean metrics, steps, prompts rolled out)."""
    cfg, release = config.ppo_config(args, rt.world), args.ppo_variant == "release"
    kl_ctl = ppo.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl else None
    ref_model = parallel.copy_of(rt, model, fresh).eval().requires_grad_(False)
    modules = nn.ModuleDict(dict(policy=model) | ({} if release else dict(critic=critic)))
    opt, wrapped = adamw(modules, args.lr_hpa), parallel.wrap(rt, modules)
    g = torch.Generator(device=rt.device).manual_seed(seed)  # sampling and minibatch shuffles
    queue = ppo.RewardQueue(cfg.queue_size) if release else None

    def end_of_turn(ids):  # real data: an answer that writes the template's next turn ends where that begins
        ids, _, cut = data.cut_ids_at_end_of_turn(ids, tok)
        return ids if cut else None

    def loss_fn(modules, mb):
        return ppo.release_loss(modules.policy, mb) if release else ppo.ppo_loss(modules.policy, modules.critic, mb, cfg)

    # the lr's horizon: every rollout's epochs x minibatches, the last rollout and the last minibatch maybe smaller
    local = args.rollout_batch // rt.world
    n_steps = stage.epochs * cfg.epochs * sum(data.n_batches(size, cfg.minibatch_size, 1)
                                             for size in data.batch_sizes(len(prompts), local))
    step, rows, rollouts, n_prompts = 0, [], [], 0
    if progress := mid.restore(modules, opt, stage.name):  # saved between rollouts: resume with the next one
        step, rows, rollouts, n_prompts = (progress[k] for k in ("step", "rows", "rollouts", "n_prompts"))
        g.set_state(progress["generator"])
        cfg.kl_coef = progress["kl_coef"]
        if kl_ctl is not None:  # the adaptive coefficient, where it had moved to
            kl_ctl.value = cfg.kl_coef
        if queue is not None:  # the release's reward queue
            queue.values = progress["queue"]
    bar = tqdm(total=n_steps, initial=step, desc=stage.name, leave=False, position=2, disable=rt.rank != 0 or None)
    for idx in itertools.islice(data.shuffled(len(prompts), local, stage.epochs, seed), len(rollouts), None):
        # 1. rollout, in the update's precision (else the first ratio is not 1); under FSDP the policy stays gathered
        with rt.autocast(), parallel.gathered(rt, model):
            ro, m = ppo.rollout(model, ref_model, critic, rm, [prompts[i] for i in idx], cfg, tok.eos_id, tok.pad_id,
                                generator=g, end_of_turn=end_of_turn, queue=queue)
        rollouts.append(parallel.mean_over_ranks(m, rt))
        n_prompts += len(idx) * rt.world
        if kl_ctl is not None:  # every rank moves the coefficient by the same, mean KL
            cfg.kl_coef = kl_ctl.update(rollouts[-1]["kl"], len(idx) * rt.world)
        log(step, {"rollout/" + k: v for k, v in rollouts[-1].items()})
        # 2. every epoch's shuffle is drawn before the first update, so an early stop leaves g where it would be
        for mb in [mb for _ in range(cfg.epochs) for mb in ppo.minibatches(ro, cfg.minibatch_size, g)]:
            sizes = data.micro_split(len(mb.scores), args.grad_accum)
            micros = [type(mb)(*fields) for fields in zip(*(f.split(sizes) for f in mb))]
            try:
                metrics = train_step(wrapped, opt, loss_fn, micros, [k / len(mb.scores) for k in sizes],
                                     args.lr_hpa * lr_at(step, n_steps, args.warmup), args.grad_clip, rt, ewc, model)
            except FloatingPointError as e:
                raise FloatingPointError(f"{stage.name}: {e} at step {step}") from None
            rows.append({k: v for k, v in metrics.items() if k != "lr"})
            log(step, metrics)
            step += 1
            bar.update(1)
            # 3. early stop: the policy moved too far from the rollout's; skip the rest of this rollout's updates
            if args.target_kl and metrics["approx_kl"] > args.target_kl:
                break
        if mid.due(step):
            mid.save(modules, opt, {"step": step, "rows": rows, "rollouts": rollouts, "n_prompts": n_prompts,
                                    "generator": g.get_state(), "kl_coef": cfg.kl_coef,
                                    "queue": queue.values if queue is not None else None})
    bar.close()
    return means(rows) | means(rollouts, "rollout/"), step, n_prompts


# -----------------------------------------------------------------------------
# one stage: its batches and its loss


def run_stage(args, rt, stage, model, critic, subsets, ewc, rm, tok, fresh, log, mid):
    """Build the batches and the loss of one stage of hbat.py, then optimize. Returns (mean metrics, steps, the
    examples it trained on: demonstrations, pairs or prompts, repeats over epochs counted, over all ranks; a
    multi-task stage counts both)."""
    ifa, hpa = (data.shard_of(subsets[kind][stage.subset], rt.rank, rt.world) for kind in ("ifa", "hpa"))
    seed = hbat.stage_seed(args.seed, stage.name, stage.kind)
    torch.manual_seed(seed)
    local = args.batch_size // rt.world
    fit = dict(rt=rt, warmup=args.warmup, grad_clip=args.grad_clip, ewc=ewc, log=log, mid=mid)
    seen = {"ifa": 0, "hpa": 0}  # counted as the batches are used

    def batches(examples, epochs, collate, seed, kind):
        for micros, shares in data.batches_of(examples, local, epochs, seed, collate, args.grad_accum, rt.device):
            seen[kind] += sum(len(m[0]) for m in micros) * rt.world
            yield micros, shares

    def ifa_loss(model, batch):  # every loss takes (module, micro-batch) -> (loss, metrics)
        return dpo.ifa_step_loss(model, *batch[1:])

    if stage.kind == "ifa":
        m, steps = optimize(model, ifa_loss, batches(ifa, stage.epochs, data.ifa_batch, seed, "ifa"),
                            data.n_batches(len(ifa), local, stage.epochs), args.lr_ifa, stage.name, **fit)
        return m, steps, seen["ifa"]
    if args.algo == "ppo":
        return run_ppo_stage(args, rt, stage, model, critic, [ex[0] for ex in hpa], ewc, rm, tok, seed, fresh, log,
                             mid)
    # §2.3: DPO's reference is the model at the start of the stage; its log-probs are computed once, here
    ref_model = parallel.copy_of(rt, model, fresh).eval().requires_grad_(False) if args.live_ref else None
    with rt.autocast():  # the precision of the training step, so that the first step's ratio is exactly 1
        ref_logps = None if args.live_ref else dpo.reference_logps(model, hpa, args.batch_size, rt.device)

    def dpo_loss(model, batch):
        idx, tokens, mask = batch
        return dpo.dpo_step_loss(model, tokens, mask, None if args.live_ref else ref_logps[idx], args.beta,
                                 args.label_smoothing, ipo=args.ipo, ref_model=ref_model, rpo_alpha=stage.rpo_alpha)

    if stage.kind == "hpa":
        m, steps = optimize(model, dpo_loss, batches(hpa, stage.epochs, data.hpa_batch, seed + 1, "hpa"),
                            data.n_batches(len(hpa), local, stage.epochs), args.lr_hpa, stage.name, **fit)
        return m, steps, seen["hpa"]

    if stage.kind == "alternate":  # §7.3 alright: every IFA and every DPO batch once, one step each, in turn
        ifa_batches = batches(ifa, stage.epochs, data.ifa_batch, seed, "ifa")
        hpa_batches = batches(hpa, args.epochs_hpa, data.hpa_batch, seed + 1, "hpa")
        order = hbat.interleave(data.n_batches(len(ifa), local, stage.epochs),
                                data.n_batches(len(hpa), local, args.epochs_hpa))  # 0: an IFA step, 1: a DPO step

        def turns():
            for kind in order:
                micros, shares = next(hpa_batches if kind else ifa_batches)
                yield [(kind, micro) for micro in micros], shares

        def turn_loss(model, batch):
            kind, micro = batch
            loss, m = (dpo_loss if kind else ifa_loss)(model, micro)
            return loss, {("hpa/" if kind else "ifa/") + k: v for k, v in m.items()}

        m, steps = optimize(model, turn_loss, turns(), len(order), lambda step: args.lr_hpa if order[step] else
                            args.lr_ifa, stage.name, **fit)
        return m, steps, seen["ifa"] + seen["hpa"]

    # §2.4 multi-task: every IFA batch with an HPA batch, cycling the HPA batches (E_HPA passes over D_HPA)
    hpa_list = list(data.batches_of(hpa, local, args.epochs_hpa, seed + 1, data.hpa_batch, args.grad_accum,
                                    rt.device))

    def pairs():  # micro-batch i of each (None where one batch has fewer), each weighted by its share of its batch
        for i, (micros, shares) in enumerate(batches(ifa, stage.epochs, data.ifa_batch, seed, "ifa")):
            hpa_micros, hpa_shares = hpa_list[i % len(hpa_list)]
            seen["hpa"] += sum(len(m[0]) for m in hpa_micros) * rt.world
            parts = list(itertools.zip_longest(zip(micros, shares), zip(hpa_micros, hpa_shares),
                                               fillvalue=(None, 0.0)))
            yield parts, [1.0] * len(parts)

    def multi_loss(model, batch):
        loss, metrics = 0.0, {}
        for (micro, share), loss_fn, prefix in zip(batch, (ifa_loss, dpo_loss), ("ifa/", "hpa/")):
            if micro is not None:
                l, m = loss_fn(model, micro)
                loss, metrics = loss + share * l, metrics | {prefix + k: share * v for k, v in m.items()}
        return loss, metrics

    m, steps = optimize(model, multi_loss, pairs(), data.n_batches(len(ifa), local, stage.epochs), args.lr_ifa,
                        stage.name, **fit)
    return m, steps, seen["ifa"] + seen["hpa"]


# -----------------------------------------------------------------------------
# one schedule: walk its stages (hbat.py), a checkpoint after each


def evaluate_model(rt, model, tok, test, world, args, rm, judge):
    """evaluate.evaluate on the gathered model (under FSDP every rank takes part; else only rank 0 calls this)."""
    with parallel.gathered(rt, model):
        return evaluate.evaluate(model, tok, test, world, args.max_new_tokens, args.max_seq_len, rm, judge)


def run_schedule(args, rt, name, base, task, rm, judge, log):
    """Train one schedule from the base, resuming after its last completed stage. Returns (model, stage records,
    (metrics, rows) of the last stage's evaluation, or None when every stage had been run before)."""
    tok, ifa_ex, hpa_ex, test, world = task
    stages, n = hbat.build(name, args.n_splits, args.epochs_ifa, args.epochs_hpa, args.ewc != "none", args.rpo_alpha)
    subsets = {"ifa": hbat.split(ifa_ex, n, args.seed), "hpa": hbat.split(hpa_ex, n, args.seed)}
    ewc = ewc_lib.EWC(method=args.ewc, f_max=args.f_max, f_max_ifa=args.f_max_ifa, lam=args.ewc_lambda,
                      norm=args.ewc_norm, scale=args.ewc_scale, elementwise=args.ewc_elementwise,
                      seed=args.seed) if name == "hbat" else None

    def fresh():  # an unplaced model of the schedule's shape
        return prepare.on_meta(base.args)

    def new_critic():  # PPO's value network starts as a copy of the reward model (ppo.make_critic says why)
        return ppo.make_critic(rm, copy_fn=lambda m: parallel.copy_of(rt, m, lambda: reward.RewardModel(fresh())))

    model, critic = parallel.place(rt, fresh(), base.state_dict()), None  # the critic is carried across HPA stages
    ckpt = rundir.load_schedule(args.out, name, "cpu" if rt.fsdp else rt.device)
    if ckpt:
        parallel.load_full_state(rt, model, ckpt["model"])
        if ewc is not None:
            ewc.load_state_dict(ckpt["ewc"])
        if ckpt.get("critic"):
            critic = new_critic()
            parallel.load_full_state(rt, critic, ckpt["critic"])
    history, step0 = (ckpt["history"], ckpt["steps"]) if ckpt else ([], 0)
    probes = ([ex[:2] for ex in ifa_ex[:args.grad_probe]], [ex[:3] for ex in hpa_ex[:args.grad_probe]])  # §7.4
    last_eval = None
    for i in range(len(history), len(stages)):
        stage, t0 = stages[i], time.time()
        where = {"schedule": name, "stage": stage.name, "stage_index": i}

        def log_step(step, m, where=where):
            log({**where, "step": step0 + step, **m})
            if args.eval_every and "grad_norm" in m and (step0 + step) % args.eval_every == 0 and rt.evaluates:
                quick = evaluate_model(rt, model, tok, test[:100], world, args, rm, judge)[0]  # after optimizer steps
                log({**where, "step": step0 + step,
                     **{f"eval/{k}": quick[k] for k in ("ifa_score", "hpa_score") if k in quick}})

        probe = {}
        if args.algo == "dpo" and args.grad_probe:  # §7.4: does a step on one objective undo the other?
            probe = dict(zip(("grad_cosine", "grad_cosine_blocks"), conflict.grad_cosine(
                model, *probes, args.beta, rt.device, rt.autocast(), sharded=rt.fsdp)))
        if ewc is not None:
            ewc.begin_stage(stage.kind, model)  # the anchor θ* is the model at the start of the stage
        if (args.algo, args.ppo_variant, stage.kind) == ("ppo", "textbook", "hpa") and (critic is None
                                                                                   or args.critic_restart):
            critic = new_critic()  # it estimates values of the same fixed reward in every HPA stage
        mid = rundir.MidStage(args.out, name, i, step0, args.save_every, rt)  # --save-every: resume inside it
        try:
            m, steps, examples = run_stage(args, rt, stage, model, critic, subsets, ewc, rm, tok, fresh, log_step, mid)
        except FloatingPointError as e:  # the newest checkpoint that exists: this stage's progress, or the last stage's
            path = mid.path if mid.saved() else rundir.schedule_path(args.out, name)
            die(f"{name} stopped: {e}; " + (f"the last good checkpoint is {path}" if os.path.exists(path) else
                                            "it has no checkpoint yet"), code=1)
        record = {"name": stage.name, "kind": stage.kind, "ewc": stage.ewc, "steps": steps, "examples": examples,
                  **probe}
        if ewc is not None and ewc.active:  # the penalty's strength: Σ_n F_n, and L_EWC where the stage ended
            with torch.no_grad():
                end = parallel.mean_over_ranks({"p": ewc.penalty(model).item()}, rt)["p"] * (rt.world if rt.fsdp else 1)
            record |= {"ewc_total_weight": ewc.total_weight, "ewc_penalty_end": end}
        if ewc is not None:
            fisher = None
            if args.ewc == "original":  # §3.5: the Fisher of the stage's own objective, on up to 256 of its examples
                examples = [ex[:2] for ex in subsets[stage.kind][stage.subset][:256]]  # HPA: the chosen answers
                fisher = ewc_lib.fisher_diag(model, examples, lambda m, ex: m.token_logprobs(
                    *(t.to(rt.device) for t in data.ifa_batch([ex]))).sum())
            ewc.end_stage(stage.kind, model, fisher)
        step0 += steps
        history.append(record | {"seconds": time.time() - t0, "metrics": m})
        if rt.evaluates:  # where each stage leaves the model: the alignment tax is the IFA score HPA stages lose
            last_eval = evaluate_model(rt, model, tok, test, world, args, rm, judge)
            history[-1]["eval"] = last_eval[0]
        state = parallel.full_state(rt, model)
        critic_state = parallel.full_state(rt, critic) if critic is not None else None
        if rt.rank == 0:
            e = history[-1]["eval"]
            tqdm.write(f"{name:>10} {stage.name:<6} " + " ".join(f"{k} {v:.4g}" for k, v in m.items())
                       + f" | eval ifa {e['ifa_score']:.3f} hpa {e.get('hpa_score', float('nan')):.3f}"
                       + f" ({time.time() - t0:.1f}s)")
            rundir.save_schedule(args.out, name, asdict(base.args), state, ewc.state_dict() if ewc else {}, history,
                                 step0, critic_state)
            if (name, i) == ("two-stage", 0) and not os.path.exists(sft_path := os.path.join(args.out, "sft.pt")):
                checkpoint.save(asdict(base.args), state, sft_path)  # the SFT model, that `averaged` starts from
        mid.clear()
        parallel.barrier(rt)
    return model, history, last_eval


# -----------------------------------------------------------------------------


def main(argv=None):
    args = config.get_args(argv)
    if args.dry_run:  # memory per GPU on paper (memory.py) for this run's model, algorithm, batch and dtype
        margs = ModelArgs(**memory.read_params(args.model)) if args.model else prepare.tiny_model_args(args, 128)
        return memory.dry_run(margs, args.algo, args.gpus, max(1, args.batch_size // (args.gpus * args.grad_accum)),
                              args.max_seq_len, args.dtype != "fp32", args.live_ref, args.gpu_gb)
    rt = parallel.setup(args.device, args.dtype, args.fsdp, args.compile, args.activation_checkpointing)
    config.check_world(args, rt.world)
    rundir.check_out_dir(args.out, config.run_config(args), args.overwrite, rt)
    log = rundir.MetricsLog(args.out, rt.rank)
    t_start = time.time()
    try:
        tok, ifa_ex, hpa_ex, test, world, corpus = prepare.load_task(args, rt)
        judge = evaluate.load_judge(args.judge, tok, args.max_seq_len, rt.device) if args.judge else None
        base = parallel.lean(rt, lambda: Transformer.from_pretrained(args.model),  # a bad file is one line too
                             lambda margs: Transformer(ModelArgs(**margs))) if args.model else None
    except (OSError, ValueError) as e:  # data.DataError is a ValueError
        die(str(e))
    config.check_sizes(args, len(ifa_ex), len(hpa_ex))
    done = rundir.completed_stages(args.out, args.schedules)
    log.keep_only(done, {name: rundir.mid_stage_step(args.out, name, n) for name, n in done.items()})
    if rt.rank == 0:
        rundir.write_tokenizer(args.out, tok)
    if base is None:
        base = prepare.tiny_base(args, rt, tok, corpus, log.write, optimize)
    elif not rt.fsdp:  # under FSDP it stays on the CPU (the meta device on ranks other than 0) until placed
        base = base.to(rt.device)
    if tok.vocab_size > base.args.vocab_size:
        die(f"the tokenizer has {tok.vocab_size} pieces, the model's vocabulary only {base.args.vocab_size}: "
            f"--tokenizer does not belong to --model")
    if args.algo == "ppo":  # one reward model for every schedule, trained from the SFT model
        sft = prepare.sft_model(args, rt, base, ifa_ex, tok, log.write, run_stage)
        rm, rm_acc = prepare.train_reward_model(args, rt, sft, hpa_ex, log.write, optimize)
    else:
        rm, rm_acc = None, None
    results = {"algo": args.algo, "config": config.run_config(args), "reward_model_accuracy": rm_acc,
               "schedules": {}, "win_rates": {}}
    answers, trained = {}, [name for name in args.schedules if name != "averaged"]

    def models():  # (name, model, stage records, evaluation): each schedule trained, then `averaged` at every α
        for name in tqdm(trained, desc="schedules", position=0, disable=None if rt.rank == 0 else True):
            model, history, last_eval = run_schedule(args, rt, name, base, (tok, ifa_ex, hpa_ex, test, world), rm,
                                                     judge, log.write)
            if rt.evaluates and last_eval is None:  # finished by an earlier run: its answers were not kept
                last_eval = evaluate_model(rt, model, tok, test, world, args, rm, judge)
            yield name, model, history, last_eval
            if name == "two-stage" and "averaged" in args.schedules:
                final = parallel.full_state(rt, model)
        if "averaged" in args.schedules:  # §7.1: (1 − α)·θ_SFT + α·θ_two-stage for each α, no training
            for name, model in prepare.averaged(args, rt, base, final, ifa_ex, tok, log.write, run_stage):
                yield name, model, [], evaluate_model(rt, model, tok, test, world, args, rm, judge) if rt.evaluates \
                    else None

    for name, model, history, last_eval in models():
        state = parallel.full_state(rt, model) if args.export_hf else None
        if rt.evaluates:
            answers[name] = [r["response"] for r in last_eval[1]]
        if rt.rank == 0:
            metrics, rows = last_eval
            results["schedules"][name] = {"metrics": metrics, "stages": history, "samples": rows[:8]}
            rundir.write_answers(args.out, name, rows)
            if args.export_hf:
                rundir.export(args.out, name, model, tok, state, rt.bf16)
    if rt.evaluates:  # under FSDP the reward model is sharded: every rank takes part in judging
        judge = world if world is not None else evaluate.pick_judge(judge, rm, tok, args.max_seq_len)
        results["win_rates"] = evaluate.win_rates(judge, test, answers)
    if rt.rank == 0:
        results["seconds"] = time.time() - t_start
        rundir.save_json(os.path.join(args.out, "results.json"), results)
        print(evaluate.table(results))
    if rt.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
