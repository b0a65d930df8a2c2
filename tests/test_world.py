"""world.py: the embedded world is deterministic, balanced and held out; its gold judge orders content before
style; its annotator-bias knob c sets exactly the share of conflict pairs won by style."""
import pytest

import data
import world


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return data.train_tokenizer(world.make_world(seed=0, n_corpus=10, n_ifa=4, n_hpa=4, n_test=4).tokenizer_texts(),
                                cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def small_world():
    return world.make_world(seed=1, n_corpus=400, n_ifa=200, n_hpa=400, n_test=80)


def test_styled_demonstrations_change_only_the_demonstrations(small_world):
    """ifa_styled_fraction writes about that share of the demonstrations in the style (content and references
    unchanged) and leaves everything else of the world as it was; at 0 the world is the one without the knob."""
    sizes = dict(seed=1, n_corpus=400, n_ifa=200, n_hpa=400, n_test=80)
    styled = world.make_world(**sizes, ifa_styled_fraction=0.25)
    assert world.make_world(**sizes, ifa_styled_fraction=0.0) == small_world
    assert (styled.corpus, styled.hpa, styled.test) == (small_world.corpus, small_world.hpa, small_world.test)
    changed = [(a, b) for a, b in zip(small_world.ifa, styled.ifa) if a != b]
    assert 30 <= len(changed) <= 70  # 200 x 0.25, binomial
    for plain, polite in changed:
        assert polite["response"] == world.styled(plain["response"]) and world.is_styled(polite["response"])
        assert polite["reference"] == plain["reference"] == plain["response"]
        assert world.ifa_score(plain, polite["response"]) == 1.0  # the gold IFA score ignores the style


def test_validation_prompts_are_apart_from_everything_else_and_change_nothing_else(small_world):
    """n_val draws the validation prompts last, from their own stream: none is a test, corpus, demonstration or pair
    prompt, the families come in equal shares, the same seed gives the same prompts, and the rest of the world is
    the world without them."""
    sizes = dict(seed=1, n_corpus=400, n_ifa=200, n_hpa=400, n_test=80)
    w = world.make_world(**sizes, n_val=120)
    assert (w.corpus, w.ifa, w.hpa, w.test, small_world.val) == (small_world.corpus, small_world.ifa, small_world.hpa,
                                                                small_world.test, [])
    assert w.val == world.make_world(**sizes, n_val=120).val and len(w.val) == 120
    corpus_prompts = {text[:text.index(" answer :") + len(" answer :")] for text in w.corpus if " answer :" in text}
    others = {r["prompt"] for r in w.test + w.ifa + w.hpa} | corpus_prompts
    assert not {r["prompt"] for r in w.val} & others
    assert [sum(r["family"] == f for r in w.val) for f in world.FAMILIES] == [30] * 4
    assert all(world.ifa_score(r, r["reference"]) == 1.0 for r in w.val)


@pytest.mark.parametrize("share", [0.7, 0.4, 0.1, 0.0])
def test_ideal_chosen_sets_the_share_of_pairs_whose_chosen_answer_is_the_ideal_one(share, small_world):
    """The default mix makes 70% of chosen answers the ideal one (correct and styled): at 0.7 the world is the one
    without the knob; below it, exactly round(share · n) pairs keep it, and the other style and content pairs get a
    correct half-styled answer, which the gold judge still prefers to the rejected one. Conflict pairs are as they
    were."""
    w = world.make_world(seed=1, n_corpus=400, n_ifa=200, n_hpa=400, n_test=80, ideal_chosen=share)
    ideal = [r["chosen"] == world.styled(r["reference"]) for r in w.hpa]
    assert sum(ideal) == round(share * 400)
    if share == 0.7:
        assert w.hpa == small_world.hpa
    for r, before in zip(w.hpa, small_world.hpa):
        assert r["rejected"] == before["rejected"]
        if r["pair"] == "conflict":
            assert r == before
        else:
            assert world.gold_reward(r, r["chosen"]) > world.gold_reward(r, r["rejected"])
            assert world.ifa_score(r, r["chosen"]) == 1.0 and world.style_score(r["chosen"]) in (0.5, 1.0)
    with pytest.raises(ValueError, match="ideal_chosen must be in"):
        world.make_world(seed=1, n_corpus=40, n_ifa=20, n_hpa=40, n_test=8, ideal_chosen=0.8)


def test_world_is_deterministic_balanced_and_held_out(small_world, tok):
    again = world.make_world(seed=1, n_corpus=400, n_ifa=200, n_hpa=400, n_test=80)
    assert again == small_world and world.make_world(seed=2, n_corpus=400, n_ifa=200, n_hpa=400, n_test=80) != again
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
    w = world.make_world(seed=3, n_corpus=10, n_ifa=4, n_hpa=600, n_test=4, annotator_bias=0.0)
    for r in w.hpa:
        assert correct(r, r["chosen"]) and world.gold_reward(r, r["chosen"]) > world.gold_reward(r, r["rejected"])
    assert [sum(r["pair"] == k for r in w.hpa) for k in world.PAIR_KINDS] == [240, 180, 180]


def test_tax_sets_the_share_of_conflict_pairs_won_by_style():
    for c, expected in [(0.5, 90), (1.0, 180)]:
        w = world.make_world(seed=3, n_corpus=10, n_ifa=4, n_hpa=600, n_test=4, annotator_bias=c)
        wrong = [r for r in w.hpa if not correct(r, r["chosen"])]
        assert len(wrong) == expected and all(r["pair"] == "conflict" and world.is_styled(r["chosen"]) for r in wrong)


def test_near_misses_share_most_tokens(small_world):
    for r in small_world.hpa:
        if r["pair"] == "content":
            assert not correct(r, r["rejected"])
            assert world.rouge_l(r["chosen"], r["rejected"]) >= 0.75

