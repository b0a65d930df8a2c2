"""data.py: the tokenizer, tokenisation and its truncation, batches and micro-batches, and where an answer's turn
ends."""
import warnings

import pytest
import sentencepiece as spm
import torch

import data
import world
from data import DataError, DataWarning


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    w = world.make_world(seed=0, n_corpus=10, n_ifa=4, n_hpa=4, n_test=4)
    return data.train_tokenizer(w.tokenizer_texts(), cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def small_world():
    return world.make_world(seed=1, n_corpus=400, n_ifa=200, n_hpa=400, n_test=80)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


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


def test_batch_and_micro_batch_sizes():
    assert data.batch_sizes(10, 4) == [4, 4, 2] and data.batch_sizes(8, 4) == [4, 4] and data.n_batches(10, 4, 3) == 9
    assert data.micro_split(10, 4) == [3, 3, 2, 2] and data.micro_split(2, 4) == [1, 1] and data.micro_split(8, 2) == [4, 4]


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



def test_grad_accum_micro_batches_keep_each_pair_together():
    """--grad-accum n cuts each step's batch into n micro-batches (data.batches_of). A DPO batch is B chosen
    rows then the same B pairs' rejected rows (data.hpa_batch), so every micro-batch must again be one: its pairs'
    chosen rows, then the same pairs' rejected rows, in the order of its indices, each pair in exactly one."""
    B = 4
    examples = [([1, 10 + i], [20 + i] * (i + 1) + [2], [30 + i, 2]) for i in range(B)]
    ((micros, shares),) = list(data.batches_of(examples, B, 1, 0, data.hpa_batch, 2, "cpu"))
    assert len(micros) == 2 and shares == [0.5, 0.5]

    def row(t, m, r):  # prompt + answer of one row, without the padding
        return t[r, :int(m[r].nonzero().max()) + 1].tolist()

    seen = []
    for m_idx, m_tokens, m_mask in micros:
        full_tokens, full_mask = data.hpa_batch([examples[i] for i in m_idx.tolist()])
        n = len(m_idx)
        assert [row(m_tokens, m_mask, r) for r in range(2 * n)] == \
            [row(full_tokens, full_mask, r) for r in range(2 * n)]
        for k, i in enumerate(m_idx.tolist()):  # row k is pair i's chosen answer, row n + k its rejected one
            assert row(m_tokens, m_mask, k)[-len(examples[i][1]):] == examples[i][1]
            assert row(m_tokens, m_mask, n + k)[-len(examples[i][2]):] == examples[i][2]
        seen += m_idx.tolist()
    assert sorted(seen) == list(range(B))



def test_cut_at_end_of_turn():
    assert data.cut_at_end_of_turn("Miso.\n\nHuman: And?\n\nAssistant: Tom.") == ("Miso.", True)
    assert data.cut_at_end_of_turn("Miso.\n\nAssistant: Tom.") == ("Miso.", True)
    assert data.cut_at_end_of_turn("Eat well.\n\n### Instruction:\nMore") == ("Eat well.", True)
    assert data.cut_at_end_of_turn("Human: is a word here.\nAssistant too.") == ("Human: is a word here.\nAssistant "
                                                                                 "too.", False)

