"""train.py end to end: smoke runs of the real entry point at a tiny size, on the embedded world and on real-format
fixtures, read for what the method says the loop does; one train step against hand-computed numbers; and every
way a run's input can be bad, in process (one line, exit code 2, nothing trained).

The runs are shared (conftest.py: smoke_run, alternatives_run, real_run) and each is a subprocess."""
import copy
import json
import math
import os
import shutil
from dataclasses import replace
from functools import partial
from types import SimpleNamespace

import pytest
import torch

import data
import dpo
import hbat
import ppo
import train as train_py
from conftest import (ALGOS, FIXTURES, HBAT_STAGES, REAL, SMOKE, custom_flags, exits_with_one_line, ok, read_json,
                      read_rows, save, tiny_transformer, train)
from ewc import EWC
from infra import importers, parallel
from infra.checkpoint import export_hf
from model import Transformer
from world import make_world


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


# -----------------------------------------------------------------------------
# one train step


def test_grad_accum_takes_the_same_step_as_one_big_batch():
    """One optimizer step on a batch cut into 2 micro-batches of a DPO loss moves the weights exactly as one step on
    the whole batch (the loss is a mean over pairs, each micro-batch holds half of them, and each is divided by 2)."""
    base = tiny_transformer(seed=0, n_kv_heads=2, multiple_of=8, max_seq_len=32)
    g = torch.Generator().manual_seed(1)
    examples = [([1] + torch.randint(4, 40, (3,), generator=g).tolist(),
                 torch.randint(4, 40, (1 + i % 3,), generator=g).tolist() + [2],
                 torch.randint(4, 40, (2,), generator=g).tolist() + [2]) for i in range(8)]
    ref = dpo.reference_logps(base, examples, 8, "cpu")
    run = train_py.Run(SimpleNamespace(warmup=0.0, grad_clip=1e9), parallel.Runtime("cpu"), task=None, log=None)
    after = []
    for accum in (1, 2):
        model = copy.deepcopy(base)
        batches = list(data.batches_of(examples, 8, 1, 0, data.hpa_batch, accum, "cpu", rows=ref))
        assert len(batches) == 1 and len(batches[0][0]) == accum
        dpo_loss = hbat.Objective(partial(dpo.dpo_step_loss, beta=0.5), iter(batches), 1, 1e-2)
        _, steps, examples_seen = train_py.run_stage(run, "HPA", "hpa", model, {"hpa": dpo_loss})
        assert (steps, examples_seen) == (1, 8)
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    moved = (after[0] - torch.cat([p.detach().flatten() for p in base.parameters()])).abs().max()
    assert moved > 5e-3  # Adam's first step moves each weight by about lr = 1e-2
    # Adam divides by |g|, so a weight whose gradient is ~0 can turn rounding noise into a visible step: allow 1% of lr
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=1e-4)


def test_train_step_adds_the_stage_penalty_to_the_loss():
    """train_step's gradient is that of loss + L_EWC: with the anchor θ* = θ − 0.01 on every tensor and weights F_n,
    the penalty is Σ_n F_n · λ² · 0.01² · numel_n and its gradient 2·F_n·λ²·(θ − θ*); the step's grad norm (before
    clipping) must be the norm of the loss's own gradient plus that, computed here by hand."""
    model = tiny_transformer(seed=3)
    tokens, mask = data.ifa_batch([([1, 5, 6], [7, 8, 2]), ([1, 9], [10, 2])])
    loss = dpo.ifa_step_loss(model, tokens, mask)[0]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ewc = EWC(lam=2.0)
    names = [n for n, _ in model.named_parameters()]
    ewc.anchor = {n: p.detach() - 0.01 for n, p in model.named_parameters()}
    ewc.weights = {n: 0.5 + i for i, n in enumerate(names)}  # F_n, one per tensor
    want_penalty = sum(ewc.weights[n] * 4.0 * 1e-4 * p.numel() for n, p in model.named_parameters())
    want_norm = torch.cat([(g + 2 * ewc.weights[n] * 4.0 * 0.01).flatten() for n, g in zip(names, grads)]).norm()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights as they are
    rt = parallel.Runtime("cpu")
    losses = parallel.wrap(rt, model, {"ifa": dpo.ifa_step_loss})
    m = train_py.train_step(losses, opt, [[("ifa", (tokens, mask), 1.0)]], [1.0], 0.0, 1e9, rt, ewc, model)
    assert m["ewc_penalty"] == pytest.approx(want_penalty, rel=1e-5)
    assert m["grad_norm"] == pytest.approx(want_norm.item(), rel=1e-5)
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-6)  # the logged loss is the objective's alone


def test_lr_schedule_by_hand():
    """10 steps, warm-up share 0.2: lr/peak rises 0.5, 1 over steps 0-1, then falls linearly, (10 - s) / 8, to 1/8 at
    the last step (the next step, which is not taken, would be 0)."""
    assert [train_py.lr_at(s, 10, 0.2) for s in range(10)] == [0.5, 1.0] + [(10 - s) / 8 for s in range(2, 10)]
    assert train_py.lr_at(0, 1, 0.1) == 1.0  # a one-step stage runs at the peak


# -----------------------------------------------------------------------------
# the cheap alternatives: every schedule in one run


def test_every_schedule_lands_in_results_json(alternatives_run):
    results = read_json(alternatives_run / "results.json")
    alphas = ["0", "0.25", "0.5", "0.75", "1"]
    assert list(results["schedules"]) == ["two-stage", "hbat", "rpo", "alright"] + [f"averaged@{a}" for a in alphas]
    assert set(results["win_rates"]) == {f"{n}_vs_two-stage" for n in results["schedules"] if n != "two-stage"}
    assert results["win_rates"]["averaged@1_vs_two-stage"] == 0.5  # the same answers: every prompt a tie
    for name in ("two-stage", "hbat", "rpo", "alright"):
        for st in results["schedules"][name]["stages"]:
            assert -1 <= st["grad_cosine"] <= 1 and all(-1 <= c <= 1 for c in st["grad_cosine_blocks"].values())
    rpo_hpa = results["schedules"]["rpo"]["stages"][1]["metrics"]
    assert rpo_hpa["nll_chosen"] > 0 and rpo_hpa["loss"] > rpo_hpa["nll_chosen"]


def test_every_schedule_is_scored_on_the_validation_prompts_too(alternatives_run):
    """Beside its test metrics and win rate, every schedule has its metrics and win rate on the validation prompts,
    which share no prompt with the test prompts; averaging at α = 1 ties two-stage there too."""
    results, config = read_json(alternatives_run / "results.json"), read_json(alternatives_run / "config.json")
    assert results["val_win_rates"].keys() == results["win_rates"].keys()
    assert results["val_win_rates"]["averaged@1_vs_two-stage"] == 0.5
    for name, s in results["schedules"].items():
        assert s["val_metrics"].keys() == s["metrics"].keys(), name
    w = make_world(seed=config["world_seed"], n_ifa=config["n_ifa"], n_hpa=config["n_hpa"], n_test=config["n_test"],
                   n_val=config["n_val"])
    assert len(w.val) == config["n_val"] > 0 and not {r["prompt"] for r in w.val} & {r["prompt"] for r in w.test}


def test_the_gradient_cosine_is_measured_at_every_stage_s_start_and_end(alternatives_run):
    """Every stage record of a DPO run has grad_cosine (its start) and grad_cosine_end; the end of one stage is the
    start of the next, so the two agree there."""
    for name, s in read_json(alternatives_run / "results.json")["schedules"].items():
        stages = s["stages"]
        assert all(-1 <= st["grad_cosine_end"] <= 1 and st["grad_cosine_end_blocks"] for st in stages), name
        for a, b in zip(stages, stages[1:]):
            assert a["grad_cosine_end"] == pytest.approx(b["grad_cosine"], abs=1e-6), (name, a["name"])


def test_averaged_at_0_and_1_are_the_sft_and_two_stage_models(alternatives_run):
    """Weights: averaging OUT/sft.pt (two-stage's IFA stage) with two-stage.pt gives each back bit for bit at α = 0
    and 1. Metrics and answers: averaged@0 scores exactly as two-stage did after its IFA stage, averaged@1 exactly
    as two-stage."""
    out = alternatives_run
    sft = torch.load(out / "sft.pt", weights_only=True)["model"]
    final = torch.load(out / "two-stage.pt", weights_only=True)["model"]
    for alpha, expected in ((0.0, sft), (1.0, final)):
        got = hbat.average(sft, final, alpha)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not all(torch.equal(sft[k], final[k]) for k in sft)  # the test would be empty otherwise
    results = read_json(out / "results.json")["schedules"]
    assert results["averaged@0"]["metrics"] == results["two-stage"]["stages"][0]["eval"]
    assert results["averaged@1"]["metrics"] == results["two-stage"]["metrics"]
    assert (out / "averaged@1.responses.jsonl").read_text() == (out / "two-stage.responses.jsonl").read_text()


def test_every_schedule_trains_on_the_same_examples_and_steps(alternatives_run):
    """Equal data: rpo's stages are two-stage's; alright's one stage takes every demonstration and pair as many
    times and as many steps as two-stage's two stages together, IFA steps at --lr-ifa and DPO steps at --lr-hpa."""
    results, config = read_json(alternatives_run / "results.json"), read_json(alternatives_run / "config.json")
    stages = {name: s["stages"] for name, s in results["schedules"].items()}
    two = stages["two-stage"]
    assert [(s["steps"], s["examples"]) for s in stages["rpo"]] == [(s["steps"], s["examples"]) for s in two]
    (alt,) = stages["alright"]
    assert alt["examples"] == config["n_ifa"] * config["epochs_ifa"] + config["n_hpa"] * config["epochs_hpa"]
    assert alt["examples"] == sum(s["examples"] for s in two) and alt["steps"] == sum(s["steps"] for s in two)
    rows = [r for r in read_rows(alternatives_run / "metrics.jsonl") if r["schedule"] == "alright" and "lr" in r]
    assert len(rows) == alt["steps"] and [("ifa/loss" in r) for r in rows] == \
        [k == 0 for k in hbat.interleave(two[0]["steps"], two[1]["steps"], config["alright_lambda"],
                                         hbat.stage_seed(config["seed"], "ALT", "alternate", "order"))]
    warm = max(1, int(config["warmup"] * alt["steps"]))
    for r in rows[warm:]:  # past the warm-up: peak x (steps left) / (steps after warm-up), the peak of its kind
        peak = config["lr_ifa"] if "ifa/loss" in r else config["lr_hpa"]
        assert r["lr"] == pytest.approx(peak * (alt["steps"] - r["step"]) / (alt["steps"] - warm))


def test_the_gradient_probe_changes_no_training_number(alternatives_run, tmp_path, cache):
    """--grad-probe 0 (no cosine measured) trains exactly the same models: the probe's backward passes leave no
    gradient, RNG draw or optimizer state behind."""
    out = tmp_path / "out"
    ok(train("--algo", "dpo", "--schedule", "two-stage,hbat,averaged,rpo,alright", "--lr-hpa", "5e-4",
             "--grad-probe", "0", out=out, cache=cache))
    a, b = (read_json(o / "results.json")["schedules"] for o in (alternatives_run, out))
    for name in a:
        assert a[name]["metrics"] == b[name]["metrics"], name
        for sa, sb in zip(a[name]["stages"], b[name]["stages"]):
            assert "grad_cosine" not in sb and sa["metrics"] == sb["metrics"], (name, sa["name"])


@pytest.mark.parametrize("algo", ["ppo", "ppo-release", "ppo-grpo", "dpo"])
def test_the_overoptimisation_instrument_reads_along_every_hpa_stage_and_changes_nothing(algo, smoke_run, tmp_path,
                                                                                       cache):
    """--overopt-every 2: after every second step of every HPA stage (and no other), a row of overopt/kl (from the
    stage's start), overopt/kl_sft (from the SFT model: two-stage's HPA stage starts there, so the two are equal in
    it), overopt/gold and, under PPO, overopt/proxy, for greedy and sampled answers; every final model's kl_sft; and
    every other training row, result and weight exactly those of the run without it (under DPO the instrument trains
    the SFT model first, as PPO always does: rows of a schedule "sft")."""
    out = tmp_path / "out"
    ok(train(*ALGOS[algo], "--overopt-every", "2", out=out, cache=cache))
    rows = read_rows(out / "metrics.jsonl")
    readings = [r for r in rows if "overopt/kl" in r]
    hpa = {(r["schedule"], r["stage_index"]) for r in rows
           if r["stage"].startswith("HPA") and ("loss" in r or "policy_loss" in r)}
    assert {(r["schedule"], r["stage_index"]) for r in readings} == hpa
    keys = {"overopt/kl", "overopt/kl_sft", "overopt/gold", "overopt/gold_greedy"} | (
        {"overopt/proxy", "overopt/proxy_greedy"} if algo != "dpo" else set())
    assert all(set(r) - {"schedule", "stage", "stage_index", "step"} == keys for r in readings)
    assert all(r["step"] % 2 == 0 and -1 <= r["overopt/gold"] <= 4 for r in readings)
    two_stage = [r for r in readings if r["schedule"] == "two-stage"]
    assert two_stage and all(r["overopt/kl"] == r["overopt/kl_sft"] for r in two_stage)
    assert any(r["overopt/kl"] != r["overopt/kl_sft"] for r in readings if r["schedule"] == "hbat")
    plain, _ = smoke_run(algo)
    left_out = {"base"} | ({"sft"} if algo == "dpo" else set())
    training = [r for r in rows if "overopt/kl" not in r and r["schedule"] not in left_out]
    assert training == [r for r in read_rows(plain / "metrics.jsonl") if r["schedule"] not in left_out]
    a, b = (read_json(o / "results.json")["schedules"] for o in (plain, out))
    for name in a:
        kl_sft = b[name]["metrics"].pop("kl_sft")
        assert a[name]["metrics"] == b[name]["metrics"] and math.isfinite(kl_sft), name
        assert [st["metrics"] for st in a[name]["stages"]] == [st["metrics"] for st in b[name]["stages"]], name


def test_averaged_under_ppo_starts_from_the_sft_model_the_reward_model_came_from(tmp_path, cache):
    """Under PPO, OUT/sft.pt is trained once before the schedules; it must be the model two-stage's own IFA stage
    trains (averaged@0 scores exactly as two-stage after IFA)."""
    out = tmp_path / "out"
    ok(train(*ALGOS["ppo-release"], "--schedule", "two-stage,averaged", "--average-alphas", "0,1", out=out,
             cache=cache))
    results = read_json(out / "results.json")["schedules"]
    assert list(results) == ["two-stage", "averaged@0", "averaged@1"]
    assert results["averaged@0"]["metrics"] == results["two-stage"]["stages"][0]["eval"]
    assert results["averaged@1"]["metrics"] == results["two-stage"]["metrics"]
    assert "grad_cosine" not in results["two-stage"]["stages"][0]  # measured under DPO only


# -----------------------------------------------------------------------------
# real data and real LLaMA layouts (docs/formats.md, docs/real-data.md)


def check_scores(results, keys):
    for name in ("two-stage", "hbat"):
        metrics = results["schedules"][name]["metrics"]
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("ifa_score", "no_eos")), metrics  # ROUGE-L and a share
        assert all(isinstance(metrics.get(k), float) for k in keys), metrics


@pytest.mark.slow
def test_dpo_from_meta_layout_on_alpaca_and_hh(real_run):
    """Meta layout with tokenizer.model beside it: both schedules run; ROUGE-L on real data; no judge under DPO, so
    no HPA score and no win rate."""
    out, results = real_run("dpo_meta")
    check_scores(results, ["ifa_score"])
    assert "hpa_score" not in results["schedules"]["hbat"]["metrics"] and results["win_rates"] == {}
    assert [s["name"] for s in results["schedules"]["hbat"]["stages"]] == ["IFA_1", "HPA_1", "IFA_2", "HPA_2"]
    rows = [json.loads(line) for line in (out / "hbat.responses.jsonl").read_text().splitlines()]
    assert [r["prompt"][-len(importers.HH_ASSISTANT):] for r in rows] == [importers.HH_ASSISTANT] * 3  # HH test prompts
    assert all(r["stop"] in ("eos", "end_of_turn", None) and isinstance(r["response"], str) for r in rows)


@pytest.mark.slow
def test_ppo_from_hf_layout_with_explicit_tokenizer(real_run):
    """HF layout, --tokenizer: a reward model is trained on the HH pairs first; it scores the answers (rm_score) and,
    as the default judge of real data, gives the HPA score and the win rate."""
    out, results = real_run("ppo_hf")
    assert (out / "reward_model.pt").exists() and 0.0 <= results["reward_model_accuracy"] <= 1.0
    check_scores(results, ["ifa_score", "rm_score", "hpa_score"])
    metrics = results["schedules"]["hbat"]["metrics"]
    assert metrics["hpa_score"] == pytest.approx(metrics["rm_score"])  # the same judge, asked twice
    assert 0.0 <= results["win_rates"]["hbat_vs_two-stage"] <= 1.0


@pytest.mark.slow
def test_tldr_run_judged_by_a_saved_reward_model(real_run, llama, tmp_path):
    """TL;DR SFT + comparisons under DPO, with --judge pointing at the PPO run's saved reward model."""
    judge = real_run("ppo_hf")[0] / "reward_model.pt"
    ok(train(*REAL, "--algo", "dpo", "--model", llama.dir / "meta", "--ifa-data", f"{FIXTURES}/tldr_sft.jsonl",
             "--hpa-data", f"{FIXTURES}/tldr_comparisons.json", "--test-data", f"{FIXTURES}/tldr_sft.jsonl",
             "--judge", judge, out=tmp_path / "out", cache=tmp_path / "cache"))
    results = read_json(tmp_path / "out" / "results.json")
    check_scores(results, ["ifa_score", "hpa_score"])
    assert "rm_score" not in results["schedules"]["hbat"]["metrics"]
    assert 0.0 <= results["win_rates"]["hbat_vs_two-stage"] <= 1.0
    assert all("hpa_score" in s["eval"] for s in results["schedules"]["hbat"]["stages"])  # after every stage too


@pytest.mark.slow
@pytest.mark.parametrize("run", ["dpo_meta", "ppo_hf"])
def test_exported_model_round_trips(real_run, llama, run):
    """OUT/<schedule>-hf holds the HF layout and the tokenizer; loading it gives the trained model's logits."""
    out, _ = real_run(run)
    args = Transformer.from_pretrained(llama.dir / ("meta" if run == "dpo_meta" else "hf")).args  # the base's
    tokens = torch.tensor([llama.tok.encode("Human: What is a good name for a cat? Assistant: Miso")])
    for name in ("two-stage", "hbat"):
        d = out / f"{name}-hf"
        assert {"config.json", "model.safetensors", "tokenizer.model"} <= {p.name for p in d.iterdir()}
        assert (d / "tokenizer.model").read_bytes() == llama.tok.model_proto
        config = json.loads((d / "config.json").read_text())
        assert (config["bos_token_id"], config["eos_token_id"]) == (llama.tok.bos_id, llama.tok.eos_id)
        trained = Transformer(args)
        trained.load_state_dict(torch.load(out / f"{name}.pt", weights_only=True)["model"])
        exported = Transformer.from_pretrained(d)
        # HF's config keeps the FFN width, not Meta's multiple_of that rounds up to it
        assert replace(exported.args, multiple_of=args.multiple_of) == args
        assert exported.args.ffn_hidden_dim == args.ffn_hidden_dim
        with torch.no_grad():
            expected = trained(tokens)
            torch.testing.assert_close(exported(tokens), expected, atol=1e-5, rtol=0)
            assert not torch.allclose(llama.model(tokens), expected)  # the weights did move from the base


def test_exported_model_loads_in_transformers(llama, tmp_path):
    """Parity with an independent implementation: transformers' LlamaForCausalLM reads export_hf's output."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional)")
    export_hf(llama.model, tmp_path / "hf", llama.tok.bos_id, llama.tok.eos_id)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.tensor([llama.tok.encode("Human: What is a good name for a cat? Assistant: Miso")])
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, llama.model(tokens), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# bad input: one line, exit code 2, nothing trained


BAD_INPUT = {
    # case: (flags (a function of the custom-data dir and a scratch dir), what the one line must name); the flags
    # that the parser alone refuses are tested in test_flags.py
    "broken JSONL line": (lambda d, tmp: custom_flags(d, ifa=os.path.join(FIXTURES, "bad_json.jsonl")),
                          "bad_json.jsonl:2"),
    "missing field": (lambda d, tmp: custom_flags(d, hpa=os.path.join(FIXTURES, "missing_field.jsonl")), "rejected"),
    "missing tokenizer": (lambda d, tmp: custom_flags(d, model=shutil.copy(d / "model" / "model.pt", tmp)),
                          "tokenizer"),  # a model file with no tokenizer.model beside it
    "a tokenizer the model cannot hold": (lambda d, tmp: custom_flags(d) + ["--tokenizer", small_tokenizer(tmp)],
                                          "--tokenizer"),
    "--n-splits larger than the data": (lambda d, tmp: ["--n-splits", "1000"], "--n-splits"),  # the embedded world
    "a batch that --n-splits leaves no room for": (lambda d, tmp: custom_flags(d) + ["--batch-size", "64"],
                                                   "--n-splits"),
}


def small_tokenizer(tmp):
    """A tokenizer.model with more pieces than the custom model's vocabulary."""
    data.train_tokenizer([" ".join(f"w{i}" for i in range(300))], vocab_size=400, cache_dir=tmp / "tok")
    return next((tmp / "tok").glob("tokenizer-*.model"))


def main_error(capsys, *argv):
    """train.main in process on bad input: the one line of its SystemExit(2)."""
    return exits_with_one_line(capsys, train_py.main, [*SMOKE, *map(str, argv)])


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
        save(tiny_transformer(seed=0, n_layers=1), path)
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
def test_a_bad_model_file_exits_2_with_one_line_and_runs_nothing(kind, custom, tmp_path, capsys):
    """Every way a --model can be unreadable: one line naming the file, exit 2, no traceback, and nothing trained
    (no checkpoint, no log row): the model is read before anything runs."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    path, name = bad_model(custom, scratch, kind)
    out = tmp_path / "out"
    line = main_error(capsys, *custom_flags(custom, model=path), "--tokenizer", scratch / "tokenizer.model",
                      "--out", out, "--cache-dir", tmp_path / "cache")
    assert name in line and str(path) in line, line
    assert not [n for n in os.listdir(out) if n.endswith((".pt", ".jsonl"))], os.listdir(out)


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(case, custom, tmp_path, capsys):
    flags, named = BAD_INPUT[case]
    line = main_error(capsys, *flags(custom, tmp_path), "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert named in line, line

