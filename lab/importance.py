"""
What modified EWC learned in a finished Hbat run: each objective's importance Ω per weight tensor, and the weights F
it puts on the next stage of the other kind (docs/method.md §3.1-3.3).

    python -m lab.importance out/hbat.pt            # the 8 tensors each objective changed most
    python -m lab.importance out/hbat.pt --top 40   # every tensor of the lesson's model

Ω^IFA_n is the mean squared change IFA stages made to tensor n, summed over them; Ω^HPA_n likewise for the HPA stages.
An HPA stage is held by F = F_max · Ω^IFA / max Ω^IFA (--f-max), an IFA stage by the same of Ω^HPA (--f-max-ifa).
Reads the checkpoint's EWC state only (either layout, sharded or not), and the run's settings of F (--f-max,
--f-max-ifa, --ewc-norm, --ewc-scale) from the config.json beside it.
"""
import argparse
import json
import os
import pickle
import sys

import torch

import ewc


def table(importance, f_max, top, norm="max", scale=1.0):
    """Rows 'tensor  Ω  F' of the `top` tensors by Ω, F = normalise(Ω) at f_max (§3.3)."""
    weights = ewc.normalise(importance, f_max, norm, scale)
    ranked = sorted(importance, key=importance.get, reverse=True)[:top]
    return [f"  {name:<34} {importance[name]:>10.3e} {weights[name]:>8.3f}" for name in ranked]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="OUT/<schedule>.pt of a run whose schedule uses EWC (hbat)")
    p.add_argument("--top", type=int, default=8, help="tensors to show per objective")
    args = p.parse_args(argv)
    try:
        saved = torch.load(args.checkpoint, map_location="cpu", weights_only=True, mmap=True)
        history = [stage["name"] for stage in saved["history"]]
    except FileNotFoundError:
        sys.exit(f"lab.importance: {args.checkpoint}: no such file")
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError):
        sys.exit(f"lab.importance: {args.checkpoint}: not a schedule's checkpoint (OUT/<schedule>.pt of a run)")
    importance = saved.get("ewc", {}).get("importance", {})
    if not any(importance.values()):
        sys.exit(f"lab.importance: {args.checkpoint}: its schedule has no EWC penalty, so no importance (hbat's has)")
    if any(torch.is_tensor(v) for kind in importance.values() for v in kind.values()):
        sys.exit(f"lab.importance: {args.checkpoint}: its importance is per element (--ewc-elementwise); this shows "
                 "per-tensor importance only")
    # the run's own settings of F (config.json beside the checkpoint), else train.py's defaults
    config = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "config.json")
    run = {}
    if os.path.exists(config):
        with open(config) as f:
            run = json.load(f)
    if run.get("ewc", "modified") != "modified":
        sys.exit(f"lab.importance: {args.checkpoint}: the run used --ewc {run['ewc']}, not modified EWC's F")
    f_max, f_max_ifa = run.get("f_max", ewc.F_MAX), run.get("f_max_ifa", ewc.F_MAX_IFA)
    norm, scale = run.get("ewc_norm", "max"), run.get("ewc_scale", 1.0)
    print(f"{args.checkpoint}: stages {', '.join(history)}")
    for kind, held, top in (("ifa", "an HPA stage", f_max), ("hpa", "an IFA stage", f_max_ifa)):
        if importance[kind]:
            print(f"Ω^{kind.upper()}: what {kind.upper()} stages changed most, and F, the weight it puts on {held} "
                  f"(F_max {top:g}, normalised by {norm})")
            print(f"  {'tensor':<34} {'Ω':>10} {'F':>8}")
            print("\n".join(table(importance[kind], top, args.top, norm, scale)))


if __name__ == "__main__":
    main()
