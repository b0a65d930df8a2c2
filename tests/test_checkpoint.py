"""infra/checkpoint.py: our, Meta's and Hugging Face's layouts load to the same logits, the export round trip,
atomic writes, and refusing a checkpoint that would run code.

The Meta shards and HF files are written here by code that follows Meta's sharding and HF's converter
(convert_llama_weights_to_hf.py) directly, so that a loader bug cannot cancel out against a writer bug."""
import copy
import json
import re
import struct
from dataclasses import asdict

import pytest
import torch

from conftest import save
from infra.checkpoint import atomic_save, export_hf, read_safetensors
from model import Transformer
from test_model import ARGS, tiny

HF_NAMES = [(r"^tok_embeddings\.", "model.embed_tokens."), (r"^norm\.", "model.norm."), (r"^output\.", "lm_head."),
            (r"^layers\.(\d+)\.attention\.w([qkvo])\.", r"model.layers.\1.self_attn.\2_proj."),
            (r"^layers\.(\d+)\.feed_forward\.w1\.", r"model.layers.\1.mlp.gate_proj."),
            (r"^layers\.(\d+)\.feed_forward\.w2\.", r"model.layers.\1.mlp.down_proj."),
            (r"^layers\.(\d+)\.feed_forward\.w3\.", r"model.layers.\1.mlp.up_proj."),
            (r"^layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
            (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm.")]


def hf_permute(w, n_heads):
    """convert_llama_weights_to_hf.py's permute: Meta's interleaved rotary rows -> HF's half-split rows."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def to_hf(model):
    a, out = model.args, {}
    for name, w in model.state_dict().items():
        if ".wq." in name or ".wk." in name:
            w = hf_permute(w, a.n_heads if ".wq." in name else a.n_kv_heads)
        for pattern, new in HF_NAMES:
            name = re.sub(pattern, new, name)
        out[name] = w
    return out


def hf_config(a, **changes):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
              "intermediate_size": a.ffn_hidden_dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
              "num_key_value_heads": a.n_kv_heads, "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps,
              "rope_theta": a.rope_theta, "max_position_embeddings": a.max_seq_len, "tie_word_embeddings": False}
    return {**config, **changes}


def write_st(tensors, path, dtype="F32"):
    """Independent safetensors writer; no header padding, so the reader must not rely on alignment."""
    header, blobs, offset = {}, [], 0
    for name, w in tensors.items():
        w = {"F32": w.float(), "F16": w.half(), "BF16": w.bfloat16().view(torch.int16)}[dtype].contiguous()
        blob = w.numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(w.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def write_hf(model, d, config=None, n_files=1, dtype="F32", drop=()):
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config or hf_config(model.args)))
    tensors = {n: w for n, w in to_hf(model).items() if n not in drop}
    if n_files == 1:
        write_st(tensors, d / "model.safetensors", dtype)
        return d
    names, weight_map = list(tensors), {}
    for i in range(n_files):
        file = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::n_files]}
        write_st(part, d / file, dtype)
        weight_map.update({n: file for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def write_meta(model, d, n_shards=2):
    """Meta's layout: column-parallel weights split by rows, wo/w2 and the embedding by columns, norms copied."""
    d.mkdir()
    a = model.args
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
              "vocab_size": -1, "multiple_of": a.multiple_of, "norm_eps": a.norm_eps}
    (d / "params.json").write_text(json.dumps(params))
    shards = [{"rope.freqs": torch.zeros(a.dim // a.n_heads // 2)} for _ in range(n_shards)]
    for name, w in model.state_dict().items():
        if w.dim() == 1:
            parts = [w] * n_shards
        else:
            parts = w.chunk(n_shards, dim=1 if re.search(r"wo\.|w2\.|tok_embeddings", name) else 0)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, d / f"consolidated.{i:02d}.pth")
    return d


def assert_same_logits(path, reference, tokens, **kw):
    loaded = Transformer.from_pretrained(path, **kw)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), reference(tokens))
    return loaded


def test_our_meta_and_hf_layouts_load_to_identical_logits(tmp_path):
    model = tiny()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 10))
    save(model, tmp_path / "ours.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["ours.pt"]  # the temporary file was renamed away
    loaded = assert_same_logits(tmp_path / "ours.pt", model, tokens)
    assert loaded.args == model.args and all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    assert_same_logits(write_meta(model, tmp_path / "meta"), model, tokens)
    assert_same_logits(write_hf(model, tmp_path / "hf"), model, tokens)
    assert_same_logits(write_hf(model, tmp_path / "hf_sharded", n_files=3), model, tokens)
    bin_dir = tmp_path / "hf_bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text(json.dumps(hf_config(model.args)))
    torch.save(to_hf(model), bin_dir / "pytorch_model.bin")
    assert_same_logits(bin_dir, model, tokens)
    # half-precision files load to the rounded weights; dtype= picks the in-memory precision
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    assert_same_logits(write_hf(model, tmp_path / "hf_bf16", dtype="BF16"), rounded, tokens)
    half = Transformer.from_pretrained(write_hf(model, tmp_path / "hf_f16", dtype="F16"), dtype=torch.bfloat16)
    assert half.output.weight.dtype == torch.bfloat16


def test_hf_tied_embeddings_and_nested_rope_theta(tmp_path):
    tokens = torch.randint(0, ARGS.vocab_size, (2, 10))
    tied = tiny()
    tied.output.weight.data = tied.tok_embeddings.weight.data.clone()
    config = hf_config(tied.args, tie_word_embeddings=True)
    assert_same_logits(write_hf(tied, tmp_path / "tied", config, drop={"lm_head.weight"}), tied, tokens)
    model = tiny(rope_theta=500000.0)
    config = hf_config(model.args, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    del config["rope_theta"]
    loaded = assert_same_logits(write_hf(model, tmp_path / "nested", config), model, tokens)
    assert loaded.args.rope_theta == 500000.0


def test_export_hf_round_trip_in_hf_layout(tmp_path):
    model = tiny()
    export_hf(model, tmp_path / "export")
    written = read_safetensors(tmp_path / "export" / "model.safetensors")
    expected = to_hf(model)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[n], expected[n]) for n in expected)
    assert_same_logits(tmp_path / "export", model, torch.randint(0, ARGS.vocab_size, (2, 10)))


def test_atomic_save_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    atomic_save({"step": 1}, path)
    atomic_save({"step": 2}, path)
    assert torch.load(path) == {"step": 2}
    with pytest.raises(Exception, match="pickle"):  # a lambda cannot be pickled: torch.save fails mid-write
        atomic_save({"step": 3, "fn": lambda: None}, path)
    assert torch.load(path) == {"step": 2} and [p.name for p in path.parent.iterdir()] == ["ck.pt"]


class WritesMarker:
    """Unpickling this calls open(marker, "w"): code that runs on load leaves the marker file behind."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path):
    model, marker = tiny(), tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model_args": asdict(model.args), "model": model.state_dict(), "extra": WritesMarker(marker)}, path)
    with pytest.raises(ValueError, match="pickled"):
        Transformer.from_pretrained(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load does run it
    assert marker.exists()


def test_errors_name_what_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json.*config.json"):
        Transformer.from_pretrained(tmp_path)
    model = tiny()
    state = model.state_dict()
    state["layers.1.attention.wq.weight"] = state["layers.1.attention.wq.weight"][:-1]
    torch.save({"model_args": asdict(model.args), "model": state}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wq\.weight"):
        Transformer.from_pretrained(tmp_path / "bad.pt")
    d = write_hf(model, tmp_path / "f8")
    head = json.dumps({"model.norm.weight": {"dtype": "F8_E4M3", "shape": [64], "data_offsets": [0, 64]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + bytes(64))
    with pytest.raises(ValueError, match="F8_E4M3"):
        Transformer.from_pretrained(d)

