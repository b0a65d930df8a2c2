"""lab/memory.py: the parameter count against the real module and the published Llama 2 sizes, the training-state
lines by hand, FSDP's division, the activation count against the tensors autograd saves, and read_params against
infra/checkpoint.py's loaders."""
import json
from dataclasses import asdict

import pytest
import torch

from conftest import save
from infra import checkpoint
from lab.memory import GiB, LLAMA2, format_plan, param_count, plan, read_params, sequence_bytes
from model import ModelArgs, Transformer
from reward import RewardModel

TINY = ModelArgs(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=10, multiple_of=4, max_seq_len=16)


@pytest.mark.parametrize("args", [
    ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, multiple_of=16),                         # plain MHA
    ModelArgs(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=77, multiple_of=32),           # GQA
    ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=33, multiple_of=24, ffn_dim_multiplier=1.3),
], ids=["mha", "gqa", "ffn-multiplier"])
def test_param_count_equals_the_module(args):
    # built on the CPU (a few KB): the meta device's first nn.init costs 1.6 s of loading here
    assert param_count(args) == sum(p.numel() for p in Transformer(args).parameters())


def test_llama2_param_counts_are_the_published_ones():
    """The parameter counts of meta-llama/Llama-2-{7,13,70}b-hf (sum of the safetensors shapes)."""
    assert param_count(ModelArgs(**LLAMA2["llama-2-7b"])) == 6_738_415_616
    assert param_count(ModelArgs(**LLAMA2["llama-2-13b"])) == 13_015_864_320
    assert param_count(ModelArgs(**LLAMA2["llama-2-70b"])) == 68_976_648_192


def bytes_of(result):
    return {name: gib * GiB for name, gib in result["rows"]}


def test_training_state_lines_by_hand():
    """TINY: D 8, 1 layer, H 2, K 1 (Hd 4), V 10, F = 4·ceil(int(64/3) / 4) = 24.
    P = 2·V·D (80 + 80) + final norm 8 + layer [wq 64 + wo 64 + wk 32 + wv 32 + 3·8·24 = 576 + norms 16] = 952.
    fp32 weights 4P = 3808, gradients 3808, AdamW 8P = 7616, anchor 3808. Autocast copies the Linears, 2 bytes each:
    P − embedding 80 − norms 24 = 848 -> 1696. DDP on 2 GPUs: a bucket copy of the gradients, 3808.
    PPO, B 3, T 6: reward model = critic = P + D + 1 = 961: critic fp32 weights 3844; gradients and AdamW skip its
    unused vocabulary head (80): 881 -> 3524 and 7048; bf16 reference 2P = 1904 and reward model 1922; the critic's
    autocast copies are its trunk Linears 952 − 160 − 24 = 768 plus the value head 9 -> 2·(848 + 777) = 3250; the
    buckets hold P + 961 -> 7652; KV cache 2 (k, v) · 1 layer · 3 · 6 · K 1 · Hd 4 · 2 bytes = 288 (576 in fp32)."""
    assert param_count(TINY) == 952
    dpo = bytes_of(plan(TINY, "dpo", world=2, micro_batch=3, seq_len=6))
    assert dpo["policy weights (fp32)"] == 3808
    assert dpo["policy gradients (fp32)"] == 3808
    assert dpo["policy AdamW moments (2 x fp32)"] == 7616
    assert dpo["EWC anchor θ* (fp32, docs/method.md §3.4)"] == 3808
    assert dpo["autocast bf16 weight copies (kept for backward)"] == 1696
    assert dpo["DDP gradient buckets (fp32)"] == 3808
    ppo = bytes_of(plan(TINY, "ppo", world=2, micro_batch=3, seq_len=6))
    assert (ppo["critic weights (fp32)"], ppo["critic gradients (fp32)"], ppo["critic AdamW moments (2 x fp32)"]) \
        == (3844, 3524, 7048)
    assert (ppo["reference policy (bf16, frozen)"], ppo["reward model (bf16, frozen)"]) == (1904, 1922)
    assert ppo["autocast bf16 weight copies (kept for backward)"] == 3250
    assert ppo["DDP gradient buckets (fp32)"] == 7652
    assert ppo["KV cache for the rollout (3 x 6)"] == 288
    fp32 = bytes_of(plan(TINY, "dpo", world=1, micro_batch=3, seq_len=6, mixed_bf16=False, live_ref=True))
    assert fp32["live DPO reference (fp32, frozen)"] == 3808
    assert not any(name.startswith(("autocast", "DDP")) for name in fp32)  # no autocast, one process: no DDP
    assert bytes_of(plan(TINY, "ppo", 1, 3, 6, mixed_bf16=False))["KV cache for the rollout (3 x 6)"] == 576
    # FSDP gathers the root (embedding and head, 160) and two layers (784 each) in bf16: 2 · 1728
    assert bytes_of(plan(TINY, "dpo", 2, 3, 6, fsdp=True))["FSDP all-gathered weights (bf16: root + 2 layers)"] == 3456


@pytest.mark.parametrize("algo", ["dpo", "ppo"])
def test_fsdp_divides_training_state_and_frozen_models_not_activations(algo):
    args = ModelArgs(**LLAMA2["llama-2-7b"])
    ddp = bytes_of(plan(args, algo, world=1, micro_batch=2, seq_len=256, live_ref=True))
    fsdp = bytes_of(plan(args, algo, world=4, micro_batch=2, seq_len=256, live_ref=True, fsdp=True))
    shared = ddp.keys() & fsdp.keys()
    assert {n for n in ddp if n not in shared} == {"autocast bf16 weight copies (kept for backward)"}
    assert {n for n in fsdp if n not in shared} == {"FSDP all-gathered weights (bf16: root + 2 layers)"}
    divided = {n for n in shared if not n.startswith(("activations", "KV cache"))}
    assert len(divided) == (5 if algo == "dpo" else 9)
    for name in shared:
        assert fsdp[name] == pytest.approx(ddp[name] / 4 if name in divided else ddp[name], rel=1e-12), name


def saved_bytes(model, run):
    """Bytes of the distinct storages autograd saves for backward while run() executes, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(n for ptr, n in saved.items() if ptr not in params)


@pytest.mark.parametrize("mixed_bf16", [True, False], ids=["bf16-autocast", "fp32"])
@pytest.mark.parametrize("kind", ["logprobs", "entropy", "value-head"])
def test_activation_count_equals_what_autograd_saves(mixed_bf16, kind):
    """The saved bytes of a batch of 3 minus those of 2 are one sequence's, with everything shared across the batch
    (weights, autocast's weight copies, rotary tables) cancelled out."""
    args = ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, multiple_of=16,
                     ffn_dim_multiplier=1.3)
    torch.manual_seed(0)
    model = RewardModel(Transformer(args)) if kind == "value-head" else Transformer(args)
    T, N = 11, 4

    def run(B):
        tokens = torch.randint(0, args.vocab_size, (B, T))
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[:, -N:] = True
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_bf16):
            if kind == "value-head":
                return saved_bytes(model, lambda: model.values(tokens))
            return saved_bytes(model, lambda: model.token_logprobs(tokens, mask, with_entropy=kind == "entropy"))

    expected = sequence_bytes(args, T, N, mixed_bf16, entropy=kind == "entropy", value_head=kind == "value-head")
    assert run(3) - run(2) == expected


def test_read_params_of_each_layout_matches_checkpoint_loaders(tmp_path, capsys):
    # Llama-2-7b-hf's config.json (docs/formats.md §2.2); an empty weights file is enough for checkpoint.load to parse it
    hf = tmp_path / "hf"
    hf.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "vocab_size": 32000, "max_position_embeddings": 4096,
              "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu", "tie_word_embeddings": False}
    (hf / "config.json").write_text(json.dumps(config))
    checkpoint.write_safetensors({}, hf / "model.safetensors")
    assert read_params(hf) == checkpoint.load(hf)[0]
    assert param_count(ModelArgs(**read_params(hf))) == 6_738_415_616
    # an FFN below Meta's 8·dim/3 (multiplier < 1), GQA, rope_theta nested, keys left to their defaults
    small = dict(hidden_size=64, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=96, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    (hf / "config.json").write_text(json.dumps(small))
    assert read_params(hf) == checkpoint.load(hf)[0]
    assert ModelArgs(**read_params(hf)).ffn_hidden_dim == 100
    (hf / "model.safetensors").unlink()  # read_params never needs the weights
    assert read_params(hf)["rope_theta"] == 5e5

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                  "multiple_of": 16, "norm_eps": 1e-6, "vocab_size": 96,
                                                  "use_scaled_rope": False}))  # a key ModelArgs does not have
    torch.save({}, meta / "consolidated.00.pth")
    assert read_params(meta) == {k: v for k, v in checkpoint.load(meta)[0].items() if k != "use_scaled_rope"}
    # Llama 2's own params.json: vocab_size -1 leaves the size to the tokenizer, so read_params assumes 32000
    (meta / "params.json").write_text('{"dim":4096,"multiple_of":256,"n_heads":32,"n_layers":32,"norm_eps":1e-05,'
                                      '"vocab_size":-1}')
    (meta / "consolidated.00.pth").unlink()
    assert read_params(meta) == {k: v for k, v in LLAMA2["llama-2-7b"].items() if k != "max_seq_len"}
    assert "vocab_size -1" in capsys.readouterr().err

    torch.manual_seed(0)
    save(Transformer(TINY), tmp_path / "ours.pt")
    assert read_params(tmp_path / "ours.pt") == asdict(TINY)
    with pytest.raises(FileNotFoundError, match="llama-2-7b"):
        read_params(tmp_path / "nowhere")


def test_llama2_names_give_fresh_dicts():
    params = read_params("llama-2-13b")
    params["dim"] = 1
    assert read_params("llama-2-13b")["dim"] == 5120


def test_format_plan_states_size_lines_total_and_verdict():
    args = ModelArgs(**LLAMA2["llama-2-7b"])
    ddp = plan(args, "dpo", world=8, micro_batch=1, seq_len=512)
    text = format_plan(ddp, title="llama-2-7b")
    assert "parameters: 6.74 B" in text and text.endswith("fits in 80 GiB: no")
    assert f"{ddp['rows'][0][1]:8.2f} GiB" in text and ddp["total"] == pytest.approx(sum(g for _, g in ddp["rows"]))
    assert plan(args, "dpo", world=8, micro_batch=1, seq_len=512, gpu_gb=ddp["total"])["fits"]
    assert format_plan(plan(args, "dpo", world=8, micro_batch=1, seq_len=512, fsdp=True)).endswith("yes")
