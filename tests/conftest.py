"""What several test files share: tiny models and data, and the end-to-end runs of train.py that tests only read.

Every end-to-end run is a subprocess (`python train.py ...` or torchrun), so its exit code, stdout and stderr are the
real ones; each runs once per session on first use (`smoke_run`, `torchrun_run`, `alternatives_run`, `real_run`)
and the tests that only inspect what it wrote share it. All runs share one --cache-dir, so the tiny base is
pretrained once, and use one thread each (OMP_NUM_THREADS=1): at this size threads only fight each other on a shared
machine. Import the helpers with `from conftest import ...`.
"""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
import torch

# Tests import the top-level modules (model.py, data.py, ...) and infra/, lab/ the way train.py does.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402  (needs the path above)
from infra import checkpoint, importers  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
# the environment of a `python train.py` or `torchrun` subprocess: none of an outer torchrun's variables, one thread
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                        "MASTER_PORT")} | {"OMP_NUM_THREADS": "1"}
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


# a test that runs train.py end to end (through one of these fixtures) is slow: `pytest -m "not slow"` leaves it out
SLOW_FIXTURES = {"cache", "smoke_run", "torchrun_run", "alternatives_run", "real_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def ok(proc):
    """A finished subprocess that must have exited 0; its output tails make the failure message."""
    assert proc.returncode == 0, \
        f"exit code {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


# -----------------------------------------------------------------------------
# tiny models and data

# a tiny vocabulary of 40: ids 0..3 are unk/bos/eos/pad, as from data.train_tokenizer
TINY_ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=40, multiple_of=16, max_seq_len=64)


def tiny_transformer(seed=0, args=TINY_ARGS, **changes) -> Transformer:
    """A randomly initialised Transformer of `args` with `changes` applied (dataclasses.replace), built right after
    torch.manual_seed(seed), so that the same call gives the same weights (and leaves the global RNG in the same
    state)."""
    torch.manual_seed(seed)
    return Transformer(replace(args, **changes))


def save(model, path):
    """A model (a Transformer or a reward model) in our model-file layout, as a run writes it."""
    checkpoint.save(asdict(model.args), model.state_dict(), path)


def random_pairs(n, seed, vocab_size=40, bos=1, eos=2):
    """n HPA examples of random words from ids 4..vocab_size-1: (bos + prompt, chosen + eos, rejected + eos), each
    part 1 to 6 words long, drawn from a torch.Generator seeded with `seed` (the global RNG is untouched)."""
    g = torch.Generator().manual_seed(seed)

    def words():
        return torch.randint(4, vocab_size, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
    return [([bos] + words(), words() + [eos], words() + [eos]) for _ in range(n)]


# -----------------------------------------------------------------------------
# train.py end to end

SMOKE = ("--preset", "smoke", "--device", "cpu")
ALGOS = {"dpo": ("--algo", "dpo"), "ppo": ("--algo", "ppo"),  # the flags of each HPA objective the tests run
         "ppo-release": ("--algo", "ppo", "--ppo-variant", "release"),
         "ppo-adaptive-kl": ("--algo", "ppo", "--adaptive-kl-target", "1"),
         "ppo-grpo": ("--algo", "ppo", "--ppo-variant", "grpo")}
HBAT_STAGES = [(f"{kind}_{i}", kind.lower(), not (kind == "IFA" and i == 1)) for i in range(1, 5)
               for kind in ("IFA", "HPA")]  # --preset smoke keeps the default --n-splits 4


def train(*flags, out, cache, launcher=(sys.executable,), timeout=300, script="train.py", env=ENV):
    """`python train.py --preset smoke --device cpu --out OUT --cache-dir CACHE FLAGS` (or another launcher or
    script), to its end."""
    cmd = [*launcher, str(script), *SMOKE, "--out", str(out), "--cache-dir", str(cache), *map(str, flags)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc, code=2):
    """The contract for bad input: exit code `code`, stderr exactly one line, no traceback. Returns that line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, f"exit code {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr[-3000:]}"
    return lines[0]


def exits_with_one_line(capsys, fn, *args, code=2):
    """In process, the same contract for an entry point's main(argv): SystemExit(code) and one line on stderr."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == code
    return one_line_error(SimpleNamespace(returncode=e.value.code, stderr=capsys.readouterr().err), code)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def snapshot(out):
    """{file name: bytes} of everything in an --out, to check that a failed run lost or changed nothing."""
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}


def comparable(results):
    """results.json without what legitimately differs between two runs of one command: wall-clock seconds."""
    r = json.loads(json.dumps(results))
    r.pop("seconds", None)
    for s in r["schedules"].values():
        for stage in s["stages"]:
            stage.pop("seconds", None)
    return r


def final_state(out, names=("two-stage", "hbat")):
    """Each schedule's final weights, from either layout (under --fsdp: its sharded checkpoint)."""
    return {name: checkpoint.load(out / f"{name}.pt")[1] for name in names}


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """The --cache-dir of every train.py the tests run: the tiny base is pretrained once per session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, cache):
    """One uninterrupted `train.py ALGO --preset smoke` per algo of ALGOS: get(algo) -> (out, the finished process)."""
    runs = {}

    def get(algo):
        if algo not in runs:
            out = tmp_path_factory.mktemp(f"smoke-{algo}") / "out"
            runs[algo] = (out, ok(train(*ALGOS[algo], out=out, cache=cache)))
        return runs[algo]
    return get


@pytest.fixture(scope="session")
def torchrun_run(tmp_path_factory, cache):
    """One uninterrupted `torchrun --nproc_per_node 2 train.py ALGO --preset smoke` per (algo, how), how "ddp" or
    "fsdp" (--fsdp --activation-checkpointing: every model sharded, every block recomputed in backward):
    get(algo, how) -> (out, the finished process)."""
    runs = {}

    def get(algo, how):
        if (algo, how) not in runs:
            out = tmp_path_factory.mktemp(f"torchrun-{algo}-{how}") / "out"
            flags = ["--fsdp", "--activation-checkpointing"] if how == "fsdp" else []
            runs[algo, how] = (out, ok(train(*ALGOS[algo], *flags, out=out, cache=cache, launcher=TORCHRUN)))
        return runs[algo, how]
    return get


@pytest.fixture(scope="session")
def alternatives_run(tmp_path_factory, cache):
    """Every schedule in one DPO run (two-stage, hbat, averaged, rpo, alright), at unequal learning rates: alright's
    IFA steps must take --lr-ifa and its DPO steps --lr-hpa."""
    out = tmp_path_factory.mktemp("alternatives") / "out"
    ok(train("--algo", "dpo", "--schedule", "two-stage,hbat,averaged,rpo,alright", "--lr-hpa", "5e-4",
             out=out, cache=cache))
    return out


# A train.py that kills itself (SIGKILL) right after its N-th mid-stage save, or, torn, halfway through writing it
KILLER = """import io, os, signal, sys
sys.path.insert(0, os.getcwd())
import train
from infra import checkpoint, rundir
n, torn, count, save = int(os.environ["KILL_AFTER"]), os.environ.get("KILL_TORN") == "1", [0], rundir.MidStage.save

def half_written(path, write):
    buf = io.BytesIO()
    write(buf)
    with open(f"{path}.tmp", "wb") as f:
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def killing_save(self, *args, **kwargs):
    count[0] += 1
    if count[0] == n and torn and self.rt.rank == 0:
        checkpoint.atomic_write = half_written
    save(self, *args, **kwargs)
    if count[0] == n and self.rt.rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)

rundir.MidStage.save = killing_save
train.main(sys.argv[1:])
"""


# -----------------------------------------------------------------------------
# real data at a toy size


@pytest.fixture(scope="session")
def custom(tmp_path_factory):
    """Real-data inputs at a toy size: a random 1-layer model in our layout, a sentencepiece tokenizer next to it
    (where train.py looks for one), 48 demonstrations (the last 16 are the held-out test prompts) and 32 preference
    pairs as JSONL."""
    d = tmp_path_factory.mktemp("custom")
    words = ["red", "green", "blue", "cat", "dog", "bird", "one", "two", "three", "four"]
    ifa = [{"prompt": f"say {words[i % 10]} {words[3 * i % 10]}", "response": f"{words[3 * i % 10]} {words[i % 10]}"}
           for i in range(48)]
    hpa = [{"prompt": f"name {words[i % 10]}", "chosen": words[i % 10], "rejected": f"{words[(i + 1) % 10]} no"}
           for i in range(32)]
    importers.save_records(d / "ifa.jsonl", ifa)
    importers.save_records(d / "hpa.jsonl", hpa)
    tok = data.train_tokenizer([json.dumps(r) for r in ifa + hpa], cache_dir=d / "tok")
    (d / "model").mkdir()
    shutil.copy(next((d / "tok").glob("tokenizer-*.model")), d / "model" / "tokenizer.model")
    torch.manual_seed(0)
    save(Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size,
                               multiple_of=16, max_seq_len=128)), d / "model" / "model.pt")
    return d


def custom_flags(d, ifa=None, hpa=None, model=None):
    return ["--schedule", "two-stage", "--n-splits", "1", "--ifa-data", ifa or d / "ifa.jsonl",
            "--hpa-data", hpa or d / "hpa.jsonl", "--model", model or d / "model" / "model.pt"]


def fixture_texts():
    """Every text of the real-format fixtures (Alpaca, HH, TL;DR), to train a tokenizer on."""
    texts = []
    for name in ("alpaca.json", "hh.jsonl.gz", "tldr_sft.jsonl", "tldr_comparisons.json"):
        for record in importers.load_records(os.path.join(FIXTURES, name), kind=None)[1]:
            texts += [v for v in record.values() if isinstance(v, str)]
    return texts


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """A tiny random LLaMA with a sentencepiece tokenizer trained on the fixtures' text: meta/ (params.json, two
    consolidated.*.pth shards, tokenizer.model beside them, as Meta ships it) and hf/ (config.json +
    model.safetensors, no tokenizer: runs from it pass --tokenizer)."""
    from test_checkpoint import write_meta  # Meta's sharded layout, written independently of infra/checkpoint.py
    d = tmp_path_factory.mktemp("llama")
    tok = data.train_tokenizer(fixture_texts(), vocab_size=512, cache_dir=d / "tok", model_type="bpe")
    shutil.copy(next((d / "tok").glob("tokenizer-*.model")), d / "tokenizer.model")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                                  multiple_of=16, max_seq_len=256))
    write_meta(model, d / "meta")
    shutil.copy(d / "tokenizer.model", d / "meta" / "tokenizer.model")
    checkpoint.export_hf(model, d / "hf", tok.bos_id, tok.eos_id)
    return SimpleNamespace(dir=d, tok=tok, model=model)


# the fixtures hold 2 Alpaca demonstrations and 3 HH pairs: N = 2 leaves one example per subset, so batches of 1
REAL = ("--n-splits", "2", "--batch-size", "1", "--rollout-batch", "1", "--minibatch", "1", "--max-new-tokens", "8",
        "--export-hf")
HH = ("--ifa-data", f"{FIXTURES}/alpaca.json", "--hpa-data", f"{FIXTURES}/hh.jsonl.gz",
      "--test-data", f"{FIXTURES}/hh.jsonl.gz")


@pytest.fixture(scope="session")
def real_run(llama, tmp_path_factory):
    """train.py on the real-format fixtures from the tiny LLaMA, each run once on first use: get(name) -> (out,
    results). "dpo_meta": DPO from the Meta layout; "ppo_hf": PPO from the Hugging Face layout with --tokenizer."""
    done = {}
    flags = {"dpo_meta": ("--algo", "dpo", "--model", llama.dir / "meta", *HH),
             "ppo_hf": ("--algo", "ppo", "--model", llama.dir / "hf", "--tokenizer", llama.dir / "tokenizer.model",
                        *HH)}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name) / "out"
            ok(train(*REAL, *flags[name], out=out, cache=tmp_path_factory.mktemp("cache")))
            done[name] = (out, read_json(out / "results.json"))
        return done[name]
    return get
