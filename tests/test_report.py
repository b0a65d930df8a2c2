"""lab/report.py: the README's and docs/results.md's tables are what the committed result files give, and the
arithmetic behind them is checked by hand."""
import pytest

from lab import report


def test_the_documents_match_the_committed_result_files():
    """The regeneration test: every generated block of README.md and docs/results.md, rebuilt from
    results/protocol/*.json, is exactly what the documents hold."""
    try:
        report.main(["--check"])
    except SystemExit as e:
        pytest.fail(f"python -m lab.report --check: {e}")


def test_pooled_is_the_mean_over_bases_with_a_t_interval():
    """0.5, 0.6, 0.7: mean 0.6, s = 0.1, half-width t(0.975, df 2) · s / √3 = 4.303 · 0.1 / 1.732 = 0.248."""
    assert report.pooled([0.5, 0.6, 0.7]) == "0.600 (0.352 to 0.848)"
    assert report.pooled([0.1, -0.1], signed=True) == "+0.000 (-1.271 to +1.271)"  # 12.706 · 0.1414 / 1.414
    assert report.pooled([0.55]) == "0.550"


@pytest.mark.parametrize("per_base,verdict", [([0.6, 0.62, 0.64], "beats"), ([0.4, 0.38, 0.36], "loses to"),
                                              ([0.45, 0.55, 0.5], "ties"), ([0.9], "ties")])
def test_a_verdict_needs_an_interval_that_excludes_a_tie(per_base, verdict):
    assert report.verdict_of(per_base) == verdict


def study(runs_per_base):
    """A result file of two schedules (two-stage, hbat) and averaged, from per-base lists of runs given as
    (hbat IFA, hbat HPA, averaged@0.5 IFA, averaged@0.5 HPA, hbat's test win rate against two-stage); two-stage
    scores 0.5 IFA and 2.0 HPA everywhere."""
    knobs = {n: {"name": "k (x)", "flag": "--k", "settings": [1, 2, 3], "default": 2}
             for n in ("two-stage", "hbat", "averaged")}
    bases = []
    for w, runs in enumerate(runs_per_base):
        rows = []
        for s, (ifa, hpa, a_ifa, a_hpa, win) in enumerate(runs):
            m = {"two-stage": {"ifa_score": 0.5, "hpa_score": 2.0, "styled": 0.5},
                 "hbat": {"ifa_score": ifa, "hpa_score": hpa, "styled": 0.5},
                 "averaged": {"ifa_score": a_ifa, "hpa_score": a_hpa, "styled": 0.5}}
            h2h = {"two-stage": {"hbat": 1 - win, "averaged": 0.5}, "hbat": {"two-stage": win, "averaged": 0.5},
                   "averaged": {"two-stage": 0.5, "hbat": 0.5}}
            stages = {n: [{"name": "S", "kind": "ifa", "steps": 1, "examples": 10}] for n in ("two-stage", "hbat")}
            rows.append({"seed": s, "metrics": m, "sft_metrics": m["two-stage"], "h2h": h2h, "stages": stages,
                         "averaged": {"0.5": m["averaged"]}})
        bases.append({"world_seed": w, "seeds": list(range(len(runs))), "chosen": {n: 2 for n in knobs},
                      "runs_seconds": 1.0,
                      "val_win": {n: {"1": [0.5], "2": [0.5], "3": [0.5]} for n in knobs}, "runs": rows})
    return {"algo": "dpo", "ppo_variant": None, "ideal_chosen": None, "knobs": knobs, "bases": bases,
            "bases_left_out": []}


def test_gaps_are_paired_per_base_and_averaging_beats_a_schedule_only_on_both_axes():
    """Base 0 (two seeds): hbat IFA 0.6, 0.4 (mean 0.5: gap 0.0), HPA 2.2, 2.4 (gap +0.3); averaged (0.55, 2.5) beats
    (0.5, 2.3) on both axes. Base 1: hbat (0.7, 2.0), gaps +0.2 and 0.0; averaged (0.8, 1.9) beats it on IFA only.
    Pooled IFA gap: mean(0.0, 0.2) = +0.1; pooled HPA gap: mean(0.3, 0.0) = +0.15; averaging beats hbat on 1 of 2."""
    d = study([[(0.6, 2.2, 0.55, 2.5, 0.6), (0.4, 2.4, 0.55, 2.5, 0.6)], [(0.7, 2.0, 0.8, 1.9, 0.7)]])
    row = next(line for line in report.gaps(d).splitlines() if line.startswith("| Hbat |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].startswith("+0.100 (") and cells[2].startswith("+0.150 (") and cells[3] == "1 of 2"


def test_verdicts_say_beats_only_with_an_interval_above_a_tie():
    d = study([[(0.5, 2.0, 0.5, 2.0, w)] for w in (0.60, 0.62, 0.64)])
    text = report.verdicts(d)
    assert "**Hbat** (beats two-stage, 0.620 (" in text
    assert "**two-stage** (the baseline): ties averaged; loses to Hbat." in text
    assert "the same 10 examples" in text


def test_what_the_equal_answer_fix_moved_reads_both_files():
    """moved_by_equal_answers: each schedule's examples (the set over runs) and Hbat's pooled win rate with its
    verdict, before and after, from the two files: 0.45 on every base (no spread: an interval below a tie) to 0.60,
    0.62, 0.64 (beats)."""
    before = study([[(0.5, 2.0, 0.5, 2.0, 0.45)] for _ in range(3)])
    before["bases"][0]["runs"][0]["stages"]["hbat"][0]["examples"] = 12
    after = study([[(0.5, 2.0, 0.5, 2.0, w)] for w in (0.60, 0.62, 0.64)])
    text = report.moved_by_equal_answers(before, after)
    assert "two-stage 10 → 10; Hbat 10, 12 → 10." in text
    assert "Hbat 0.450 (0.450 to 0.450) (loses to) → 0.620 (0.570 to 0.670) (beats)" in text
