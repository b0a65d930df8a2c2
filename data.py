"""Data: the sentencepiece tokenizer, tokenisation, batching, and where an answer ends.

Records are plain dicts: IFA {"prompt", "response"}, HPA {"prompt", "chosen", "rejected"} (docs/method.md §1); the
embedded world (world.py) makes them, and infra/importers.py reads them from real datasets on disk. Tokenised
examples are tuples of id lists: IFA (prompt_ids, response_ids), HPA (prompt_ids, chosen_ids, rejected_ids);
prompt_ids start with bos, every response ends with eos. Batches are right-padded. The N-way split of a dataset is
hbat.split.

Simplified: the tokenizer is plain sentencepiece.
"""
import hashlib
import io
import itertools
import json
import os
import warnings
from pathlib import Path

import sentencepiece as spm
import torch


class DataError(ValueError):
    """Unusable input data (a tokenizer file here, a dataset in infra/importers.py); the message names the file and,
    where there is one, the line."""


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
# The end of an answer

# What ends an answer's turn besides eos, per prompt template of infra/importers.py: the next turn's marker, which a
# model trained on these transcripts may go on to write itself. evaluate.py cuts decoded answers at the first one.
END_OF_TURN = {"hh": ("\n\nHuman:", "\n\nAssistant:"), "alpaca": ("\n\n### Instruction:",)}


def cut_at_end_of_turn(text):
    """(text before the first END_OF_TURN string, True), or (text, False) when it holds none.

    "Miso.\n\nHuman: And?" -> ("Miso.", True). Every template's markers apply to every answer: a record does not say
    which template made its prompt, and no answer in one format has reason to write another format's turn marker."""
    cut = min((i for stops in END_OF_TURN.values() for s in stops if (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def ids_before_end_of_turn(ids, tok):
    """The ids of an answer before its first END_OF_TURN string, or None when it writes none (PPO's rollouts end
    such an answer there)."""
    ids, _, cut = cut_ids_at_end_of_turn(ids, tok)
    return ids if cut else None


def cut_ids_at_end_of_turn(ids, tok):
    """(ids, text, cut): an answer's token ids and text up to its first END_OF_TURN string (cut True), or all of
    them (cut False). The ids keep the tokens whose text lies wholly before the marker."""
    text, cut = cut_at_end_of_turn(tok.decode(ids))
    if cut:
        while ids and not text.startswith(tok.decode(ids)):
            ids = ids[:-1]
    return ids, text, cut


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation and batching

def _tokenize(name, tok, records, max_seq_len, response_keys):
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
    return _tokenize(name, tok, records, max_seq_len, ("response",))


def tokenize_hpa(records, tok, max_seq_len, name="hpa"):
    """HPA records -> [(prompt_ids, chosen_ids, rejected_ids)]; prompt + either answer fits in max_seq_len."""
    return _tokenize(name, tok, records, max_seq_len, ("chosen", "rejected"))


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


def rollout_batches(n, batch_size, epochs, seed, group_size=1):
    """The prompt indices of each rollout of a PPO stage over n prompts: `shuffled`'s batches of batch_size. With
    GRPO's group_size K > 1, rollout for rollout a K-th of PPO's prompts (rounded up), K answers each, drawn in order
    from the same seeded shuffles: where K divides each of PPO's batch sizes, every rollout samples exactly as many
    answers as PPO's, so both objectives (and every schedule, however it splits the prompts) train on n × epochs
    answers, over 1/K as many prompt draws. 40 prompts, batch 16, K 4: PPO [16, 16, 8] per epoch, GRPO [4, 4, 2]."""
    sizes = [-(-s // group_size) for s in batch_sizes(n, batch_size)] * epochs
    draws = itertools.chain.from_iterable(shuffled(n, n, epochs, seed))  # one seeded permutation per epoch
    return [list(itertools.islice(draws, s)) for s in sizes]


def batch_sizes(n, batch_size):
    """The sizes of one epoch's batches from `shuffled`: 10, 4 -> [4, 4, 2]."""
    return [batch_size] * (n // batch_size) + [n % batch_size] * (n % batch_size > 0)


def n_batches(n, batch_size, epochs):
    return epochs * len(batch_sizes(n, batch_size))


def micro_split(n, n_micro):
    """Sizes of n_micro near-equal parts of n (at most n parts): 10, 4 -> [3, 3, 2, 2]; 2, 4 -> [1, 1]."""
    q, r = divmod(n, n_micro)
    return [q + (i < r) for i in range(min(n, n_micro))]


def batches_of(examples, batch_size, epochs, seed, collate, n_micro, device, rows=None):
    """`shuffled` batches of examples (this rank's shard of a stage's data), each as (micros, shares): at most
    n_micro micro-batches (indices, *collate(examples)) on device, of `micro_split`'s sizes, and each one's share of
    the batch's examples, what its loss weighs in the step (a ragged batch is still an average over its examples).
    Micro-batches are collated apart: a DPO micro-batch keeps each chosen row with its rejected row. `rows`, a tensor
    with one row per example (DPO's cached reference log-probs), adds the micro-batch's rows of it at the end."""
    for idx in shuffled(len(examples), batch_size, epochs, seed):
        sizes = micro_split(len(idx), n_micro)
        cuts = [0, *itertools.accumulate(sizes)]
        micros = [(torch.tensor(idx[a:b]),) + tuple(t.to(device) for t in collate([examples[i] for i in idx[a:b]]))
                  for a, b in zip(cuts, cuts[1:])]
        yield [m + (rows[m[0]],) for m in micros] if rows is not None else micros, [k / len(idx) for k in sizes]
