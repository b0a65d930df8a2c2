"""Helpers shared by several test files; import them with `from conftest import ...`."""
import os
import sys
from dataclasses import replace

import pytest
import torch

# Tests import the top-level modules (model.py, data.py, ...) the way train.py does.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import ModelArgs, Transformer  # noqa: E402  (needs the path above)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the environment of a `python train.py` or `torchrun` subprocess: none of an outer torchrun's variables, one thread
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                        "MASTER_PORT")} | {"OMP_NUM_THREADS": "1"}


def ok(proc):
    """A finished subprocess that must have exited 0; its output tails make the failure message."""
    assert proc.returncode == 0, \
        f"exit code {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc

# a tiny vocabulary of 40: ids 0..3 are unk/bos/eos/pad, as from data.train_tokenizer
TINY_ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=40, multiple_of=16, max_seq_len=64)


def tiny_transformer(seed=0, args=TINY_ARGS, **changes) -> Transformer:
    """A randomly initialised Transformer of `args` with `changes` applied (dataclasses.replace), built right after
    torch.manual_seed(seed), so that the same call gives the same weights (and leaves the global RNG in the same
    state)."""
    torch.manual_seed(seed)
    return Transformer(replace(args, **changes))


def random_pairs(n, seed, vocab_size=40, bos=1, eos=2):
    """n HPA examples of random words from ids 4..vocab_size-1: (bos + prompt, chosen + eos, rejected + eos), each
    part 1 to 6 words long, drawn from a torch.Generator seeded with `seed` (the global RNG is untouched)."""
    g = torch.Generator().manual_seed(seed)

    def words():
        return torch.randint(4, vocab_size, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
    return [([bos] + words(), words() + [eos], words() + [eos]) for _ in range(n)]


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """The --cache-dir of every train.py the tests run: the tiny base is pretrained once per session."""
    return tmp_path_factory.mktemp("cache")
