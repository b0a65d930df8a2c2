"""lab/study.py: its ablations are the settings they claim to be, and its table reports what the runs measured."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ENV, ROOT
from infra import flags
from lab import study


@pytest.mark.parametrize("name,ablation", study.ABLATIONS, ids=[name for name, _ in study.ABLATIONS])
def test_every_ablation_changes_only_the_setting_it_names(name, ablation):
    algo, variant = study.ONLY.get(name, ("dpo", "textbook"))  # the run an ablation belongs to
    base = ["--algo", algo, "--ppo-variant", variant] if algo == "ppo" else []
    defaults, changed = vars(flags.get_args(base)), vars(flags.get_args(base + ablation))
    differ = {k for k in defaults if defaults[k] != changed[k]}
    named = {f.lstrip("-").replace("-", "_") for f in ablation if f.startswith("--")}
    assert differ == named, f"{name}: {ablation} changes {differ}"


def test_summarise_gives_mean_and_sample_std_over_seeds():
    runs = [({"ifa_score": 0.5, "hpa_score": 2.0, "no_eos": 0.0}, 0.4),
            ({"ifa_score": 0.7, "hpa_score": 3.0, "no_eos": 0.1}, None)]  # a seed without a win rate is skipped
    row = study.summarise({"x": runs}).splitlines()[2]
    # std with n - 1: sqrt(((0.5-0.6)^2 + (0.7-0.6)^2) / 1) = 0.1414; sqrt(0.5) = 0.7071; sqrt(0.005) = 0.0707
    assert row == "| x | 2 | 0.600 ± 0.141 | 2.500 ± 0.707 | - | 0.050 ± 0.071 | 0.400 | - |"
    # three win rates 0.4, 0.5, 0.6: s = 0.1, half-width t(0.975, df 2) · s / sqrt(3) = 4.303 · 0.1 / 1.732 = 0.248
    runs = [({"ifa_score": 1.0, "hpa_score": 1.0, "no_eos": 0.0}, w) for w in (0.4, 0.5, 0.6)]
    assert study.summarise({"y": runs}).splitlines()[2].endswith("| 0.500 ± 0.100 | 0.25 to 0.75 |")


def test_pooling_over_bases_by_hand(tmp_path):
    """Two bases (study roots), setting A against the reference R on the same seeds:
    base 0: A wins 0.6, 0.4 (mean 0.5), R 0.5, 0.3 -> paired differences +0.1, +0.1
    base 1: A wins 0.7 (one seed; the other has no win rate), R 0.5 -> +0.2
    pooled over bases: mean(0.5, 0.7) = 0.6, t(df 1) = 12.706, s = 0.1414, half-width 12.706 * 0.1414 / sqrt(2)
    = 1.27; over all three runs mean 0.567, s = 0.153, half-width 4.303 * 0.153 / sqrt(3) = 0.38; paired over bases
    mean(+0.1, +0.2) = +0.15, half-width 12.706 * 0.0707 / sqrt(2) = 0.64. A setting one root lacks is left out."""
    def run(seed, win):
        return {"seed": seed, "win": win, "ifa_score": 0.5, "hpa_score": 2.0, "styled": 0.1}
    bases = [{"A": [run(0, 0.6), run(1, 0.4)], "R": [run(0, 0.5), run(1, 0.3)], "only here": [run(0, 0.5)]},
             {"A": [run(0, 0.7), run(1, None)], "R": [run(0, 0.5), run(1, 0.5)]}]
    roots = []
    for i, b in enumerate(bases):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "STUDY.json").write_text(json.dumps(b))
        roots.append(str(tmp_path / str(i)))
    lines = study.pooled(roots, versus="R").splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| A", "| R"]
    cells = lines[2].strip("| ").split(" | ")
    assert cells[1:5] == ["0.500 (2)", "0.700 (1)", "0.600 (-0.67 to 1.87)", "0.567 (0.19 to 0.95)"]
    assert cells[-1] == "+0.150 (-0.49 to 0.79)"


def test_an_ablation_is_judged_against_the_two_stage_run_of_its_seed(tmp_path, cache):
    """The study runs an ablation alone (--schedule hbat) and compares its answers with the main run's two-stage
    answers. train.py running both schedules with the same flag compares them itself: the win rates must agree."""
    common = ["--preset", "smoke", "--cache-dir", str(cache)]
    proc = subprocess.run([sys.executable, "-m", "lab.study", "--algo", "dpo", "--seeds", "0", "--taxes", "0.5",
                           "--schedules", "two-stage", "--ablations", "ewc=none", "--out", str(tmp_path / "study"),
                           "--quiet", *common],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "train.py", "--algo", "dpo", "--seed", "0", "--annotator-bias", "0.5",
                           "--schedule", "two-stage,hbat", "--ewc", "none", "--out", str(tmp_path / "both"), *common],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "both" / "results.json") as f:
        expected = json.load(f)["win_rates"]["hbat_vs_two-stage"]
    with open(tmp_path / "study" / "STUDY.md") as f:
        row = next(line for line in f if line.startswith("| c=0.5 hbat ewc=none |"))
    assert row.split("|")[-3].strip() == f"{expected:.3f}"  # the win rate column; one seed: no interval
    assert 0 < expected < 1
    # --report runs nothing: seed 1 has not run, so it is left out of the table, not started
    proc = subprocess.run([sys.executable, "-m", "lab.study", "--algo", "dpo", "--seeds", "0", "1", "--taxes", "0.5",
                           "--schedules", "two-stage", "--ablations", "ewc=none", "--out", str(tmp_path / "study"),
                           "--report", *common],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| c=0.5 hbat ewc=none | 1 |" in proc.stdout
    assert not os.path.exists(tmp_path / "study" / "main_c0.5_s1")


