"""Data: the sentencepiece tokenizer, record formats and importers, tokenisation and batching, seeded splits.

Records are plain dicts: IFA {"prompt", "response"}, HPA {"prompt", "chosen", "rejected"} (docs/method.md §1). The
importers turn what users have on disk (Alpaca, Anthropic HH-RLHF, Reddit TL;DR and its comparisons, TRL preference
JSONL; docs/formats.md §1) into these; every prompt template lives in TEMPLATES below. Bad input raises DataError,
whose message names the file and the line, so train.py can print it as one line.

Tokenised examples are tuples of id lists: IFA (prompt_ids, response_ids), HPA (prompt_ids, chosen_ids,
rejected_ids); prompt_ids start with bos, every response ends with eos. Batches are right-padded.

The embedded world (docs/method.md §6) and its gold judge live in world.py; they are re-exported here.

Simplified: no parquet and no conversational (list of messages) formats; the tokenizer is plain sentencepiece.
"""
import gzip
import hashlib
import io
import itertools
import json
import os
import warnings
import zlib
from pathlib import Path

import sentencepiece as spm
import torch

from world import (FAMILIES, World, evaluate, gold_reward, ifa_score, is_styled, make_world,  # noqa: F401
                   parse_response, rouge_l, style_score, styled, win_rate)


class DataError(ValueError):
    """Unusable input data; the message names the file and, where there is one, the line."""


class DataWarning(UserWarning):
    """Examples shortened or dropped to fit max_seq_len (reported once per dataset)."""


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """A sentencepiece model with ids that are always valid in tensors.

    LLaMA's tokenizer.model has no pad piece (pad_id -1); we pad with unk (0) there, which keeps pad apart from eos so
    that a stray pad can never read as the end of an answer. Masks, never pad values, mark the real tokens.
    """

    def __init__(self, model_proto: bytes, name="tokenizer"):
        self.model_proto = model_proto  # kept so an exported model can carry its tokenizer.model
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise DataError(f"{name}: not a sentencepiece model ({e})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise DataError(f"{name}: the sentencepiece model needs bos and eos pieces")
        pad, unk = self.sp.pad_id(), self.sp.unk_id()
        self.pad_id = pad if pad >= 0 else unk if unk >= 0 else self.eos_id
        self.vocab_size = self.sp.get_piece_size()

    @classmethod
    def load(cls, path):
        try:
            proto = Path(path).read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read tokenizer: {e.strerror or e}") from None
        return cls(proto, name=str(path))

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        """Text of ids; pads (even a substitute pad such as LLaMA's unk) decode to nothing, as bos and eos do."""
        return self.sp.decode([i for i in ids if i != self.pad_id])


def train_tokenizer(texts, vocab_size=512, cache_dir="~/.cache/hbat", model_type="word"):
    """Train a sentencepiece model on `texts` (seconds), or reuse the one cached under the same corpus and settings.

    model_type "word" makes every whitespace-separated word one piece (right for the embedded world, whose
    vocabulary is small); use "bpe" or "unigram" for real text. vocab_size is an upper bound: the model keeps
    fewer pieces when the corpus has fewer. Ids: unk 0, bos 1, eos 2, pad 3.
    """
    texts = list(texts)
    settings = dict(model_type=model_type, vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
                    unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode() + b"\0")
    path = Path(cache_dir).expanduser() / f"tokenizer-{digest.hexdigest()[:16]}.model"
    if not path.exists():
        proto = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=proto, **settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(proto.getvalue())
        os.replace(tmp, path)  # atomic, so runs sharing a cache never read half a file
    return Tokenizer.load(path)


# ----------------------------------------------------------------------------------------------------------------
# Formats and importers (docs/formats.md §1)

TEMPLATES = {
    "alpaca": ("Below is an instruction that describes a task, paired with an input that provides further context. "
               "Write a response that appropriately completes the request.\n\n"
               "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"),
    "alpaca_no_input": ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"),
    "tldr": "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:",
    "cnndm": "Article:\n{article}\n\nTL;DR:",
}
HH_ASSISTANT = "\n\nAssistant:"  # HH prompt = everything up to and including the last one (DPO reference code)
# What ends an answer's turn besides eos, per template: the next turn's marker, which a model trained on these
# transcripts may go on to write itself. evaluate.py cuts decoded answers at the first one (cut_at_end_of_turn).
END_OF_TURN = {"hh": ("\n\nHuman:", "\n\nAssistant:"), "alpaca": ("\n\n### Instruction:",)}

# format -> (kind, fields that identify it); detection tries them in this order on the first record
FORMATS = {
    "hpa": ("hpa", {"prompt", "chosen", "rejected"}),  # ours, TRL explicit prompt, Dahoas
    "ifa": ("ifa", {"prompt", "response"}),
    "completion": ("ifa", {"prompt", "completion"}),  # TRL prompt-completion
    "alpaca": ("ifa", {"instruction", "output"}),
    "tldr": ("ifa", {"subreddit", "title", "post", "summary"}),
    "tldr_comparisons": ("hpa", {"info", "summaries", "choice"}),
    "hh": ("hpa", {"chosen", "rejected"}),
    "trl_implicit": ("hpa", {"chosen", "rejected"}),
}


def cut_at_end_of_turn(text):
    """(text before the first END_OF_TURN string, True), or (text, False) when it holds none.

    "Miso.\n\nHuman: And?" -> ("Miso.", True). Every template's markers apply to every answer: a record does not say
    which template made its prompt, and no answer in one format has reason to write another format's turn marker."""
    cut = min((i for stops in END_OF_TURN.values() for s in stops if (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def cut_ids_at_end_of_turn(ids, tok):
    """(ids, text, cut): an answer's token ids and text up to its first END_OF_TURN string (cut True), or all of
    them (cut False). The ids keep the tokens whose text lies wholly before the marker."""
    text, cut = cut_at_end_of_turn(tok.decode(ids))
    if cut:
        while ids and not text.startswith(tok.decode(ids)):
            ids = ids[:-1]
    return ids, text, cut


def _read_objects(path):
    """[(where, obj)] from a JSON array or JSON lines file, gzipped or not; `where` is "path:N" (line N) or
    "path: record N" (in an array)."""
    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not UTF-8 text or a broken gzip file ({e})") from None
    if text.lstrip().startswith("["):  # one JSON array (Alpaca); otherwise JSON lines, whatever the extension
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
        out = [(f"{path}: record {i + 1}", obj) for i, obj in enumerate(items)]
    else:
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: malformed JSON line: {e.msg}") from None
    if not out:
        raise DataError(f"{path}: empty file (no records)")
    for where, obj in out:
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return out


def _get(where, obj, key, kind=str):
    if key not in obj:
        raise DataError(f"{where}: missing field '{key}'")
    if not isinstance(obj[key], kind):
        raise DataError(f"{where}: field '{key}' should be {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def _detect(path, objects):
    where, first = objects[0]
    for fmt, (_, fields) in FORMATS.items():
        if fields <= first.keys():
            if fmt == "hh" and HH_ASSISTANT not in str(first["chosen"]):
                continue
            return fmt
    raise DataError(f"{where}: cannot tell the format from the fields {sorted(first)}; known formats: "
                    f"{', '.join(FORMATS)}")


def _split_hh(where, chosen, rejected):
    """HH: prompt = up to the last "\\n\\nAssistant:" of each string; they must agree, else the TRL common prefix."""
    i, j = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if i < 0 or j < 0:
        raise DataError(f"{where}: an HH transcript without '\\n\\nAssistant:'")
    prompt = chosen[:i + len(HH_ASSISTANT)]
    if rejected[:j + len(HH_ASSISTANT)] != prompt:
        return _split_common_prefix(where, chosen, rejected)
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def _split_common_prefix(where, chosen, rejected):
    """TRL's extract_prompt: the longest common prefix, moved back over a space so it stays in the completions."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n > 0 and chosen[n - 1] == " ":
        n -= 1
    if n == 0:
        raise DataError(f"{where}: chosen and rejected share no prompt")
    return chosen[:n], chosen[n:], rejected[n:]


def _convert(fmt, where, obj):
    """One record of format `fmt` as our IFA or HPA dict (None: a pair with identical answers, skipped)."""
    if fmt in ("hpa", "ifa"):
        for key in FORMATS[fmt][1]:
            _get(where, obj, key)
        return dict(obj)  # extra fields (e.g. the world's "family", "reference") are kept
    if fmt == "completion":
        return {"prompt": _get(where, obj, "prompt"), "response": _get(where, obj, "completion")}
    if fmt == "alpaca":
        instruction, output = _get(where, obj, "instruction"), _get(where, obj, "output")
        inp = obj.get("input") or ""
        template = TEMPLATES["alpaca"] if inp else TEMPLATES["alpaca_no_input"]
        return {"prompt": template.format(instruction=instruction, input=inp), "response": output}
    if fmt == "tldr":
        fields = {k: _get(where, obj, k) for k in ("subreddit", "title", "post", "summary")}
        return {"prompt": TEMPLATES["tldr"].format(**fields), "response": " " + fields["summary"].strip()}
    if fmt == "tldr_comparisons":
        info, summaries = _get(where, obj, "info", dict), _get(where, obj, "summaries", list)
        choice = _get(where, obj, "choice", int)
        if len(summaries) != 2 or choice not in (0, 1) or not all(isinstance(s, dict) for s in summaries):
            raise DataError(f"{where}: expected two summaries and a choice of 0 or 1")
        texts = [_get(where, s, "text") for s in summaries]
        if "article" in info:
            prompt = TEMPLATES["cnndm"].format(article=_get(where, info, "article"))
        else:
            prompt = TEMPLATES["tldr"].format(**{k: _get(where, info, k) for k in ("subreddit", "title", "post")})
        pair = {"prompt": prompt, "chosen": texts[choice], "rejected": texts[1 - choice]}
    else:
        chosen, rejected = _get(where, obj, "chosen"), _get(where, obj, "rejected")
        prompt, c, r = (_split_hh if fmt == "hh" else _split_common_prefix)(where, chosen, rejected)
        pair = {"prompt": prompt, "chosen": c, "rejected": r}
    return None if pair["chosen"] == pair["rejected"] else pair


def load_records(path, fmt=None, kind=None):
    """Read a dataset file. fmt: one of FORMATS, or None to detect it by fields.

    kind None: returns (kind "ifa" | "hpa", records). kind "ifa" or "hpa": returns the records alone, and the file
    must hold that kind, except that preference data read as "ifa" gives its chosen answers as demonstrations (the
    DPO reference code's SFT on HH). Pairs whose two answers are identical carry no preference and are skipped, with
    one warning per file.
    """
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"{path}: unknown format '{fmt}'; known formats: {', '.join(FORMATS)}")
    if kind not in (None, "ifa", "hpa"):
        raise ValueError(f"kind must be 'ifa', 'hpa' or None, got {kind!r}")
    objects = _read_objects(path)
    fmt = fmt or _detect(path, objects)
    records = [_convert(fmt, where, obj) for where, obj in objects]
    kept = [r for r in records if r is not None]
    if not kept:
        raise DataError(f"{path}: no usable records")
    if len(kept) < len(records):
        warnings.warn(f"{path}: skipped {len(records) - len(kept)} pairs with identical answers", DataWarning)
    found = FORMATS[fmt][0]
    if kind is None:
        return found, kept
    if kind == found:
        return kept
    if kind == "hpa":
        raise DataError(f"{path}: holds demonstrations ({fmt}), not preference pairs")
    return [{"prompt": r["prompt"], "response": r["chosen"]} for r in kept]


def find_tokenizer(model, tokenizer=None):
    """The Tokenizer of a model: `tokenizer` (a tokenizer.model path) if given, else the tokenizer.model inside the
    model's folder (Hugging Face keeps it there, and a run keeps one in its --out beside OUT/<schedule>.pt) or
    beside it (Meta's download keeps it next to the llama-2-7b/ folder)."""
    model_dir = os.path.abspath(model if os.path.isdir(model) else os.path.dirname(model))
    found = [p for p in (os.path.join(d, "tokenizer.model") for d in (model_dir, os.path.dirname(model_dir)))
             if os.path.exists(p)]
    if not (tokenizer or found):
        raise DataError(f"no tokenizer.model in or beside {model_dir}: give --tokenizer")
    return Tokenizer.load(tokenizer or found[0])


def load_real_task(model, tokenizer, ifa_data, hpa_data, test_data=None, n_test=300):
    """A real-data run's tokenizer (`find_tokenizer`) and records: (tok, ifa, hpa, test), test as {"prompt",
    "reference"}. Without test_data the last n_test demonstrations are held out as the test prompts."""
    tok = find_tokenizer(model, tokenizer)
    ifa, hpa = load_records(ifa_data, kind="ifa"), load_records(hpa_data, kind="hpa")
    if not test_data and len(ifa) <= n_test:
        raise DataError(f"{ifa_data}: {len(ifa)} demonstrations leave none for training after --n-test {n_test}; "
                        f"lower --n-test or give --test-data")
    test, ifa = (load_records(test_data, kind="ifa"), ifa) if test_data else (ifa[-n_test:], ifa[:-n_test])
    return tok, ifa, hpa, [{"prompt": r["prompt"], "reference": r["response"]} for r in test]


def save_records(path, records):
    """Write records as JSON lines (the format load_records reads back as "ifa" or "hpa")."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation and batching

def _fit(name, tok, records, max_seq_len, response_keys):
    """Tokenise; keep the end of a prompt that is too long; drop what still does not fit; warn once with counts."""
    examples, cut, dropped = [], 0, 0
    for r in records:
        prompt = tok.encode(r["prompt"])
        responses = [tok.encode(r[k]) + [tok.eos_id] for k in response_keys]
        room = max_seq_len - 1 - max(map(len, responses))  # 1 for bos
        if room < 1:  # not even one prompt token fits beside the response
            dropped += 1
            continue
        if len(prompt) > room:
            prompt, cut = prompt[-room:], cut + 1  # keep the end, next to the answer (as the HH references do)
        examples.append(([tok.bos_id] + prompt, *responses))
    if cut or dropped:
        warnings.warn(f"{name}: max_seq_len {max_seq_len}: kept the end of {cut} prompts, dropped {dropped} of "
                      f"{len(records)} examples", DataWarning, stacklevel=3)
    return examples


def tokenize_ifa(records, tok, max_seq_len, name="ifa"):
    """IFA records -> [(prompt_ids, response_ids)], each at most max_seq_len tokens in all."""
    return _fit(name, tok, records, max_seq_len, ("response",))


def tokenize_hpa(records, tok, max_seq_len, name="hpa"):
    """HPA records -> [(prompt_ids, chosen_ids, rejected_ids)]; prompt + either answer fits in max_seq_len."""
    return _fit(name, tok, records, max_seq_len, ("chosen", "rejected"))


def encode_prompts(records, tok, max_len=None):
    """Generation prompts: bos + prompt ids (the last max_len - 1 prompt tokens when max_len is given)."""
    out = []
    for r in records:
        ids = tok.encode(r["prompt"])
        if max_len:
            ids = ids[max(0, len(ids) - (max_len - 1)):]
        out.append([tok.bos_id] + ids)
    return out


def _pad_rows(rows, pad_id):
    """rows: [(prompt_ids, response_ids)] -> tokens (N, T) long right-padded, mask (N, T) True on response ids.

    ([1, 7], [8, 2]) and ([1, 7, 9, 5], [2]) with pad 3 -> tokens [[1, 7, 8, 2, 3], [1, 7, 9, 5, 2]],
    mask [[F, F, T, T, F], [F, F, F, F, T]]. The pad value never matters: masks mark what is scored, and right pads
    sit after every real token, where causal attention cannot see them.
    """
    T = max(len(p) + len(r) for p, r in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p):len(p) + len(r)] = True
    return tokens, mask


def ifa_batch(examples, pad_id=0):
    """[(prompt_ids, response_ids)] * B -> tokens (B, T) long, mask (B, T) bool (True on response tokens incl. eos)."""
    return _pad_rows(examples, pad_id)


def hpa_batch(examples, pad_id=0):
    """[(prompt_ids, chosen_ids, rejected_ids)] * B -> tokens (2B, T), mask (2B, T).

    Rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected, so one forward pass scores both.
    """
    return _pad_rows([(p, c) for p, c, _ in examples] + [(p, r) for p, _, r in examples], pad_id)


@torch.no_grad()
def pair_values(fn, examples, batch_size, device):
    """fn(tokens, mask) -> (2b,), one number per row of an hpa_batch (chosen rows, then rejected rows), over all
    HPA examples in batches: (N, 2) float, column 0 chosen, column 1 rejected, in data order. DPO's cached
    reference log-probs and the reward model's pair scores are both this loop."""
    out = []
    for i in range(0, len(examples), batch_size):
        tokens, mask = hpa_batch(examples[i:i + batch_size])
        out.append(fn(tokens.to(device), mask.to(device)).view(2, -1).t())  # (b, 2)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------
# A stage's data: rank shards, shuffled batches, micro-batches (the N-way split is hbat.split)

def shard_of(examples, rank, world):
    """This rank's share of a stage's examples, the same number on every rank (FSDP's gathers need every rank to
    run as many forward passes): every world-th example from the rank's index on."""
    return examples[:len(examples) - len(examples) % world][rank::world]


def shuffled(n, batch_size, epochs, seed):
    """For `epochs` seeded shuffles of range(n), the batches of indices, the last of each epoch smaller when
    batch_size does not divide n: every example is used once per epoch, so that schedules that cut the data
    differently (Hbat's N subsets, two-stage's one) train on exactly the same examples."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).tolist()
        yield from (order[i:i + batch_size] for i in range(0, n, batch_size))


def batch_sizes(n, batch_size):
    """The sizes of one epoch's batches from `shuffled`: 10, 4 -> [4, 4, 2]."""
    return [batch_size] * (n // batch_size) + [n % batch_size] * (n % batch_size > 0)


def n_batches(n, batch_size, epochs):
    return epochs * len(batch_sizes(n, batch_size))


def micro_split(n, n_micro):
    """Sizes of n_micro near-equal parts of n (at most n parts): 10, 4 -> [3, 3, 2, 2]; 2, 4 -> [1, 1]."""
    q, r = divmod(n, n_micro)
    return [q + (i < r) for i in range(min(n, n_micro))]


def batches_of(examples, batch_size, epochs, seed, collate, n_micro, device):
    """`shuffled` batches of examples (this rank's shard of a stage's data), each as (micros, shares): at most
    n_micro micro-batches (indices, *collate(examples)) on device, of `micro_split`'s sizes, and each one's share of
    the batch's examples, what its loss weighs in the step (a ragged batch is still an average over its examples).
    Micro-batches are collated apart: a DPO micro-batch keeps each chosen row with its rejected row."""
    for idx in shuffled(len(examples), batch_size, epochs, seed):
        sizes = micro_split(len(idx), n_micro)
        cuts = [0, *itertools.accumulate(sizes)]
        yield ([(torch.tensor(idx[a:b]),) + tuple(t.to(device) for t in collate([examples[i] for i in idx[a:b]]))
                for a, b in zip(cuts, cuts[1:])], [k / len(idx) for k in sizes])
