"""infra/pictures.py: a run's two pictures when matplotlib is installed, one line saying how to get them when not."""
import json
import sys

import pytest

import hbat
from infra import pictures


def results():
    """Two schedules of two stages each, from a base, with weight averaging's models between SFT and two-stage."""
    m = {"ifa_score": 0.8, "hpa_score": 2.5}
    stages = [{"steps": 4, "eval": m}, {"steps": 4, "eval": m | {"ifa_score": 0.6}}]
    return {"base_metrics": m, "schedules": {"two-stage": {"stages": stages, "metrics": stages[-1]["eval"]},
                                             "hbat": {"stages": stages, "metrics": m},
                                             "averaged@0.5": {"stages": [], "metrics": m}}}


def test_a_run_draws_its_tradeoff_and_its_curves(tmp_path):
    pytest.importorskip("matplotlib")
    line = pictures.draw(str(tmp_path), results())
    assert all((tmp_path / f).stat().st_size > 1000 for f in pictures.FILES) and "tradeoff.png" in line


def test_with_the_instrument_on_a_run_also_draws_the_overoptimisation_picture(tmp_path):
    """Rows of overopt/* in OUT/metrics.jsonl (--overopt-every) add overopt.png; a run without them draws none."""
    pytest.importorskip("matplotlib")
    assert "overopt.png" not in pictures.draw(str(tmp_path), results())
    rows = [{"schedule": s, "stage": "HPA", "stage_index": i, "step": k, "overopt/kl": k, "overopt/kl_sft": k,
             "overopt/gold": 2 - k / 10, "overopt/proxy": k / 5} for s in ("two-stage", "hbat") for i in (1, 3)
            for k in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "overopt.png" in pictures.draw(str(tmp_path), results())
    assert (tmp_path / "overopt.png").stat().st_size > 1000


def test_real_data_without_a_judge_has_no_hpa_score_and_still_draws(tmp_path):
    pytest.importorskip("matplotlib")
    r = results()
    for m in [r["base_metrics"]] + [st["eval"] for s in r["schedules"].values() for st in s["stages"]] + [
            s["metrics"] for s in r["schedules"].values()]:
        m.pop("hpa_score", None)
    assert "pictures:" in pictures.draw(str(tmp_path), r)


def test_without_matplotlib_a_run_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    line = pictures.draw(str(tmp_path), results())
    assert "pip install matplotlib" in line and not list(tmp_path.iterdir())


def test_every_schedule_has_its_own_colour():
    colours = [pictures.color(n) for n in hbat.SCHEDULES]
    assert len(set(colours)) == len(colours) and pictures.color("averaged@0.25") == pictures.color("averaged")
