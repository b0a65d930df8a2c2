"""reward.py: the Bradley–Terry loss by hand, where the score is read, the offset, the checkpoint round trip, and a
short training run on the embedded world."""
import math
import os

import pytest
import torch

import data
from conftest import random_pairs, save, tiny_transformer
from reward import (RewardModel, bradley_terry_loss, last_true_index, pair_scores, pairwise_accuracy,
                    rm_step_loss, set_offset)
from world import make_world

V, BOS, EOS, PAD = 40, 1, 2, 3


def test_bradley_terry_hand_example():
    """−log σ(r_c − r_r): (2, 1) -> log(1 + e^−1) = 0.31326168751822286; (0, 0) -> log 2; (−1, 1) -> log(1 + e²)
    = 2.1269280110429727; the gradient on r_c is −σ(r_r − r_c): −σ(−1) = −0.2689414213699951 for the first."""
    chosen = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    losses = bradley_terry_loss(chosen, rejected)
    expected = torch.tensor([0.31326168751822286, math.log(2), 2.1269280110429727], dtype=torch.float64)
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-15)
    losses.sum().backward()
    assert chosen.grad[0].item() == pytest.approx(-0.2689414213699951, abs=1e-15)


def test_last_true_index():
    mask = torch.tensor([[False, True, True, False], [False, True, False, False], [False, False, False, True]])
    assert last_true_index(mask).tolist() == [2, 1, 3]
    with pytest.raises(ValueError):
        last_true_index(torch.tensor([[False, True], [False, False]]))


def test_score_is_read_at_the_last_response_token():
    """Changing any token after a row's last response token (the padding) leaves its score unchanged; changing
    that token changes it; and the score is `values` at that position."""
    rm = RewardModel(tiny_transformer())
    tokens, mask = data.hpa_batch(random_pairs(4, seed=1), pad_id=PAD)
    last = last_true_index(mask)
    with torch.no_grad():
        scores = rm.score(tokens, mask)
        torch.testing.assert_close(scores, rm.values(tokens)[torch.arange(len(tokens)), last], rtol=0, atol=0)
        after = torch.arange(tokens.shape[1])[None] > last[:, None]
        assert after.any()  # some rows are padded, so the check below has something to change
        scrambled = torch.where(after, torch.randint(4, V, tokens.shape), tokens)
        torch.testing.assert_close(rm.score(scrambled, mask), scores, rtol=0, atol=1e-6)
        changed = tokens.clone()
        changed[0, last[0]] = 5 if tokens[0, last[0]] != 5 else 6
        assert abs(rm.score(changed, mask)[0] - scores[0]) > 1e-4


def test_score_of_a_left_padded_row_with_pad_mask_matches_unpadded():
    """PPO scores left-padded prompt + response rows with pad_mask: the score must be the row's own."""
    rm = RewardModel(tiny_transformer())
    prompt, response = [BOS, 7, 8, 9], [10, 11, EOS]
    row = torch.tensor([prompt + response])
    mask = torch.tensor([[False] * len(prompt) + [True] * len(response)])
    padded = torch.cat([torch.full((1, 3), PAD), row], 1)
    padded_mask = torch.cat([torch.zeros(1, 3, dtype=torch.bool), mask], 1)
    with torch.no_grad():
        torch.testing.assert_close(rm.score(padded, padded_mask, pad_mask=padded != PAD), rm.score(row, mask),
                                   rtol=0, atol=1e-5)


def test_pair_scores_and_accuracy_follow_data_order():
    """pair_scores in batches of 5 = the scores of one hpa_batch, laid out as (N, [chosen, rejected])."""
    rm = RewardModel(tiny_transformer())
    examples = random_pairs(12, seed=2)
    tokens, mask = data.hpa_batch(examples)
    with torch.no_grad():
        expected = torch.stack(rm.score(tokens, mask).chunk(2), 1)
        _, metrics = rm_step_loss(rm, tokens, mask)
    torch.testing.assert_close(pair_scores(rm, examples, 5, "cpu"), expected, rtol=0, atol=1e-5)
    assert pairwise_accuracy(rm, examples, 5, "cpu") == metrics["accuracy"]
    assert 0 < metrics["accuracy"] < 1  # so a swapped column would show


def test_set_offset_centres_the_training_scores():
    """After set_offset the mean score over chosen and rejected responses is 0; the loss and accuracy, blind to
    a shift, do not change."""
    rm = RewardModel(tiny_transformer())
    examples = random_pairs(12, seed=2)
    tokens, mask = data.hpa_batch(examples)
    with torch.no_grad():
        loss_before, metrics_before = rm_step_loss(rm, tokens, mask)
        mean_before = pair_scores(rm, examples, 5, "cpu").mean().item()
        offset = set_offset(rm, examples, batch_size=5, device="cpu")
        loss_after, metrics_after = rm_step_loss(rm, tokens, mask)
    assert offset == pytest.approx(mean_before, abs=1e-6)
    assert pair_scores(rm, examples, 5, "cpu").mean().item() == pytest.approx(0.0, abs=1e-6)
    assert loss_after.item() == pytest.approx(loss_before.item(), abs=1e-6)
    assert metrics_after["accuracy"] == metrics_before["accuracy"]


def test_save_and_load_round_trip(tmp_path):
    rm = RewardModel(tiny_transformer())
    examples = random_pairs(6, seed=3)
    set_offset(rm, examples, batch_size=6, device="cpu")
    assert rm.offset.item() != 0
    path = tmp_path / "rm.pt"
    save(rm, path)
    assert os.listdir(tmp_path) == ["rm.pt"]  # written through a temporary file that is gone
    loaded = RewardModel.from_pretrained(path)
    assert loaded.state_dict().keys() == rm.state_dict().keys() >= {"head.weight", "head.bias", "offset"}
    for name, w in rm.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], w, rtol=0, atol=0)
    tokens, mask = data.hpa_batch(examples)
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(tokens, mask), rm.score(tokens, mask), rtol=0, atol=0)


@pytest.mark.slow
def test_reward_model_learns_the_embedded_world(tmp_path):
    """From a random trunk, 30 Bradley–Terry steps (batch 32) on 300 pairs of the embedded world lift held-out
    pairwise accuracy from chance to above 0.6 on 300 pairs (3.5 standard errors above chance). With c = 0.5
    the 40% style pairs are learnable at once and the rest stay near chance without content knowledge, so a
    style-only reward model tops out near 0.7 here."""
    w = make_world(seed=0, n_corpus=300, n_ifa=10, n_hpa=600, n_test=10, annotator_bias=0.5)
    texts = w.corpus + [f"{r['prompt']} {r['chosen']} {r['rejected']}" for r in w.hpa]
    tok = data.train_tokenizer(texts, vocab_size=200, cache_dir=tmp_path)
    examples = data.tokenize_hpa(w.hpa, tok, max_seq_len=64)
    train, held_out = examples[:300], examples[300:]
    rm = RewardModel(tiny_transformer(vocab_size=tok.vocab_size, dim=48))
    before = pairwise_accuracy(rm, held_out, 100, "cpu")
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randint(len(train), (32,), generator=g).tolist()
        loss, _ = rm_step_loss(rm, *data.hpa_batch([train[i] for i in idx], tok.pad_id))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = pairwise_accuracy(rm, held_out, 100, "cpu")
    print(f"\nheld-out pairwise accuracy: {before:.3f} before, {after:.3f} after 30 steps")
    assert after > 0.6
