"""Throughput of model.py: tokens/s for one training step (forward + backward + AdamW) and for KV-cache generation.

    python bench.py                          # both configs, all CPU threads
    python bench.py --configs tiny --threads 2 --steps 5

Training: a batch of 8 x 256 random tokens, next-token cross-entropy over all positions. Generation: 8 prompts of 32
random tokens, 96 new tokens each, greedy and without eos, so every row runs to the end. Weights are random: speed
does not depend on what they hold. Timings exclude one warm-up step.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer

CONFIGS = {
    # int(8 * 256 / 3) = 682, rounded up to a multiple of 16: FFN 688
    "tiny": ModelArgs(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=4096, multiple_of=16, max_seq_len=512),
    # int(8 * 512 / 3) = 1365 -> FFN 1376
    "small": ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=32, max_seq_len=512),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="model sizes to time")
    p.add_argument("--steps", type=int, default=3, help="timed repetitions of each measurement (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--batch", type=int, default=8, help="sequences per training step / prompts per generate call")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per generation prompt")
    p.add_argument("--new-tokens", type=int, default=96, help="tokens generated per prompt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    return p.parse_args()


def timed(fn, steps: int, device: str) -> float:
    """Seconds per call of fn, averaged over `steps` calls after one warm-up call."""
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    for name in args.configs:
        torch.manual_seed(0)
        model = Transformer(CONFIGS[name]).to(args.device)
        n_params = sum(p.numel() for p in model.parameters())
        V = model.args.vocab_size
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens = torch.randint(0, V, (args.batch, args.seq_len), device=args.device)

        def train_step():
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, V).float(), tokens[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        prompts = torch.randint(0, V, (args.batch, args.prompt_len)).tolist()

        def generate():
            model.generate(prompts, args.new_tokens)

        train_s = timed(train_step, args.steps, args.device)
        gen_s = timed(generate, args.steps, args.device)
        print(f"{name:6s} {n_params / 1e6:6.1f}M params | train {args.batch * args.seq_len / train_s:9.0f} tok/s "
              f"({train_s * 1e3:7.1f} ms/step) | generate {args.batch * args.new_tokens / gen_s:8.0f} tok/s "
              f"({gen_s / args.new_tokens * 1e3:6.2f} ms/token step)")


if __name__ == "__main__":
    main()
