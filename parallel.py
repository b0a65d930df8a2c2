"""Where train.py's models live: one process, DDP, or FSDP (--fsdp), set up from what torchrun passes.

Every model a run trains or consults is placed by `place`. With --fsdp it is sharded over the ranks (fully_shard on
each transformer block, then on the whole), so a GPU holds 1/world of its weights, gradients, AdamW moments and EWC
anchor (memory.py has the numbers). Placed models cannot be deep-copied and, under FSDP, their state_dict() holds
shards: hence copy_of, full_state, load_full_state and gathered, each of which is the plain one-liner it stands for
when --fsdp is off. The training loop reaches DDP and FSDP only through wrap, grad_sync and clip_grad_norm.
"""
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

import reward


def setup(args):
    """Device, process group (torchrun sets RANK/WORLD_SIZE; plain `python train.py` is one process), precision.
    Sets args.device, rank, world, evaluates, bf16 and autocast."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1 or args.fsdp
    if ddp:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    args.rank, args.world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    args.evaluates = args.rank == 0 or args.fsdp  # under FSDP every rank takes part in generating
    args.bf16 = args.dtype == "bf16" or (args.dtype == "auto" and args.device.startswith("cuda"))
    # bf16 autocast keeps fp32 master weights; the log-softmax inside model.token_logprobs stays fp32
    args.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.bf16 else nullcontext


def barrier(args):
    if args.world > 1:
        dist.barrier()


def mean_over_ranks(metrics, args):
    if args.world == 1 or not metrics:
        return metrics
    t = torch.tensor(list(metrics.values()), dtype=torch.float64, device=args.device)
    dist.all_reduce(t)
    return dict(zip(metrics, (t / args.world).tolist()))


def place(args, module):
    """A fresh, unsharded module onto the device, with --compile and --activation-checkpointing applied; with
    --fsdp, sharded over the ranks there."""
    trunk = module.trunk if isinstance(module, reward.RewardModel) else module
    trunk.checkpointing = args.activation_checkpointing
    if args.compile:
        for layer in trunk.layers:
            layer.compile()  # per block, in place (FSDP's gathers stay outside the compiled code)
    if not args.fsdp:
        return module.to(args.device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.bf16 else None, reduce_dtype=torch.float32)
    for layer in trunk.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    for method in ("hidden", "token_logprobs", "generate", "values", "score"):
        if hasattr(module, method):  # entry points besides forward(): they too gather the root's weights first
            register_fsdp_forward_method(module, method)
    return module


def copy_of(args, module, fresh):
    """An independent copy of `module` (a placed one cannot be deep-copied: FSDP forbids it, compiled blocks would
    share code with the original); fresh() builds an unplaced module of the same shape."""
    new = place(args, fresh())
    new.load_state_dict(module.state_dict())  # under FSDP shard by shard: both are laid out over the same ranks
    return new


def full_state(args, module):
    """The whole state_dict, for saving (under FSDP every rank must call this; only rank 0 gets it, on the CPU)."""
    if not args.fsdp:
        return module.state_dict()
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(args, module, state):
    if args.fsdp:
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(state)


@contextmanager
def gathered(args, model):
    """Generation under FSDP: every block keeps its weights gathered after its first use, so that the prefill is
    the only collective and ranks whose rows all ended early may stop decoding before the others."""
    blocks = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model] if args.fsdp else []
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


def wrap(args, module):
    """What the training loop calls its loss through: Objective(module), inside DistributedDataParallel under DDP
    (FSDP needs no wrapper: the sharded modules sync their own gradients)."""
    model = Objective(module)
    if args.world > 1 and not args.fsdp:
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
