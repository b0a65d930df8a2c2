"""study.py: its ablations are the settings they claim to be, and its table reports what the runs measured."""
import json
import os
import subprocess
import sys

import pytest

import config
import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | {"OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("name,flags", study.ABLATIONS, ids=[name for name, _ in study.ABLATIONS])
def test_every_ablation_changes_only_the_setting_it_names(name, flags):
    defaults, changed = vars(config.get_args([])), vars(config.get_args(flags))
    differ = {k for k in defaults if defaults[k] != changed[k]}
    named = {f.lstrip("-").replace("-", "_") for f in flags if f.startswith("--")}
    assert differ == named, f"{name}: {flags} changes {differ}"


def test_summarise_gives_mean_and_sample_std_over_seeds():
    runs = [({"ifa_score": 0.5, "hpa_score": 2.0, "no_eos": 0.0}, 0.4),
            ({"ifa_score": 0.7, "hpa_score": 3.0, "no_eos": 0.1}, None)]  # a seed without a win rate is skipped
    row = study.summarise({"x": runs}).splitlines()[2]
    # std with n - 1: sqrt(((0.5-0.6)^2 + (0.7-0.6)^2) / 1) = 0.1414; sqrt(0.5) = 0.7071; sqrt(0.005) = 0.0707
    assert row == "| x | 2 | 0.600 ± 0.141 | 2.500 ± 0.707 | - | 0.050 ± 0.071 | 0.400 | - |"
    # three win rates 0.4, 0.5, 0.6: s = 0.1, half-width t(0.975, df 2) · s / sqrt(3) = 4.303 · 0.1 / 1.732 = 0.248
    runs = [({"ifa_score": 1.0, "hpa_score": 1.0, "no_eos": 0.0}, w) for w in (0.4, 0.5, 0.6)]
    assert study.summarise({"y": runs}).splitlines()[2].endswith("| 0.500 ± 0.100 | 0.25 to 0.75 |")


@pytest.mark.slow
def test_an_ablation_is_judged_against_the_two_stage_run_of_its_seed(tmp_path):
    """The study runs an ablation alone (--schedule hbat) and compares its answers with the main run's two-stage
    answers. train.py running both schedules with the same flag compares them itself: the win rates must agree."""
    common = ["--preset", "smoke", "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run([sys.executable, "study.py", "--algo", "dpo", "--seeds", "0", "--taxes", "0.5",
                           "--ablations", "ewc=none", "--out", str(tmp_path / "study"), "--quiet", *common],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "train.py", "--algo", "dpo", "--seed", "0", "--alignment-tax", "0.5",
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
    proc = subprocess.run([sys.executable, "study.py", "--algo", "dpo", "--seeds", "0", "1", "--taxes", "0.5",
                           "--ablations", "ewc=none", "--out", str(tmp_path / "study"), "--report", *common],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| c=0.5 hbat ewc=none | 1 |" in proc.stdout
    assert not os.path.exists(tmp_path / "study" / "main_c0.5_s1")
