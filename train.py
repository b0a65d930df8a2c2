"""
Hybrid Alignment Training: the one training loop.

    python train.py --algo dpo                    # the small-scale reproduction on the embedded world
    python train.py --algo ppo                    # the same with a reward model and PPO
    python train.py --algo dpo --preset smoke     # the whole pipeline in seconds
    torchrun --nproc_per_node 2 train.py --algo dpo --preset smoke            # DDP
    torchrun --nproc_per_node 8 train.py --fsdp --model /data/llama-2-7b ...  # sharded; docs/real-data.md

Read it top to bottom, one path: `main` prepares the task and the base model (under PPO also the SFT and reward
models), runs every schedule of hbat.py and prints a table; `run_schedule` walks a schedule's stages with the EWC
penalty around each and a checkpoint after it; `run_stage` takes one `train_step` per step of a stage, its batches and
losses built by `stage_objectives` (IFA, DPO and their mixes) or, under PPO, `run_ppo_stage` runs rollout -> epochs x
minibatches -> early stop; `train_step` is one AdamW step, the same in every stage. What a run starts from:
prepare.py; flags, run directory, placement over ranks: infra/. Re-running a command with the same --out resumes
after the last completed stage (or inside it, --save-every) with the same numbers on the same device and thread
count: each stage draws its randomness from generators seeded by the stage. § refers to docs/method.md.
"""
import os
import time
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from tqdm import tqdm

import data
import dpo
import evaluate
import hbat
import ppo
import prepare
import reward
from ewc import EWC
from infra import flags, parallel, pictures, rundir
from infra.flags import die
from lab import conflict
from model import Transformer


@dataclass
class Run:
    """What every stage of a run shares."""
    args: object                          # the flags (infra/flags.py)
    rt: parallel.Runtime                  # where this process runs: device, rank, world size, precision
    task: prepare.Task                    # tokenizer, D_IFA, D_HPA, held-out prompts (and the world's gold judge)
    log: rundir.MetricsLog                # OUT/metrics.jsonl
    rm: reward.RewardModel | None = None  # PPO's reward model
    judge: evaluate.Judge | None = None   # real data: what scores answers (--judge)
    sft: Transformer | None = None        # --overopt-every: the SFT model, the instrument's shared KL reference

    def evaluate(self, model, records=None):
        """(metrics, answer rows) of the model on these records, by default the test prompts."""
        return evaluate.evaluate_placed(self.rt, model, self.task, self.task.test if records is None else records,
                                        self.args.max_new_tokens, self.args.max_seq_len, self.rm, self.judge)

    def logger(self, schedule, stage, index=0, steps_before=0, model=None, start=None):
        """log(step, metrics) for a stage: rows of OUT/metrics.jsonl; with a model and --eval-every K also its scores
        on 100 test prompts every K optimizer steps; with the stage's starting model and --overopt-every K the
        over-optimisation instrument's reading (evaluate.overopt) on 64 validation prompts every K steps."""
        args, on = self.args, model is not None and self.rt.evaluates

        def scores(step):
            m = self.evaluate(model, self.task.test[:100])[0]
            return {f"eval/{k}": m[k] for k in ("ifa_score", "hpa_score") if k in m}

        def overopt(step):  # its own sampling seed per reading, so that it draws nothing from training's streams
            seed = hbat.stage_seed(args.seed, schedule, stage, "overopt", step)
            return evaluate.overopt(self.rt, model, start, self.task, self.task.val[:64], args.max_new_tokens,
                                    args.max_seq_len, self.rm, seed, self.sft)
        checks = [(args.eval_every if on else 0, scores), (args.overopt_every if on and start is not None else 0,
                                                           overopt)]
        return self.log.logger({"schedule": schedule, "stage": stage, "stage_index": index}, steps_before, checks)

    def kl_sft(self, model, schedule):
        """{"kl_sft": KL of a final model from the SFT model on the test prompts, where its tax is measured}, with the
        instrument on (--overopt-every); else {}. Its own sampling seed, like the instrument's readings."""
        if self.sft is None:
            return {}
        seed = hbat.stage_seed(self.args.seed, schedule, "kl_sft")
        return evaluate.sampled_kl(self.rt, model, {"kl_sft": self.sft}, self.task, self.task.test,
                                   self.args.max_new_tokens, self.args.max_seq_len, seed)[1]


def main(argv=None):
    args = flags.get_args(argv)
    rt = parallel.setup(args.device, args.dtype, args.fsdp, args.compile, args.activation_checkpointing)
    flags.check_world(args, rt.world)
    rundir.check_out_dir(args.out, flags.run_config(args), args.overwrite, rt)
    t_start = time.time()
    try:  # a bad file is one line
        task = prepare.load_task(args, rt)
        judge = evaluate.load_judge(args.judge, task.tok, args.max_seq_len, rt.device) if args.judge else None
        base = prepare.base_model(args, rt, task)  # None: the tiny base is pretrained below
    except (OSError, ValueError) as e:  # data.DataError is a ValueError
        die(str(e))
    flags.check_sizes(args, len(task.ifa), len(task.hpa))
    run = Run(args, rt, task, rundir.MetricsLog(args.out, rt.rank, args.schedules), judge=judge)
    if rt.rank == 0:
        rundir.write_tokenizer(args.out, task.tok)
    if base is None:  # no --model: the tiny base, pretrained once on the world's corpus
        base = pretrain(run)
    rm_accuracy = None
    if args.algo == "ppo":  # one reward model for every schedule, trained from the SFT model
        run.rm, rm_accuracy = reward_model(run, base)
    if args.overopt_every:  # the instrument measures every KL from the SFT model too: forgetting against KL
        sft = prepare.lean_load(rt, train_sft(run, base))
        run.sft = parallel.place(rt, sft, sft.state_dict()).eval().requires_grad_(False)  # one copy: placed in place
    results = rundir.Results(rt, args.out, args.algo, flags.run_config(args), rm_accuracy)
    for name in tqdm(args.schedules, desc="schedules", position=0, disable=None if rt.rank == 0 else True):
        stages, n_splits = hbat.build(name, args.n_splits, args.epochs_ifa, args.epochs_hpa, args.ewc != "none",
                                      args.rpo_alpha, args.alright_lambda)
        if stages:
            trained = [(name, *run_schedule(run, name, stages, n_splits, base))]
        else:  # weight averaging trains nothing (§7.1): the SFT model and two-stage's, interpolated
            train_sft(run, base)
            trained = ((name, model, [], None) for name, model in prepare.averaged(args, rt, base.args))
        for name, model, history, evaluation in trained:  # None: not evaluated here (averaged, other ranks)
            if rt.evaluates:  # and on the validation prompts, where settings are chosen
                metrics, rows = evaluation or run.evaluate(model)
                results.add(name, history, (metrics | run.kl_sft(model, name), rows),
                            task.val and run.evaluate(model, task.val))
            if args.export_hf:
                rundir.export(rt, args.out, name, model, task.tok)
    if rt.evaluates:  # where every schedule started, the first row of the table: judged last, because generating
        # under FSDP gathers whole weights on every rank (parallel.gathered), which training needs nowhere
        results.data["base_metrics"] = run.evaluate(parallel.place(rt, prepare.on_meta(base.args),
                                                                   base.state_dict()))[0]
    # every schedule against two-stage (under FSDP a reward model is sharded: every rank takes part in judging)
    judge = evaluate.pick_judge(judge, run.rm, task.tok, args.max_seq_len, task.world)
    for prefix, records in (("", task.test), ("val_", task.val)):
        if rt.evaluates and records:
            results.data[prefix + "win_rates"] = evaluate.win_rates(judge, records, results.answers[prefix])
    results.save(time.time() - t_start)
    if rt.rank == 0:
        print(evaluate.table(results.data) + "\n" + pictures.draw(args.out, results.data))
    parallel.teardown(rt)


# -----------------------------------------------------------------------------
# one schedule: walk its stages (hbat.py), a checkpoint after each


def run_schedule(run, name, stages, n_splits, base):
    """Train one schedule from the base, resuming after its last completed stage. Returns (model, stage records,
    (metrics, rows) of the last stage's evaluation: made here, also when a re-run finds the last stage saved but not
    yet judged; None on a rank that does not evaluate)."""
    args, rt = run.args, run.rt
    subsets = {kind: hbat.split(examples, n_splits, args.seed) for kind, examples in (("ifa", run.task.ifa),
                                                                                      ("hpa", run.task.hpa))}
    ewc = EWC(method=args.ewc, f_max=args.f_max, f_max_ifa=args.f_max_ifa, lam=args.ewc_lambda, norm=args.ewc_norm,
              scale=args.ewc_scale, elementwise=args.ewc_elementwise, seed=args.seed) if any(
        s.ewc for s in stages) else None
    model = parallel.place(rt, prepare.on_meta(base.args), base.state_dict())
    history, steps_before, critic = rundir.restore_schedule(rt, args.out, name, model, ewc,  # the critic is carried
                                                            lambda: prepare.critic(rt, run.rm))  # across HPA stages
    probes = ([ex[:2] for ex in run.task.ifa[:args.grad_probe]], [ex[:3] for ex in run.task.hpa[:args.grad_probe]])
    micro = args.batch_size // (rt.world * args.grad_accum)  # a probe's forward passes are no larger than training's
    ppo_cfg = flags.ppo_config(args, rt.world) if args.algo == "ppo" else None
    last_eval = None
    if history and "eval" not in history[-1]:  # its last stage was saved, not judged: the run stopped in between
        last_eval = judge_last_stage(run, model, history)
    for i in range(len(history), len(stages)):
        stage, t0 = stages[i], time.time()
        online = ppo_cfg is not None and stage.kind == "hpa"  # a PPO stage: on-policy samples, not a dataset
        start = parallel.copy_of(rt, model, lambda: prepare.on_meta(model.args)).eval().requires_grad_(False) if (
            args.overopt_every and stage.kind == "hpa") else None  # the stage's start, for the instrument's KL
        log = run.logger(name, stage.name, i, steps_before, model, start)
        probing = args.algo == "dpo" and args.grad_probe  # §7.4: does a step on one objective undo the other?
        probe = conflict.probe(model, probes, args.beta, rt, chunk=micro) if probing else {}  # at its start, then end
        if ewc is not None:
            ewc.begin_stage(stage.kind, model, stage.ewc)  # the anchor θ* is the model at the start of the stage
        if online and ppo_cfg.critic and (critic is None or args.critic_restart):
            critic = prepare.critic(rt, run.rm)  # it estimates values of the same fixed reward in every HPA stage
        midstage = rundir.MidStage(args.out, name, i, steps_before, args.save_every, rt)  # --save-every
        try:
            if online:
                m, steps, examples = run_ppo_stage(run, stage, model, critic, subsets, ewc, midstage, log)
            else:
                m, steps, examples = run_stage(run, stage.name, stage.kind, model, stage_objectives(
                    run, stage, model, subsets), ewc, midstage, log, stage.alright_lambda,
                    hbat.stage_seed(args.seed, stage.name, stage.kind, "order"))
        except FloatingPointError as e:  # the newest checkpoint that exists: this stage's progress, or the last stage's
            path = midstage.path if midstage.saved() else rundir.model_path(args.out, name)
            die(f"{name} stopped: {e}; " + (f"the last good checkpoint is {path}" if os.path.exists(path) else
                                            "it has no checkpoint yet"), code=1)
        record = {"name": stage.name, "kind": stage.kind, "ewc": stage.ewc, "steps": steps, "examples": examples,
                  **probe, **(conflict.probe(model, probes, args.beta, rt, "_end", micro) if probing else {})}
        if ewc is not None and ewc.active:  # the penalty's strength: Σ_n F_n, and L_EWC where the stage ended
            with torch.no_grad():
                end = parallel.mean_over_ranks({"p": ewc.penalty(model).item()}, rt)["p"] * (rt.world if rt.fsdp else 1)
            record |= {"ewc_total_weight": ewc.total_weight, "ewc_penalty_end": end}
        if ewc is not None:  # Ω of the stage's objective; original EWC's Fisher on the stage's own examples
            ewc.end_stage(stage.kind, model, subsets[stage.kind][stage.subset])
        steps_before += steps
        history.append(record | {"seconds": time.time() - t0, "metrics": m})
        # saved before it is judged: an evaluation that fails (a long answer out of memory, a bad judge) loses no
        # training, and the re-run judges the stage without training it again (before this loop)
        rundir.save_schedule(rt, args.out, name, model, ewc, history, steps_before, critic,
                             sft=stage == hbat.sft_stage(args.epochs_ifa))  # the SFT model: what `averaged` starts from
        midstage.clear()
        parallel.barrier(rt)
        last_eval = judge_last_stage(run, model, history)
        if rt.rank == 0:
            tqdm.write(evaluate.stage_line(name, stage.name, m, history[-1]["eval"], time.time() - t0))
    return model, history, last_eval


def judge_last_stage(run, model, history):
    """Evaluate the model where the last stage left it, into that stage's record: the alignment tax is the IFA score
    the HPA stages lose. Returns (metrics, answer rows), or None on a rank that does not evaluate."""
    if not run.rt.evaluates:
        return None
    evaluation = run.evaluate(model)
    history[-1]["eval"] = evaluation[0]
    return evaluation


# -----------------------------------------------------------------------------
# one stage: its objectives, then one train_step per step


def stage_objectives(run, stage, model, subsets):
    """The objectives of an IFA, DPO, multi-task or alright stage on its subset of the data (this rank's shard)."""
    args, rt = run.args, run.rt
    ifa, hpa = (data.shard_of(subsets[kind][stage.subset], rt.rank, rt.world) for kind in ("ifa", "hpa"))
    seed = hbat.stage_seed(args.seed, stage.name, stage.kind)
    torch.manual_seed(seed)
    per_rank, objectives = args.batch_size // rt.world, {}
    if stage.epochs_ifa:
        objectives["ifa"] = hbat.Objective(dpo.ifa_step_loss, data.batches_of(
            ifa, per_rank, stage.epochs_ifa, seed, data.ifa_batch, args.grad_accum, rt.device),
            data.n_batches(len(ifa), per_rank, stage.epochs_ifa), args.lr_ifa)
    if stage.epochs_hpa:  # §2.3: DPO's reference is the model at the start of the stage, its log-probs cached here
        ref_model = parallel.copy_of(rt, model, lambda: prepare.on_meta(model.args)).eval().requires_grad_(False) \
            if args.live_ref else None
        with rt.autocast():  # the precision of the training step, so that the first step's ratio is exactly 1
            ref_logps = None if args.live_ref else dpo.reference_logps(model, hpa, args.batch_size, rt.device)
        loss_fn = partial(dpo.dpo_step_loss, beta=args.beta, label_smoothing=args.label_smoothing, ipo=args.ipo,
                          ref_model=ref_model, rpo_alpha=stage.rpo_alpha)
        objectives["hpa"] = hbat.Objective(loss_fn, data.batches_of(
            hpa, per_rank, stage.epochs_hpa, seed + 1, data.hpa_batch, args.grad_accum, rt.device, rows=ref_logps),
            data.n_batches(len(hpa), per_rank, stage.epochs_hpa), args.lr_hpa)
    return objectives


def run_stage(run, name, kind, module, objectives, ewc=None, midstage=None, log=None, lam=0.5, seed=0):
    """One stage: a fresh AdamW (§2.2 step 3), then one train_step per step of hbat.steps(kind, ...) (alright's steps
    drawn with weight lam for DPO, from `seed`), the lr warmed up and decayed over the stage; `midstage`
    (rundir.MidStage) saves its progress every --save-every steps and resumes from it. Returns (the stage's mean
    metrics, its steps, the examples it trained on: repeats over epochs counted, over all ranks)."""
    args, rt = run.args, run.rt
    n_steps = hbat.n_steps(kind, objectives)
    opt, rows, start, examples = adamw(module), [], 0, 0
    losses = parallel.wrap(rt, module, {k: o.loss_fn for k, o in objectives.items()})
    if midstage and (progress := midstage.restore(module, opt, name)):
        start, rows = progress["step"], progress["rows"]
    bar = tqdm(desc=name, total=n_steps, initial=start, leave=False, position=2, disable=None if rt.rank == 0 else True)
    for step, (objective, micro_steps, shares, n) in enumerate(hbat.steps(kind, objectives, lam, seed)):
        examples += n * rt.world
        if step < start:  # a resumed stage skips the steps it took: the same batches, and the same examples counted
            continue
        lr = objectives[objective].lr * lr_at(step, n_steps, args.warmup)
        try:
            m = train_step(losses, opt, micro_steps, shares, lr, args.grad_clip, rt, ewc, module)
        except FloatingPointError as e:
            raise FloatingPointError(f"{name}: {e} at step {step}") from None
        rows.append({k: v for k, v in m.items() if k != "lr"})  # the stage reports its mean metrics, not its lr
        bar.update(1)
        if log:
            log(step, m)
        if midstage and midstage.due(step + 1):
            midstage.save(module, opt, {"step": step + 1, "rows": rows})
    bar.close()
    return means(rows), len(rows), examples


def run_ppo_stage(run, stage, model, critic, subsets, ewc, midstage, log):
    """§4.2, cleanrl's loop: for each batch of prompts a rollout, then cfg.epochs x minibatches of train steps,
    stopped early when the policy moved too far (--target-kl). The KL reference is the model at the start of the
    stage (§2.3); the critic is the schedule's (None for the release's variant, §4.3, whose reward queue restarts
    here). Returns (mean metrics, steps, answers sampled: prompts rolled out, times K under GRPO)."""
    args, rt, tok = run.args, run.rt, run.task.tok
    prompts = [ex[0] for ex in data.shard_of(subsets["hpa"][stage.subset], rt.rank, rt.world)]
    seed = hbat.stage_seed(args.seed, stage.name, stage.kind)
    torch.manual_seed(seed)
    cfg = flags.ppo_config(args, rt.world)
    ref_model = parallel.copy_of(rt, model, lambda: prepare.on_meta(model.args)).eval().requires_grad_(False)
    modules = nn.ModuleDict(dict(policy=model) | (dict(critic=critic) if cfg.critic else {}))
    opt, losses = adamw(modules), parallel.wrap(rt, modules, {"ppo": partial(ppo.minibatch_loss, cfg=cfg)})
    state = ppo.StageState(cfg, seed, rt.device)  # the sampling generator, KL coefficient, the release's reward queue
    # each rollout's prompts (GRPO: 1/K as many, K answers each), and the lr's horizon: every rollout's epochs x
    # minibatches, the last rollout and the last minibatch maybe smaller
    group = cfg.group_size
    batches = data.rollout_batches(len(prompts), args.rollout_batch // rt.world, stage.epochs_hpa, seed, group)
    n_steps = cfg.epochs * sum(data.n_batches(len(idx) * group, cfg.minibatch_size, 1) for idx in batches)
    step, rows, rollouts, n_prompts = 0, [], [], 0
    if progress := midstage.restore(modules, opt, stage.name):  # saved between rollouts: resume with the next one
        step, rows, rollouts, n_prompts = (progress[k] for k in ("step", "rows", "rollouts", "n_prompts"))
        state.load_state_dict(progress)
    bar = tqdm(total=n_steps, initial=step, desc=stage.name, leave=False, position=2, disable=rt.rank != 0 or None)
    for idx in batches[len(rollouts):]:
        # 1. rollout, in the update's precision (else the first ratio is not 1); under FSDP the policy stays gathered
        with rt.autocast(), parallel.gathered(rt, model):
            answered = [prompts[i] for i in idx for _ in range(group)]  # GRPO: each prompt K times in a row
            ro, m = ppo.rollout(model, ref_model, critic, run.rm, answered, cfg, tok.eos_id, tok.pad_id,
                                state.generator, partial(data.ids_before_end_of_turn, tok=tok), state.queue)
        rollouts.append(parallel.mean_over_ranks(m, rt))
        n_prompts += len(idx) * group * rt.world  # answers sampled: prompts x K
        state.after_rollout(rollouts[-1]["kl"], len(idx) * group * rt.world)
        log(step, {"rollout/" + k: v for k, v in rollouts[-1].items()})
        # 2. every epoch's shuffle is drawn before the first update, so an early stop leaves the generator where it
        #    would be
        for mb in [mb for _ in range(cfg.epochs) for mb in ppo.minibatches(ro, cfg.minibatch_size, state.generator)]:
            sizes = data.micro_split(len(mb.scores), args.grad_accum)
            try:
                metrics = train_step(losses, opt, [[("ppo", (micro,), 1.0)] for micro in ppo.split(mb, sizes)],
                                     [k / len(mb.scores) for k in sizes],
                                     args.lr_hpa * lr_at(step, n_steps, args.warmup), args.grad_clip, rt, ewc, model)
            except FloatingPointError as e:
                raise FloatingPointError(f"{stage.name}: {e} at step {step}") from None
            rows.append({k: v for k, v in metrics.items() if k != "lr"})
            log(step, metrics)
            step += 1
            bar.update(1)
            # 3. early stop: the policy moved too far from the rollout's; skip the rest of this rollout's updates
            if cfg.target_kl and metrics["approx_kl"] > cfg.target_kl:
                break
        if midstage.due(step):
            midstage.save(modules, opt, {"step": step, "rows": rows, "rollouts": rollouts, "n_prompts": n_prompts},
                          per_rank=state.state_dict())
    bar.close()
    return means(rows) | means(rollouts, "rollout/"), step, n_prompts


# -----------------------------------------------------------------------------
# one optimizer step, the same in every stage


def train_step(losses, opt, micro_steps, shares, lr, grad_clip, rt, ewc=None, policy=None):
    """One AdamW step on Σ_i shares[i] · losses(micro_steps[i]) over the micro-steps of gradient accumulation
    (shares: each one's part of the batch, summing to 1), plus the stage's EWC penalty on `policy` (§3.3). losses:
    parallel.wrap's sum of a micro-step's losses. Returns the step's metrics (the same weighted means, then means
    over ranks), its lr and the gradient norm before clipping."""
    for g in opt.param_groups:
        g["lr"] = lr
    metrics = {}
    for i, (parts, share) in enumerate(zip(micro_steps, shares)):
        # gradients are averaged over ranks on the last micro-step only, which must be known before the forward
        with parallel.grad_sync(losses, i == len(micro_steps) - 1), rt.autocast():
            loss, m = losses(parts)
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


def lr_at(step, total, warmup_share):
    """Linear warm-up then linear decay to 0 (a constant lr made scores jump between checkpoints:
    docs/design-notes.md)."""
    warmup = max(1, int(warmup_share * total))
    return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def adamw(module):
    """Every stage starts a fresh AdamW (§2.2 step 3); train_step sets its lr."""
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.0, betas=(0.9, 0.95),
                             weight_decay=0.0)


def means(rows, prefix=""):
    """The mean of each metric over the rows of a stage that have it (alright's IFA and DPO steps log different
    metrics): what the stage reports."""
    keys = dict.fromkeys(k for r in rows for k in r)
    return {prefix + k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}


# -----------------------------------------------------------------------------
# what the schedules start from, each trained once: the tiny base, and under PPO the SFT and reward models


def pretrain(run):
    """The tiny base of the embedded world (no --model): a LLaMA pretrained on the world's unlabeled corpus with the
    next-token loss, cached under --cache-dir (prepare.base_path) for every later run; returns it as loaded back."""
    args, rt = run.args, run.rt
    torch.manual_seed(args.world_seed)
    model = parallel.place(rt, Transformer(prepare.tiny_model_args(args, run.task.tok.vocab_size)))
    lm = hbat.Objective(dpo.lm_step_loss, prepare.pretraining_batches(args, rt, run.task), args.pretrain_steps, 1e-3)
    m, _, _ = run_stage(run, "pretrain", "lm", model, {"lm": lm}, log=run.logger("base", "pretrain"))
    return prepare.cache_base(args, rt, run.task, model, m["loss"])


def train_sft(run, base):
    """The SFT model, which PPO's reward model and `averaged` start from: hbat.sft_stage, two-stage's IFA stage (its
    seed, so the same model), trained once per run as a schedule of its own unless two-stage wrote it. Its path."""
    path = rundir.model_path(run.args.out, "sft")
    if not os.path.exists(path):
        run_schedule(run, "sft", [hbat.sft_stage(run.args.epochs_ifa)], 1, base)
    return path


def reward_model(run, base):
    """§1: the reward model, trained once on D_HPA from the SFT model (Bradley–Terry, scalar head at the last
    response token) and kept fixed in OUT/reward_model.pt; PPO then uses only D_HPA's prompts. A tenth of the pairs is
    held out to measure its accuracy. Returns (the placed reward model, that accuracy)."""
    args, rt, path = run.args, run.rt, rundir.model_path(run.args.out, "reward_model")
    n_val = max(1, len(run.task.hpa) // 10)
    train_ex, val_ex = run.task.hpa[:-n_val], run.task.hpa[-n_val:]
    if not os.path.exists(path):
        sft = prepare.lean_load(rt, train_sft(run, base))
        seed = hbat.stage_seed(args.seed, "rm")
        torch.manual_seed(seed)  # the head's initialisation, and the batches
        midstage = rundir.MidStage(args.out, "reward", 0, 0, args.save_every, rt)
        rm = reward.RewardModel(sft)  # the SFT model is not needed after this
        rm = parallel.place(rt, rm, rm.state_dict())
        shard, per_rank = data.shard_of(train_ex, rt.rank, rt.world), args.batch_size // rt.world
        pairs = hbat.Objective(reward.rm_step_loss, data.batches_of(
            shard, per_rank, args.rm_epochs, seed, data.hpa_batch, args.grad_accum, rt.device),
            data.n_batches(len(shard), per_rank, args.rm_epochs), args.lr_ifa)
        run_stage(run, "RM", "rm", rm, {"rm": pairs}, None, midstage, run.logger("reward", "RM"))
        reward.set_offset(rm, train_ex, args.batch_size, rt.device)
        rundir.save_model(rt, path, rm, midstage)
    return prepare.load_reward_model(rt, path, val_ex, args.batch_size)


if __name__ == "__main__":
    main()
