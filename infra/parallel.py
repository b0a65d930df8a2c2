"""Where train.py's models live: one process, DDP, or FSDP (--fsdp), set up from what torchrun passes.

`setup` returns a `Runtime`, the small record of where this process runs (device, rank, world size, precision,
--fsdp/--compile/--activation-checkpointing); every function here takes it instead of the run's flags.

Every model a run trains or consults is placed by `place`. With --fsdp it is sharded over the ranks (fully_shard on
each transformer block, then on the whole), so a GPU holds 1/world of its weights, gradients, AdamW moments and EWC
anchor (lab/memory.py has the numbers). Placed models cannot be deep-copied and, under FSDP, their state_dict() holds
shards: hence copy_of, full_state, load_full_state and gathered, each of which is the plain one-liner it stands for
when --fsdp is off. The training loop reaches DDP and FSDP only through wrap (whose Losses also sums a step's
losses), grad_sync and clip_grad_norm. Under --fsdp only rank 0 reads a model file (`lean`): the other ranks build
it on the meta device and `place` gives them their shards from rank 0's copy, so a node holds one copy of the
weights in host memory, not one per rank.
"""
import ctypes
import itertools
import os
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor


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
    if fsdp:
        return_freed_memory()
    bf16 = dtype == "bf16" or (dtype == "auto" and device.startswith("cuda"))
    return Runtime(device, rank, world, fsdp, bf16, compile, activation_checkpointing)


def return_freed_memory():
    """Have glibc give freed blocks of 64 KiB and more back to the system at once (mallopt M_MMAP_THRESHOLD, as the
    environment variable MALLOC_MMAP_THRESHOLD_=65536 would). Under FSDP each rank briefly holds whole tensors (rank
    0 the checkpoint it reads, every rank the blocks it gathers); by default glibc keeps that freed memory for reuse,
    and each rank's resident set stays about two copies of the weights above what it holds (docs/performance.md,
    "Host memory"). No-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator is left as it is
        return
    libc.mallopt(-3, 65536)  # -3: M_MMAP_THRESHOLD


def teardown(rt):
    """The end of a run under torchrun: once every rank is done with every collective, leave the process group (a
    rank that tears gloo down while another still talks to it can abort at exit)."""
    if rt.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def barrier(rt):
    if rt.world > 1:
        dist.barrier()


def gather_to_rank0(rt, obj):
    """[every rank's obj, by rank] on rank 0 (None elsewhere): the state each rank keeps for itself, to be saved."""
    if rt.world == 1:
        return [obj]
    out = [None] * rt.world if rt.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def from_rank0(rt, obj):
    """Rank 0's obj on every rank (a name they must agree on)."""
    if rt.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(metrics, rt):
    if rt.world == 1 or not metrics:
        return metrics
    t = torch.tensor(list(metrics.values()), dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return dict(zip(metrics, (t / rt.world).tolist()))


def place(rt, module, full_state=None):
    """A fresh, unsharded module onto the device, with --compile and --activation-checkpointing applied; with
    --fsdp, sharded over the ranks there. The module may be on the meta device (no memory): its tensors are then
    allocated there (with --fsdp only each rank's shards) and filled from `full_state`, a whole state_dict that under
    --fsdp only rank 0's counts: FSDP2 broadcasts it shard by shard (lean loading: `lean`)."""
    trunk = getattr(module, "trunk", module)  # a reward model's transformer, or the transformer itself
    trunk.checkpointing = rt.activation_checkpointing
    if rt.compile:
        for layer in trunk.layers:
            layer.compile()  # per block, in place (FSDP's gathers stay outside the compiled code)
    meta = any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))
    if not rt.fsdp:
        module = module.to_empty(device=rt.device) if meta else module.to(rt.device)
        if full_state is not None:
            module.load_state_dict(full_state)
        return module
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if rt.bf16 else None, reduce_dtype=torch.float32)
    for layer in trunk.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    for method in ("hidden", "next_token_logprobs", "token_logprobs", "generate", "values", "score"):
        if hasattr(module, method):  # entry points besides forward(): they too gather the root's weights first
            register_fsdp_forward_method(module, method)
    if meta:
        module.to_empty(device=rt.device)  # this rank's shards only
    if full_state is not None:  # every rank takes part; only rank 0's full_state is read
        set_model_state_dict(module, full_state if rt.rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return module


def lean(rt, load, build):
    """An unplaced module for `place`: under --fsdp only rank 0 runs load() (reads a checkpoint: one copy of the
    weights in host memory per node, not one per rank); the others get build(model_args) of the same shape on the
    meta device, no memory, and their shards when it is placed with rank 0's state_dict. A load() that fails with
    OSError or ValueError fails on every rank with rank 0's message. Without --fsdp every rank loads its own copy."""
    if not rt.fsdp:
        return load()
    box = [None]  # rank 0 -> every rank: (model_args, None) or (None, the error)
    if rt.rank == 0:
        try:
            module = load()
            box = [(asdict(module.args), None)]
        except (OSError, ValueError) as e:
            box = [(None, str(e))]
    dist.broadcast_object_list(box, src=0)
    margs, error = box[0]
    if error is not None:
        raise ValueError(error)
    if rt.rank == 0:
        return module
    with torch.device("meta"):
        return build(margs)


def copy_of(rt, module, build):
    """An independent copy of `module` (a placed one cannot be deep-copied: FSDP forbids it, compiled blocks would
    share code with the original); build() makes an unplaced module of the same shape, on the meta device or not."""
    new = place(rt, build(), None if rt.fsdp else module.state_dict())
    if rt.fsdp:
        new.load_state_dict(module.state_dict())  # shard by shard: both are laid out over the same ranks
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


def train_state(rt, module, opt):
    """(the module's whole state_dict, the optimizer's), for a mid-stage checkpoint: under FSDP every rank must call
    this and rank 0 gets them whole, on the CPU."""
    if not rt.fsdp:
        return module.state_dict(), opt.state_dict()
    return get_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_train_state(rt, module, opt, module_state, opt_state):
    """The inverse of train_state, on every rank (each reads the whole file; FSDP keeps its shards)."""
    if rt.fsdp:
        # not strict: a parameter that never had a gradient (the critic's unused LM head) has no AdamW state
        set_state_dict(module, opt, model_state_dict=module_state, optim_state_dict=opt_state,
                       options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        module.load_state_dict(module_state)
        opt.load_state_dict(opt_state)


def save_shards(path, parts):
    """Under FSDP, a checkpoint in which every rank writes only its own shards (torch.distributed.checkpoint: one
    file per rank and a .metadata in directory `path`), so that saving takes no rank more host memory than its
    shards. parts: {name: module or (module, optimizer)}. Every rank calls this."""
    dcp.save({name: _shards(*(part if isinstance(part, tuple) else (part,))) for name, part in parts.items()},
             checkpoint_id=path)


def load_shards(path, parts):
    """The inverse of save_shards, into placed modules (and fresh optimizers): every rank reads its own shards.
    Every rank calls this."""
    parts = {name: part if isinstance(part, tuple) else (part, None) for name, part in parts.items()}
    state = {name: _shards(module, opt) for name, (module, opt) in parts.items()}
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    missing = [f"{name}.module.{k}" for name in state for k in state[name]["module"]
               if f"{name}.module.{k}" not in saved]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of the weights it should hold, e.g. {missing[0]}")
    # partial for the optimizer only (the weights were checked above): a fresh AdamW holds state for every
    # parameter, a saved one only for those that had a gradient
    dcp.load(state, checkpoint_id=path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    for name, (module, opt) in parts.items():
        if opt is None:
            set_model_state_dict(module, state[name]["module"])
        else:
            set_state_dict(module, opt, model_state_dict=state[name]["module"],
                           optim_state_dict=state[name]["optimizer"], options=StateDictOptions(strict=False))


def _shards(module, opt=None):
    """This rank's shards (DTensors) of a module's state_dict and of its optimizer's, keyed by parameter name."""
    if opt is None:
        return {"module": get_model_state_dict(module)}
    module_state, opt_state = get_state_dict(module, opt)
    return {"module": module_state, "optimizer": opt_state}


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
        if rt.fsdp and isinstance(model, FSDPModule):  # the root stays gathered after a forward without a backward:
            model.reshard()  # shard it again, or what reads the parameters next (an EWC anchor) sees whole tensors


class Losses(nn.Module):
    """A micro-step's loss: Σ weight · loss_fn(module, *loss arguments) over its parts [(objective, arguments,
    weight)] (one part, or an IFA and an HPA part in a multi-task step: hbat.steps), with the metrics of each objective
    under its name when a stage has several. A module, so that under DDP the loss is its forward and the gradients of
    whatever it touches (token_logprobs, a reward head, a critic) are averaged over ranks."""

    def __init__(self, module, loss_fns):
        super().__init__()
        self.module, self.loss_fns = module, loss_fns

    def forward(self, parts):
        loss, metrics = 0.0, {}
        for objective, args, weight in parts:
            part, m = self.loss_fns[objective](self.module, *args)
            prefix = f"{objective}/" if len(self.loss_fns) > 1 else ""
            loss, metrics = loss + weight * part, metrics | {prefix + k: weight * v for k, v in m.items()}
        return loss, metrics


def wrap(rt, module, loss_fns):
    """What a training step calls its loss through: Losses(module, {objective: loss_fn}), inside
    DistributedDataParallel under DDP (FSDP needs no wrapper: the sharded modules sync their own gradients)."""
    losses = Losses(module, loss_fns)
    if rt.world > 1 and not rt.fsdp:
        return nn.parallel.DistributedDataParallel(losses, find_unused_parameters=True)
    return losses


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
