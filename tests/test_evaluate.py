"""evaluate.py: answers end at EOS or at their template's end of turn, the broken outputs are counted, and the judges
of real data: a plugged-in judge's win rate, the reward-model judge against one sequence at a time, and --judge
refusing what is not a reward model."""
import io

import pytest
import sentencepiece as spm
import torch

import data
import evaluate
import reward
from conftest import fixture_texts, save
from model import ModelArgs, Transformer


@pytest.fixture(scope="module")
def llama_tok():
    """A tokenizer set up as LLaMA's: no normalisation (newlines survive), byte fallback, no pad piece. On these texts
    it learns the piece ".\\n\\n", so the end of turn starts inside a token."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(fixture_texts()), model_writer=proto, model_type="bpe", vocab_size=400,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return data.Tokenizer(proto.getvalue())



class Scripted:
    """A stand-in for model.Transformer.generate: answers each prompt with the next scripted ids."""

    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompts, max_new_tokens, temperature, eos_id):
        assert len(prompts) == len(self.answers) and all(len(a) <= max_new_tokens for a in self.answers)
        return self.answers



def test_answers_stop_at_eos_or_end_of_turn(llama_tok):
    """HH answer that goes on to write the next turn: cut before it and counted as finished; an answer with EOS
    keeps its text; one cut off by max_new_tokens is the only unfinished one."""
    tok = llama_tok
    texts = [" Sure.\n\nHuman: And a dog?\n\nAssistant: Rex", " Sir Whiskers", " cat cat cat"]
    scripted = [tok.encode(texts[0]), tok.encode(texts[1]) + [tok.eos_id], tok.encode(texts[2])]
    assert tok.sp.id_to_piece(scripted[0][5]) == ".\n\n"  # the cut falls inside a token
    records = [{"prompt": "\n\nHuman: Name a pet?\n\nAssistant:", "reference": " Sure."}] * 3
    answers = evaluate.respond(Scripted(scripted), tok, records, max_new_tokens=40, max_seq_len=96)
    assert [a["text"] for a in answers] == [" Sure.", " Sir Whiskers", " cat cat cat"]
    assert [a["stop"] for a in answers] == ["end_of_turn", "eos", None]
    assert answers[0]["ids"] == scripted[0][:5] and tok.decode(answers[0]["ids"]) == " Sure"  # whole tokens before it
    assert answers[1]["ids"] == scripted[1][:-1]
    metrics, rows = evaluate.evaluate(Scripted(scripted), tok, records, None, 40, 96, judge=LengthJudge())
    assert metrics["no_eos"] == pytest.approx(1 / 3) and metrics["repetition"] == pytest.approx(1 / 3)
    assert metrics["ifa_score"] == pytest.approx(1 / 3)  # ROUGE-L 1 for the first answer, 0 for the others
    assert metrics["hpa_score"] == pytest.approx((1 + 2 + 3) / 3)  # the judge's mean
    assert [r["stop"] for r in rows] == ["end_of_turn", "eos", None]



class LengthJudge(evaluate.Judge):
    """A hand-made judge: longer answers (in words) are better."""

    def score(self, records, responses):
        return [float(len(y.split())) for y in responses]



def test_win_rate_under_a_plugged_judge_counts_ties_half():
    """Four prompts: a is longer twice, shorter once, as long once -> (1 + 1 + 0 + 0.5) / 4."""
    records = [{"prompt": f"q{i}"} for i in range(4)]
    a = ["one two three", "one two", "one", "one two"]
    b = ["one", "one", "one two three", "two one"]
    judge = LengthJudge()
    assert judge.win_rate(records, a, b) == 0.625
    assert judge.win_rate(records, b, a) == 0.375
    assert judge.win_rate(records, a, a) == 0.5
    with pytest.raises(ValueError):
        judge.win_rate(records, a, b[:3])



def test_reward_model_judge_scores_each_answer_as_one_sequence(llama):
    """The default judge: rm.score of bos + prompt + response + eos, one sequence at a time (the oracle), equals the
    judge's batched, padded scores; a prompt too long for max_seq_len keeps its end."""
    tok = llama.tok
    torch.manual_seed(1)
    rm = reward.RewardModel(Transformer(llama.model.args)).eval()
    records = [{"prompt": "\n\nHuman: What is a good name for a cat?\n\nAssistant:"}, {"prompt": "TL;DR:"}]
    responses = ["Sir Whiskers of the Windowsill.", ""]

    def oracle(prompt, response, max_seq_len):
        answer = tok.encode(response) + [tok.eos_id]
        prompt = [tok.bos_id] + tok.encode(prompt)[-(max_seq_len - 1 - len(answer)):]
        tokens = torch.tensor([prompt + answer])
        return rm.score(tokens, torch.arange(tokens.shape[1])[None] >= len(prompt)).item()

    for max_seq_len in (256, 14):
        judge = evaluate.RewardModelJudge(rm, tok, max_seq_len, batch_size=2)
        expected = [oracle(r["prompt"], y, max_seq_len) for r, y in zip(records, responses)]
        assert judge.score(records, responses) == pytest.approx(expected, abs=1e-5)
    assert evaluate.pick_judge(None, rm, tok, 256).rm is rm and evaluate.pick_judge(None, None, tok, 256) is None



def test_load_judge_refuses_what_is_not_a_reward_model(llama, tmp_path):
    """--judge PATH: a saved reward model loads; a plain model, a non-torch file or another tokenizer's RM is a
    ValueError naming the file (train.py prints it as one line)."""
    tok = llama.tok
    rm = reward.RewardModel(Transformer(llama.model.args))
    save(rm, tmp_path / "rm.pt")
    judge = evaluate.load_judge(tmp_path / "rm.pt", tok, 64, "cpu")
    assert torch.equal(judge.rm.head.weight, rm.head.weight)
    save(llama.model, tmp_path / "model.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    for name in ("model.pt", "junk.pt"):
        with pytest.raises(ValueError, match=f"^--judge {tmp_path / name}: not a reward model[^\n]*$"):
            evaluate.load_judge(tmp_path / name, tok, 64, "cpu")
    small = reward.RewardModel(Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=8, multiple_of=16)))
    save(small, tmp_path / "small.pt")
    with pytest.raises(ValueError, match="another tokenizer"):
        evaluate.load_judge(tmp_path / "small.pt", tok, 64, "cpu")



def test_the_run_table_has_base_and_sft_rows_a_tax_column_and_a_legend():
    """SFT (two-stage's first stage) scores IFA 0.9, two-stage 0.7 and hbat 0.8: their taxes are 0.200 and 0.100; the
    base and SFT rows have none. Every column is named in the legend; only a smoke run says it shows the plumbing."""
    m = {"ifa_score": 0.7, "hpa_score": 2.0}
    results = {"config": {"preset": "default"}, "base_metrics": {"ifa_score": 0.1, "hpa_score": 0.5},
               "win_rates": {"hbat_vs_two-stage": 0.6},
               "schedules": {"two-stage": {"metrics": m, "stages": [{"eval": {"ifa_score": 0.9, "hpa_score": 2.5}}]},
                             "hbat": {"metrics": m | {"ifa_score": 0.8}, "stages": []}}}
    lines = evaluate.table(results).splitlines()
    assert [line.split()[0] for line in lines[1:5]] == ["base", "SFT", "two-stage", "hbat"]
    assert lines[1].split()[-2:] == ["-", "-"] and lines[2].split()[-2:] == ["-", "-"]
    assert lines[3].split()[-2:] == ["0.200", "-"] and lines[4].split()[-2:] == ["0.100", "0.600"]
    legend = "\n".join(lines[5:])
    assert all(f"  {c}:" in legend for c in ("ifa_score", "hpa_score", "tax", "win vs 2-stage"))
    assert "plumbing" not in legend and "pipeline runs" not in legend
    results["config"]["preset"] = "smoke"
    assert "--preset smoke" in evaluate.table(results)


def test_sampled_kl_is_each_answers_log_ratio_summed_by_hand(llama_tok):
    """evaluate.sampled_kl (the over-optimisation instrument's KL, and a final model's KL from SFT) against a naive
    loop: the same seeded draws, batch by batch, then for every answer Σ_t log π(y_t | x, y_<t) − log π_ref(...) with
    one unpadded forward per answer token, averaged over answers (seed 13 draws answers that end at EOS, so rows of
    several lengths); a model's KL from itself is exactly 0."""
    from types import SimpleNamespace
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=llama_tok.vocab_size, multiple_of=16, max_seq_len=48)
    torch.manual_seed(0)
    policy, ref = Transformer(args).eval(), Transformer(args).eval()
    records = [{"prompt": f"{i}. {t[:40]}"} for i in range(3) for t in fixture_texts()]  # over one EVAL_BATCH
    rt, task, new = SimpleNamespace(fsdp=False), SimpleNamespace(tok=llama_tok), 10
    texts, kl = evaluate.sampled_kl(rt, policy, {"ref": ref, "self": policy}, task, records, new, 48, seed=13)
    prompts = data.encode_prompts(records, llama_tok, max_len=48 - new)
    generator, answers = torch.Generator().manual_seed(13), []
    for i in range(0, len(prompts), evaluate.EVAL_BATCH):
        answers += policy.generate(prompts[i:i + evaluate.EVAL_BATCH], new, temperature=1.0, eos_id=llama_tok.eos_id,
                                   generator=generator)

    def logp(model, p, y):
        with torch.no_grad():
            return sum(torch.log_softmax(model(torch.tensor([p + y[:t]]))[0, -1].float(), -1)[y[t]].item()
                       for t in range(len(y)))
    naive = sum(logp(policy, p, y) - logp(ref, p, y) for p, y in zip(prompts, answers)) / len(prompts)
    assert len(texts) == len(records) and any(y and y[-1] == llama_tok.eos_id for y in answers)
    assert kl["ref"] == pytest.approx(naive, rel=1e-4, abs=1e-4) and kl["ref"] != 0 and kl["self"] == 0
    assert texts[0] == llama_tok.decode(answers[0][:-1] if answers[0][-1] == llama_tok.eos_id else answers[0])
