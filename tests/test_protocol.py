"""lab/protocol.py: every schedule gets one knob and the same budget, settings are chosen on the validation prompts
only, and the head-to-head matrix compares the tuned schedules on the test prompts."""
import json

import pytest

import hbat
import world
from infra import flags
from lab import protocol


@pytest.mark.parametrize("algo,variant", [("dpo", "textbook"), ("ppo", "textbook"), ("ppo", "release")])
def test_every_schedule_has_one_knob_with_the_same_budget(algo, variant):
    knobs = protocol.knobs(algo, variant)
    assert set(knobs) == ({"two-stage", "hbat", "averaged"} if algo == "ppo" else set(hbat.SCHEDULES))
    for name, knob in knobs.items():
        assert len(knob.settings) == protocol.BUDGET == len(set(knob.settings)), name
        if name != "averaged":  # averaged's α = 1 is two-stage itself
            assert knob.default in knob.settings, name


@pytest.mark.parametrize("algo,variant,name", [(a, v, n) for a, v in (("dpo", "textbook"), ("ppo", "textbook"),
                                                                     ("ppo", "release")) for n in protocol.knobs(a, v)])
def test_a_knob_changes_only_the_flags_it_names_and_its_default_changes_nothing(algo, variant, name):
    knob, run = protocol.knobs(algo, variant)[name], ["--algo", algo, "--ppo-variant", variant] if algo == "ppo" else []
    defaults = vars(flags.get_args(run))
    for value in knob.settings:
        changed = vars(flags.get_args(run + knob.flags(value)))
        differ = {k for k in defaults if defaults[k] != changed[k]}
        named = {f.lstrip("-").replace("-", "_") for f in knob.flags(value) if f.startswith("--")}
        assert differ <= named and (differ or value == knob.default or name == "averaged"), (name, value, differ)
    if name != "averaged":
        assert vars(flags.get_args(run + knob.flags(knob.default))) == defaults


def test_every_setting_of_every_schedule_runs_once_per_base_and_seed(tmp_path):
    ns = type("Args", (), dict(algo="dpo", preset="default", ppo_variant="textbook", ideal_chosen=None, cache_dir=None,
                               root=str(tmp_path), seeds=[0, 1], world_seeds=[3, 4]))
    runs = protocol.commands(ns, protocol.knobs("dpo"))
    outs = [out for out, _ in runs]
    assert len(outs) == len(set(outs)) == 2 * 2 * 5 * protocol.BUDGET  # averaged runs inside two-stage's runs
    two = [cmd for out, cmd in runs if "/two-stage_" in out]
    assert all("two-stage,averaged" in cmd and "0.25,0.5,0.75" in cmd for cmd in two)
    assert [out for out in outs if "/s0/" in out] == outs[:len(outs) // 2]  # every base's first seed first


# -----------------------------------------------------------------------------
# choosing on validation, reporting on test: fake runs whose answers make every win rate known

W = world.make_world(n_corpus=20, n_ifa=10, n_hpa=10, n_test=6, n_val=6)
GOOD, BAD = "good", "bad"


def answers(records, quality):
    return [r | {"response": r["reference"] if quality == GOOD else "x"} for r in records]


def fake_run(out, names, val, test):
    """A finished run dir: for each schedule name its (val quality, test quality)."""
    out.mkdir(parents=True)
    schedules = {}
    for name in names:
        for prefix, records, quality in (("", W.test, test[name]), ("val_", W.val, val[name])):
            rows = answers(records, quality)
            (out / f"{name}.{prefix}responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        m = world.evaluate(W.test, [r["response"] for r in answers(W.test, test[name])])
        metrics = {"ifa_score": m["ifa"], "hpa_score": m["hpa"], "styled": m["styled"]}
        stages = [{"name": "IFA", "kind": "ifa", "steps": 2, "examples": 8, "eval": metrics}]
        schedules[name] = {"metrics": metrics, "val_metrics": metrics, "stages": stages}
    (out / "results.json").write_text(json.dumps({"schedules": schedules, "seconds": 1.0}))


def test_settings_are_chosen_on_the_validation_prompts_never_on_the_test_prompts(tmp_path):
    """Each schedule has one setting that answers the validation prompts well and the test prompts badly; its other
    settings do the reverse. Chosen on validation: two-stage β = 0.3 (it beats the default's bad answers), Hbat ×3
    (it ties the tuned two-stage; its other settings lose), averaged α = 0.25 in the tuned two-stage's run. Every other
    schedule answers validation badly at every setting: a tie, broken towards its default. The test matrix then
    compares those choices: Hbat ×3 against two-stage β = 0.3 is bad against bad on test, 1/2."""
    knobs = protocol.knobs("dpo")
    good_on_val = {"two-stage": 0.3, "hbat": 3}
    for name, knob in knobs.items():
        if name == "averaged":
            continue
        for value in knob.settings:
            v = GOOD if good_on_val.get(name) == value else BAD
            t = BAD if v == GOOD else GOOD
            names = [name] + ([f"averaged@{a:g}" for a in knobs["averaged"].settings] if name == "two-stage" else [])
            quality = {n: (v, t) if n == name else (GOOD, BAD) if n == "averaged@0.25" else (BAD, GOOD) for n in names}
            fake_run(tmp_path / "w0" / "s0" / f"{name}_{value:g}", names,
                     {n: q[0] for n, q in quality.items()}, {n: q[1] for n, q in quality.items()})
    args = type("Args", (), dict(algo="dpo", ppo_variant="textbook", ideal_chosen=None, preset="default",
                                 root=str(tmp_path), seeds=[0], world_seeds=[0, 1]))
    result = protocol.collect(args, knobs)
    assert result["bases_left_out"] == [1]  # world 1 has no finished run
    (base,) = result["bases"]
    assert base["chosen"] == {"two-stage": 0.3, "hbat": 3, "multi-task": 0.1, "rpo": 1.0, "alright": 0.5,
                              "averaged": 0.25}
    assert base["val_win"]["two-stage"] == {"0.0333": [0.5], "0.1": [0.5], "0.3": [1.0]}
    assert base["val_win"]["hbat"] == {"0.3333": [0.0], "1": [0.0], "3": [0.5]}
    (run,) = base["runs"]
    assert run["h2h"]["hbat"]["two-stage"] == 0.5 and run["h2h"]["rpo"]["two-stage"] == 1.0
    assert run["h2h"]["two-stage"]["rpo"] == 0.0 and run["h2h"]["averaged"]["rpo"] == 0.0
    # what a run at the defaults prints, chosen by nothing: Hbat ×1 (good on test) against two-stage β = 0.1 (good)
    assert run["defaults"]["hbat"]["win"] == 0.5 and run["defaults"]["two-stage"]["win"] == 0.5
    assert set(run["defaults"]) == set(knobs) - {"averaged"}
