"""
Answer prompts with a trained model: a run's checkpoint, a Hugging Face folder (our --export-hf included) or a
Meta folder.

    python sample.py out/hbat.pt "sort the numbers : 3 1 2 answer :"            # greedy, one answer per prompt
    python sample.py out/hbat.pt "reverse the words : cat sun answer :" --temperature 1 --top-p 0.9 --seed 1
    printf 'sort the numbers : 9 4 answer :\\ncount the word dog : dog dog answer :\\n' | python sample.py out/hbat.pt
    python sample.py runs/llama2-7b-dpo/hbat-hf --template alpaca "Name three colours."

Prompts come from the arguments or, without any, from stdin, one per line; each answer is printed on one line (a
newline inside it written as \\n), in the order of the prompts. The tokenizer is found as train.py finds it
(--tokenizer, else a tokenizer.model inside or beside the checkpoint's folder; every run keeps one in its --out).
An answer ends at EOS or at its template's end of turn ("\\n\\nHuman:"), as in train.py's evaluation.
"""
import argparse
import os
import sys

import torch

import data
from infra import importers
from model import Transformer

TEMPLATES = {"none": "{}", "alpaca": importers.TEMPLATES["alpaca_no_input"].replace("{instruction}", "{}"),
             "hh": "\n\nHuman: {}" + importers.HH_ASSISTANT}


def die(message):
    print(f"sample.py: error: {message}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        die(message)


def model_path(path):
    """The model file or folder to load. A run folder (train.py's --out) holds one model per schedule: its only one is
    taken, else they are listed; a file that cannot be a model is named, not loaded."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "metrics.jsonl")):
        models = sorted(f for f in os.listdir(path) if f.endswith(".pt") and not f.endswith(".step.pt")
                        and f not in ("sft.pt", "reward_model.pt"))
        if len(models) == 1:
            return os.path.join(path, models[0])
        die(f"{path} is a run folder: give one of its models ("
            + (", ".join(os.path.join(path, m) for m in models) or "none is finished yet") + ")")
    if os.path.isfile(path) and not path.endswith((".pt", ".pth", ".bin", ".safetensors")):
        die(f"{path}: not a model file (give a run's OUT/<schedule>.pt, a Hugging Face or a Meta folder)")
    return path


def answer(model, tok, prompts, max_new_tokens, temperature=0.0, top_p=1.0, generator=None):
    """The answer to each prompt (a string): sampled at `temperature` with nucleus `top_p` (greedy at 0), cut at
    EOS or at the end of turn. A prompt keeps its last tokens so that prompt + answer fits the model's context."""
    ids = data.encode_prompts([{"prompt": p} for p in prompts], tok,
                              max_len=max(2, model.args.max_seq_len - max_new_tokens))
    new = model.generate(ids, max_new_tokens, temperature=temperature, top_p=top_p, eos_id=tok.eos_id,
                         generator=generator)
    return [data.cut_ids_at_end_of_turn(row[:-1] if row and row[-1] == tok.eos_id else row, tok)[1] for row in new]


def main(argv=None):
    p = ArgumentParser(description="Answer prompts with a trained model.")
    p.add_argument("checkpoint", help="OUT/<schedule>.pt of a run (or the run's OUT, if it holds one model), a Hugging "
                   "Face folder or a Meta folder")
    p.add_argument("prompts", nargs="*", help="prompts (default: read from stdin, one per line)")
    p.add_argument("--tokenizer", help="sentencepiece tokenizer.model (default: inside or beside the checkpoint's "
                   "folder)")
    p.add_argument("--template", choices=list(TEMPLATES), default="none", help="wrap each prompt in a training "
                   "template: Alpaca's instruction, or an HH dialogue turn (default: the prompt as given)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="cap on each answer's tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches this")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    args = p.parse_intermixed_args(argv)  # prompts before or after the options
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        die("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.checkpoint = model_path(args.checkpoint)
    try:
        model = Transformer.from_pretrained(args.checkpoint).to(device).eval()
        tok = importers.find_tokenizer(args.checkpoint, args.tokenizer)
    except (OSError, ValueError) as e:  # a missing or unreadable file: infra/checkpoint.py and importers.py name it
        die(str(e))
    if tok.vocab_size > model.args.vocab_size:
        die(f"{args.checkpoint}: the tokenizer has {tok.vocab_size} pieces, the model's vocabulary only "
            f"{model.args.vocab_size}: give the --tokenizer it was trained with")
    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    g = torch.Generator(device=device).manual_seed(args.seed)
    prompts = [TEMPLATES[args.template].format(q) for q in prompts]
    for i in range(0, len(prompts), 64):  # in batches, as train.py's evaluation answers
        for text in answer(model, tok, prompts[i:i + 64], args.max_new_tokens, args.temperature, args.top_p, g):
            print(text.replace("\n", "\\n"), flush=True)


if __name__ == "__main__":
    main()
