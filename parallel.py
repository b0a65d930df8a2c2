"""Where train.py's models live: one process, DDP, or FSDP (--fsdp), set up from what torchrun passes.

`setup` returns a `Runtime`, the small record of where this process runs (device, rank, world size, precision,
--fsdp/--compile/--activation-checkpointing); every function here takes it instead of the run's flags.

Every model a run trains or consults is placed by `place`. With --fsdp it is sharded over the ranks (fully_shard on
each transformer block, then on the whole), so a GPU holds 1/world of its weights, gradients, AdamW moments and EWC
anchor (memory.py has the numbers). Placed models cannot be deep-copied and, under FSDP, their state_dict() holds
shards: hence copy_of, full_state, load_full_state and gathered, each of which is the plain one-liner it stands for
when --fsdp is off. The training loop reaches DDP and FSDP only through wrap, grad_sync and clip_grad_norm.
"""
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

import reward


@dataclass(frozen=True)
class Runtime:
    """Where this process runs; what every function below takes instead of the run's flags."""
    device: str                             # "cpu", "cuda" or "cuda:<local rank>"
    rank: int = 0
    world: int = 1
    fsdp: bool = False                      # shard every model over the ranks (--fsdp)
    bf16: bool = False                      # bf16 autocast (and bf16 FSDP mixed precision)
    compile: bool = False                   # torch.compile each block (--compile)
    activation_checkpointing: bool = False  # recompute each block in backward (--activation-checkpointing)

    @property
    def evaluates(self) -> bool:
        """Whether this rank generates and scores answers: rank 0, or every rank under FSDP (each takes part in
        the gathers of a sharded model)."""
        return self.rank == 0 or self.fsdp

    def autocast(self):
        """The training step's precision: bf16 autocast keeps fp32 master weights, and the log-softmax inside
        model.token_logprobs stays fp32."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()


def setup(device="auto", dtype="auto", fsdp=False, compile=False, activation_checkpointing=False) -> Runtime:
    """Device, process group (torchrun sets RANK/WORLD_SIZE; plain `python train.py` is one process), precision."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1 or fsdp
    if ddp:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    bf16 = dtype == "bf16" or (dtype == "auto" and device.startswith("cuda"))
    return Runtime(device, rank, world, fsdp, bf16, compile, activation_checkpointing)


def barrier(rt):
    if rt.world > 1:
        dist.barrier()


def mean_over_ranks(metrics, rt):
    if rt.world == 1 or not metrics:
        return metrics
    t = torch.tensor(list(metrics.values()), dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return dict(zip(metrics, (t / rt.world).tolist()))


def place(rt, module):
    """A fresh, unsharded module onto the device, with --compile and --activation-checkpointing applied; with
    --fsdp, sharded over the ranks there."""
    trunk = module.trunk if isinstance(module, reward.RewardModel) else module
    trunk.checkpointing = rt.activation_checkpointing
    if rt.compile:
        for layer in trunk.layers:
            layer.compile()  # per block, in place (FSDP's gathers stay outside the compiled code)
    if not rt.fsdp:
        return module.to(rt.device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if rt.bf16 else None, reduce_dtype=torch.float32)
    for layer in trunk.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    for method in ("hidden", "next_token_logprobs", "token_logprobs", "generate", "values", "score"):
        if hasattr(module, method):  # entry points besides forward(): they too gather the root's weights first
            register_fsdp_forward_method(module, method)
    return module


def copy_of(rt, module, fresh):
    """An independent copy of `module` (a placed one cannot be deep-copied: FSDP forbids it, compiled blocks would
    share code with the original); fresh() builds an unplaced module of the same shape."""
    new = place(rt, fresh())
    new.load_state_dict(module.state_dict())  # under FSDP shard by shard: both are laid out over the same ranks
    return new


def full_state(rt, module):
    """The whole state_dict, for saving (under FSDP every rank must call this; only rank 0 gets it, on the CPU)."""
    if not rt.fsdp:
        return module.state_dict()
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(rt, module, state):
    if rt.fsdp:
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(state)


@contextmanager
def gathered(rt, model):
    """Generation under FSDP: every block keeps its weights gathered after its first use, so that the prefill is
    the only collective and ranks whose rows all ended early may stop decoding before the others."""
    blocks = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model] if rt.fsdp else []
    for m in blocks:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in blocks:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


class Objective(nn.Module):
    """Routes any loss function through DDP's forward, so that DDP syncs the gradients of whatever the loss
    touches (model.token_logprobs, a reward head, a critic) and not only of `model(tokens)`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, loss_fn, batch):
        return loss_fn(self.module, batch)


def wrap(rt, module):
    """What the training loop calls its loss through: Objective(module), inside DistributedDataParallel under DDP
    (FSDP needs no wrapper: the sharded modules sync their own gradients)."""
    model = Objective(module)
    if rt.world > 1 and not rt.fsdp:
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    return model


def grad_sync(model, sync):
    """Context for one micro-step of gradient accumulation: gradients are averaged over ranks only when `sync`
    (the last micro-step). Must be entered before the forward: DDP's no_sync, or FSDP's per-module flag."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return nullcontext() if sync else model.no_sync()
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_requires_gradient_sync(sync, recurse=False)
    return nullcontext()


def clip_grad_norm(params, max_norm) -> float:
    """Clip the global gradient norm; returns the norm before clipping (under FSDP gathered from every shard)."""
    norm = nn.utils.clip_grad_norm_(params, max_norm)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
