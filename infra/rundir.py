"""The run directory --out: its config check, the metrics log, the schedules' checkpoints, results and exports.

    OUT/config.json              the settings that define the run (flags.run_config); another run is not resumed here
    OUT/metrics.jsonl            one row per optimizer step (and per PPO rollout), for curves
    OUT/<schedule>.pt            the schedule after its last completed stage: weights, EWC accumulators, history
    OUT/tokenizer.model          the run's tokenizer (sample.py finds it beside OUT/<schedule>.pt)
    OUT/sft.pt                   the SFT model (hbat.sft_stage), which PPO's reward model and `averaged` start from
    OUT/reward_model.pt          PPO's reward model, trained once
    OUT/results.json             every schedule's final metrics and stages, and the win rates (docs/formats.md §4)
    OUT/<schedule>.responses.jsonl, OUT/<schedule>-hf/   the held-out answers; the Hugging Face export
    OUT/<schedule>.val_responses.jsonl                   the answers to the validation prompts
    OUT/*.dcp/                   under --fsdp: the sharded weights (and AdamW state) that a .pt file names

Every file is written atomically (checkpoint.atomic_write), so a kill leaves each whole, old or new. Only rank 0
writes files, but under --fsdp every rank writes its own shards of a sharded checkpoint; every function here is
called by every rank, so that the barriers and collectives line up.
"""
import json
import os
import shutil
import uuid
from dataclasses import asdict

import torch
from tqdm import tqdm

from infra import checkpoint, parallel
from infra.flags import die


def save_json(path, obj):
    checkpoint.atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def check_out_dir(out, config, overwrite, rt):
    """Refuse to resume into an --out written by a different configuration (unless --overwrite, which empties it)."""
    config = json.loads(json.dumps(config))  # as it reads back: tuples become lists
    path = os.path.join(out, "config.json")
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    parallel.barrier(rt)  # every rank has read the old config before rank 0 replaces it
    if old is not None and old != config:
        if not overwrite:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            die(f"{out} holds a run with other settings ({', '.join(diff)}); use another --out or --overwrite")
        if rt.rank == 0:
            for name in os.listdir(out):
                if name.endswith((".pt", ".jsonl", ".json")):
                    os.remove(os.path.join(out, name))
            remove_shards(out, "")
    if rt.rank == 0:
        os.makedirs(out, exist_ok=True)
        save_json(path, config)
    parallel.barrier(rt)


def read_metrics(path):
    """The rows of a metrics.jsonl; a last row torn by a kill is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class MetricsLog:
    """OUT/metrics.jsonl, one row per optimizer step. Opened for a run of these schedules, it drops the rows of the
    stages that did not complete (keep_only), so that a resumed run logs each step once."""

    def __init__(self, out, rank, schedules=()):
        self.path, self.on = os.path.join(out, "metrics.jsonl"), rank == 0
        done = completed_stages(out, schedules)
        self.keep_only(done, {name: mid_stage_step(out, name, n) for name, n in done.items()})

    def keep_only(self, done, resume_steps=None):
        """done: {schedule: number of its completed stages}; rows of other schedules (base, reward) are kept, and
        with resume_steps {schedule: global step}, the rows of the stage a schedule resumes inside, before that step."""
        if not (self.on and os.path.exists(self.path)):
            return
        rows = []
        for r in read_metrics(self.path):
            name, limit = r["schedule"], (resume_steps or {}).get(r["schedule"])
            if name not in done or r["stage_index"] < done[name] or (
                    r["stage_index"] == done[name] and limit is not None and r["step"] < limit):
                rows.append(r)
        checkpoint.atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))

    def write(self, row):
        if self.on:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def logger(self, where, steps_before=0, checks=()):
        """log(step, metrics): a row {**where, "step": steps_before + step, **metrics}; and for each (K, reading) of
        `checks`, after every K-th optimizer step, a row of what reading(step) returns (a dict of metrics). A reading is
        made on every rank that calls log (one that needs collectives, on all); rank 0 writes."""
        def log(step, metrics):
            step += steps_before
            self.write({**where, "step": step, **metrics})
            for every, reading in checks:
                if every and "grad_norm" in metrics and step % every == 0:
                    self.write({**where, "step": step, **reading(step)})
        return log


# -----------------------------------------------------------------------------
# a schedule's checkpoint: the model after its last completed stage, in the one model-file layout


def model_path(out, name):
    """OUT/<name>.pt: a schedule's checkpoint, or the SFT model (name "sft")."""
    return os.path.join(out, f"{name}.pt")


def save_model(rt, path, module, midstage=None):
    """A trained model in the one model-file layout (the tiny base, the SFT model, the reward model), then its stage's
    mid-stage file is spent. Every rank calls this; rank 0 writes the file. Under --fsdp the weights go, shard by
    shard from every rank, to a new directory beside it (<path without .pt>-<token>.dcp), which the file names."""
    if rt.fsdp:  # a new directory each time (the base's cache may be written by two runs): <stem>-<token>.dcp
        stem = os.path.basename(path).removesuffix(".pt")
        shards = f"{stem}-{parallel.from_rank0(rt, uuid.uuid4().hex[:8])}.dcp"
        parallel.save_shards(os.path.join(os.path.dirname(path), shards), {"model": module})
        parallel.barrier(rt)  # every rank's shards are on disk before the file that names them
        if rt.rank == 0:
            checkpoint.save_sharded(asdict(module.args), shards, path)
            remove_shards(os.path.dirname(path), f"{stem}-", keep=shards)
    else:
        state = parallel.full_state(rt, module)
        if rt.rank == 0:
            checkpoint.save(asdict(module.args), state, path)
    if midstage is not None:
        midstage.clear()
    parallel.barrier(rt)


def completed_stages(out, names):
    """{schedule: how many of its stages its checkpoint holds} (0 without one), and PPO's SFT and reward models
    ("sft", "reward": 1 once written), for MetricsLog.keep_only. Memory-mapped: only the history is read."""
    paths = {name: model_path(out, name) for name in names}
    return {name: len(torch.load(p, map_location="cpu", weights_only=True, mmap=True)["history"])
            if os.path.exists(p) else 0 for name, p in paths.items()} | {
        name: int(os.path.exists(os.path.join(out, file))) for name, file in (("sft", "sft.pt"),
                                                                             ("reward", "reward_model.pt"))}


def restore_schedule(rt, out, name, model, ewc, make_critic):
    """Load a schedule's checkpoint, if it has one, into the placed model and the EWC state, and PPO's critic into
    make_critic() if it saved one. Returns (its stage records, the optimizer steps taken, the critic or None);
    ([], 0, None) without a checkpoint. A checkpoint written under --fsdp is read shard by shard: every rank reads
    its own (whole, if this run is not sharded)."""
    path = model_path(out, name)
    if not os.path.exists(path):
        return [], 0, None
    saved = torch.load(path, map_location="cpu" if rt.fsdp else rt.device, weights_only=True, mmap=rt.fsdp)
    critic = make_critic() if saved.get("critic") is not None else None
    if "shards" in saved:  # critic: True
        shards = os.path.join(out, saved["shards"])
        if rt.fsdp:
            parallel.load_shards(shards, {"model": model} | ({"critic": critic} if critic else {}))
        else:
            model.load_state_dict(checkpoint.load_sharded(shards, "model"))
            if critic is not None:
                critic.load_state_dict(checkpoint.load_sharded(shards, "critic"))
    else:
        parallel.load_full_state(rt, model, saved["model"])
        if critic is not None:
            parallel.load_full_state(rt, critic, saved["critic"])
    if ewc is not None:
        ewc.load_state_dict(saved["ewc"])
    return saved["history"], saved["steps"], critic


def save_schedule(rt, out, name, model, ewc, history, steps, critic=None, sft=False):
    """After every stage: what resuming needs, the weights, the EWC accumulators, the stage records, the optimizer
    steps taken and PPO's critic (every stage restarts AdamW and draws its randomness from its own seed); with `sft`
    (the stage is hbat.sft_stage) the weights also as OUT/sft.pt, unless it exists. Every rank calls this. Under
    --fsdp the weights go to OUT/<name>.stage<k>.dcp/, each rank writing its own shards (parallel.save_shards), and
    OUT/<name>.pt names that directory; otherwise rank 0 writes them into OUT/<name>.pt."""
    extra = dict(ewc=ewc.state_dict() if ewc else {}, history=history, steps=steps)
    # decided before anything is written, the same on every rank (a schedule named "sft" is OUT/sft.pt already)
    copy_sft = sft and name != "sft" and not os.path.exists(model_path(out, "sft"))
    parallel.barrier(rt)  # every rank has looked before rank 0 writes
    if rt.fsdp:
        shards = f"{name}.stage{len(history)}.dcp"
        parallel.save_shards(os.path.join(out, shards), {"model": model} | ({"critic": critic} if critic else {}))
        parallel.barrier(rt)  # every rank's shards are on disk before the file that names them
        if rt.rank == 0:
            checkpoint.save_sharded(asdict(model.args), shards, model_path(out, name), **extra,
                                    critic=True if critic is not None else None)
            remove_shards(out, f"{name}.stage", keep=shards)
    else:
        state = parallel.full_state(rt, model)
        critic_state = parallel.full_state(rt, critic) if critic is not None else None
        if rt.rank == 0:
            checkpoint.save(asdict(model.args), state, model_path(out, name), **extra, critic=critic_state)
            remove_shards(out, f"{name}.stage")  # a run under --fsdp's, continued without it
    if copy_sft:
        save_model(rt, model_path(out, "sft"), model)


def remove_shards(out, prefix, keep=None):
    """Remove the sharded-checkpoint directories OUT/<prefix>*.dcp but `keep`: ones an older save left, or one a
    kill left half written (rank 0 only)."""
    for entry in os.listdir(out):
        if entry.startswith(prefix) and entry.endswith(".dcp") and entry != keep:
            shutil.rmtree(os.path.join(out, entry), ignore_errors=True)


class MidStage:
    """OUT/<schedule>.step.pt: a stage's progress every --save-every optimizer steps, so that a killed run resumes
    inside the stage as if never stopped. The stage is first rebuilt from the last stage-boundary checkpoint exactly
    as an uninterrupted run builds it (the EWC anchor and weights, the reference model or cached reference log-probs,
    the critic it started with); `restore` then loads what only the stage's own steps changed: the weights (PPO: and
    the critic's), AdamW's state, and the loop's `progress` (its step, its metric rows, where it is in the data), and
    for every rank what that rank alone holds: its RNG states and, under PPO, its sampling generator, KL coefficient
    and the release's reward queue. Written atomically by rank 0; under FSDP each rank writes its own shards of the
    weights and AdamW's state beside it (`save`)."""

    def __init__(self, out, schedule, stage_index, steps_before, every, rt):
        self.path, self.schedule = os.path.join(out, f"{schedule}.step.pt"), schedule
        self.stage_index, self.steps_before, self.every, self.rt = stage_index, steps_before, every, rt
        self.last = 0  # the stage's step at the last save (or at the restore)

    def _read(self):
        if not os.path.exists(self.path):
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        return state if state["stage_index"] == self.stage_index else None  # else left by an earlier stage

    def restore(self, module, opt, name):
        """Load this stage's saved progress into module and opt (the ones the stage just built) and return the loop's
        `progress` dict with this rank's own state in it (`per_rank` of `save`), or None when the stage starts from
        its beginning."""
        state = self._read()
        if state is None:
            return None
        if "ranks" not in state:
            raise ValueError(f"{self.path} was saved by an older version of this code: remove it to restart the stage")
        if len(state["ranks"]) != self.rt.world:
            raise ValueError(f"{self.path} was saved by {len(state['ranks'])} processes, this run has {self.rt.world}: "
                             "resume it with as many, or remove the file to restart the stage")
        if "shards" in state and not self.rt.fsdp:
            raise ValueError(f"{self.path} was saved under --fsdp: resume it with --fsdp, or remove the file to "
                             "restart the stage")
        if "shards" in state:
            parallel.load_shards(os.path.join(os.path.dirname(self.path), state["shards"]), {"train": (module, opt)})
        else:
            parallel.load_train_state(self.rt, module, opt, state["module"], state["optimizer"])
        mine = dict(state["ranks"][self.rt.rank])
        torch.set_rng_state(mine.pop("rng"))
        cuda_rng = mine.pop("cuda_rng")
        if torch.cuda.is_available() and cuda_rng:
            torch.cuda.set_rng_state_all(cuda_rng)
        self.last = state["progress"]["step"]
        if self.rt.rank == 0:
            tqdm.write(f"resuming {self.schedule} {name} at step {self.last}")
        return state["progress"] | mine

    def saved(self) -> bool:
        """Whether this stage's progress is on disk (a file left by an earlier stage does not count)."""
        return self._read() is not None

    def due(self, step):
        return bool(self.every) and step - self.last >= self.every

    def save(self, module, opt, progress, per_rank=None):
        """Every rank calls this; rank 0 writes the file. `progress` is the loop's, the same on every rank;
        `per_rank` what each rank keeps for itself (PPO: its sampling generator and the release's reward queue),
        saved for every rank with its RNG states and given back to the same rank. The weights and AdamW's state go
        into the file, or under --fsdp into OUT/<schedule>.step<global step>.dcp/, each rank writing its own shards,
        which the file names once they are complete."""
        progress = progress | {"global_step": self.steps_before + progress["step"]}  # where metrics.jsonl resumes
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        mine = (per_rank or {}) | {"rng": torch.get_rng_state(), "cuda_rng": cuda_rng}
        if self.rt.fsdp:
            shards = f"{self.schedule}.step{progress['global_step']}.dcp"
            parallel.save_shards(os.path.join(os.path.dirname(self.path), shards), {"train": (module, opt)})
            train = {"shards": shards}
        else:
            module_state, opt_state = parallel.train_state(self.rt, module, opt)
            train = {"module": module_state, "optimizer": opt_state}
        ranks = parallel.gather_to_rank0(self.rt, mine)  # also a barrier: every rank's shards are written
        self.last = progress["step"]
        if self.rt.rank == 0:
            checkpoint.atomic_save({"stage_index": self.stage_index, "progress": progress, "ranks": ranks, **train},
                                   self.path)
            remove_shards(os.path.dirname(self.path), f"{self.schedule}.step", keep=train.get("shards"))

    def clear(self):
        """After the stage's boundary checkpoint is written: its progress is spent."""
        if self.rt.rank == 0:
            if os.path.exists(self.path):
                os.remove(self.path)
            remove_shards(os.path.dirname(self.path), f"{self.schedule}.step")


def mid_stage_step(out, name, stage_index):
    """The global step at which a saved mid-stage progress of `name` resumes stage `stage_index`, or None."""
    path = os.path.join(out, f"{name}.step.pt")
    if not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state["progress"]["global_step"] if state["stage_index"] == stage_index else None


# -----------------------------------------------------------------------------
# the end of a run


class Results:
    """OUT/results.json, filled as the schedules finish: every schedule's final metrics (and on the validation
    prompts val_metrics), stage records and first answers, with all its test answers in
    OUT/<schedule>.responses.jsonl (validation answers: OUT/<schedule>.val_responses.jsonl); then the win rates
    against two-stage, on the test prompts (win_rates) and on the validation prompts (val_win_rates). Every rank
    that evaluates calls `add` and `win_rates`; rank 0 writes."""

    def __init__(self, rt, out, algo, config, rm_accuracy):
        self.rt, self.out, self.answers = rt, out, {"": {}, "val_": {}}  # test, validation answers
        self.data = {"algo": algo, "config": config, "reward_model_accuracy": rm_accuracy, "schedules": {},
                     "win_rates": {}, "val_win_rates": {}}

    def add(self, name, history, evaluation, val_evaluation=None):
        """A schedule's stage records and its final evaluations, each (metrics, answer rows)."""
        (metrics, rows), val = evaluation, val_evaluation or ({}, [])
        self.answers[""][name], self.answers["val_"][name] = ([r["response"] for r in rs] for rs in (rows, val[1]))
        if self.rt.rank == 0:
            self.data["schedules"][name] = {"metrics": metrics, "val_metrics": val[0], "stages": history,
                                            "samples": rows[:8]}
            for prefix, rs in (("", rows), ("val_", val[1])):  # what a study compares runs by, across run dirs
                if rs:
                    checkpoint.atomic_write(os.path.join(self.out, f"{name}.{prefix}responses.jsonl"),
                                            lambda f, rs=rs: f.write("".join(json.dumps(r) + "\n" for r in rs).encode()))

    def save(self, seconds):
        if self.rt.rank == 0:
            save_json(os.path.join(self.out, "results.json"), self.data | {"seconds": seconds})


def write_tokenizer(directory, tok):
    """directory/tokenizer.model, where importers.find_tokenizer (sample.py, a run on real data) looks for it."""
    checkpoint.atomic_write(os.path.join(directory, "tokenizer.model"), lambda f: f.write(tok.model_proto))


def export(rt, out, name, model, tok):
    """OUT/<schedule>-hf: the Hugging Face layout, with the tokenizer; bf16 under bf16, as LLaMA weights ship. Every
    rank calls this (FSDP gathers); rank 0 writes."""
    state = parallel.full_state(rt, model)
    if rt.rank == 0:
        hf_dir = os.path.join(out, f"{name}-hf")
        dtype = torch.bfloat16 if rt.bf16 else torch.float32
        checkpoint.export_hf(model, hf_dir, tok.bos_id, tok.eos_id, {k: v.to(dtype) for k, v in state.items()})
        write_tokenizer(hf_dir, tok)
