"""sample.py: talk to the result. In process, through its main(argv), on the models a smoke run and a real-data run
wrote."""
import io
import shutil
import sys

import pytest

import sample
from conftest import exits_with_one_line, read_rows


def answers(capsys, monkeypatch, *argv, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    sample.main([str(a) for a in argv])
    return capsys.readouterr().out.splitlines()


@pytest.mark.slow
def test_sample_answers_as_the_evaluation_did(smoke_run, capsys, monkeypatch):
    """sample.py on a run's OUT/hbat.pt, its prompts on stdin, greedy: the same answers, line for line, as the
    run's own evaluation wrote to hbat.responses.jsonl (the tokenizer found in --out); a prompt as an argument gets
    the same answer; sampling with a seed repeats itself."""
    out, _ = smoke_run("dpo")
    rows = read_rows(out / "hbat.responses.jsonl")
    assert answers(capsys, monkeypatch, out / "hbat.pt", "--max-new-tokens", 12,
                   stdin="".join(r["prompt"] + "\n" for r in rows)) == [r["response"] for r in rows]
    assert answers(capsys, monkeypatch, out / "hbat.pt", rows[0]["prompt"], "--max-new-tokens", 12) == \
        [rows[0]["response"]]
    hot = [answers(capsys, monkeypatch, out / "hbat.pt", rows[1]["prompt"], "--temperature", 1, "--seed", 3)
           for _ in range(2)]
    assert hot[0] == hot[1] and len(hot[0]) == 1


@pytest.mark.slow
def test_sample_answers_from_an_export_a_checkpoint_and_a_meta_folder_alike(real_run, llama, capsys, monkeypatch):
    """From a real-data run: OUT/hbat-hf (the Hugging Face export) and OUT/hbat.pt give the same answers, each finding
    its tokenizer.model; the Meta folder the run started from answers too (its tokenizer beside it). Prompts are
    wrapped in an HH turn (--template hh)."""
    out, _ = real_run("dpo_meta")
    prompts = "What is a good name for a cat?\nName a colour.\n"
    got = [answers(capsys, monkeypatch, path, "--template", "hh", "--max-new-tokens", 8, stdin=prompts)
           for path in (out / "hbat-hf", out / "hbat.pt")]
    assert got[0] == got[1] and len(got[0]) == 2
    assert len(answers(capsys, monkeypatch, llama.dir / "meta", "Hi", "--max-new-tokens", 4)) == 1


@pytest.mark.parametrize("case", ["no such checkpoint", "not a checkpoint", "no tokenizer", "--top-p 0"])
def test_sample_bad_input_is_one_line(case, custom, tmp_path, capsys):
    (tmp_path / "junk.pt").write_text("junk")
    model = custom / "model" / "model.pt"  # its tokenizer.model beside it
    shutil.copy(model, tmp_path / "alone.pt")  # without one
    argv, name = {"no such checkpoint": ([tmp_path / "nowhere.pt", "hi"], "nowhere.pt"),
                  "not a checkpoint": ([tmp_path / "junk.pt", "hi"], "junk.pt"),
                  "no tokenizer": ([tmp_path / "alone.pt", "hi"], "--tokenizer"),
                  "--top-p 0": ([model, "hi", "--top-p", 0], "--top-p")}[case]
    assert name in exits_with_one_line(capsys, sample.main, [str(a) for a in argv])


@pytest.mark.parametrize("case", ["a run folder of two models", "a run's results.json"])
def test_sample_given_a_run_folder_or_a_file_of_it_names_what_to_give(case, tmp_path, capsys):
    """A run folder with two schedules' models: one line listing them (not the SFT model or a mid-stage save); a run's
    results.json: one line saying it is not a model, nothing loaded."""
    for name in ("metrics.jsonl", "results.json", "two-stage.pt", "hbat.pt", "sft.pt", "hbat.step.pt"):
        (tmp_path / name).write_text("{}")
    path, names = {"a run folder of two models": (tmp_path, ["two-stage.pt", "hbat.pt"]),
                   "a run's results.json": (tmp_path / "results.json", ["not a model file"])}[case]
    line = exits_with_one_line(capsys, sample.main, [str(path), "hi"])
    assert all(n in line for n in names) and "sft.pt" not in line and "step.pt" not in line


def test_sample_given_a_run_folder_of_one_model_takes_it(tmp_path):
    for name in ("metrics.jsonl", "hbat.pt", "sft.pt"):
        (tmp_path / name).write_text("{}")
    assert sample.model_path(str(tmp_path)) == str(tmp_path / "hbat.pt")

