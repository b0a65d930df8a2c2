"""Real data on disk: the dataset importers and where a model's tokenizer is found (docs/formats.md §1).

The importers turn what users have on disk (Alpaca, Anthropic HH-RLHF, Reddit TL;DR and its comparisons, TRL
preference JSONL) into the plain records of data.py: IFA {"prompt", "response"}, HPA {"prompt", "chosen",
"rejected"}; every prompt template lives in TEMPLATES below. Bad input raises data.DataError, whose message names the
file and the line, so train.py can print it as one line.

Simplified: no parquet and no conversational (list of messages) formats.
"""
import gzip
import json
import os
import warnings
import zlib
from pathlib import Path

from data import DataError, DataWarning, Tokenizer

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
