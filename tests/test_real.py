"""Real data and real LLaMA layouts (docs/formats.md, docs/real-data.md): train.py on the offline HH / Alpaca / TL;DR
fixtures from a tiny random model written in Meta's and in Hugging Face's layout, the export of the aligned model,
the end of turn in generation, and the judge of real data. Everything is built here; nothing is downloaded."""
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch

import data
import evaluate
import reward
from checkpoint import export_hf
from conftest import ENV, ROOT, ok
from model import ModelArgs, Transformer, save_checkpoint
from test_model import write_meta  # Meta's sharded layout, written independently of checkpoint.py

FIX = os.path.join(ROOT, "tests", "fixtures")
# the fixtures hold 2 Alpaca demonstrations and 3 HH pairs: N = 2 leaves one example per subset, so batches of 1
TINY = ("--preset", "smoke", "--device", "cpu", "--n-splits", "2", "--batch-size", "1", "--rollout-batch", "1",
        "--minibatch", "1", "--max-new-tokens", "8", "--export-hf")


def fixture_texts():
    texts = []
    for name in ("alpaca.json", "hh.jsonl.gz", "tldr_sft.jsonl", "tldr_comparisons.json"):
        for record in data.load_records(os.path.join(FIX, name), kind=None)[1]:
            texts += [v for v in record.values() if isinstance(v, str)]
    return texts


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random LLaMA with a sentencepiece tokenizer trained on the fixtures' text: meta/ (params.json, two
    consolidated.*.pth shards, tokenizer.model beside them, as Meta ships it) and hf/ (config.json +
    model.safetensors, no tokenizer: runs from it pass --tokenizer)."""
    d = tmp_path_factory.mktemp("llama")
    tok = data.train_tokenizer(fixture_texts(), vocab_size=512, cache_dir=d / "tok", model_type="bpe")
    shutil.copy(next((d / "tok").glob("tokenizer-*.model")), d / "tokenizer.model")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                                  multiple_of=16, max_seq_len=256))
    write_meta(model, d / "meta")
    shutil.copy(d / "tokenizer.model", d / "meta" / "tokenizer.model")
    export_hf(model, d / "hf", tok.bos_id, tok.eos_id)
    return SimpleNamespace(dir=d, tok=tok, model=model)


def train(*flags, out, cache):
    cmd = [sys.executable, "train.py", *TINY, "--out", str(out), "--cache-dir", str(cache), *map(str, flags)]
    ok(subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300))
    with open(out / "results.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(llama, tmp_path_factory):
    """Each run once, on first use: {name: (out dir, results)}."""
    done = {}
    hh = ("--ifa-data", f"{FIX}/alpaca.json", "--hpa-data", f"{FIX}/hh.jsonl.gz", "--test-data", f"{FIX}/hh.jsonl.gz")
    flags = {"dpo_meta": ("--algo", "dpo", "--model", llama.dir / "meta", *hh),
             "ppo_hf": ("--algo", "ppo", "--model", llama.dir / "hf", "--tokenizer", llama.dir / "tokenizer.model",
                        *hh)}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name) / "out"
            done[name] = (out, train(*flags[name], out=out, cache=tmp_path_factory.mktemp("cache")))
        return done[name]
    return get


def check_scores(results, keys):
    for name in ("two-stage", "hbat"):
        metrics = results["schedules"][name]["metrics"]
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("ifa_score", "no_eos")), metrics  # ROUGE-L and a share
        assert all(isinstance(metrics.get(k), float) for k in keys), metrics


# -----------------------------------------------------------------------------
# train.py end to end on the fixtures


@pytest.mark.slow
def test_dpo_from_meta_layout_on_alpaca_and_hh(runs):
    """Meta layout with tokenizer.model beside it: both schedules run; ROUGE-L on real data; no judge under DPO, so
    no HPA score and no win rate."""
    out, results = runs("dpo_meta")
    check_scores(results, ["ifa_score"])
    assert "hpa_score" not in results["schedules"]["hbat"]["metrics"] and results["win_rates"] == {}
    assert [s["name"] for s in results["schedules"]["hbat"]["stages"]] == ["IFA_1", "HPA_1", "IFA_2", "HPA_2"]
    rows = [json.loads(line) for line in (out / "hbat.responses.jsonl").read_text().splitlines()]
    assert [r["prompt"][-len(data.HH_ASSISTANT):] for r in rows] == [data.HH_ASSISTANT] * 3  # HH test prompts
    assert all(r["stop"] in ("eos", "end_of_turn", None) and isinstance(r["response"], str) for r in rows)


@pytest.mark.slow
def test_ppo_from_hf_layout_with_explicit_tokenizer(runs):
    """HF layout, --tokenizer: a reward model is trained on the HH pairs first; it scores the answers (rm_score) and,
    as the default judge of real data, gives the HPA score and the win rate."""
    out, results = runs("ppo_hf")
    assert (out / "reward_model.pt").exists() and 0.0 <= results["reward_model_accuracy"] <= 1.0
    check_scores(results, ["ifa_score", "rm_score", "hpa_score"])
    metrics = results["schedules"]["hbat"]["metrics"]
    assert metrics["hpa_score"] == pytest.approx(metrics["rm_score"])  # the same judge, asked twice
    assert 0.0 <= results["win_rates"]["hbat_vs_two-stage"] <= 1.0


@pytest.mark.slow
def test_tldr_run_judged_by_a_saved_reward_model(runs, llama, tmp_path):
    """TL;DR SFT + comparisons under DPO, with --judge pointing at the PPO run's saved reward model."""
    judge = runs("ppo_hf")[0] / "reward_model.pt"
    results = train("--algo", "dpo", "--model", llama.dir / "meta", "--ifa-data", f"{FIX}/tldr_sft.jsonl",
                    "--hpa-data", f"{FIX}/tldr_comparisons.json", "--test-data", f"{FIX}/tldr_sft.jsonl",
                    "--judge", judge, out=tmp_path / "out", cache=tmp_path / "cache")
    check_scores(results, ["ifa_score", "hpa_score"])
    assert "rm_score" not in results["schedules"]["hbat"]["metrics"]
    assert 0.0 <= results["win_rates"]["hbat_vs_two-stage"] <= 1.0
    assert all("hpa_score" in s["eval"] for s in results["schedules"]["hbat"]["stages"])  # after every stage too


@pytest.mark.slow
@pytest.mark.parametrize("run", ["dpo_meta", "ppo_hf"])
def test_exported_model_round_trips(runs, llama, run):
    """OUT/<schedule>-hf holds the HF layout and the tokenizer; loading it gives the trained model's logits."""
    out, _ = runs(run)
    args = Transformer.from_pretrained(llama.dir / ("meta" if run == "dpo_meta" else "hf")).args  # the base's
    tokens = torch.tensor([llama.tok.encode("Human: What is a good name for a cat? Assistant: Miso")])
    for name in ("two-stage", "hbat"):
        d = out / f"{name}-hf"
        assert {"config.json", "model.safetensors", "tokenizer.model"} <= {p.name for p in d.iterdir()}
        assert (d / "tokenizer.model").read_bytes() == llama.tok.model_proto
        config = json.loads((d / "config.json").read_text())
        assert (config["bos_token_id"], config["eos_token_id"]) == (llama.tok.bos_id, llama.tok.eos_id)
        trained = Transformer(args)
        trained.load_state_dict(torch.load(out / f"{name}.pt", weights_only=True)["model"])
        exported = Transformer.from_pretrained(d)
        # HF's config keeps the FFN width, not Meta's multiple_of that rounds up to it
        assert replace(exported.args, multiple_of=args.multiple_of) == args
        assert exported.args.ffn_hidden_dim == args.ffn_hidden_dim
        with torch.no_grad():
            expected = trained(tokens)
            torch.testing.assert_close(exported(tokens), expected, atol=1e-5, rtol=0)
            assert not torch.allclose(llama.model(tokens), expected)  # the weights did move from the base
    # sample.py answers from the export and from OUT/hbat.pt alike (each finds its tokenizer.model), and from the
    # Meta folder the run started from (tokenizer beside it)
    prompts = "What is a good name for a cat?\nName a colour.\n"  # one per line, each wrapped in an HH turn
    answers = [ok(subprocess.run([sys.executable, "sample.py", path, "--template", "hh", "--max-new-tokens", "8"],
                                 cwd=ROOT, env=ENV, input=prompts, capture_output=True, text=True,
                                 timeout=120)).stdout.splitlines() for path in (out / "hbat-hf", out / "hbat.pt")]
    assert answers[0] == answers[1] and len(answers[0]) == 2
    ok(subprocess.run([sys.executable, "sample.py", llama.dir / "meta", "Hi"], cwd=ROOT, env=ENV, capture_output=True,
                      text=True, timeout=120))


@pytest.mark.slow
def test_ppo_on_real_data_under_fsdp_matches_ddp(llama, tmp_path):
    """torchrun --nproc_per_node 2 --fsdp from the HF layout on the HH / Alpaca fixtures (the base read onto the CPU
    and sharded, a sharded reward model that also judges the answers, export gathered by rank 0) ends where the
    same run under DDP ends: the same scores, win rate and exported weights."""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    flags = ("--preset", "smoke", "--device", "cpu", "--n-splits", "1", "--batch-size", "2", "--rollout-batch", "2",
             "--minibatch", "2", "--max-new-tokens", "8", "--export-hf", "--algo", "ppo", "--model", llama.dir / "hf",
             "--tokenizer", llama.dir / "tokenizer.model", "--ifa-data", f"{FIX}/alpaca.json",
             "--hpa-data", f"{FIX}/hh.jsonl.gz", "--test-data", f"{FIX}/hh.jsonl.gz", "--cache-dir", tmp_path / "c")
    results = {}
    for how in ("ddp", "fsdp"):
        cmd = [*launcher, "train.py", *map(str, flags), "--out", str(tmp_path / how)] + (["--fsdp"] * (how == "fsdp"))
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{how}: exit code {proc.returncode}\n{proc.stderr[-3000:]}"
        with open(tmp_path / how / "results.json") as f:
            results[how] = json.load(f)
    for name in ("two-stage", "hbat"):
        for k, v in results["ddp"]["schedules"][name]["metrics"].items():
            assert results["fsdp"]["schedules"][name]["metrics"][k] == pytest.approx(v, abs=1e-4), (name, k)
        a, b = (Transformer.from_pretrained(tmp_path / how / f"{name}-hf") for how in ("ddp", "fsdp"))
        for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-4, msg=n)
    assert results["fsdp"]["win_rates"] == pytest.approx(results["ddp"]["win_rates"], abs=1e-6)
    assert "hbat_vs_two-stage" in results["fsdp"]["win_rates"]


def test_exported_model_loads_in_transformers(llama, tmp_path):
    """Parity with an independent implementation: transformers' LlamaForCausalLM reads export_hf's output."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional)")
    export_hf(llama.model, tmp_path / "hf", llama.tok.bos_id, llama.tok.eos_id)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.tensor([llama.tok.encode("Human: What is a good name for a cat? Assistant: Miso")])
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, llama.model(tokens), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# generation stops at the template's end of turn


def test_cut_at_end_of_turn():
    assert data.cut_at_end_of_turn("Miso.\n\nHuman: And?\n\nAssistant: Tom.") == ("Miso.", True)
    assert data.cut_at_end_of_turn("Miso.\n\nAssistant: Tom.") == ("Miso.", True)
    assert data.cut_at_end_of_turn("Eat well.\n\n### Instruction:\nMore") == ("Eat well.", True)
    assert data.cut_at_end_of_turn("Human: is a word here.\nAssistant too.") == ("Human: is a word here.\nAssistant "
                                                                                 "too.", False)


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


# -----------------------------------------------------------------------------
# the judge of real data


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
    save_checkpoint(rm, tmp_path / "rm.pt")
    judge = evaluate.load_judge(tmp_path / "rm.pt", tok, 64, "cpu")
    assert torch.equal(judge.rm.head.weight, rm.head.weight)
    save_checkpoint(llama.model, tmp_path / "model.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    for name in ("model.pt", "junk.pt"):
        with pytest.raises(ValueError, match=f"^--judge {tmp_path / name}: not a reward model[^\n]*$"):
            evaluate.load_judge(tmp_path / name, tok, 64, "cpu")
    small = reward.RewardModel(Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=8, multiple_of=16)))
    save_checkpoint(small, tmp_path / "small.pt")
    with pytest.raises(ValueError, match="another tokenizer"):
        evaluate.load_judge(tmp_path / "small.pt", tok, 64, "cpu")
