"""The cheap alternatives to Hbat (docs/method.md §7): weight averaging, RPO, ALRIGHT's alternation, and the gradient
cosine that measures the conflict between the objectives. The pure parts against hand-worked numbers and direct
computations; the schedules end to end in one smoke run of train.py."""
import math
import shutil
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import conflict
import data
import dpo
import hbat
import study
from conftest import ENV, ROOT, ok, random_pairs, tiny_transformer
from test_train import ALGOS, KILLER, SMOKE, comparable, one_line_error, read_json, read_rows, train

# -----------------------------------------------------------------------------
# the schedules as data


def test_rpo_is_two_stage_with_the_nll_weight_on_its_hpa_stage():
    stages, n = hbat.build("rpo", 4, 2, 3, use_ewc=True, rpo_alpha=0.5)
    assert n == 1
    assert [(s.name, s.kind, s.subset, s.epochs, s.ewc, s.rpo_alpha) for s in stages] == [
        ("IFA", "ifa", 0, 2, False, 0.0), ("HPA", "hpa", 0, 3, False, 0.5)]


def test_alright_is_one_alternating_stage_and_averaged_trains_nothing():
    stages, n = hbat.build("alright", 4, 2, 3, use_ewc=True)
    assert (n, [(s.name, s.kind, s.epochs, s.ewc) for s in stages]) == (1, [("ALT", "alternate", 2, False)])
    assert hbat.build("averaged", 4, 2, 3, use_ewc=True) == ([], 1)


@pytest.mark.parametrize("n_a,n_b,expected", [(3, 3, [0, 1, 0, 1, 0, 1]), (2, 4, [0, 1, 1, 0, 1, 1]),
                                              (4, 2, [0, 0, 1, 0, 0, 1]), (1, 3, [0, 1, 1, 1]), (0, 2, [1, 1]),
                                              (2, 0, [0, 0])])
def test_interleave_by_hand(n_a, n_b, expected):
    assert hbat.interleave(n_a, n_b) == expected


@pytest.mark.parametrize("n_a,n_b", [(74, 74), (74, 75), (16, 5), (5, 16), (1, 1), (9, 1)])
def test_interleave_takes_every_step_once_and_spreads_them_evenly(n_a, n_b):
    """n_a IFA and n_b DPO steps, and after any prefix of k steps the IFA share is within one step of k·n_a/total."""
    order = hbat.interleave(n_a, n_b)
    assert (order.count(0), order.count(1)) == (n_a, n_b)
    for k in range(len(order) + 1):
        assert abs(order[:k].count(0) - k * n_a / (n_a + n_b)) < 1


def test_average_is_exact_at_the_ends_and_linear_between():
    a = {"w": torch.tensor([1.0, -2.0, 0.3]), "b": torch.tensor([7.0])}
    b = {"w": torch.tensor([3.0, 2.0, 0.1]), "b": torch.tensor([-1.0])}
    assert all(torch.equal(hbat.average(a, b, 0.0)[k], a[k]) for k in a)
    assert all(torch.equal(hbat.average(a, b, 1.0)[k], b[k]) for k in a)
    mid = hbat.average(a, b, 0.25)
    assert torch.allclose(mid["w"], torch.tensor([1.5, -1.0, 0.25])) and torch.allclose(mid["b"], torch.tensor([5.0]))
    with pytest.raises(ValueError, match="different tensors"):
        hbat.average(a, {"w": b["w"]}, 0.5)


# -----------------------------------------------------------------------------
# the RPO term


class FixedLogprobs:
    """A stand-in policy whose token_logprobs are given numbers, so that the loss can be worked out by hand."""

    def __init__(self, values):
        self.values = values

    def token_logprobs(self, tokens, mask):
        return torch.where(mask, self.values, 0.0)


def test_rpo_adds_alpha_times_the_chosen_answers_mean_token_nll():
    """One pair: chosen tokens log-probs (−1, −2) and rejected (−3) over 3 response positions; the reference's
    summed log-probs (−2, −2). DPO with β = 0.5: logits = (−3 − (−3)) − 0 ... worked below; NLL of the chosen
    answer = (1 + 2) / 2 = 1.5, so with α = 2 the loss is the DPO loss + 3."""
    values = torch.tensor([[0.0, -1.0, -2.0], [0.0, -3.0, -5.0]])  # row 0 chosen, row 1 rejected
    mask = torch.tensor([[False, True, True], [False, True, False]])  # the rejected answer has one token: −3
    ref = torch.tensor([[-2.0, -2.0]])
    # policy: chosen −3, rejected −3 -> logits = (−3 − −3) − (−2 − −2) = 0, z = 0, loss = log 2
    plain, m0 = dpo.dpo_step_loss(FixedLogprobs(values), None, mask, ref, beta=0.5)
    assert plain.item() == pytest.approx(math.log(2))
    loss, m = dpo.dpo_step_loss(FixedLogprobs(values), None, mask, ref, beta=0.5, rpo_alpha=2.0)
    assert m["nll_chosen"] == pytest.approx(1.5)
    assert loss.item() == pytest.approx(math.log(2) + 3.0) and m["loss"] == pytest.approx(loss.item())
    assert "nll_chosen" not in m0


# -----------------------------------------------------------------------------
# the gradient cosine


def test_grad_cosine_against_a_direct_computation():
    """conflict.grad_cosine against flattened autograd gradients and F.cosine_similarity, with the DPO gradient in
    its closed form at the reference: −β/(2K) · ∇Σ_k (log π(y_w) − log π(y_l)); per block too. The model's .grad
    fields are left empty."""
    model = tiny_transformer(seed=3)
    demos = [ex[:2] for ex in random_pairs(6, seed=1)]
    pairs = random_pairs(5, seed=2)
    total, blocks = conflict.grad_cosine(model, demos, pairs, beta=0.1, device="cpu", autocast=nullcontext())
    assert all(p.grad is None for p in model.parameters())
    params = dict(model.named_parameters())
    tokens, mask = data.ifa_batch(demos)
    g_ifa = torch.autograd.grad(dpo.sft_loss(model.token_logprobs(tokens, mask), mask), list(params.values()))
    pt, pm = data.hpa_batch(pairs)
    logps = model.token_logprobs(pt, pm).sum(-1)
    margin = (logps[:5] - logps[5:]).sum()
    g_dpo = [-0.1 / (2 * 5) * g for g in torch.autograd.grad(margin, list(params.values()))]
    flat = [torch.cat([g.flatten() for g in gs]) for gs in (g_ifa, g_dpo)]
    assert total == pytest.approx(F.cosine_similarity(*flat, dim=0).item(), abs=1e-5)
    assert -1 <= total <= 1
    names = list(params)
    assert list(blocks) == ["tok_embeddings", "layers.0", "layers.1", "norm", "output"]
    for block, value in blocks.items():
        idx = [i for i, n in enumerate(names) if conflict.block_of(n) == block]
        a, b = (torch.cat([gs[i].flatten() for i in idx]) for gs in (g_ifa, g_dpo))
        assert value == pytest.approx(F.cosine_similarity(a, b, dim=0).item(), abs=1e-5), block


def test_cosines_by_hand():
    """a = (1, 0 | 2), b = (0, 1 | 2) over blocks x and y: overall 4 / (√5 · √5) = 0.8; block x 0, block y 1."""
    g_a = {"x.a": torch.tensor([1.0, 0.0]), "y.b": torch.tensor([2.0])}
    g_b = {"x.a": torch.tensor([0.0, 1.0]), "y.b": torch.tensor([2.0])}
    total, blocks = conflict.cosines(g_a, g_b)
    assert total == pytest.approx(0.8) and blocks == {"x": pytest.approx(0.0), "y": pytest.approx(1.0)}
    assert conflict.cosines({"x": torch.zeros(2)}, {"x": torch.ones(2)})[0] == 0.0  # a zero gradient: 0, not NaN


# -----------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def alternatives_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("alternatives") / "out"
    # unequal learning rates: alright's IFA steps must take --lr-ifa and its DPO steps --lr-hpa
    ok(train("--algo", "dpo", "--schedule", "two-stage,hbat,averaged,rpo,alright", "--lr-hpa", "5e-4",
             out=out, cache=cache))
    return out


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
        [k == 0 for k in hbat.interleave(two[0]["steps"], two[1]["steps"])]
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


@pytest.mark.parametrize("flags,named", [
    (["--schedule", "hbat,averaged"], "two-stage"),
    (["--algo", "ppo", "--schedule", "two-stage,rpo"], "rpo"),
    (["--algo", "ppo", "--schedule", "alright"], "alright"),
    (["--average-alphas", "0,1.5"], "--average-alphas"),
    (["--average-alphas", "half"], "--average-alphas"),
    (["--rpo-alpha", "-1"], "--rpo-alpha"),
])
def test_impossible_alternative_flags_exit_2_with_one_line(flags, named, tmp_path, cache):
    line = one_line_error(train(*flags, out=tmp_path / "out", cache=cache))
    assert named in line, line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.pt"))



def test_the_study_report_of_the_alternatives(alternatives_run, tmp_path):
    """study.py --alternatives over two bases (here the same run twice): every schedule has a row; averaging at
    α = 1 is two-stage (a 0.5 win rate); the best α's head to head with itself is a tie; the plots are written when
    matplotlib is there."""
    roots = []
    for b in ("a", "b"):
        shutil.copytree(alternatives_run, tmp_path / b / "main_c0.5_s0")
        roots.append(str(tmp_path / b))
    study.alternatives(roots, str(tmp_path / "report"))
    text = (tmp_path / "report" / "ALTERNATIVES.md").read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    results = read_json(alternatives_run / "results.json")
    for name in results["schedules"]:
        assert name in rows, name
    assert rows["averaged@1"][4] == "0.500 0.500"
    best = text.split("best α of averaging per base: ")[1].split(",")[0]
    assert rows[f"averaged@{best}"][6] == "0.500 0.500"
    assert "grad_cosine" in text and "| hbat | IFA_1 " in text


def test_alright_killed_inside_its_stage_resumes_to_the_same_numbers(tmp_path, cache):
    """--save-every 1 and a SIGKILL right after the 5th mid-stage save, inside alright's one alternating stage: the
    re-run resumes at step 5 (the same turn of IFA and DPO batches) and ends with the uninterrupted run's results,
    metric rows and weights."""
    flags = ["--algo", "dpo", "--schedule", "alright", "--save-every", "1", "--cache-dir", str(cache)]
    ok(train(*flags[:-2], out=tmp_path / "a", cache=cache))  # uninterrupted (train() adds the cache)
    (tmp_path / "killer.py").write_text(KILLER)
    cmd = [*SMOKE, *flags, "--out", str(tmp_path / "b")]
    killed = subprocess.run([sys.executable, str(tmp_path / "killer.py"), *cmd], cwd=ROOT, env=ENV | {"KILL_AFTER": "5"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and not (tmp_path / "b" / "results.json").exists(), killed.stderr[-2000:]
    resumed = ok(subprocess.run([sys.executable, "train.py", *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True,
                                timeout=300))
    assert "resuming alright ALT at step 5" in resumed.stdout + resumed.stderr
    a, b = (read_json(tmp_path / o / "results.json") for o in ("a", "b"))
    assert comparable(a) == comparable(b)
    rows = [[r for r in read_rows(tmp_path / o / "metrics.jsonl") if r["schedule"] == "alright"] for o in ("a", "b")]
    assert rows[0] == rows[1] and len(rows[0]) == a["schedules"]["alright"]["stages"][0]["steps"]
    wa, wb = (torch.load(tmp_path / o / "alright.pt", weights_only=True)["model"] for o in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
