"""
Evaluation on held-out prompts: greedy answers, their scores, and the side-by-side table train.py prints.

On the embedded world (docs/method.md §6) the gold judge of world.py scores each answer: IFA score (content correctness,
our analogue of the paper's ROUGE-L), HPA score (mean gold reward, our analogue of its GPT-4 judgement) and,
between two schedules, the gold win rate. On real data there is no gold judge: ROUGE-L against the references for
the IFA score, and a judge (below) for the HPA score and the win rates. Either way the broken outputs the DPO/PPO
literature warns about are counted, not hidden: answers that never finish within the cap, and answers that repeat
themselves.

An answer finishes at EOS or at its template's end of turn (data.END_OF_TURN, e.g. "\n\nHuman:" after an HH prompt).

Judges. On real data the HPA score and the win rates come from a judge: any object with
`score(records, responses) -> list[float]`, one number per (record, response text), higher is better; `Judge` adds
`win_rate` (ties count half). The default is a local reward model, `RewardModelJudge`: the run's reward model under
PPO, or a saved one (`train.py --judge PATH`, e.g. the OUT/reward_model.pt of an earlier PPO run). To plug in
another judge, subclass Judge and build it where train.py's main() builds `judge` (evaluate(..., judge=) and the win
rates then use it):

    class LengthJudge(evaluate.Judge):          # or a call to a local LLM, an API, ...
        def score(self, records, responses):
            return [-abs(len(y.split()) - 50) for y in responses]

A pairwise judge (GPT-4 comparing two answers, as the paper does) overrides `win_rate` instead.
"""
import pickle

import torch

import data
import reward
from infra import parallel
from world import rouge_l

EVAL_BATCH = 64


@torch.no_grad()
def respond(model, tok, records, max_new_tokens, max_seq_len):
    """Greedy answers to the records' prompts: a list of {"ids": the answer's token ids, "text": its decoded text,
    "stop": "eos", "end_of_turn" or None (cut off by max_new_tokens)}. A prompt keeps its last tokens so that prompt +
    answer fits max_seq_len, as in training.

    The end of turn is applied after the fact: generation runs on to EOS or the cap, and the text is cut at the first
    data.END_OF_TURN string (what it costs is only the tokens generated past it), the ids at the last token whose text
    still lies before the cut."""
    prompts = data.encode_prompts(records, tok, max_len=max_seq_len - max_new_tokens)
    out = []
    for i in range(0, len(prompts), EVAL_BATCH):
        for new in model.generate(prompts[i:i + EVAL_BATCH], max_new_tokens, temperature=0.0, eos_id=tok.eos_id):
            eos = bool(new) and new[-1] == tok.eos_id
            ids = new[:-1] if eos else new
            ids, text, cut = data.cut_ids_at_end_of_turn(ids, tok)
            out.append({"ids": ids, "text": text, "stop": "end_of_turn" if cut else "eos" if eos else None})
    return out


def repeats(text, n=3):
    """True when some word occurs n times in a row ("the the the"): the degenerate loop of an over-optimised policy."""
    words = text.split()
    return any(len(set(words[i:i + n])) == 1 for i in range(len(words) - n + 1))


def evaluate(model, tok, test, world, max_new_tokens, max_seq_len, rm=None, judge=None):
    """Answer every test prompt greedily and score the answers. Returns (metrics, rows), one row per prompt.
    `world` is the embedded world (its gold judge gives the HPA score) or None for real data, where the judge gives
    it (pick_judge: `judge`, else `rm`). `rm` (PPO's reward model) also adds its mean score, rm_score."""
    answers = respond(model, tok, test, max_new_tokens, max_seq_len)
    responses = [a["text"] for a in answers]
    if world is not None:
        scores = world.evaluate(test, responses)
        metrics = {"ifa_score": scores.pop("ifa"), "hpa_score": scores.pop("hpa"), **scores}
    else:
        metrics = {"ifa_score": sum(rouge_l(y, r["reference"]) for y, r in zip(responses, test)) / len(test)}
    if rm is not None:
        metrics["rm_score"] = mean(RewardModelJudge(rm, tok, max_seq_len).score(test, responses))
    if world is None and (judge is not None or rm is not None):  # pick_judge's order: --judge, else the run's RM
        metrics["hpa_score"] = mean(judge.score(test, responses)) if judge is not None else metrics["rm_score"]
    metrics["no_eos"] = sum(a["stop"] is None for a in answers) / len(answers)  # neither EOS nor an end of turn
    metrics["repetition"] = sum(map(repeats, responses)) / len(responses)
    metrics["length"] = sum(len(a["ids"]) for a in answers) / len(answers)
    rows = [{"prompt": r["prompt"], "response": a["text"], "stop": a["stop"], "reference": r.get("reference"),
             "family": r.get("family")} for r, a in zip(test, answers)]
    return metrics, rows


def evaluate_placed(rt, model, task, records, max_new_tokens, max_seq_len, rm=None, judge=None):
    """`evaluate` of a model placed by infra/parallel.py on some of the task's records (its test or validation
    prompts): under FSDP every rank takes part in its gathers; else only rank 0 calls this."""
    with parallel.gathered(rt, model):
        return evaluate(model, task.tok, records, task.world, max_new_tokens, max_seq_len, rm, judge)


def mean(xs):
    return sum(xs) / len(xs)


@torch.no_grad()
def sampled_kl(rt, policy, references, task, records, max_new_tokens, max_seq_len, seed):
    """KL(π‖π_ref) of the policy from each reference model on these records' prompts, estimated from one answer per
    prompt sampled from the policy (a generator seeded by `seed`, so that it draws nothing from training's streams):
    the mean over answers of Σ_t log π(y_t) − log π_ref(y_t) (k1, unbiased per answer). references: {name: model}.
    Returns (the sampled answers' texts, {name: KL}). Under FSDP every rank calls it; else only rank 0."""
    from ppo import collate, response_logprobs  # the rollout's own alignment of prompt and answer tokens
    prompts = data.encode_prompts(records, task.tok, max_len=max_seq_len - max_new_tokens)
    device = next(policy.parameters()).device
    generator, texts, batches = torch.Generator(device=device).manual_seed(seed), [], []
    with parallel.gathered(rt, policy):
        for i in range(0, len(prompts), EVAL_BATCH):
            batch = prompts[i:i + EVAL_BATCH]
            sampled = policy.generate(batch, max_new_tokens, temperature=1.0, eos_id=task.tok.eos_id,
                                      generator=generator)
            _, _, tokens, pad_mask, masks = collate(batch, sampled, task.tok.pad_id, device)
            batches.append((tokens, pad_mask, masks, response_logprobs(policy, tokens, pad_mask, masks)))
            texts += [task.tok.decode(ids[:-1] if ids and ids[-1] == task.tok.eos_id else ids) for ids in sampled]
    kl = {}
    for name, ref in references.items():  # under FSDP one whole reference gathered at a time, not all of them
        with parallel.gathered(rt, ref):
            kl[name] = sum((logp - response_logprobs(ref, *b)).sum().item() for *b, logp in batches)
    return texts, {name: v / len(prompts) for name, v in kl.items()}


def overopt(rt, policy, start, task, records, max_new_tokens, max_seq_len, rm=None, seed=0, sft=None):
    """The over-optimisation instrument (Gao, Schulman and Hilton 2022), one reading along an HPA stage: on held-out
    prompts the policy's greedy answer and one sampled answer (sampled_kl). Returns
        overopt/kl            KL(π‖π_start) per answer, π_start the stage's starting model (sampled_kl)
        overopt/kl_sft        KL(π‖π_SFT) per answer, from the SFT model, the one reference every schedule shares
                              (given `sft`); Gao et al. plot the scores against √KL
        overopt/gold(_greedy) the world's gold judge, mean reward of the sampled (greedy) answers
        overopt/proxy(_greedy) the reward model's mean score of the same answers (PPO; absent without one)
    Embedded world only (the gold judge). Under FSDP every rank calls it; else only rank 0."""
    references = {"overopt/kl": start} | ({"overopt/kl_sft": sft} if sft is not None else {})
    texts, out = sampled_kl(rt, policy, references, task, records, max_new_tokens, max_seq_len, seed)
    with parallel.gathered(rt, policy):
        greedy = [a["text"] for a in respond(policy, task.tok, records, max_new_tokens, max_seq_len)]
    for name, answers in (("", texts), ("_greedy", greedy)):
        out[f"overopt/gold{name}"] = task.world.evaluate(records, answers)["hpa"]
        if rm is not None:
            out[f"overopt/proxy{name}"] = mean(RewardModelJudge(rm, task.tok, max_seq_len).score(records, answers))
    return out


# -----------------------------------------------------------------------------
# judges for real data (the module docstring says how to plug in another)


class Judge:
    """The base of judges: a subclass defines score(records, responses) -> list[float], one number per pair, higher is
    better; win_rate compares two systems with those scores."""

    def win_rate(self, records, responses_a, responses_b):
        """Share of records where a's response scores higher than b's; ties count half (as world.win_rate)."""
        if not len(records) == len(responses_a) == len(responses_b) or not records:
            raise ValueError("win_rate needs one response from each system per record, and at least one record")
        a, b = self.score(records, responses_a), self.score(records, responses_b)
        return mean([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)])


class RewardModelJudge(Judge):
    """A local reward model (reward.RewardModel) as the judge: its score of prompt + response text + EOS, the prompt
    cut from the left so that both fit max_seq_len, as in training. The response is re-encoded from its text and always
    read at EOS, where the reward model learned to score: the judge sees the answer as a reader would; whether the
    model stopped by itself is counted apart (no_eos)."""

    def __init__(self, rm, tok, max_seq_len, batch_size=EVAL_BATCH):
        if rm.args.vocab_size < tok.vocab_size:
            raise ValueError(f"the judge's reward model has {rm.args.vocab_size} token ids, fewer than the "
                             f"tokenizer's {tok.vocab_size}: it was trained with another tokenizer")
        self.rm, self.tok, self.max_seq_len, self.batch_size = rm, tok, max_seq_len, batch_size

    @torch.no_grad()
    def score(self, records, responses):
        device, out = next(self.rm.parameters()).device, []
        for i in range(0, len(records), self.batch_size):
            ex = []
            for r, y in zip(records[i:i + self.batch_size], responses[i:i + self.batch_size]):
                answer = self.tok.encode(y)[:self.max_seq_len - 3] + [self.tok.eos_id]  # room for bos + a prompt token
                ex.append((data.encode_prompts([r], self.tok, max_len=self.max_seq_len - len(answer))[0], answer))
            tokens, mask = data.ifa_batch(ex, self.tok.pad_id)
            out += self.rm.score(tokens.to(device), mask.to(device)).tolist()
        return out


def pick_judge(judge, rm, tok, max_seq_len, world=None):
    """What judges the win rates: the embedded world's gold judge; on real data the judge given (--judge), else the
    run's reward model (PPO), else None (no HPA score, no win rates)."""
    if world is not None:
        return world
    return judge if judge is not None else RewardModelJudge(rm, tok, max_seq_len) if rm is not None else None


def load_judge(path, tok, max_seq_len, device):
    """`--judge PATH`: a saved reward model (e.g. OUT/reward_model.pt of a PPO run)."""
    try:
        rm = reward.RewardModel.from_pretrained(path)
    except (RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError):  # not a model file, or not an RM
        raise ValueError(f"--judge {path}: not a reward model (such as "
                         f"OUT/reward_model.pt of a --algo ppo run)") from None
    return RewardModelJudge(rm.to(device).eval().requires_grad_(False), tok, max_seq_len)


def win_rates(judge, records, answers):
    """{"<schedule>_vs_two-stage": the judge's win rate of its answers against two-stage's} for every schedule
    but two-stage. judge: the embedded world (its gold judge), a Judge (real data), or None (no win rates)."""
    if judge is None or "two-stage" not in answers:
        return {}
    return {f"{name}_vs_two-stage": judge.win_rate(records, answers[name], answers["two-stage"])
            for name in answers if name != "two-stage"}


def stage_line(schedule, stage, metrics, evaluation, seconds):
    """The line a run prints after each stage: its mean training metrics, then its evaluation's IFA and HPA scores."""
    return (f"{schedule:>10} {stage:<6} " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            + f" | eval ifa {evaluation['ifa_score']:.3f} hpa {evaluation.get('hpa_score', float('nan')):.3f}"
            + f" ({seconds:.1f}s)")


LEGEND = {"ifa_score": "content correct on the held-out prompts (real data: ROUGE-L against the references)",
          "hpa_score": "mean reward of the judge (the embedded world: its gold reward, in [-1, 4])",
          "rm_score": "mean score of the run's reward model (PPO)",
          "styled": "share of answers in the polite style the judge prefers (the embedded world)",
          "no_eos": "share of answers cut at --max-new-tokens", "repetition": "share with a word three times in a row",
          "length": "mean answer length in tokens", "tax": "IFA score lost against the SFT model: the alignment tax",
          "win vs 2-stage": "share of prompts where the answer beats two-stage's (ties half)"}


def table(results):
    """The side-by-side table of one run: the base and the SFT model (two-stage's first stage) where every schedule
    starts, a row per schedule with the IFA score it lost against SFT, then a legend of the columns."""
    cols = ["ifa_score", "hpa_score", "rm_score", "styled", "no_eos", "repetition", "length"]
    runs = results["schedules"]
    rows = ({"base": results["base_metrics"]} if results.get("base_metrics") else {}) | (
        {"SFT": runs["two-stage"]["stages"][0]["eval"]} if "two-stage" in runs else {}) | {
        name: r["metrics"] for name, r in runs.items()}
    cols = [c for c in cols if any(c in m for m in rows.values())]
    sft = rows.get("SFT", {}).get("ifa_score")
    lines = [f"{'schedule':<14}" + "".join(f"{c:>12}" for c in cols + ["tax"]) + f"{'win vs 2-stage':>16}"]
    for name, m in rows.items():
        win = results["win_rates"].get(f"{name}_vs_two-stage")
        tax = sft - m["ifa_score"] if sft is not None and name in runs else None
        lines.append(f"{name:<14}" + "".join(f"{m.get(c, float('nan')):>12.3f}" for c in cols)
                     + (f"{tax:>12.3f}" if tax is not None else f"{'-':>12}")
                     + (f"{win:>16.3f}" if win is not None else f"{'-':>16}"))
    lines += [""] + [f"  {c}: {LEGEND[c]}" for c in cols + ["tax", "win vs 2-stage"]]
    if results["config"].get("preset") == "smoke":
        lines.append("  --preset smoke: a model and data this small show that the pipeline runs, not what it learns")
    elif results["config"].get("preset") == "lesson":
        lines.append("  --preset lesson: one small run on one seed shows the tax; which schedule is better is the "
                     "study's to say (docs/results.md)")
    elif not results["config"].get("ifa_data"):  # the embedded world, where the study has decided it
        lines.append("  one seed of one base model: which schedule is better is decided over seeds and bases "
                     "(docs/results.md)")
    return "\n".join(lines)