"""Host memory of loading a model under `torchrun --fsdp`: the peak resident set summed over all of a run's processes
(the torchrun agent and every rank), from its start to its first optimizer step, for 1, 2 and 4 processes.

    python -m lab.bench_memory                          # a random 94M-parameter HF checkpoint, DPO, 1 2 4 procs
    python -m lab.bench_memory --procs 1 2 --algo ppo   # PPO also loads the SFT model and the reward model
    python -m lab.bench_memory --repo ../old-checkout   # the same measurement of another checkout's train.py
    python -m lab.bench_memory --procs 2 4 --resume     # also: killed inside its first stage, then resumed

Each process costs its interpreter (`import torch` and train.py's modules, measured here too) plus what it holds of
the weights; the figure to read is what one more rank adds above its interpreter, in copies of the fp32 weights.
The checkpoint, tokenizer and data are written to a temporary directory first (not timed, not counted). With
--resume each run is then killed (its workers too) once it has saved its first stage's progress (--save-every 2),
and re-run: the resumed run's peak, to its first optimizer step after the saved one, is the second figure.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

import data
from infra import checkpoint, importers, rundir
from model import ModelArgs, Transformer


def tree(root_pid):
    """root_pid and all its descendants (Linux /proc)."""
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(pid))
        except OSError:  # the process ended while we looked
            continue
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def tree_rss(root_pid):
    """Resident set of root_pid and all its descendants, in bytes."""
    rss = 0
    for pid in tree(root_pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                rss += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
        except (OSError, StopIteration):  # ended, or a zombie without VmRSS
            continue
    return rss


def kill_tree(root_pid):
    """SIGKILL root_pid and every descendant: torchrun's workers run in process groups of their own, so killing
    torchrun's group alone would leave them running."""
    for pid in tree(root_pid):
        try:
            os.kill(pid, 9)
        except OSError:
            continue


def peak_until(cmd, cwd, env, done, timeout):
    """Run cmd; sample the tree's RSS every 20 ms until done() or exit; kill it; return the peak in bytes."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    peak, deadline = 0, time.time() + timeout
    try:
        while p.poll() is None and not done() and time.time() < deadline:
            peak = max(peak, tree_rss(p.pid))
            time.sleep(0.02)
    finally:
        if p.poll() is None:
            kill_tree(p.pid)
        _, err = p.communicate()
    if not done():
        sys.exit(f"bench_memory.py: the run ended before its first optimizer step:\n{err[-3000:]}")
    return peak


def two_stage_rows(path):
    """The training rows of two-stage in metrics.jsonl (a torn last line skipped)."""
    return [r for r in rundir.read_metrics(path) if r["schedule"] == "two-stage" and "loss" in r]


def first_step(out, from_step=0):
    """done() for peak_until: metrics.jsonl has a training row of two-stage at step `from_step` or later (a row is
    logged once its step is taken; steps count from 0)."""
    def done():
        path = os.path.join(out, "metrics.jsonl")
        return os.path.exists(path) and any(r["step"] >= from_step for r in two_stage_rows(path))
    return done


def killed_after_a_save(cmd, cwd, env, out, timeout):
    """Run cmd until two-stage's first mid-stage file exists, SIGKILL it (torchrun and its workers),
    and cut metrics.jsonl back to the saved step, as the resumed run will. Returns that step."""
    path = os.path.join(out, "two-stage.step.pt")
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + timeout
    while p.poll() is None and not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(p.pid)
    _, err = p.communicate()
    if not os.path.exists(path):
        sys.exit(f"bench_memory.py: the run saved no mid-stage progress:\n{err[-3000:]}")
    step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["progress"]["global_step"]
    rows = os.path.join(out, "metrics.jsonl")
    kept = [r for r in two_stage_rows(rows) if r["step"] < step]  # nothing else is logged before it
    with open(rows, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--algo", choices=["dpo", "ppo"], default="dpo")
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="whose train.py to run")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--n-layers", type=int, default=7)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--resume", action="store_true", help="also measure each run resumed inside its first stage")
    p.add_argument("flags", nargs="*", help="more train.py flags, after --, e.g. -- --grad-probe 0")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_memory_")
    try:
        words = "red green blue cat dog bird one two three four".split()
        ifa = [{"prompt": f"say {words[i % 10]} {words[3 * i % 10]}", "response": f"{words[3 * i % 10]} {words[i % 10]}"}
               for i in range(80)]
        hpa = [{"prompt": f"name {words[i % 10]}", "chosen": words[i % 10], "rejected": f"{words[(i + 1) % 10]} no"}
               for i in range(64)]
        importers.save_records(os.path.join(tmp, "ifa.jsonl"), ifa)
        importers.save_records(os.path.join(tmp, "hpa.jsonl"), hpa)
        tok = data.train_tokenizer([json.dumps(r) for r in ifa + hpa], cache_dir=os.path.join(tmp, "tok"))
        torch.manual_seed(0)
        margs = ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.dim // 64, vocab_size=tok.vocab_size,
                          multiple_of=256, max_seq_len=128)
        model, hf = Transformer(margs), os.path.join(tmp, "hf")
        checkpoint.export_hf(model, hf, tok.bos_id, tok.eos_id)
        shutil.copy(next(f for f in os.scandir(os.path.join(tmp, "tok")) if f.name.endswith(".model")).path,
                    os.path.join(hf, "tokenizer.model"))
        n_params = sum(t.numel() for t in model.parameters())
        copy_gb = n_params * 4 / 1e9
        del model
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["OMP_NUM_THREADS"] = "1"
        base = peak_until([sys.executable, "-c", "import torch, train, time; open('ready', 'w'); time.sleep(60)"],
                          tmp, env | {"PYTHONPATH": args.repo}, lambda: os.path.exists(os.path.join(tmp, "ready")), 120)
        print(f"model: {n_params / 1e6:.1f}M parameters, {copy_gb:.2f} GB in fp32; one interpreter "
              f"(import torch + train.py): {base / 1e9:.2f} GB; {args.algo}, --fsdp, run from {args.repo}")
        print("| processes | run | peak RSS, all processes (GB) | per extra rank above its interpreter (GB) | "
              "in copies of the weights |")
        print("|---|---|---|---|---|")
        first = {}
        for n in args.procs:
            out = os.path.join(tmp, f"out{n}")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   "train.py", "--fsdp", "--algo", args.algo, "--model", hf, "--ifa-data", os.path.join(tmp, "ifa.jsonl"),
                   "--hpa-data", os.path.join(tmp, "hpa.jsonl"), "--schedule", "two-stage", "--n-splits", "1",
                   "--batch-size", "8", "--rollout-batch", "8", "--minibatch", "8", "--epochs-ifa", "1",
                   "--epochs-hpa", "1", "--rm-epochs", "1", "--max-seq-len", "64", "--max-new-tokens", "8",
                   "--n-test", "8", "--device", "cpu", "--out", out, *args.flags]
            peaks = {"fresh": peak_until(cmd, args.repo, env, first_step(out), args.timeout)}
            if args.resume:
                shutil.rmtree(out)
                cmd += ["--save-every", "2"]
                saved = killed_after_a_save(cmd, args.repo, env, out, args.timeout)
                peaks["resumed"] = peak_until(cmd, args.repo, env, first_step(out, saved), args.timeout)  # its 1st
            for run, peak in peaks.items():
                first.setdefault(run, (n, peak))
                (n0, peak0) = first[run]
                extra = (peak - peak0) / (n - n0) - base if n > n0 else None
                print(f"| {n} | {run} | {peak / 1e9:.2f} | " + ("-" if extra is None else f"{extra / 1e9:.2f}")
                      + " | " + ("-" if extra is None else f"{extra / 1e9 / copy_gb:.2f}") + " |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
