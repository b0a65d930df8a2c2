"""LLaMA checkpoint formats: our .pt (whole, or naming a sharded directory written under --fsdp), Meta
consolidated.*.pth, Hugging Face safetensors/bin; conversion to/from our state dict.

Everything here works on plain data, so that model.py can import this file without a cycle: a params dict (the
fields of model.ModelArgs, which are Meta's params.json names) and a state dict under Meta's tensor names
(layers.3.attention.wq.weight, ...), which model.py's parameters share. model.Transformer.from_pretrained builds a
model from `load`, every model file a run writes goes through `save` (under --fsdp `save_sharded`), and
`export_hf` writes a model in Hugging Face's layout. `atomic_save` is the one way checkpoints reach the disk, for
the training loop as well.
"""
import json
import math
import os
import pickle
import warnings
from pathlib import Path

import torch


def atomic_write(path, write) -> None:
    """Call write(f) on a new file so that `path` holds its old contents or all of the new ones, never a part: write
    path.tmp in the same directory (a rename is atomic only within one filesystem), fsync it, then rename it onto
    path. Creates the directory if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # else a power cut after the rename could leave path pointing at unwritten blocks
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj, path) -> None:
    """torch.save(obj, path), atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save(params: dict, state: dict, path, **extra) -> None:
    """Write our format, {"model_args": params, "model": state, **extra}, atomically: the one layout of every
    model file a run writes (the tiny base, the reward model, each schedule's checkpoint with its training state in
    `extra`), so that `load` and model.Transformer.from_pretrained read any of them."""
    atomic_save({"model_args": params, "model": state, **extra}, path)


def load(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read any of the three layouts -> (params, state dict on CPU, in the file's dtypes, under our names).

    path is one of our files, a Meta directory (params.json + consolidated.*.pth) or a Hugging Face directory
    (config.json + model.safetensors, sharded safetensors with an index, or pytorch_model*.bin). params holds
    ModelArgs keyword arguments; a Meta params.json may add keys of its own, which the caller drops."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        return _load_ours(path)
    if (path / "params.json").is_file():
        return _load_meta(path)
    if (path / "config.json").is_file():
        return _load_hf(path)
    raise FileNotFoundError(f"{path}: not a checkpoint file, nor a directory with params.json (Meta layout) "
                            f"or config.json (Hugging Face layout)")


def _read_json(file: Path) -> dict:
    """A JSON config; a malformed or missing one is a ValueError or OSError naming the file."""
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def _torch_load(file: Path):
    try:  # weights_only: a checkpoint is data; a pickle that names a function would run it on load
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{file} holds pickled Python objects besides tensors; refusing to load it") from None
    except (RuntimeError, EOFError) as e:  # not a torch zip file, or a truncated one
        raise ValueError(f"{file}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None


def _load_ours(file: Path):
    ckpt = _torch_load(file)
    if isinstance(ckpt, dict) and {"model_args", "shards"} <= ckpt.keys():  # written under --fsdp: see save_sharded
        return ckpt["model_args"], load_sharded(file.parent / ckpt["shards"], "model")
    if not (isinstance(ckpt, dict) and {"model_args", "model"} <= ckpt.keys()):
        raise ValueError(f"{file} is not a save_checkpoint file (it needs the keys model_args and model)")
    return ckpt["model_args"], ckpt["model"]


def save_sharded(params: dict, shards: str, path, **extra) -> None:
    """Our format for a model whose weights are in a sharded checkpoint (--fsdp, parallel.save_shards): path holds
    {"model_args", "shards": the directory's name, beside path, **extra}, and `load` reads the weights whole from
    the directory. Written after the directory is complete, so path always names a whole one."""
    atomic_save({"model_args": params, "shards": shards, **extra}, path)


def load_sharded(directory, part) -> dict[str, torch.Tensor]:
    """The whole state dict of `part` ("model", "critic") of a sharded checkpoint, on the CPU in one process (no
    process group): what sample.py and from_pretrained read of a run made under --fsdp."""
    import torch.distributed.checkpoint as dcp  # here: every other format needs no torch.distributed
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    try:
        reader = dcp.FileSystemReader(str(directory))
        meta = reader.read_metadata().state_dict_metadata
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{directory}: not a readable sharded checkpoint ({str(e).splitlines()[0]})") from None
    prefix = f"{part}.module."
    state = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not state:
        raise ValueError(f"{directory} holds no {part!r} weights")
    try:
        with warnings.catch_warnings():  # that it runs in one process, without a process group, is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({part: {"module": state}}, storage_reader=reader, no_dist=True)
    except (dcp.CheckpointException, OSError, RuntimeError) as e:  # CheckpointException is a BaseException
        raise ValueError(f"{directory}: not a readable sharded checkpoint ({str(e).splitlines()[0][:200]})") from None
    return state


def _load_meta(d: Path):
    params = _read_json(d / "params.json")
    if params.get("use_scaled_rope"):
        raise ValueError(f"{d}/params.json: use_scaled_rope (Llama 3.1 rotary scaling) is not supported")
    shards = [_torch_load(f) for f in sorted(d.glob("consolidated.*.pth"))]  # 00, 01, ... is the concat order
    if not shards:
        raise FileNotFoundError(f"{d} has params.json but no consolidated.*.pth")
    state = {}
    for name, first in shards[0].items():
        if name == "rope.freqs":  # a stored copy of what model.rotary computes
            continue
        # column-parallel layers were split by output rows, row-parallel ones (wo, w2) by input columns, and the
        # embedding by its dim in LLaMA 1/2 but by vocabulary in Llama 3 (each shard is then a full dim wide)
        by_column = name.endswith(("wo.weight", "w2.weight")) or (
            name == "tok_embeddings.weight" and first.shape[1] != params["dim"])
        replicated = first.dim() == 1 or len(shards) == 1  # the norms sit whole in every shard
        state[name] = first if replicated else torch.cat([s[name] for s in shards], dim=1 if by_column else 0)
    if params.get("vocab_size", -1) < 0:  # Llama 2 writes -1 (the tokenizer decides), so read the embedding
        params["vocab_size"] = state["tok_embeddings.weight"].shape[0]
    return params, state


_HF_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_HF_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}


def _hf_name(name: str) -> str:
    """layers.3.attention.wq.weight -> model.layers.3.self_attn.q_proj.weight; norm.weight -> model.norm.weight."""
    parts = name.split(".")
    if parts[0] == "layers":
        return f"model.layers.{parts[1]}.{_HF_LAYER['.'.join(parts[2:-1])]}.weight"
    return f"{_HF_TOP[parts[0]]}.weight"


def permute_qk(w: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """Reorder the rows of a wq/wk weight (n_heads·Hd, D) within each head, from Meta's interleaved rotary pairs
    (0, 1), (2, 3), ... to HF's order "all even rows, then all odd rows" (inverse=True goes back). Since q and k are
    reordered alike, q·k is unchanged. This is the permute of HF's convert_llama_weights_to_hf.py."""
    d1, d2 = w.shape
    pairs = d1 // n_heads // 2
    shape = (n_heads, 2, pairs, d2) if inverse else (n_heads, pairs, 2, d2)
    return w.reshape(shape).transpose(1, 2).reshape(d1, d2)


def _load_hf(d: Path):
    cfg = _read_json(d / "config.json")
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                           "vocab_size") if not isinstance(cfg.get(k), int)]
    if missing:
        raise ValueError(f"{d}/config.json: no integer {', '.join(missing)} (not a LLaMA config)")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}  # newer writers move rope_theta in here
    if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"{d}/config.json: rotary scaling is not supported")
    if cfg.get("head_dim", dim // n_heads) != dim // n_heads or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(f"{d}/config.json: only LLaMA's head_dim = hidden_size / heads and bias-free layers load")
    # Meta's rule (ModelArgs.ffn_hidden_dim) rounds int(8·dim/3) up to multiple_of, so multiple_of =
    # intermediate_size gives any size at least that large (every LLaMA); a multiplier below 1 first shrinks it.
    hidden, base = cfg["intermediate_size"], int(2 * 4 * dim / 3)
    params = dict(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                  n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"], multiple_of=hidden,
                  ffn_dim_multiplier=hidden / base if hidden < base else None,
                  norm_eps=cfg.get("rms_norm_eps", 1e-6),
                  rope_theta=cfg.get("rope_theta") or rope.get("rope_theta", 10000.0),
                  max_seq_len=cfg.get("max_position_embeddings", 2048))
    index = d / "model.safetensors.index.json"
    files = (sorted({d / f for f in _read_json(index)["weight_map"].values()}) if index.is_file()
             else sorted(d.glob("model.safetensors")) or sorted(d.glob("pytorch_model*.bin")))
    if not files:
        raise FileNotFoundError(f"{d} has config.json but no model.safetensors(.index.json) or pytorch_model*.bin")
    n_layers = params["n_layers"]
    ours = [f"{m}.weight" for m in _HF_TOP] + [f"layers.{i}.{m}.weight" for i in range(n_layers) for m in _HF_LAYER]
    rename = {_hf_name(n): n for n in ours}
    state = {}
    for f in files:
        shard = read_safetensors(f) if f.suffix == ".safetensors" else _torch_load(f)
        state.update({rename.get(n, n): w for n, w in shard.items() if not n.endswith("rotary_emb.inv_freq")})
    hd, n_kv = dim // n_heads, params["n_kv_heads"] or n_heads
    for i in range(n_layers):
        for name, n in ((f"layers.{i}.attention.wq.weight", n_heads), (f"layers.{i}.attention.wk.weight", n_kv)):
            if name in state and state[name].shape == (n * hd, dim):  # other shapes are reported by the caller
                state[name] = permute_qk(state[name], n, inverse=True)
    if cfg.get("tie_word_embeddings"):  # HF then ignores lm_head (often not even stored)
        state["output.weight"] = state["tok_embeddings.weight"]
    return params, state


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32}


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file: a little-endian u64 header length, a JSON header mapping each name to its
    dtype, shape and byte range [begin, end) in the data that follows. A file that breaks the layout (a header
    length past the file or over the reference reader's 100 MB cap, a byte range past the end or of the wrong
    size) is a ValueError naming it, checked before anything is read into memory."""
    tensors, size = {}, os.path.getsize(file)
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= min(size - 8, 100 << 20):
            raise ValueError(f"{file}: not a safetensors file (header length {n} in a file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{file}: not a safetensors file (its header is not JSON)") from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']} "
                                 f"(supported: {', '.join(_ST_DTYPES)})")
            begin, end = info["data_offsets"]
            itemsize = torch.empty(0, dtype=_ST_DTYPES[info["dtype"]]).element_size()
            if not 0 <= begin <= end <= size - 8 - n or end - begin != itemsize * math.prod(info["shape"]):
                raise ValueError(f"{file}: tensor {name} lies outside the file or has the wrong size "
                                 f"(truncated or corrupt)")
            f.seek(8 + n + begin)
            data = bytearray(f.read(end - begin))
            dtype = _ST_DTYPES[info["dtype"]]
            flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(info["shape"])
    return tensors


def write_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """The inverse of read_safetensors, header padded with spaces to 8 bytes as the reference writer does."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    dtype_names = {v: k for k, v in _ST_DTYPES.items()}
    for name, w in tensors.items():
        blob = w.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype_names[w.dtype], "shape": list(w.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(file, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        f.writelines(blobs)


def export_hf(model, out_dir, bos_id=1, eos_id=2, state=None) -> None:
    """Write a model.Transformer as out_dir/config.json and out_dir/model.safetensors in Hugging Face's
    LlamaForCausalLM layout, in the weights' dtype (the tokenizer's ids go into config.json). `state` replaces
    model.state_dict(), e.g. the gathered weights of a sharded model, or a copy in another dtype."""
    a, out = model.args, Path(out_dir)
    state = model.state_dict() if state is None else state
    out.mkdir(parents=True, exist_ok=True)
    n_kv = a.n_kv_heads or a.n_heads
    tensors = {}
    for name, w in state.items():
        if name.endswith(("wq.weight", "wk.weight")):
            w = permute_qk(w, a.n_heads if name.endswith("wq.weight") else n_kv)
        tensors[_hf_name(name)] = w
    write_safetensors(tensors, out / "model.safetensors")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
              "intermediate_size": a.ffn_hidden_dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
              "num_key_value_heads": n_kv, "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps,
              "rope_theta": a.rope_theta, "max_position_embeddings": a.max_seq_len, "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": str(state["output.weight"].dtype).removeprefix("torch."),
              "bos_token_id": bos_id, "eos_token_id": eos_id}
    (out / "config.json").write_text(json.dumps(config, indent=2))
