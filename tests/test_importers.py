"""infra/importers.py: each real format on a tiny fixture (Alpaca, HH-RLHF, TL;DR, TRL), format detection, and every
bad-input case as one DataError naming the file and the line."""
import gzip
import json
from pathlib import Path

import pytest

from data import DataError, DataWarning
from infra import importers
from world import make_world

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def small_world():
    return make_world(seed=1, n_corpus=400, n_ifa=200, n_hpa=400, n_test=80)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_alpaca_template_and_fields():
    kind, recs = importers.load_records(FIX / "alpaca.json")
    assert kind == "ifa" and len(recs) == 2
    assert recs[0]["prompt"] == ("Below is an instruction that describes a task. Write a response that appropriately "
                                 "completes the request.\n\n### Instruction:\nGive three tips for staying healthy."
                                 "\n\n### Response:")
    assert recs[0]["response"] == "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep."
    assert recs[1]["prompt"].endswith("### Instruction:\nTranslate the sentence into French.\n\n"
                                      "### Input:\nThe cat sleeps.\n\n### Response:")
    assert recs[1]["prompt"].startswith("Below is an instruction that describes a task, paired with an input")
    assert recs[1]["response"] == "Le chat dort."


def test_hh_gz_split_on_both_strings():
    kind, recs = importers.load_records(FIX / "hh.jsonl.gz")
    assert kind == "hpa" and len(recs) == 3
    raw = [json.loads(line) for line in gzip.open(FIX / "hh.jsonl.gz", "rt")]
    for r, o in zip(recs, raw):
        assert r["prompt"].endswith("\n\nAssistant:")
        assert r["prompt"] + r["chosen"] == o["chosen"] and r["prompt"] + r["rejected"] == o["rejected"]
    assert "How about Miso?\n\nHuman: Something longer?" in recs[0]["prompt"]  # the last Assistant turn, not the first
    assert recs[0]["chosen"] == " Sir Whiskers of the Windowsill." and recs[0]["rejected"] == " Cat."
    assert recs[2]["rejected"] == " I don't care."  # answers sharing a first word: not the common-prefix split


def test_hh_falls_back_to_common_prefix_when_the_prompts_disagree(tmp_path):
    line = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: ok\n\nAssistant: bye"}
    _, recs = importers.load_records(write(tmp_path, "hh.jsonl", json.dumps(line) + "\n"))
    assert recs == [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello there.",
                     "rejected": " Go away.\n\nHuman: ok\n\nAssistant: bye"}]


def test_pairs_with_identical_answers_are_skipped_with_one_warning(tmp_path):
    same = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}
    other = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    p = write(tmp_path, "hh.jsonl", "".join(json.dumps(x) + "\n" for x in (same, same, other)))
    with pytest.warns(DataWarning, match="skipped 2 pairs"):
        _, recs = importers.load_records(p)
    assert recs == [{"prompt": "\n\nHuman: a\n\nAssistant:", "chosen": " b", "rejected": " c"}]


def test_tldr_sft_template():
    kind, recs = importers.load_records(FIX / "tldr_sft.jsonl")
    assert kind == "ifa"
    assert recs[0]["prompt"] == ("SUBREDDIT: r/cooking\n\nTITLE: Burnt my first loaf\n\nPOST: I tried baking bread for "
                                 "the first time and left it in too long.\n\nTL;DR:")
    assert recs[0]["response"] == " first bread burnt, too long in oven"
    assert recs[1]["response"] == " ran my first 10k"


def test_tldr_comparisons_follow_choice():
    kind, recs = importers.load_records(FIX / "tldr_comparisons.json")  # JSON lines despite .json, as released
    assert kind == "hpa"
    assert recs[0]["prompt"] == ("SUBREDDIT: r/relationships\n\nTITLE: Dishes\n\nPOST: My roommate never does the "
                                 "dishes.\n\nTL;DR:")
    assert (recs[0]["chosen"], recs[0]["rejected"]) == (" roommate leaves dishes", " I like dishes")
    assert (recs[1]["chosen"], recs[1]["rejected"]) == (" new puppy cries at night", " I got a cat")


def test_trl_explicit_and_implicit_prompt():
    kind, recs = importers.load_records(FIX / "trl_explicit.jsonl")
    assert kind == "hpa" and recs[0] == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    kind, recs = importers.load_records(FIX / "trl_implicit.jsonl")
    assert kind == "hpa"
    assert recs == [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                    {"prompt": "Water boils at", "chosen": " 100 C.", "rejected": " 50 C."}]


def test_explicit_format_and_kind():
    _, recs = importers.load_records(FIX / "trl_implicit.jsonl", fmt="trl_implicit")
    assert recs[0]["prompt"] == "The sky is"
    ifa = importers.load_records(FIX / "hh.jsonl.gz", kind="ifa")  # preference data as demonstrations: the chosen answers
    assert ifa[1] == {"prompt": "\n\nHuman: How do I boil an egg?\n\nAssistant:",
                      "response": " Put it in boiling water for about nine minutes."}
    assert len(importers.load_records(FIX / "trl_explicit.jsonl", kind="hpa")) == 2
    with pytest.raises(DataError, match="alpaca.json.*not preference pairs"):
        importers.load_records(FIX / "alpaca.json", kind="hpa")


def test_save_and_load_keep_world_fields(tmp_path, small_world):
    p = tmp_path / "hpa.jsonl"
    importers.save_records(p, small_world.hpa)
    assert importers.load_records(p) == ("hpa", small_world.hpa)


@pytest.mark.parametrize("name, message", [
    ("bad_json.jsonl", r"bad_json.jsonl:2: malformed JSON"),
    ("missing_field.jsonl", r"missing_field.jsonl:2: missing field 'rejected'"),
    ("empty.jsonl", r"empty.jsonl: empty file"),
    ("unknown_format.jsonl", r"unknown_format.jsonl:1: cannot tell the format"),
    ("does_not_exist.jsonl", r"does_not_exist.jsonl: cannot read"),
])
def test_bad_files(name, message):
    with pytest.raises(DataError, match=message):
        importers.load_records(FIX / name)


def test_more_bad_input(tmp_path):
    with pytest.raises(DataError, match="trl_explicit.jsonl: unknown format 'parquet'"):
        importers.load_records(FIX / "trl_explicit.jsonl", fmt="parquet")
    with pytest.raises(DataError, match="cannot read"):
        importers.load_records(tmp_path)  # a directory
    (tmp_path / "x.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    with pytest.raises(DataError, match="x.jsonl.gz"):
        importers.load_records(tmp_path / "x.jsonl.gz")
    with pytest.raises(DataError, match=r"a.json:3: malformed JSON"):
        importers.load_records(write(tmp_path, "a.json", '[\n{"prompt": "a", "response": "b"},\n{"prompt": }\n]'))
    with pytest.raises(DataError, match=r"b.json: record 2: expected a JSON object"):
        importers.load_records(write(tmp_path, "b.json", '[{"prompt": "a", "response": "b"}, 3]'))
    with pytest.raises(DataError, match=r"c.jsonl:1: field 'choice' should be int"):
        line = json.loads((FIX / "tldr_comparisons.json").read_text().splitlines()[0])
        importers.load_records(write(tmp_path, "c.jsonl", json.dumps({**line, "choice": "0"})))
    with pytest.raises(DataError, match=r"d.jsonl:2: an HH transcript without"):
        lines = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
                 {"chosen": "Human: a", "rejected": "Human: b"}]
        importers.load_records(write(tmp_path, "d.jsonl", "".join(json.dumps(x) + "\n" for x in lines)))
    with pytest.raises(DataError, match=r"e.jsonl:1: chosen and rejected share no prompt"):
        importers.load_records(write(tmp_path, "e.jsonl", json.dumps({"chosen": "yes", "rejected": "no"})))

