"""
Evaluation on held-out prompts: greedy answers, their scores, and the side-by-side table train.py prints.

On the embedded world (HBAT.md §6) the gold judge of world.py scores each answer: IFA score (content correctness,
our analogue of the paper's ROUGE-L), HPA score (mean gold reward, our analogue of its GPT-4 judgement) and,
between two schedules, the gold win rate. On real data there is no gold judge: ROUGE-L against the references and,
when a reward model is at hand, its mean score. Either way the broken outputs the DPO/PPO literature warns about
are counted, not hidden: answers that never emit EOS within the cap, and answers that repeat themselves.
"""
import torch

import data
import world as gold

EVAL_BATCH = 64


@torch.no_grad()
def respond(model, tok, records, max_new_tokens, max_seq_len):
    """Greedy answers to the records' prompts: a list of {"ids": new token ids without EOS, "eos": bool}.
    A prompt keeps its last tokens so that prompt + answer fits max_seq_len, as in training."""
    prompts = data.encode_prompts(records, tok, max_len=max_seq_len - max_new_tokens)
    out = []
    for i in range(0, len(prompts), EVAL_BATCH):
        for new in model.generate(prompts[i:i + EVAL_BATCH], max_new_tokens, temperature=0.0, eos_id=tok.eos_id):
            eos = bool(new) and new[-1] == tok.eos_id
            out.append({"ids": new[:-1] if eos else new, "eos": eos})
    return out


def repeats(text, n=3):
    """True when some word occurs n times in a row ("the the the"): the degenerate loop of an over-optimised policy."""
    words = text.split()
    return any(len(set(words[i:i + n])) == 1 for i in range(len(words) - n + 1))


def evaluate(model, tok, test, world, args, rm=None):
    """Answer every test prompt greedily and score the answers. Returns (metrics, rows), one row per prompt.
    `world` is the embedded world (gold judge) or None for real data."""
    answers = respond(model, tok, test, args.max_new_tokens, args.max_seq_len)
    responses = [tok.decode(a["ids"]) for a in answers]
    if world is not None:
        scores = gold.evaluate(test, responses)
        metrics = {"ifa_score": scores.pop("ifa"), "hpa_score": scores.pop("hpa"), **scores}
    else:
        metrics = {"ifa_score": sum(gold.rouge_l(y, r["reference"]) for y, r in zip(responses, test)) / len(test)}
    if rm is not None:
        metrics["rm_score"] = rm_scores(rm, tok, test, answers, args.device, args.max_seq_len,
                                        args.max_new_tokens)
        if world is None:
            metrics["hpa_score"] = metrics["rm_score"]
    metrics["no_eos"] = sum(not a["eos"] for a in answers) / len(answers)
    metrics["repetition"] = sum(map(repeats, responses)) / len(responses)
    metrics["length"] = sum(len(a["ids"]) for a in answers) / len(answers)
    rows = [{"prompt": r["prompt"], "response": y, "eos": a["eos"], "reference": r.get("reference"),
             "family": r.get("family")} for r, y, a in zip(test, responses, answers)]
    return metrics, rows


@torch.no_grad()
def rm_scores(rm, tok, test, answers, device, max_seq_len, max_new_tokens):
    """Mean reward-model score of the answers, read at their last token (EOS when present) as in training."""
    total = 0.0
    for i in range(0, len(test), EVAL_BATCH):
        prompts = data.encode_prompts(test[i:i + EVAL_BATCH], tok, max_len=max_seq_len - max_new_tokens)
        ex = [(p, a["ids"] + [tok.eos_id] * a["eos"]) for p, a in zip(prompts, answers[i:i + EVAL_BATCH])]
        tokens, mask = data.ifa_batch(ex)
        total += rm.score(tokens.to(device), mask.to(device)).sum().item()
    return total / len(test)


def table(results):
    """The side-by-side table of one run: a row per schedule."""
    cols = ["ifa_score", "hpa_score", "rm_score", "styled", "no_eos", "repetition", "length"]
    runs = results["schedules"]
    cols = [c for c in cols if any(c in r["metrics"] for r in runs.values())]
    lines = [f"{'schedule':<12}" + "".join(f"{c:>12}" for c in cols) + f"{'win vs 2-stage':>16}"]
    for name, r in runs.items():
        win = results["win_rates"].get(f"{name}_vs_two-stage")
        lines.append(f"{name:<12}" + "".join(f"{r['metrics'].get(c, float('nan')):>12.3f}" for c in cols)
                     + (f"{win:>16.3f}" if win is not None else f"{'-':>16}"))
    return "\n".join(lines)
