"""data.py and world.py: importers on tiny fixtures of each real format, batching, splits, the tokenizer, the embedded
world's gold judge and its alignment-tax knob, and every bad-input case."""
import gzip
import json
import warnings
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import data
import hbat
import world
from data import DataError, DataWarning

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    w = data.make_world(seed=0, n_corpus=10, n_ifa=4, n_hpa=4, n_test=4)
    return data.train_tokenizer(w.tokenizer_texts(), cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def small_world():
    return data.make_world(seed=1, n_corpus=400, n_ifa=200, n_hpa=400, n_test=80)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------------------------------------------
# Importers

def test_alpaca_template_and_fields():
    kind, recs = data.load_records(FIX / "alpaca.json")
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
    kind, recs = data.load_records(FIX / "hh.jsonl.gz")
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
    _, recs = data.load_records(write(tmp_path, "hh.jsonl", json.dumps(line) + "\n"))
    assert recs == [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello there.",
                     "rejected": " Go away.\n\nHuman: ok\n\nAssistant: bye"}]


def test_pairs_with_identical_answers_are_skipped_with_one_warning(tmp_path):
    same = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}
    other = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    p = write(tmp_path, "hh.jsonl", "".join(json.dumps(x) + "\n" for x in (same, same, other)))
    with pytest.warns(DataWarning, match="skipped 2 pairs"):
        _, recs = data.load_records(p)
    assert recs == [{"prompt": "\n\nHuman: a\n\nAssistant:", "chosen": " b", "rejected": " c"}]


def test_tldr_sft_template():
    kind, recs = data.load_records(FIX / "tldr_sft.jsonl")
    assert kind == "ifa"
    assert recs[0]["prompt"] == ("SUBREDDIT: r/cooking\n\nTITLE: Burnt my first loaf\n\nPOST: I tried baking bread for "
                                 "the first time and left it in too long.\n\nTL;DR:")
    assert recs[0]["response"] == " first bread burnt, too long in oven"
    assert recs[1]["response"] == " ran my first 10k"


def test_tldr_comparisons_follow_choice():
    kind, recs = data.load_records(FIX / "tldr_comparisons.json")  # JSON lines despite .json, as released
    assert kind == "hpa"
    assert recs[0]["prompt"] == ("SUBREDDIT: r/relationships\n\nTITLE: Dishes\n\nPOST: My roommate never does the "
                                 "dishes.\n\nTL;DR:")
    assert (recs[0]["chosen"], recs[0]["rejected"]) == (" roommate leaves dishes", " I like dishes")
    assert (recs[1]["chosen"], recs[1]["rejected"]) == (" new puppy cries at night", " I got a cat")


def test_trl_explicit_and_implicit_prompt():
    kind, recs = data.load_records(FIX / "trl_explicit.jsonl")
    assert kind == "hpa" and recs[0] == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    kind, recs = data.load_records(FIX / "trl_implicit.jsonl")
    assert kind == "hpa"
    assert recs == [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                    {"prompt": "Water boils at", "chosen": " 100 C.", "rejected": " 50 C."}]


def test_explicit_format_and_kind():
    _, recs = data.load_records(FIX / "trl_implicit.jsonl", fmt="trl_implicit")
    assert recs[0]["prompt"] == "The sky is"
    ifa = data.load_records(FIX / "hh.jsonl.gz", kind="ifa")  # preference data as demonstrations: the chosen answers
    assert ifa[1] == {"prompt": "\n\nHuman: How do I boil an egg?\n\nAssistant:",
                      "response": " Put it in boiling water for about nine minutes."}
    assert len(data.load_records(FIX / "trl_explicit.jsonl", kind="hpa")) == 2
    with pytest.raises(DataError, match="alpaca.json.*not preference pairs"):
        data.load_records(FIX / "alpaca.json", kind="hpa")


def test_save_and_load_keep_world_fields(tmp_path, small_world):
    p = tmp_path / "hpa.jsonl"
    data.save_records(p, small_world.hpa)
    assert data.load_records(p) == ("hpa", small_world.hpa)


# ----------------------------------------------------------------------------------------------------------------
# Batching

def test_ifa_batch_worked_example():
    tokens, mask = data.ifa_batch([([1, 7], [8, 2]), ([1, 7, 9, 5], [2])], pad_id=3)
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    assert tokens.tolist() == [[1, 7, 8, 2, 3], [1, 7, 9, 5, 2]]
    assert mask.tolist() == [[False, False, True, True, False], [False, False, False, False, True]]


def test_hpa_batch_stacks_chosen_then_rejected():
    tokens, mask = data.hpa_batch([([1, 5], [6, 2], [7, 7, 2]), ([1], [8, 2], [2])], pad_id=3)
    assert tokens.tolist() == [[1, 5, 6, 2, 3], [1, 8, 2, 3, 3], [1, 5, 7, 7, 2], [1, 2, 3, 3, 3]]
    assert mask.tolist() == [[False, False, True, True, False], [False, True, True, False, False],
                             [False, False, True, True, True], [False, True, False, False, False]]


def test_tokenize_adds_bos_and_eos(tok):
    rec = {"prompt": "sort the numbers : 3 1 answer :", "response": "1 3"}
    [(p, r)] = data.tokenize_ifa([rec], tok, 64)
    assert p[0] == tok.bos_id and r[-1] == tok.eos_id
    assert tok.decode(p[1:]) == rec["prompt"] and tok.decode(r[:-1]) == "1 3"
    [(p, c, j)] = data.tokenize_hpa([{"prompt": "a", "chosen": "sure , 1", "rejected": "2"}], tok, 64)
    assert p == [tok.bos_id] + tok.encode("a") and c[-1] == j[-1] == tok.eos_id and len(c) == 4


def test_truncation_keeps_the_prompt_end_and_reports_once(tok):
    recs = [{"prompt": "0 1 2 3 4 5 6 7 8 9", "response": "cat dog"},          # prompt cut to its last 4 words
            {"prompt": "0", "response": "cat dog cat dog cat dog cat dog"},  # does not fit at all: dropped
            {"prompt": "5 6", "response": "cat"}]                            # fits as it is
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = data.tokenize_ifa(recs, tok, max_seq_len=8)
    assert [str(w.message) for w in caught] == [
        "ifa: max_seq_len 8: kept the end of 1 prompts, dropped 1 of 3 examples"]
    assert [tok.decode(p[1:]) for p, _ in ex] == ["6 7 8 9", "5 6"]
    assert all(len(p) + len(r) <= 8 for p, r in ex)
    with pytest.warns(DataWarning, match="kept the end of 1 prompts, dropped 0 of 1"):  # the longer answer decides
        [(p, c, r)] = data.tokenize_hpa([{"prompt": "0 1 2 3 4 5", "chosen": "cat", "rejected": "cat dog cat"}], tok, 8)
    assert tok.decode(p[1:]) == "3 4 5"
    assert data.encode_prompts([recs[0]], tok, max_len=4) == [[tok.bos_id] + tok.encode("7 8 9")]


# ----------------------------------------------------------------------------------------------------------------
# Splitting

def test_split_is_seeded_disjoint_and_keeps_every_item():
    items = list(range(103))
    parts = hbat.split(items, 4, seed=7)
    assert parts == hbat.split(items, 4, seed=7) and parts != hbat.split(items, 4, seed=8)
    assert [len(p) for p in parts] == [26, 26, 26, 25]  # the 3 left over by 103 // 4 go to the first subsets
    assert sorted(x for p in parts for x in p) == items
    assert hbat.split(items, 1, seed=0)[0] != items and sorted(hbat.split(items, 1, seed=0)[0]) == items
    assert [len(p) for p in hbat.split(list(range(100)), 4, seed=7)] == [25] * 4


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_every_schedule_sees_every_example_as_often(n):
    """Equal data: N subsets of 103 examples, each cut into batches of 8 for 2 epochs (the last batch of an epoch
    smaller), use every example exactly twice, as one subset of all 103 does; so do its micro-batches, with shares
    that sum to 1 and are proportional to their sizes."""
    examples = [([1, i], [i, 2]) for i in range(103)]
    used = []
    for subset in hbat.split(examples, n, seed=0):
        batches = list(data.batches_of(subset, 8, 2, seed=n, collate=data.ifa_batch, n_micro=3, device="cpu"))
        assert len(batches) == data.n_batches(len(subset), 8, 2)
        for micros, shares in batches:
            sizes = [len(m[0]) for m in micros]
            assert sum(shares) == pytest.approx(1) and shares == pytest.approx([k / sum(sizes) for k in sizes])
            used += [subset[i][0][1] for m in micros for i in m[0].tolist()]
    assert sorted(used) == sorted(list(range(103)) * 2)


def test_batch_and_micro_batch_sizes():
    assert data.batch_sizes(10, 4) == [4, 4, 2] and data.batch_sizes(8, 4) == [4, 4] and data.n_batches(10, 4, 3) == 9
    assert data.micro_split(10, 4) == [3, 3, 2, 2] and data.micro_split(2, 4) == [1, 1] and data.micro_split(8, 2) == [4, 4]


@pytest.mark.parametrize("n", [0, -1, 4])
def test_split_rejects_bad_n(n):
    with pytest.raises(ValueError, match="cannot split 3 records"):
        hbat.split([1, 2, 3], n, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer

def test_tokenizer_special_ids_round_trip_and_cache(tok, small_world, tmp_path):
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(world.VOCAB) + 4
    for word in world.VOCAB:  # every word of the world is one piece
        assert len(tok.encode(word)) == 1
    for text in small_world.corpus[:50] + [world.styled(r["reference"]) for r in small_world.test]:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids and 0 not in ids
        assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + tok.encode("1 2") + [tok.eos_id, tok.pad_id, tok.pad_id]) == "1 2"
    data.train_tokenizer(["a b c"], cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    stamp = path.stat().st_mtime_ns
    data.train_tokenizer((text for text in ["a b c"]), cache_dir=tmp_path)  # same corpus, as a generator: cached
    assert list(tmp_path.iterdir()) == [path] and path.stat().st_mtime_ns == stamp
    data.train_tokenizer(["a b d"], cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


def test_llama_style_tokenizer_without_pad(tmp_path):
    prefix = str(tmp_path / "llama")
    texts = ["the quick brown fox jumps over the lazy dog", "hello world", "a tiny corpus for a tiny model"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=prefix, model_type="bpe",
                                   vocab_size=60, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    t = data.Tokenizer.load(prefix + ".model")
    assert t.sp.pad_id() == -1 and (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 0)
    ex = data.tokenize_ifa([{"prompt": "hello", "response": "world"}, {"prompt": "the fox", "response": "a"}], t, 32)
    tokens, mask = data.ifa_batch(ex, pad_id=t.pad_id)
    assert tokens.min() >= 0 and mask.sum() == sum(len(r) for _, r in ex)


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(DataError, match="nope.model"):
        data.Tokenizer.load(tmp_path / "nope.model")
    with pytest.raises(DataError, match="junk.model.*not a sentencepiece model"):
        data.Tokenizer.load(write(tmp_path, "junk.model", "not a model"))


# ----------------------------------------------------------------------------------------------------------------
# The embedded world

def test_styled_demonstrations_change_only_the_demonstrations(small_world):
    """ifa_styled_fraction writes about that share of the demonstrations in the style (content and references
    unchanged) and leaves everything else of the world as it was; at 0 the world is the one without the knob."""
    sizes = dict(seed=1, n_corpus=400, n_ifa=200, n_hpa=400, n_test=80)
    styled = data.make_world(**sizes, ifa_styled_fraction=0.25)
    assert data.make_world(**sizes, ifa_styled_fraction=0.0) == small_world
    assert (styled.corpus, styled.hpa, styled.test) == (small_world.corpus, small_world.hpa, small_world.test)
    changed = [(a, b) for a, b in zip(small_world.ifa, styled.ifa) if a != b]
    assert 30 <= len(changed) <= 70  # 200 x 0.25, binomial
    for plain, polite in changed:
        assert polite["response"] == world.styled(plain["response"]) and world.is_styled(polite["response"])
        assert polite["reference"] == plain["reference"] == plain["response"]
        assert world.ifa_score(plain, polite["response"]) == 1.0  # the gold IFA score ignores the style


def test_world_is_deterministic_balanced_and_held_out(small_world, tok):
    again = data.make_world(seed=1, n_corpus=400, n_ifa=200, n_hpa=400, n_test=80)
    assert again == small_world and data.make_world(seed=2, n_corpus=400, n_ifa=200, n_hpa=400, n_test=80) != again
    w = small_world
    assert (len(w.corpus), len(w.ifa), len(w.hpa), len(w.test)) == (400, 200, 400, 80)
    assert [sum(r["family"] == f for r in w.test) for f in world.FAMILIES] == [20] * 4
    test_prompts = {r["prompt"] for r in w.test}
    assert not test_prompts & {r["prompt"] for r in w.ifa + w.hpa}
    assert not any(text.startswith(tuple(test_prompts)) for text in w.corpus)
    words = {x for text in w.corpus + [r["prompt"] + " " + r["chosen"] + " " + r["rejected"] for r in w.hpa]
             for x in text.split()}
    assert words <= set(world.VOCAB)
    longest = max(len(p) + max(len(c), len(j)) for p, c, j in data.tokenize_hpa(w.hpa, tok, 64))
    assert longest <= 64


def test_demonstrations_are_plain_and_correct(small_world):
    for r in small_world.ifa:
        assert world.ifa_score(r, r["response"]) == 1.0 and world.style_score(r["response"]) == 0.0


def test_summary_key_sentence_is_last(small_world):
    for r in small_world.test:
        if r["family"] == "summary":
            name, verb, adj, obj = r["reference"].split()
            assert r["prompt"].endswith(f"in the end {name} {verb} the {adj} {obj} . answer :")


@pytest.mark.parametrize("family, reference, wrong", [
    ("sort", "1 3 7 9", "1 7 3 9"), ("reverse", "tree sun cat", "tree cat"), ("count", "2", "3"),
    ("summary", "anna lost red kite", "anna lost blue kite"), ("summary", "anna lost red kite", "anna lost kite")])
def test_gold_judge_orders_content_then_style(family, reference, wrong):
    rec = {"family": family, "reference": reference}
    rewards = [world.gold_reward(rec, y) for y in (world.styled(reference), reference, world.styled(wrong), wrong)]
    assert rewards[0] > rewards[1] > rewards[2] > rewards[3]
    assert rewards[:2] == [4.0, 3.0]


def test_gold_judge_parts():
    rec = {"family": "sort", "reference": "1 3 7 9"}
    assert world.parse_response("sure , 1 3 hope this helps") == (["1", "3"], True, True)
    assert world.parse_response("sure , hope this helps") == ([], True, True)
    assert world.parse_response("1 3 hope this") == (["1", "3", "hope", "this"], False, False)
    assert world.style_score("sure , 1 3 7 9") == 0.5 and world.style_score("1 3 7 9 hope this helps") == 0.5
    assert world.is_styled("sure , 9 hope this helps") and not world.is_styled("sure , 9")
    assert world.ifa_score(rec, "sure , 1 3 7 9 hope this helps") == 1.0 and world.ifa_score(rec, "1 3 7") == 0.0
    rambling = "sure , 1 3 7 9 9 9 9 9 9 hope this helps"  # 5 words too many: the whole concision penalty
    assert world.gold_reward(rec, rambling) == 0.0 + 0.0 + 1.0 - 1.0


def test_rouge_l_worked_examples():
    # Lin (2004) §3.1: LCS 3 -> P = R = 3/4; LCS 2 ("the gunman") -> 2/4
    assert world.rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(0.75)
    assert world.rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(0.5)
    # P = 5/5, R = 5/6: F = 2·1·(5/6) / (1 + 5/6) = 10/11
    assert world.rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert world.rouge_l("The Cat!", "the cat") == 1.0 and world.rouge_l("", "the cat") == 0.0
    assert world.rouge_l("dog", "the cat") == 0.0


def test_win_rate_counts_ties_half():
    recs = [{"family": "count", "reference": "2"}] * 4
    a = ["sure , 2 hope this helps", "2", "3", "sure , 2 hope this helps"]
    b = ["2", "2", "2", "sure , 3 hope this helps"]
    assert world.win_rate(recs, a, b) == (1 + 0.5 + 0 + 1) / 4
    assert world.win_rate(recs, b, a) == 1 - world.win_rate(recs, a, b)
    with pytest.raises(ValueError):
        world.win_rate(recs, a, b[:2])


def test_evaluate_reports_ifa_gold_and_style(small_world):
    scores = world.evaluate(small_world.test, [world.styled(r["reference"]) for r in small_world.test])
    assert scores == {"ifa": 1.0, "hpa": 4.0, "styled": 1.0, "ifa_count": 1.0, "ifa_reverse": 1.0, "ifa_sort": 1.0,
                      "ifa_summary": 1.0}


def correct(r, answer):
    return " ".join(world.parse_response(answer)[0]) == r["reference"]


def test_no_pair_prefers_a_wrong_answer_at_zero_tax():
    w = data.make_world(seed=3, n_corpus=10, n_ifa=4, n_hpa=600, n_test=4, alignment_tax=0.0)
    for r in w.hpa:
        assert correct(r, r["chosen"]) and world.gold_reward(r, r["chosen"]) > world.gold_reward(r, r["rejected"])
    assert [sum(r["pair"] == k for r in w.hpa) for k in world.PAIR_KINDS] == [240, 180, 180]


def test_tax_sets_the_share_of_conflict_pairs_won_by_style():
    for c, expected in [(0.5, 90), (1.0, 180)]:
        w = data.make_world(seed=3, n_corpus=10, n_ifa=4, n_hpa=600, n_test=4, alignment_tax=c)
        wrong = [r for r in w.hpa if not correct(r, r["chosen"])]
        assert len(wrong) == expected and all(r["pair"] == "conflict" and world.is_styled(r["chosen"]) for r in wrong)


def test_near_misses_share_most_tokens(small_world):
    for r in small_world.hpa:
        if r["pair"] == "content":
            assert not correct(r, r["rejected"])
            assert world.rouge_l(r["chosen"], r["rejected"]) >= 0.75


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one exception type, naming the file and the line

@pytest.mark.parametrize("name, message", [
    ("bad_json.jsonl", r"bad_json.jsonl:2: malformed JSON"),
    ("missing_field.jsonl", r"missing_field.jsonl:2: missing field 'rejected'"),
    ("empty.jsonl", r"empty.jsonl: empty file"),
    ("unknown_format.jsonl", r"unknown_format.jsonl:1: cannot tell the format"),
    ("does_not_exist.jsonl", r"does_not_exist.jsonl: cannot read"),
])
def test_bad_files(name, message):
    with pytest.raises(DataError, match=message):
        data.load_records(FIX / name)


def test_more_bad_input(tmp_path):
    with pytest.raises(DataError, match="trl_explicit.jsonl: unknown format 'parquet'"):
        data.load_records(FIX / "trl_explicit.jsonl", fmt="parquet")
    with pytest.raises(DataError, match="cannot read"):
        data.load_records(tmp_path)  # a directory
    (tmp_path / "x.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    with pytest.raises(DataError, match="x.jsonl.gz"):
        data.load_records(tmp_path / "x.jsonl.gz")
    with pytest.raises(DataError, match=r"a.json:3: malformed JSON"):
        data.load_records(write(tmp_path, "a.json", '[\n{"prompt": "a", "response": "b"},\n{"prompt": }\n]'))
    with pytest.raises(DataError, match=r"b.json: record 2: expected a JSON object"):
        data.load_records(write(tmp_path, "b.json", '[{"prompt": "a", "response": "b"}, 3]'))
    with pytest.raises(DataError, match=r"c.jsonl:1: field 'choice' should be int"):
        line = json.loads((FIX / "tldr_comparisons.json").read_text().splitlines()[0])
        data.load_records(write(tmp_path, "c.jsonl", json.dumps({**line, "choice": "0"})))
    with pytest.raises(DataError, match=r"d.jsonl:2: an HH transcript without"):
        lines = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
                 {"chosen": "Human: a", "rejected": "Human: b"}]
        data.load_records(write(tmp_path, "d.jsonl", "".join(json.dumps(x) + "\n" for x in lines)))
    with pytest.raises(DataError, match=r"e.jsonl:1: chosen and rejected share no prompt"):
        data.load_records(write(tmp_path, "e.jsonl", json.dumps({"chosen": "yes", "rejected": "no"})))
