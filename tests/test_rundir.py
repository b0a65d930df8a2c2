"""infra/rundir.py: resume. A run killed at a stage's boundary, inside a stage (every kind of stage, PPO's SFT and
reward models included), or while writing a checkpoint ends, re-run, with exactly the uninterrupted run's results,
per-step metrics and weights; a finished run re-run trains nothing; an --out of other settings is refused; bad
input leaves a used --out as it was.

The kills are real: SIGKILL, of the process itself (conftest.KILLER) or from outside."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import train as train_py
from infra import parallel, rundir
from conftest import (ALGOS, ENV, HBAT_STAGES, KILLER, ROOT, SMOKE, TORCHRUN, comparable, custom_flags,
                      exits_with_one_line, final_state, ok, read_json, read_rows, snapshot, train)


def test_kill_and_resume_equals_an_uninterrupted_run(smoke_run, tmp_path, cache):
    """Run B is the uninterrupted PPO run A's command, SIGKILLed from outside once hbat has checkpointed at least two
    stages (so both EWC accumulators and the critic carried across HPA stages are in play), then re-run: results.json
    and the per-step metrics equal A's exactly (CPU). (DPO and the release's PPO carry nothing across stages that
    this does not; their resumes, at and inside stages, are tested below.)"""
    algo = "ppo"
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


@pytest.mark.parametrize("algo,after,torn,how,where", [
    ("dpo", 3, False, None, ("two-stage", "IFA", 3)),       # inside an IFA stage (8 steps)
    ("dpo", 11, False, None, ("two-stage", "HPA", 3)),      # inside a DPO stage (8 steps)
    ("dpo", 5, True, None, ("two-stage", "IFA", 4)),        # during the write of step 5: step 4's file is what is left
    ("ppo", 3, False, None, ("sft", "IFA", 3)),             # PPO's SFT model (8 steps) ...
    ("ppo", 11, False, None, ("reward", "RM", 3)),          # ... and its reward model (8 steps), trained before
    ("ppo", 26, False, None, ("two-stage", "HPA", 4)),      # between PPO rollouts (4 rollouts of 2 updates)
    ("ppo-release", 34, False, None, ("hbat", "HPA_2", 2)),  # after the one rollout of an hbat HPA stage, penalised
    ("ppo-release", 26, False, None, ("two-stage", "HPA", 4)),  # between rollouts: the reward queue holds two
    ("ppo-adaptive-kl", 26, False, None, ("two-stage", "HPA", 4)),  # the KL coefficient has moved twice
    ("ppo-grpo", 26, False, None, ("two-stage", "HPA", 4)),  # GRPO: between rollouts of 4 prompts x 4 answers
    ("dpo", 13, False, "ddp", ("two-stage", "HPA", 5)),     # torchrun, 2 processes
    ("ppo-release", 26, False, "ddp", ("two-stage", "HPA", 4)),  # torchrun: each rank's own queue and generator
    ("ppo", 26, False, "fsdp", ("two-stage", "HPA", 4)),    # torchrun --fsdp: each rank reads back its own shards
    ("dpo", 13, True, "fsdp", ("two-stage", "HPA", 4)),     # --fsdp, killed writing the file that names step 5's
], ids=["ifa", "dpo", "torn-write", "sft", "reward-model", "ppo-between-rollouts", "release-end-of-stage",
        "release-between-rollouts", "adaptive-kl", "grpo", "torchrun", "torchrun-release", "fsdp", "fsdp-torn"])
def test_kill_inside_a_stage_and_resume_equals_an_uninterrupted_run(algo, after, torn, how, where, smoke_run,
                                                                     torchrun_run, tmp_path, cache):
    """--save-every 1; the run kills itself (SIGKILL) right after its N-th mid-stage save, or halfway through
    writing it. The re-run prints where it resumes, inside the stage, and ends with exactly the uninterrupted run's
    results.json, per-step metrics and final weights (CPU, one thread; under torchrun against the uninterrupted
    torchrun run, with --fsdp --activation-checkpointing as it ran)."""
    launcher = TORCHRUN if how else (sys.executable,)
    out_a, _ = torchrun_run(algo, how) if how else smoke_run(algo)
    (tmp_path / "killer.py").write_text(KILLER)
    out = tmp_path / "out"
    distributed = ["--fsdp", "--activation-checkpointing"] if how == "fsdp" else []
    flags = [*SMOKE, *ALGOS[algo], *distributed, "--save-every", "1", "--out", str(out), "--cache-dir", str(cache)]
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
    assert not [n for n in os.listdir(out) if ".step" in n]  # spent at each stage's end, shards too
    if how == "fsdp":  # every checkpoint sharded: a file that names a directory with one file per rank, and no other
        for name in ("sft", "reward_model", "two-stage", "hbat") if algo == "ppo" else ("sft", "two-stage", "hbat"):
            saved = torch.load(out / f"{name}.pt", weights_only=True)
            assert "model" not in saved and sorted(os.listdir(out / saved["shards"])) == [
                ".metadata", "__0_0.distcp", "__1_0.distcp"], name
        assert len([n for n in os.listdir(out) if n.endswith(".dcp")]) == (4 if algo == "ppo" else 3)


def test_alright_killed_inside_its_stage_resumes_to_the_same_numbers(alternatives_run, tmp_path, cache):
    """--save-every 1 and a SIGKILL right after the 5th mid-stage save, inside alright's one alternating stage: the
    re-run resumes at step 5 (the same turn of IFA and DPO batches) and ends with alright's results, metric rows and
    weights of the uninterrupted run of every schedule (schedules are independent: each starts from the base and
    draws from generators seeded by its own stages)."""
    (tmp_path / "killer.py").write_text(KILLER)
    out = tmp_path / "out"
    cmd = [*SMOKE, "--algo", "dpo", "--schedule", "alright", "--lr-hpa", "5e-4", "--save-every", "1",
           "--cache-dir", str(cache), "--out", str(out)]
    killed = subprocess.run([sys.executable, str(tmp_path / "killer.py"), *cmd], cwd=ROOT,
                            env=ENV | {"KILL_AFTER": "5"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and not (out / "results.json").exists(), killed.stderr[-2000:]
    resumed = ok(subprocess.run([sys.executable, "train.py", *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True,
                                timeout=300))
    assert "resuming alright ALT at step 5" in resumed.stdout + resumed.stderr
    a, b = (comparable(read_json(o / "results.json"))["schedules"]["alright"] for o in (alternatives_run, out))
    assert a == b
    rows = [[r for r in read_rows(o / "metrics.jsonl") if r["schedule"] == "alright"] for o in (alternatives_run, out)]
    assert rows[0] == rows[1] and len(rows[0]) == a["stages"][0]["steps"]
    wa, wb = (torch.load(o / "alright.pt", weights_only=True)["model"] for o in (alternatives_run, out))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


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


def test_reusing_an_out_with_other_settings_is_refused_unless_overwrite(smoke_run, tmp_path, cache, capsys):
    """A different --seed in a used --out: exit 2 and one line naming the setting, the old run untouched. With
    --overwrite the new run starts afresh there (nothing of the old run is left to mix in)."""
    out_a, _ = smoke_run("dpo")
    out = tmp_path / "out"
    shutil.copytree(out_a, out)
    before = snapshot(out)
    line = exits_with_one_line(capsys, train_py.main, [*SMOKE, "--algo", "dpo", "--seed", "1", "--out", str(out),
                                                       "--cache-dir", str(cache)])
    assert "seed" in line and "--overwrite" in line, line
    assert snapshot(out) == before

    ok(train("--algo", "dpo", "--seed", "1", "--schedule", "two-stage", "--overwrite", out=out, cache=cache))
    results = read_json(out / "results.json")
    assert results["config"]["seed"] == 1 and set(results["schedules"]) == {"two-stage"}
    assert not (out / "hbat.pt").exists() and not (out / "hbat.responses.jsonl").exists()
    assert {r["schedule"] for r in read_rows(out / "metrics.jsonl")} <= {"two-stage", "base"}


def test_bad_data_in_a_used_out_loses_nothing(custom, tmp_path, cache, capsys):
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
    line = exits_with_one_line(capsys, train_py.main, [*SMOKE, *map(str, flags), "--out", str(out), "--cache-dir",
                                                       str(cache)])
    assert "ifa.jsonl:49" in line, line
    assert snapshot(out) == before



# A train.py whose judging of a stage fails the first time, right after the first stage was trained and saved
FAILING_JUDGE = """import os, sys
sys.path.insert(0, os.getcwd())
import train

def failing(run, model, history):
    raise RuntimeError("the judge failed")

train.judge_last_stage = failing
train.main(sys.argv[1:])
"""


def test_a_stage_is_saved_before_it_is_judged(smoke_run, tmp_path, cache):
    """The evaluation after two-stage's first stage fails: the run stops with the stage trained and on disk. The
    re-run judges that stage without training it again and ends with the uninterrupted run's results, per-step
    metrics (the IFA stage's rows once, not twice) and weights."""
    out_a, _ = smoke_run("dpo")
    out = tmp_path / "out"
    (tmp_path / "failing.py").write_text(FAILING_JUDGE)
    failed = train(*ALGOS["dpo"], out=out, cache=cache, script=tmp_path / "failing.py")
    assert failed.returncode != 0 and "the judge failed" in failed.stderr
    saved = torch.load(out / "two-stage.pt", weights_only=True)
    assert [r["name"] for r in saved["history"]] == ["IFA"] and "eval" not in saved["history"][0]
    ok(train(*ALGOS["dpo"], out=out, cache=cache))
    assert comparable(read_json(out / "results.json")) == comparable(read_json(out_a / "results.json"))
    rows = [[r for r in read_rows(o / "metrics.jsonl") if r["schedule"] != "base"] for o in (out_a, out)]
    assert rows[0] == rows[1]  # (the base was pretrained by whichever run came first)
    a, b = final_state(out_a), final_state(out)
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])


def midstage_file(tmp_path, stage_index, world=1):
    """A MidStage of a one-layer model, saved at step 3 of stage `stage_index` by `world` processes' worth of
    per-rank state (the file's `ranks` list, as rank 0 writes it)."""
    rt = parallel.Runtime("cpu")
    module = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(module.parameters())
    midstage = rundir.MidStage(str(tmp_path), "hbat", stage_index, 10, 1, rt)
    midstage.save(module, opt, {"step": 3, "rows": []}, per_rank={"queue": [1.0, 2.0]})
    if world > 1:
        state = torch.load(midstage.path, weights_only=True)
        torch.save(state | {"ranks": state["ranks"] * world}, midstage.path)
    return rt, module, opt


def test_a_mid_stage_file_of_an_earlier_stage_is_not_resumed(tmp_path):
    """The file a killed run left inside stage 1 does not count for stage 2 (it starts from its beginning); for
    stage 1 it gives back the step, the global step and this rank's own state."""
    rt, module, opt = midstage_file(tmp_path, 1)
    later = rundir.MidStage(str(tmp_path), "hbat", 2, 10, 1, rt)
    assert not later.saved() and later.restore(module, opt, "HPA_2") is None
    same = rundir.MidStage(str(tmp_path), "hbat", 1, 10, 1, rt)
    progress = same.restore(module, opt, "IFA_2")
    assert same.saved() and progress["step"] == 3 and progress["global_step"] == 13 and progress["queue"] == [1.0, 2.0]


def test_a_mid_stage_file_of_another_world_size_is_refused(tmp_path):
    rt, module, opt = midstage_file(tmp_path, 1, world=2)
    with pytest.raises(ValueError, match="saved by 2 processes, this run has 1"):
        rundir.MidStage(str(tmp_path), "hbat", 1, 10, 1, rt).restore(module, opt, "IFA_2")

