"""infra/parallel.py: DDP and FSDP under torchrun (2 CPU processes, gloo). Rank 0 alone writes and prints; FSDP takes
the same steps to the same weights as DDP; under --fsdp every model file is read by rank 0 only (lean loading)."""
import os
import shutil

import pytest
import torch

from conftest import ALGOS, ENV, HBAT_STAGES, HH, TORCHRUN, ok, read_json, read_rows, train
from infra import checkpoint
from model import Transformer


def test_torchrun_two_cpu_processes(torchrun_run):
    """`torchrun --nproc_per_node 2 train.py --algo dpo --preset smoke` (gloo on CPU) runs to the end, and rank 0
    alone writes and prints: one results.json, one table, one metrics row per step, one summary line per stage."""
    out, proc = torchrun_run("dpo", "ddp")
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


@pytest.mark.parametrize("algo", ["dpo", "ppo", "ppo-release"])
def test_fsdp_takes_the_same_steps_as_ddp(algo, torchrun_run):
    """--fsdp (every model sharded over 2 gloo processes, the EWC anchor too) against DDP (whole copies) on the
    same run: the same loss, EWC penalty and gradient norm at every logged step, the same gradient cosines at the
    stages' starts, and the same final weights, to float rounding. Sharding moves where each number lives, never
    what it is. The FSDP run also recomputes every block in backward (--activation-checkpointing), which must not
    change a number either."""
    runs = {}
    for how in ("ddp", "fsdp"):
        out, _ = torchrun_run(algo, how)
        rows = [r for r in read_rows(out / "metrics.jsonl") if r["schedule"] != "base"]  # pretrained once, cached
        runs[how] = (rows, {name: torch.load(out / f"{name}.pt", weights_only=True) | {
            "model": checkpoint.load(out / f"{name}.pt")[1]} for name in ("two-stage", "hbat")})
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
        assert a.keys() == b.keys()  # the same names, whole (FSDP's sharded checkpoint read in one process)
        # Adam turns rounding noise on a ~0 gradient into a step of about ±lr (1e-3): allow that on a few weights
        diff = torch.cat([(b[k] - a[k]).abs().flatten() for k in a])
        assert (diff > 1e-3).float().mean() < 1e-3 and diff.max() < 1e-2, (name, (diff > 1e-3).sum(), diff.max())


def test_a_run_without_fsdp_resumes_the_sharded_checkpoints_of_an_fsdp_run(torchrun_run, tmp_path, cache):
    """A finished torchrun --fsdp run's folder, its results removed, re-run by one process without --fsdp: every
    schedule is read back from its sharded checkpoint (each rank's shards, put together), nothing is trained again,
    and the re-evaluated models score as the sharded run's did."""
    fsdp_out, _ = torchrun_run("dpo", "fsdp")
    out = tmp_path / "out"
    shutil.copytree(fsdp_out, out)
    (out / "results.json").unlink()
    before = read_rows(out / "metrics.jsonl")
    ok(train(*ALGOS["dpo"], out=out, cache=cache))
    assert read_rows(out / "metrics.jsonl") == before  # not a step taken
    a, b = read_json(fsdp_out / "results.json"), read_json(out / "results.json")
    for name in ("two-stage", "hbat"):
        assert [st["steps"] for st in b["schedules"][name]["stages"]] == [
            st["steps"] for st in a["schedules"][name]["stages"]]
        for k, v in a["schedules"][name]["metrics"].items():
            assert b["schedules"][name]["metrics"][k] == pytest.approx(v, abs=1e-6), (name, k)


def test_torchrun_overwrite_of_a_used_out(smoke_run, tmp_path, cache):
    """--overwrite under torchrun: the old run's files are cleared once, before any rank writes, so neither rank
    trips over the other (a file already removed, a fresh config.json removed again)."""
    out = tmp_path / "out"
    shutil.copytree(smoke_run("dpo")[0], out)
    ok(train("--algo", "dpo", "--schedule", "two-stage", "--seed", "1", "--overwrite", out=out, cache=cache,
             launcher=TORCHRUN))
    assert read_json(out / "config.json")["seed"] == 1
    assert set(read_json(out / "results.json")["schedules"]) == {"two-stage"}
    assert not (out / "hbat.pt").exists()


LOAD_RECORDER = """# train.py, recording which model files each rank reads into loads-<rank>.txt (every model file, the reward
# model's too, is read through checkpoint.load)
import os, sys
sys.path.insert(0, os.getcwd())
import train
from infra import checkpoint
load = checkpoint.load

def record(path):
    with open(os.path.join(os.environ["LOADS_DIR"], f"loads-{os.environ.get('RANK', '0')}.txt"), "a") as f:
        f.write(f"{path}\\n")

def recorded(path):
    record(path)
    return load(path)

checkpoint.load = recorded
train.main(sys.argv[1:])
"""


def test_fsdp_on_real_data_reads_each_model_file_on_rank_0_and_matches_ddp(llama, tmp_path, cache):
    """torchrun --nproc_per_node 2 --fsdp under PPO from the Hugging Face layout on the HH / Alpaca fixtures. Lean
    loading: every model file (the base, then the SFT model and the reward model, each read back from OUT) is read
    by rank 0 only, the other rank building the model on the meta device and receiving its shards, where under DDP
    every rank reads its own copy. The sharded run (a sharded reward model that also judges, the export gathered by
    rank 0) ends where the DDP run ends: the same scores, win rate and exported weights."""
    (tmp_path / "recorder.py").write_text(LOAD_RECORDER)
    flags = ("--n-splits", "1", "--batch-size", "2", "--rollout-batch", "2", "--minibatch", "2", "--max-new-tokens",
             "8", "--export-hf", "--algo", "ppo", "--model", llama.dir / "hf", "--tokenizer",
             llama.dir / "tokenizer.model", *HH)
    results = {}
    for how in ("ddp", "fsdp"):
        loads = tmp_path / f"loads-{how}"
        loads.mkdir()
        ok(train(*flags, *["--fsdp"] * (how == "fsdp"), out=tmp_path / how, cache=cache, launcher=TORCHRUN,
                 script=tmp_path / "recorder.py", env=ENV | {"LOADS_DIR": str(loads)}))
        results[how] = read_json(tmp_path / how / "results.json")
        names = {rank: sorted(os.path.basename(p) for p in (loads / f"loads-{rank}.txt").read_text().split())
                 if (loads / f"loads-{rank}.txt").exists() else [] for rank in (0, 1)}
        assert names[0] == ["hf", "reward_model.pt", "sft.pt"], names
        assert names[1] == ([] if how == "fsdp" else names[0]), names
    for name in ("two-stage", "hbat"):
        for k, v in results["ddp"]["schedules"][name]["metrics"].items():
            assert results["fsdp"]["schedules"][name]["metrics"][k] == pytest.approx(v, abs=1e-4), (name, k)
        a, b = (Transformer.from_pretrained(tmp_path / how / f"{name}-hf") for how in ("ddp", "fsdp"))
        for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-4, msg=n)
    assert results["fsdp"]["win_rates"] == pytest.approx(results["ddp"]["win_rates"], abs=1e-6)
    assert "hbat_vs_two-stage" in results["fsdp"]["win_rates"]
