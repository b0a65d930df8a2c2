"""lab/why.py: Gao et al.'s forms fitted by least squares recover known curves and their peaks, forgetting's numbers
match a hand computation, and collect reads a run's readings and final models as train.py writes them."""
import json
import math
import statistics

import numpy as np
import pytest

from lab import why


@pytest.mark.parametrize("form", ["rl", "bon"])
def test_fit_recovers_a_known_curve_and_its_peak(form):
    """Readings exactly on R(d) = R0 + αd − β·(d log d | d²): the fit returns R0, α, β and R² = 1, and its peak is
    where the curve is highest on a fine grid (found without the formula). No peak where the curve never turns down
    (β < 0), where it turns down after the last reading or before the first, or where noise alone bends it."""
    r0, alpha, beta = 1.2, 1.5, 0.9
    d = np.linspace(0.05, 6, 40)
    term = d * np.log(d) if form == "rl" else d * d
    f = why.fit(d, r0 + alpha * d - beta * term, form)
    assert (f["r0"], f["alpha"], f["beta"], f["r2"]) == pytest.approx((r0, alpha, beta, 1.0), abs=1e-9)
    grid = np.linspace(1e-6, 10, 200001)
    curve = alpha * grid - beta * (grid * np.log(grid) if form == "rl" else grid * grid)
    assert f["peak"] == pytest.approx(grid[curve.argmax()], abs=1e-3)
    assert why.fit(d, r0 + alpha * d + 0.1 * term, form)["peak"] is None
    assert why.fit(d[:5], (r0 + alpha * d - beta * term)[:5], form)["peak"] is None  # peaks after the readings
    assert why.fit(d[-5:], (r0 + alpha * d - beta * term)[-5:], form)["peak"] is None  # before them
    flat = 2 + 0.05 * np.random.default_rng(0).standard_normal((200, 12))
    bent = sum(why.fit(d[::3][:12], y, form)["peak"] is not None for y in flat)
    assert bent <= 20  # at most about the 2.5% a one-sided test at 2 standard errors lets through, with room


def test_fit_standard_error_matches_the_textbook_formula():
    """β's standard error is √(σ² (XᵀX)⁻¹)[β], σ² the residual variance on n − 3 degrees of freedom (by hand)."""
    rng = np.random.default_rng(1)
    d = np.linspace(0.1, 4, 30)
    y = 1 + 0.8 * d - 0.3 * d * np.log(d) + 0.1 * rng.standard_normal(30)
    f = why.fit(d, y, "rl")
    X = np.column_stack([np.ones(30), d, -d * np.log(d)])
    b = np.linalg.solve(X.T @ X, X.T @ y)
    s2 = ((y - X @ b) ** 2).sum() / 27
    assert f["beta_se"] == pytest.approx(math.sqrt(s2 * np.linalg.inv(X.T @ X)[2, 2]))


def fake(tax_of, n_bases=3):
    """A collected file: per base, DPO's trained models on the line tax = 0.01·KL, averaged models off every line
    (0.03 above), the on-policy objectives' models at tax_of(KL); readings whose gold follows an RL curve that turns
    down and whose proxy rises, both moving further on later bases."""
    bases = []
    for w in range(n_bases):
        runs = {}
        for name in why.OBJECTIVES:
            kls = {"two-stage": 10 + w, "hbat": 20 + 2 * w, "averaged@0.5": 3.0 + w}
            if name == "dpo":
                kls |= {"rpo": 5.0 + w, "alright": 15.0, "multi-task": 25.0 + w}
            final = {s: {"ifa_score": 0.9 - (0.01 * kl + 0.03 if not why.trained(s) else 0.01 * kl if name == "dpo"
                                             else tax_of(kl)), "kl_sft": kl} for s, kl in kls.items()}
            readings = {s: [{"kl_sft": (k / 2) ** 2, "step": 4 * k, "stage_index": 1,
                             "gold": 2 + 0.5 * k / 2 - (0.3 + 0.002 * w) * (k / 2) * math.log(k / 2)}
                            | ({"proxy": (0.1 + 0.01 * w) * k} if name != "dpo" else {})
                            for k in range(1, 9)] for s in ("two-stage", "hbat")}
            runs[name] = {"sft_ifa": 0.9, "final": final, "readings": readings, "seconds": 1.0}
        bases.append({"world_seed": w, "runs": runs})
    return {"seed": 0, "overopt_every": 4, "average_alphas": why.ALPHAS, "bases": bases, "bases_left_out": []}


def test_forgetting_against_kl_by_hand():
    """Per-base r is Pearson's r of (KL, tax) over that base's trained models (statistics.correlation), the averaged
    ones left out; the on-policy models sit 0.05 below DPO's line on every base, so against the line through the
    others' two-stage and Hbat models each on-policy objective is below it and DPO above (RPO, ALRIGHT, multi-task
    are not in that comparison); the pooled line and r come from every trained model."""
    d = fake(lambda kl: 0.01 * kl - 0.05)
    fo = why.forgetting(d)
    for b, r in zip(d["bases"], fo["r_per_base"]):
        pts = [(m["kl_sft"], 0.9 - m["ifa_score"]) for run in b["runs"].values() for s, m in run["final"].items()
               if not s.startswith("averaged")]
        assert r == pytest.approx(statistics.correlation(*zip(*pts)))
    assert fo["r_with_averaged"] != pytest.approx(fo["r_per_base"])
    pts = why.points(d)
    assert fo["n"] == len(pts) == 3 * (5 + 3 * 2)
    assert fo["r_pooled"] == pytest.approx(statistics.correlation([p[3] for p in pts], [p[4] for p in pts]))
    slope, icept = statistics.linear_regression([p[3] for p in pts], [p[4] for p in pts])
    assert (fo["slope"], fo["intercept"]) == pytest.approx((slope, icept))
    assert all(v < 0 for name in ("ppo_textbook", "ppo_release", "ppo_grpo") for v in fo["residual"][name])
    assert all(v > 0 for v in fo["residual"]["dpo"])
    shared = [p for p in pts if p[2] in ("two-stage", "hbat")]  # like for like: the schedules every objective runs
    for b, v in zip(d["bases"], fo["residual"]["ppo_grpo"]):  # by hand: the line through DPO, textbook, release
        others = [p for p in shared if p[0] == b["world_seed"] and p[1] != "ppo_grpo"]
        s, i = statistics.linear_regression([p[3] for p in others], [p[4] for p in others])
        mine = [p for p in shared if p[0] == b["world_seed"] and p[1] == "ppo_grpo"]
        assert v == pytest.approx(statistics.mean(p[4] - (i + s * p[3]) for p in mine))
    lo, hi = fo["r_pooled_ci"]
    assert lo < fo["r_pooled"] < hi
    text = why.answers(d)
    assert "rises with" in text and "Off the line" in text and "GRPO" in text.split("Off the line")[1]
    assert "No objective's interval excludes zero" in why.answers(fake(lambda kl: 0.01 * kl))


def test_a_tax_unrelated_to_kl_claims_no_relation():
    d = fake(lambda kl: 0.01 * kl)
    rng = np.random.default_rng(0)
    for b in d["bases"]:
        for run in b["runs"].values():
            for m in run["final"].values():
                m["ifa_score"] = 0.9 - 0.2 * rng.random()
    assert "shows no relation at this power to" in why.answers(d)


def test_tables_and_fits_of_a_collected_file():
    """Every objective's HPA schedules get a row; gold falls and the proxy rises from the first quarter of the
    readings to the last on every base, so PPO's rows are over-optimisation and DPO's (no proxy) are not; the fitted
    gold curve peaks inside the readings on every base; the forgetting table has every final model."""
    d = fake(lambda kl: 0.01 * kl)
    f = why.fits(d)
    assert set(f) == set(why.OBJECTIVES) and all(set(by) == {"two-stage", "hbat"} for by in f.values())
    assert "proxy" not in f["dpo"]["two-stage"] and "proxy" in f["ppo_grpo"]["hbat"]
    rs = d["bases"][0]["runs"]["dpo"]["readings"]["hbat"]
    assert f["dpo"]["hbat"]["gold"]["change"][0] == pytest.approx(
        statistics.mean(r["gold"] for r in rs[-2:]) - statistics.mean(r["gold"] for r in rs[:2]))
    assert all(x["peak"] is not None and x["r2"] == pytest.approx(1.0) for x in f["dpo"]["hbat"]["gold"]["rl"])
    table = why.overopt_table(d)
    assert table.count("\n") == 1 + 4 * 2 and "3 of 3" in table
    answer = why.answers(d).split("\n")[0]
    assert "GRPO hbat" in answer and "DPO two-stage" not in answer.split("The gold score falls")[0]
    assert why.forgetting_table(d).count("\n") == 1 + 6 + 3 * 3


def test_collect_reads_what_train_writes(tmp_path):
    """collect_run: the SFT model's IFA score is two-stage's first stage's, the final metrics keep the scores and
    kl_sft, and the readings are the overopt rows of metrics.jsonl by schedule, without their prefix."""
    out = tmp_path / "run"
    out.mkdir()
    res = {"seconds": 5.0, "schedules": {
        "two-stage": {"metrics": {"ifa_score": 0.7, "hpa_score": 2.0, "kl_sft": 9.0, "length": 5},
                      "stages": [{"eval": {"ifa_score": 0.88}}, {"eval": {"ifa_score": 0.7}}]},
        "averaged@0.5": {"metrics": {"ifa_score": 0.8, "hpa_score": 2.1, "kl_sft": 2.0}, "stages": []}}}
    (out / "results.json").write_text(json.dumps(res))
    rows = [{"schedule": "two-stage", "stage": "HPA", "stage_index": 1, "step": 10, "loss": 0.5},
            {"schedule": "two-stage", "stage": "HPA", "stage_index": 1, "step": 12, "overopt/kl": 1.0,
             "overopt/kl_sft": 1.0, "overopt/gold": 2.5}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = why.collect_run(str(out))
    assert run["sft_ifa"] == 0.88 and run["final"]["two-stage"] == {"ifa_score": 0.7, "hpa_score": 2.0, "kl_sft": 9.0}
    assert run["readings"] == {"two-stage": [{"step": 12, "stage_index": 1, "kl": 1.0, "kl_sft": 1.0, "gold": 2.5}]}


def test_the_figures_are_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    files = why.draw(fake(lambda kl: 0.01 * kl), str(tmp_path))
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("overopt.png", "forgetting.png")) and len(files) == 2
