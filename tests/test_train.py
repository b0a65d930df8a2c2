"""train.py end to end: smoke runs of the real entry point at a tiny size.

Every run is a subprocess (`python train.py ...` or torchrun), so exit codes, stdout and stderr are the real ones.
All runs share one session cache (--cache-dir), so the tiny base is pretrained once; each gets its own --out.
Runs use one thread each (OMP_NUM_THREADS=1): at this size threads only fight each other on a shared machine.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import data
from conftest import ENV, ROOT, ok, tiny_transformer
from checkpoint import export_hf
from model import ModelArgs, Transformer, save_checkpoint

SMOKE = ("--preset", "smoke", "--device", "cpu")
ALGOS = {"dpo": ("--algo", "dpo"), "ppo": ("--algo", "ppo"),  # the flags of each HPA objective the tests run
         "ppo-release": ("--algo", "ppo", "--ppo-variant", "release"), "ppo --fsdp": ("--algo", "ppo", "--fsdp")}
HBAT_STAGES = [(f"{kind}_{i}", kind.lower(), not (kind == "IFA" and i == 1)) for i in range(1, 5)
               for kind in ("IFA", "HPA")]  # --preset smoke keeps the default --n-splits 4


def train(*flags, out, cache, launcher=(sys.executable,), timeout=300):
    cmd = [*launcher, "train.py", *SMOKE, "--out", str(out), "--cache-dir", str(cache), *map(str, flags)]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc, code=2):
    """The contract for bad input: exit code `code`, stderr exactly one line, no traceback. Returns that line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, f"exit code {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr[-3000:]}"
    return lines[0]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def snapshot(out):
    """{file name: bytes} of everything in an --out, to check that a failed run lost or changed nothing."""
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}


def comparable(results):
    """results.json without what legitimately differs between two runs of one command: wall-clock seconds."""
    r = json.loads(json.dumps(results))
    r.pop("seconds", None)
    for s in r["schedules"].values():
        for stage in s["stages"]:
            stage.pop("seconds", None)
    return r


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, cache):
    """One uninterrupted `train.py --algo ALGO --preset smoke` per algo, shared by the tests that only read it."""
    runs = {}

    def get(algo):
        if algo not in runs:
            out = tmp_path_factory.mktemp(f"smoke-{algo}") / "out"
            runs[algo] = (out, ok(train(*ALGOS[algo], out=out, cache=cache)))
        return runs[algo]
    return get


@pytest.fixture(scope="session")
def custom(tmp_path_factory):
    """Real-data inputs at a toy size: a random 1-layer model saved with save_checkpoint, a sentencepiece tokenizer
    next to it (where train.py looks for one), 48 demonstrations (the last 16 are the held-out test prompts) and
    32 preference pairs as JSONL."""
    d = tmp_path_factory.mktemp("custom")
    words = ["red", "green", "blue", "cat", "dog", "bird", "one", "two", "three", "four"]
    ifa = [{"prompt": f"say {words[i % 10]} {words[3 * i % 10]}", "response": f"{words[3 * i % 10]} {words[i % 10]}"}
           for i in range(48)]
    hpa = [{"prompt": f"name {words[i % 10]}", "chosen": words[i % 10], "rejected": f"{words[(i + 1) % 10]} no"}
           for i in range(32)]
    data.save_records(d / "ifa.jsonl", ifa)
    data.save_records(d / "hpa.jsonl", hpa)
    tok = data.train_tokenizer([json.dumps(r) for r in ifa + hpa], cache_dir=d / "tok")
    (d / "model").mkdir()
    shutil.copy(next((d / "tok").glob("tokenizer-*.model")), d / "model" / "tokenizer.model")
    torch.manual_seed(0)
    save_checkpoint(Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size,
                                          multiple_of=16, max_seq_len=128)), d / "model" / "model.pt")
    return d


def custom_flags(d, ifa=None, hpa=None, model=None):
    return ["--schedule", "two-stage", "--n-splits", "1", "--ifa-data", ifa or d / "ifa.jsonl",
            "--hpa-data", hpa or d / "hpa.jsonl", "--model", model or d / "model" / "model.pt"]


# -----------------------------------------------------------------------------
# the pipeline end to end


@pytest.mark.parametrize("algo", ["dpo", "ppo", "ppo-release"])
def test_smoke_run_writes_results_metrics_and_table(smoke_run, algo):
    """The default command at smoke size runs both schedules and reports them: progress lines, a table, the logs.
    The release's PPO builds no critic: no value loss is logged and no critic is checkpointed."""
    out, proc = smoke_run(algo)
    results = read_json(out / "results.json")
    assert results["algo"] == algo.split("-")[0]
    assert set(results["schedules"]) == {"two-stage", "hbat"}
    for s in results["schedules"].values():
        assert {"ifa_score", "hpa_score"} <= set(s["metrics"])
        assert all(math.isfinite(s["metrics"][k]) for k in ("ifa_score", "hpa_score"))
    stages = {name: [(st["name"], st["kind"], st["ewc"]) for st in s["stages"]]
              for name, s in results["schedules"].items()}
    assert stages["two-stage"] == [("IFA", "ifa", False), ("HPA", "hpa", False)]
    assert stages["hbat"] == HBAT_STAGES
    assert 0.0 <= results["win_rates"]["hbat_vs_two-stage"] <= 1.0

    rows = read_rows(out / "metrics.jsonl")
    logged = {(r["schedule"], r["stage"]) for r in rows}
    assert {(name, st[0]) for name, sts in stages.items() for st in sts} <= logged  # every stage logged steps

    table = proc.stdout.splitlines()
    assert any(line.startswith("two-stage ") for line in table)
    assert any(line.startswith("hbat ") for line in table)
    if algo.startswith("ppo"):
        critic = algo == "ppo"
        assert any("value_loss" in r for r in rows) == critic
        assert any("rollout/positive_share" in r for r in rows) != critic
        for name in ("two-stage", "hbat"):
            assert (torch.load(out / f"{name}.pt", weights_only=True).get("critic") is not None) == critic


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path, cache):
    """`torchrun --nproc_per_node 2 train.py --algo dpo --preset smoke` (gloo on CPU) runs to the end, and rank 0
    alone writes and prints: one results.json, one table, one metrics row per step, one summary line per stage."""
    out = tmp_path / "out"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    proc = ok(train("--algo", "dpo", out=out, cache=cache, launcher=launcher))
    results = read_json(out / "results.json")
    assert set(results["schedules"]) == {"two-stage", "hbat"}
    assert [st["name"] for st in results["schedules"]["hbat"]["stages"]] == [s[0] for s in HBAT_STAGES]
    assert {"config.json", "metrics.jsonl", "two-stage.pt", "hbat.pt"} <= set(os.listdir(out))
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert sum(line.startswith("schedule ") for line in proc.stdout.splitlines()) == 1, proc.stdout

    keys = [(r["schedule"], r["stage_index"], r["step"]) for r in read_rows(out / "metrics.jsonl")
            if "loss" in r]
    assert len(keys) == len(set(keys)), "a step was logged more than once: more than one rank writes metrics.jsonl"
    summaries = [line.split()[:2] for line in proc.stdout.splitlines()
                 if line.lstrip().startswith(("two-stage", "hbat")) and "loss" in line]
    assert len(summaries) == len({tuple(s) for s in summaries}) == 2 + 8, \
        f"each stage's summary line should be printed once (rank 0 only):\n{proc.stdout}"


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["dpo", "ppo", "ppo-release"])
def test_fsdp_takes_the_same_steps_as_ddp(algo, tmp_path, cache):
    """--fsdp (every model sharded over 2 gloo processes, the EWC anchor too) against DDP (whole copies) on the
    same run: the same loss, EWC penalty and gradient norm at every logged step, the same gradient cosines at the
    stages' starts, and the same final weights, to float rounding. Sharding moves where each number lives, never what it is. The FSDP run also recomputes every
    block in backward (--activation-checkpointing), which must not change a number either."""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    runs = {}
    for how in ("ddp", "fsdp"):
        out = tmp_path / how
        # activation checkpointing recomputes each block in backward: the same numbers again
        flags = ["--fsdp", "--activation-checkpointing"] if how == "fsdp" else []
        ok(train(*ALGOS[algo], *flags, out=out, cache=cache, launcher=launcher))
        rows = [r for r in read_rows(out / "metrics.jsonl") if r["schedule"] != "base"]  # pretrained once, cached
        runs[how] = (rows, {name: torch.load(out / f"{name}.pt", weights_only=True)
                                                         for name in ("two-stage", "hbat")})
    (rows_ddp, ckpt_ddp), (rows_fsdp, ckpt_fsdp) = runs["ddp"], runs["fsdp"]
    assert [(r["schedule"], r["stage"], r["step"]) for r in rows_ddp] == \
        [(r["schedule"], r["stage"], r["step"]) for r in rows_fsdp]
    keys = ("loss", "policy_loss", "value_loss", "ewc_penalty", "grad_norm")
    compared = 0
    for a, b in zip(rows_ddp, rows_fsdp):
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["schedule"], a["stage"], a["step"], k)
                compared += 1
    assert compared > 50 and any("ewc_penalty" in r and r["ewc_penalty"] > 0 for r in rows_fsdp)
    if algo == "dpo":  # the gradient cosine: every rank's shards of the same probe's gradients, summed
        for name in ckpt_ddp:
            got = [st["grad_cosine"] for st in ckpt_fsdp[name]["history"]]
            assert got == pytest.approx([st["grad_cosine"] for st in ckpt_ddp[name]["history"]], abs=1e-4), name
    for name in ckpt_ddp:
        a, b = ckpt_ddp[name]["model"], ckpt_fsdp[name]["model"]
        assert a.keys() == b.keys()  # saved whole, in the same layout: either run resumes the other's checkpoints
        # Adam turns rounding noise on a ~0 gradient into a step of about ±lr (1e-3): allow that on a few weights
        diff = torch.cat([(b[k] - a[k]).abs().flatten() for k in a])
        assert (diff > 1e-3).float().mean() < 1e-3 and diff.max() < 1e-2, (name, (diff > 1e-3).sum(), diff.max())


@pytest.mark.slow
def test_torchrun_overwrite_of_a_used_out(smoke_run, tmp_path, cache):
    """--overwrite under torchrun: the old run's files are cleared once, before any rank writes, so neither rank
    trips over the other (a file already removed, a fresh config.json removed again)."""
    out = tmp_path / "out"
    shutil.copytree(smoke_run("dpo")[0], out)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    ok(train("--algo", "dpo", "--schedule", "two-stage", "--seed", "1", "--overwrite", out=out, cache=cache,
             launcher=launcher))
    assert read_json(out / "config.json")["seed"] == 1
    assert set(read_json(out / "results.json")["schedules"]) == {"two-stage"}
    assert not (out / "hbat.pt").exists()


LOAD_RECORDER = """# train.py, recording which model files each rank reads into loads-<rank>.txt
import os, sys
sys.path.insert(0, os.getcwd())
import checkpoint, reward, train
load, load_rm = checkpoint.load, reward.RewardModel.from_pretrained.__func__

def record(path):
    with open(os.path.join(os.environ["LOADS_DIR"], f"loads-{os.environ.get('RANK', '0')}.txt"), "a") as f:
        f.write(f"{path}\\n")

def recorded(path):
    record(path)
    return load(path)

def recorded_rm(cls, path):
    record(path)
    return load_rm(cls, path)

checkpoint.load, reward.RewardModel.from_pretrained = recorded, classmethod(recorded_rm)
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_fsdp_reads_every_model_file_on_rank_0_only(custom, tmp_path, cache):
    """Lean loading: `torchrun --fsdp` with --model under PPO (the base, then the SFT model and the reward model,
    each read back from OUT) reads every model file on rank 0 only; the other rank builds the model on the meta
    device and receives its shards. The run takes the same steps to the same weights as DDP, where every rank reads
    its own copy."""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    (tmp_path / "recorder.py").write_text(LOAD_RECORDER)
    states = {}
    for how in ("ddp", "fsdp"):
        loads = tmp_path / f"loads-{how}"
        loads.mkdir()
        out = tmp_path / how
        flags = [*SMOKE, "--algo", "ppo", *custom_flags(custom), "--rollout-batch", "8", "--minibatch", "8",
                 "--out", str(out), "--cache-dir", str(cache)] + (["--fsdp"] if how == "fsdp" else [])
        ok(subprocess.run([*launcher, str(tmp_path / "recorder.py"), *map(str, flags)], cwd=ROOT,
                          env=ENV | {"LOADS_DIR": str(loads)}, capture_output=True, text=True, timeout=300))
        read = {rank: (loads / f"loads-{rank}.txt").read_text().split() if (loads / f"loads-{rank}.txt").exists()
                else [] for rank in (0, 1)}
        names = {rank: sorted(os.path.basename(p) for p in paths) for rank, paths in read.items()}
        assert names[0] == ["model.pt", "reward_model.pt", "sft.pt"], names
        assert names[1] == ([] if how == "fsdp" else names[0]), names
        states[how] = torch.load(out / "two-stage.pt", weights_only=True)["model"]
    diff = torch.cat([(states["fsdp"][k] - states["ddp"][k]).abs().flatten() for k in states["ddp"]])
    assert (diff > 1e-3).float().mean() < 1e-3 and diff.max() < 1e-2, ((diff > 1e-3).sum(), diff.max())


def test_grad_accum_micro_batches_keep_each_pair_together():
    """--grad-accum n cuts each step's batch into n micro-batches (data.batches_of). A DPO batch is B chosen
    rows then the same B pairs' rejected rows (data.hpa_batch), so every micro-batch must again be one: its pairs'
    chosen rows, then the same pairs' rejected rows, in the order of its indices, each pair in exactly one."""
    B = 4
    examples = [([1, 10 + i], [20 + i] * (i + 1) + [2], [30 + i, 2]) for i in range(B)]
    ((micros, shares),) = list(data.batches_of(examples, B, 1, 0, data.hpa_batch, 2, "cpu"))
    assert len(micros) == 2 and shares == [0.5, 0.5]

    def row(t, m, r):  # prompt + answer of one row, without the padding
        return t[r, :int(m[r].nonzero().max()) + 1].tolist()

    seen = []
    for m_idx, m_tokens, m_mask in micros:
        full_tokens, full_mask = data.hpa_batch([examples[i] for i in m_idx.tolist()])
        n = len(m_idx)
        assert [row(m_tokens, m_mask, r) for r in range(2 * n)] == \
            [row(full_tokens, full_mask, r) for r in range(2 * n)]
        for k, i in enumerate(m_idx.tolist()):  # row k is pair i's chosen answer, row n + k its rejected one
            assert row(m_tokens, m_mask, k)[-len(examples[i][1]):] == examples[i][1]
            assert row(m_tokens, m_mask, n + k)[-len(examples[i][2]):] == examples[i][2]
        seen += m_idx.tolist()
    assert sorted(seen) == list(range(B))


# -----------------------------------------------------------------------------
# checkpoints and resume


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["dpo", "ppo", "ppo-release"])
def test_kill_and_resume_equals_an_uninterrupted_run(algo, smoke_run, tmp_path, cache):
    """Run B is the uninterrupted run A's command, SIGKILLed once hbat has checkpointed at least two stages (so both
    EWC accumulators, and under PPO the critic carried across HPA stages, are in play), then re-run: results.json
    and the per-step metrics equal A's exactly (CPU)."""
    out_a, _ = smoke_run(algo)
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", *SMOKE, *ALGOS[algo], "--out", str(out), "--cache-dir", str(cache)]
    with open(tmp_path / "b.log", "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        done, deadline = 0, time.time() + 300
        try:
            while p.poll() is None and time.time() < deadline:
                if (out / "hbat.pt").exists():
                    done = len(torch.load(out / "hbat.pt", weights_only=True)["history"])
                    if done >= 2:
                        break
                time.sleep(0.02)
        finally:
            p.kill()
            p.wait()
    assert 2 <= done < len(HBAT_STAGES), f"no kill mid-schedule (hbat checkpoint had {done} stages)"
    assert not (out / "results.json").exists(), "the run finished before it was killed"

    ok(subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300))
    assert comparable(read_json(out / "results.json")) == comparable(read_json(out_a / "results.json"))

    def step_rows(path):  # the base is pretrained (and logged) only by the session's first run
        return [r for r in read_rows(path) if r["schedule"] in ("two-stage", "hbat")]
    assert step_rows(out / "metrics.jsonl") == step_rows(out_a / "metrics.jsonl")


KILLER = """# train.py, SIGKILLed by itself right after its N-th mid-stage save (or, torn, halfway through writing it)
import io, os, signal, sys
sys.path.insert(0, os.getcwd())
import checkpoint, rundir, train
n, torn, count, save = int(os.environ["KILL_AFTER"]), os.environ.get("KILL_TORN") == "1", [0], rundir.MidStage.save

def half_written(path, write):
    buf = io.BytesIO()
    write(buf)
    with open(f"{path}.tmp", "wb") as f:
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def killing_save(self, *args):
    count[0] += 1
    if count[0] == n and torn and self.rt.rank == 0:
        checkpoint.atomic_write = half_written
    save(self, *args)
    if count[0] == n and self.rt.rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)

rundir.MidStage.save = killing_save
train.main(sys.argv[1:])
"""


def final_state(out):
    return {name: torch.load(out / f"{name}.pt", weights_only=True)["model"] for name in ("two-stage", "hbat")}


@pytest.mark.slow
@pytest.mark.parametrize("algo,after,torn,procs,where", [
    ("dpo", 3, False, 1, ("two-stage", "IFA", 3)),       # inside an IFA stage (8 steps)
    ("dpo", 11, False, 1, ("two-stage", "HPA", 3)),      # inside a DPO stage (8 steps)
    ("dpo", 5, True, 1, ("two-stage", "IFA", 4)),        # during the write of step 5: step 4's file is what is left
    ("ppo", 3, False, 1, ("sft", "IFA", 3)),             # PPO's SFT model (8 steps) ...
    ("ppo", 11, False, 1, ("reward", "RM", 3)),          # ... and its reward model (8 steps), trained before
    ("ppo", 26, False, 1, ("two-stage", "HPA", 4)),      # between PPO rollouts (4 rollouts of 2 updates)
    ("ppo-release", 34, False, 1, ("hbat", "HPA_2", 2)),  # after the one rollout of an hbat HPA stage, penalised
    ("dpo", 13, False, 2, ("two-stage", "HPA", 5)),      # torchrun, 2 processes
    ("ppo --fsdp", 26, False, 2, ("two-stage", "HPA", 4)),  # torchrun --fsdp: AdamW's state gathered and re-sharded
], ids=["ifa", "dpo", "torn-write", "sft", "reward-model", "ppo-between-rollouts", "release-end-of-stage", "torchrun",
        "fsdp"])
def test_kill_inside_a_stage_and_resume_equals_an_uninterrupted_run(algo, after, torn, procs, where, smoke_run,
                                                                     tmp_path, cache):
    """--save-every 1; the run kills itself (SIGKILL) right after its N-th mid-stage save, or halfway through
    writing it. The re-run prints where it resumes, inside the stage, and ends with exactly the uninterrupted run's
    results.json, per-step metrics and final weights (CPU, one thread; under torchrun against an uninterrupted
    torchrun run)."""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)) \
        if procs > 1 else (sys.executable,)
    if procs > 1:
        out_a = tmp_path / "uninterrupted"
        ok(train(*ALGOS[algo], out=out_a, cache=cache, launcher=launcher))
    else:
        out_a, _ = smoke_run(algo)
    (tmp_path / "killer.py").write_text(KILLER)
    out = tmp_path / "out"
    flags = [*SMOKE, *ALGOS[algo], "--save-every", "1", "--out", str(out), "--cache-dir", str(cache)]
    env = ENV | {"KILL_AFTER": str(after), "KILL_TORN": "1" if torn else "0"}
    killed = subprocess.run([*launcher, str(tmp_path / "killer.py"), *flags], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and not (out / "results.json").exists(), killed.stderr[-2000:]
    schedule, stage, step = where
    resumed = ok(subprocess.run([*launcher, "train.py", *flags], cwd=ROOT, env=ENV, capture_output=True, text=True,
                                timeout=300))
    assert f"resuming {schedule} {stage} at step {step}" in resumed.stdout + resumed.stderr
    assert comparable(read_json(out / "results.json")) == comparable(read_json(out_a / "results.json"))

    def step_rows(path):
        return [r for r in read_rows(path) if r["schedule"] in ("two-stage", "hbat", "sft", "reward")]
    assert step_rows(out / "metrics.jsonl") == step_rows(out_a / "metrics.jsonl")
    for name, state in final_state(out).items():
        expected = final_state(out_a)[name]
        assert all(torch.equal(state[k], expected[k]) for k in expected), name
    assert not [n for n in os.listdir(out) if n.endswith(".step.pt")]  # spent at each stage's end


def test_rerunning_a_finished_run_reproduces_its_results(smoke_run, tmp_path, cache):
    """Every stage and the reward model are checkpointed, so the same command on a finished PPO --out trains
    nothing, rewrites the same results.json and leaves the checkpoints and the log (the reward model's and the
    base's training rows included) as they were: the cheap half of resume."""
    out_a, _ = smoke_run("ppo")
    out = tmp_path / "out"
    shutil.copytree(out_a, out)
    before = snapshot(out)
    ok(train("--algo", "ppo", out=out, cache=cache))
    assert comparable(read_json(out / "results.json")) == comparable(read_json(out_a / "results.json"))
    after = snapshot(out)
    for name in ("sft.pt", "reward_model.pt", "two-stage.pt", "hbat.pt", "metrics.jsonl"):
        assert after[name] == before[name], f"{name} changed though nothing was left to run"


def test_a_torn_last_metrics_line_does_not_break_resume(smoke_run, tmp_path, cache):
    """A kill can land in the middle of appending a row to metrics.jsonl. The re-run must still resume (dropping
    the torn row with the unfinished stage's rows), not die on a JSON error."""
    out_a, _ = smoke_run("dpo")
    out = tmp_path / "out"
    shutil.copytree(out_a, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"schedule": "hbat", "stage": "HPA_4", "stage_ind')
    ok(train("--algo", "dpo", out=out, cache=cache))
    assert read_rows(out / "metrics.jsonl") == read_rows(out_a / "metrics.jsonl")


def test_reusing_an_out_with_other_settings_is_refused_unless_overwrite(smoke_run, tmp_path, cache):
    """A different --seed in a used --out: exit 2 and one line naming the setting, the old run untouched. With
    --overwrite the new run starts afresh there (nothing of the old run is left to mix in)."""
    out_a, _ = smoke_run("dpo")
    out = tmp_path / "out"
    shutil.copytree(out_a, out)
    before = snapshot(out)
    line = one_line_error(train("--algo", "dpo", "--seed", "1", out=out, cache=cache))
    assert "seed" in line and "--overwrite" in line, line
    assert snapshot(out) == before

    ok(train("--algo", "dpo", "--seed", "1", "--schedule", "two-stage", "--overwrite", out=out, cache=cache))
    results = read_json(out / "results.json")
    assert results["config"]["seed"] == 1 and set(results["schedules"]) == {"two-stage"}
    assert not (out / "hbat.pt").exists() and not (out / "hbat.responses.jsonl").exists()
    assert {r["schedule"] for r in read_rows(out / "metrics.jsonl")} <= {"two-stage", "base"}


# -----------------------------------------------------------------------------
# failure and bad input: one line, exit code 2, no traceback


FIXTURES = os.path.join(ROOT, "tests", "fixtures")
BAD_INPUT = {
    # case: (flags (a function of the custom-data dir and a scratch dir), what the one line must name)
    "broken JSONL line": (lambda d, tmp: custom_flags(d, ifa=os.path.join(FIXTURES, "bad_json.jsonl")),
                          "bad_json.jsonl:2"),
    "missing field": (lambda d, tmp: custom_flags(d, hpa=os.path.join(FIXTURES, "missing_field.jsonl")), "rejected"),
    "missing data file": (lambda d, tmp: custom_flags(d, ifa=d / "nowhere.jsonl"), "nowhere.jsonl"),
    "missing tokenizer": (lambda d, tmp: custom_flags(d, model=shutil.copy(d / "model" / "model.pt", tmp)),
                          "tokenizer"),  # a model file with no tokenizer.model beside it
    "--n-splits 0": (lambda d, tmp: ["--n-splits", "0"], "--n-splits"),
    "unknown --algo": (lambda d, tmp: ["--algo", "sft"], "--algo"),
    "--f-max -1": (lambda d, tmp: ["--f-max", "-1"], "--f-max"),
    "--ipo with --label-smoothing": (lambda d, tmp: ["--ipo", "--label-smoothing", "0.1"], "--label-smoothing"),
    "--n-splits larger than the data": (lambda d, tmp: ["--n-splits", "1000"], "--n-splits"),
    "--fsdp without torchrun": (lambda d, tmp: ["--fsdp"], "--fsdp"),
    "--fsdp with element-wise EWC": (lambda d, tmp: ["--fsdp", "--ewc-elementwise"], "--ewc-elementwise"),
    "--ifa-styled 2": (lambda d, tmp: ["--ifa-styled", "2"], "--ifa-styled"),
    "--out is a file": (lambda d, tmp: ["--out", shutil.copy(d / "ifa.jsonl", tmp)], "--out"),
}


def bad_model(d, tmp, kind):
    """A --model that cannot be loaded, beside a good tokenizer.model: (its path, what the line must name)."""
    shutil.copy(d / "model" / "tokenizer.model", tmp / "tokenizer.model")
    if kind in ("random bytes .pt", "pickled code"):
        path = tmp / "model.pt"
        if kind == "random bytes .pt":
            path.write_bytes(bytes(range(256)) * 64)
        else:
            torch.save({"model_args": {}, "model": {}, "run": os.system}, path)  # a function: weights_only refuses
        return path, "model.pt"
    if kind == "other architecture":
        path = tmp / "model.pt"
        save_checkpoint(tiny_transformer(seed=0, n_layers=1), path)
        args, state = torch.load(path, weights_only=True).values()
        torch.save({"model_args": args | {"n_layers": 2}, "model": state}, path)  # a config its weights do not fit
        return path, "model.pt"
    hf = tmp / "hf"
    export_hf(Transformer.from_pretrained(d / "model" / "model.pt"), hf)
    st = hf / "model.safetensors"
    if kind == "truncated safetensors":
        st.write_bytes(st.read_bytes()[:-100])
    elif kind == "safetensors with a garbage header":
        st.write_bytes(b"\xff" * 8 + st.read_bytes()[8:])  # a header length of 2^64 - 1
    elif kind == "malformed config.json":
        (hf / "config.json").write_text('{"hidden_size": 16,')
        return hf, "config.json"
    return hf, "model.safetensors"


@pytest.mark.parametrize("kind", ["random bytes .pt", "pickled code", "other architecture", "truncated safetensors",
                                  "safetensors with a garbage header", "malformed config.json"])
def test_a_bad_model_file_exits_2_with_one_line_and_runs_nothing(kind, custom, tmp_path, cache):
    """Every way a --model can be unreadable: one line naming the file, exit 2, no traceback, and nothing trained
    (no checkpoint, no log row): the model is read before anything runs."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    path, name = bad_model(custom, scratch, kind)
    out = tmp_path / "out"
    line = one_line_error(train(*custom_flags(custom, model=path), "--tokenizer", scratch / "tokenizer.model",
                                out=out, cache=cache))
    assert name in line and str(path) in line, line
    assert not [n for n in os.listdir(out) if n.endswith((".pt", ".jsonl"))], os.listdir(out)


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(case, custom, tmp_path, cache):
    flags, named = BAD_INPUT[case]
    line = one_line_error(train(*flags(custom, tmp_path), out=tmp_path / "out", cache=cache))
    assert named in line, line


def test_bad_data_in_a_used_out_loses_nothing(custom, tmp_path, cache):
    """A good run, then its demonstrations file gets a broken last line and the same command runs again: exit 2,
    one line naming the file and line, and every file the good run wrote is still there, byte for byte."""
    ifa = tmp_path / "ifa.jsonl"
    shutil.copy(custom / "ifa.jsonl", ifa)
    out = tmp_path / "out"
    flags = custom_flags(custom, ifa=ifa)
    ok(train(*flags, out=out, cache=cache))
    before = snapshot(out)
    assert "results.json" in before and "two-stage.pt" in before
    with open(ifa, "a") as f:
        f.write('{"prompt": "say red", "response": \n')
    line = one_line_error(train(*flags, out=out, cache=cache))
    assert "ifa.jsonl:49" in line, line
    assert snapshot(out) == before


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, cache):
    """--lr-hpa 1e30 blows the weights up on HPA's first step, so its second loss is NaN. The run stops with exit
    code 1 and a last line naming the schedule, the stage and the step; the IFA checkpoint is intact."""
    out = tmp_path / "out"
    proc = train("--algo", "dpo", "--schedule", "two-stage", "--lr-hpa", "1e30", out=out, cache=cache)
    assert proc.returncode == 1, f"exit code {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "two-stage" in last and "HPA" in last and "step 1" in last and "two-stage.pt" in last, last
    ckpt = torch.load(out / "two-stage.pt", weights_only=True)
    assert [st["name"] for st in ckpt["history"]] == ["IFA"]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (out / "results.json").exists()
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_grad_accum_takes_the_same_step_as_one_big_batch():
    """One optimizer step on a batch cut into 2 micro-batches of a DPO loss moves the weights exactly as one step on
    the whole batch (the loss is a mean over pairs, each micro-batch holds half of them, and each is divided by 2)."""
    import dpo
    import parallel
    import train
    base = tiny_transformer(seed=0, n_kv_heads=2, multiple_of=8, max_seq_len=32)
    g = torch.Generator().manual_seed(1)
    examples = [([1] + torch.randint(4, 40, (3,), generator=g).tolist(),
                 torch.randint(4, 40, (1 + i % 3,), generator=g).tolist() + [2],
                 torch.randint(4, 40, (2,), generator=g).tolist() + [2]) for i in range(8)]
    ref = dpo.reference_logps(base, examples, 8, "cpu")

    def loss_fn(model, batch):
        idx, tokens, mask = batch
        return dpo.dpo_step_loss(model, tokens, mask, ref[idx], beta=0.5)

    after = []
    for accum in (1, 2):
        model = __import__("copy").deepcopy(base)
        batches = list(data.batches_of(examples, 8, 1, 0, data.hpa_batch, accum, "cpu"))
        assert len(batches) == 1 and len(batches[0][0]) == accum
        train.optimize(model, loss_fn, batches, 1, 1e-2, "dpo", parallel.Runtime("cpu"), warmup=0.0, grad_clip=1e9)
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    moved = (after[0] - torch.cat([p.detach().flatten() for p in base.parameters()])).abs().max()
    assert moved > 5e-3  # Adam's first step moves each weight by about lr = 1e-2
    # Adam divides by |g|, so a weight whose gradient is ~0 can turn rounding noise into a visible step: allow 1% of lr
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=1e-4)


def test_train_step_adds_the_stage_penalty_to_the_loss():
    """train_step's gradient is that of loss + L_EWC: with the anchor θ* = θ − 0.01 on every tensor and weights F_n,
    the penalty is Σ_n F_n · λ² · 0.01² · numel_n and its gradient 2·F_n·λ²·(θ − θ*); the step's grad norm (before
    clipping) must be the norm of the loss's own gradient plus that, computed here by hand."""
    import ewc as ewc_lib
    import parallel
    import train
    model = tiny_transformer(seed=3)
    tokens, mask = data.ifa_batch([([1, 5, 6], [7, 8, 2]), ([1, 9], [10, 2])])
    loss = train.dpo.ifa_step_loss(model, tokens, mask)[0]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ewc = ewc_lib.EWC(lam=2.0)
    names = [n for n, _ in model.named_parameters()]
    ewc.anchor = {n: p.detach() - 0.01 for n, p in model.named_parameters()}
    ewc.weights = {n: 0.5 + i for i, n in enumerate(names)}  # F_n, one per tensor
    want_penalty = sum(ewc.weights[n] * 4.0 * 1e-4 * p.numel() for n, p in model.named_parameters())
    want_norm = torch.cat([(g + 2 * ewc.weights[n] * 4.0 * 0.01).flatten() for n, g in zip(names, grads)]).norm()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights as they are
    m = train.train_step(parallel.wrap(parallel.Runtime("cpu"), model), opt,
                         lambda mod, b: train.dpo.ifa_step_loss(mod, *b), [(tokens, mask)], [1.0], 0.0, 1e9,
                         parallel.Runtime("cpu"), ewc, model)
    assert m["ewc_penalty"] == pytest.approx(want_penalty, rel=1e-5)
    assert m["grad_norm"] == pytest.approx(want_norm.item(), rel=1e-5)
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-6)  # the logged loss is the objective's alone


# -----------------------------------------------------------------------------
# the loop's wiring, read from what a run writes


def test_lr_schedule_by_hand():
    """10 steps, warm-up share 0.2: lr/peak rises 0.5, 1 over steps 0-1, then falls linearly, (10 - s) / 8, to 1/8 at
    the last step (the next step, which is not taken, would be 0)."""
    import train
    assert [train.lr_at(s, 10, 0.2) for s in range(10)] == [0.5, 1.0] + [(10 - s) / 8 for s in range(2, 10)]
    assert train.lr_at(0, 1, 0.1) == 1.0  # a one-step stage runs at the peak


def first_rows(out, key):
    """{(schedule, stage): the first metrics row of that stage that has `key`}."""
    rows = {}
    for r in read_rows(out / "metrics.jsonl"):
        if key in r and r["schedule"] in ("two-stage", "hbat"):
            rows.setdefault((r["schedule"], r["stage"]), r)
    return rows


@pytest.mark.parametrize("algo", ["dpo", "ppo", "ppo-release"])
def test_the_loop_is_wired_as_the_method_says(smoke_run, algo):
    """From one smoke run's results.json and metrics.jsonl:
    - equal data: hbat's IFA stages together train on as many demonstrations as two-stage's IFA stage (every one,
      E_IFA times), its HPA stages on as many pairs or prompts;
    - the reference of every HPA stage is the model at the stage's start: DPO's implicit rewards, PPO's KL, are 0
      at the stage's first step;
    - the EWC anchor is the stage's start: the penalty of every penalised stage is 0 at its first step, its total
      weight recorded, and it is > 0 where the stage ended;
    - each stage's lr horizon is the steps it took: the last step runs at peak / (steps - warm-up steps)."""
    out, _ = smoke_run(algo)
    results, config = read_json(out / "results.json"), read_json(out / "config.json")
    stages = {name: s["stages"] for name, s in results["schedules"].items()}
    for kind, n, epochs in (("ifa", config["n_ifa"], config["epochs_ifa"]), ("hpa", config["n_hpa"], config["epochs_hpa"])):
        assert [sum(st["examples"] for st in stages[name] if st["kind"] == kind) for name in stages] == [n * epochs] * 2
    if algo == "dpo":
        for (schedule, stage), r in first_rows(out, "rewards/margin").items():
            assert abs(r["rewards/chosen"]) < 1e-5 and abs(r["rewards/rejected"]) < 1e-5, (schedule, stage)
    else:
        starts = first_rows(out, "rollout/kl")
        assert len(starts) == 1 + config["n_splits"]
        assert all(r["rollout/kl"] == 0 and r["rollout/kl_true"] == 0 for r in starts.values()), starts
    penalised = [st for st in stages["hbat"] if st["ewc"]]
    assert len(penalised) == 2 * config["n_splits"] - 1
    first = first_rows(out, "ewc_penalty")
    for st in penalised:
        assert first[("hbat", st["name"])]["ewc_penalty"] == 0
        assert st["ewc_total_weight"] > 0 and st["ewc_penalty_end"] > 0
    lrs = {}
    for r in read_rows(out / "metrics.jsonl"):
        if "lr" in r and r["schedule"] in ("two-stage", "hbat"):
            lrs.setdefault((r["schedule"], r["stage"]), []).append(r["lr"])
    for name, records in stages.items():
        for st in records:
            got, peak = lrs[(name, st["name"])], config["lr_ifa"] if st["kind"] == "ifa" else config["lr_hpa"]
            assert len(got) == st["steps"]
            warm = max(1, int(config["warmup"] * st["steps"]))
            assert got[-1] == pytest.approx(peak * (1.0 if st["steps"] == warm else 1 / (st["steps"] - warm)))


def test_release_reward_queue_restarts_at_every_hpa_stage(monkeypatch, tmp_path, cache):
    """--ppo-variant release, in process: one reward queue per HPA stage (two-stage's one, hbat's four), each empty
    at its stage's first rollout and whitening every rollout of that stage only."""
    import ppo
    import train as train_py
    queues = []

    class Recorded(ppo.RewardQueue):
        def __init__(self, size):
            super().__init__(size)
            self.sizes_before = []
            queues.append(self)

        def whiten(self, rewards, masks):
            self.sizes_before.append(len(self.values))
            return super().whiten(rewards, masks)

    monkeypatch.setattr(ppo, "RewardQueue", Recorded)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    train_py.main([*SMOKE, *ALGOS["ppo-release"], "--out", str(tmp_path / "out"), "--cache-dir", str(cache)])
    assert len(queues) == 1 + 4
    assert [len(q.sizes_before) for q in queues] == [4, 1, 1, 1, 1]  # 64 prompts in rollouts of 16; hbat's 16 each
    assert all(q.sizes_before[0] == 0 and 0 < len(q.values) <= 1000 for q in queues)
    assert queues[0].sizes_before == sorted(queues[0].sizes_before) and queues[0].sizes_before[-1] > 0


def test_ppo_lr_horizon_when_minibatches_do_not_divide_the_rollout(tmp_path, cache):
    """Rollouts of 16 prompts in minibatches of 6 (6, 6, 4): 3 updates per rollout, and the lr's horizon counts them."""
    out = tmp_path / "out"
    ok(train("--algo", "ppo", "--schedule", "two-stage", "--minibatch", "6", out=out, cache=cache))
    rows = [r for r in read_rows(out / "metrics.jsonl") if r["schedule"] == "two-stage" and r["stage"] == "HPA"
            and "lr" in r]
    (hpa,) = [st for st in read_json(out / "results.json")["schedules"]["two-stage"]["stages"] if st["kind"] == "hpa"]
    assert len(rows) == hpa["steps"] == (64 // 16) * 3 and hpa["examples"] == 64
    assert rows[-1]["lr"] == pytest.approx(1e-3 / (hpa["steps"] - 1))


# -----------------------------------------------------------------------------
# sample.py: talk to the result


def sample(*args, stdin=None):
    return subprocess.run([sys.executable, "sample.py", *map(str, args)], cwd=ROOT, env=ENV, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_sample_answers_as_the_evaluation_did(smoke_run):
    """sample.py on a run's OUT/hbat.pt, its prompts on stdin, greedy: the same answers, line for line, as the
    run's own evaluation wrote to hbat.responses.jsonl (the tokenizer found in --out); a prompt as an argument gets
    the same answer; sampling with a seed repeats itself."""
    out, _ = smoke_run("dpo")
    rows = read_rows(out / "hbat.responses.jsonl")
    proc = ok(sample(out / "hbat.pt", "--max-new-tokens", 12, stdin="".join(r["prompt"] + "\n" for r in rows)))
    assert proc.stdout.splitlines() == [r["response"] for r in rows]
    one = ok(sample(out / "hbat.pt", rows[0]["prompt"], "--max-new-tokens", 12)).stdout.splitlines()
    assert one == [rows[0]["response"]]
    hot = [ok(sample(out / "hbat.pt", rows[1]["prompt"], "--temperature", 1, "--seed", 3)).stdout for _ in range(2)]
    assert hot[0] == hot[1]


@pytest.mark.parametrize("case", ["no such checkpoint", "not a checkpoint", "no tokenizer", "--top-p 0"])
def test_sample_bad_input_is_one_line(case, smoke_run, tmp_path):
    out, _ = smoke_run("dpo")
    (tmp_path / "junk.pt").write_text("junk")
    shutil.copy(out / "hbat.pt", tmp_path / "hbat.pt")  # without the tokenizer.model of its --out
    args, name = {"no such checkpoint": ([tmp_path / "nowhere.pt", "hi"], "nowhere.pt"),
                  "not a checkpoint": ([tmp_path / "junk.pt", "hi"], "junk.pt"),
                  "no tokenizer": ([tmp_path / "hbat.pt", "hi"], "--tokenizer"),
                  "--top-p 0": ([out / "hbat.pt", "hi", "--top-p", 0], "--top-p")}[case]
    assert name in one_line_error(sample(*args))
