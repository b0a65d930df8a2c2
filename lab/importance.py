"""
What modified EWC learned in a finished Hbat run: each objective's importance Ω per weight tensor, and the weights F
it puts on the next stage of the other kind (docs/method.md §3.1-3.3).

    python -m lab.importance out/hbat.pt            # the 8 tensors each objective changed most
    python -m lab.importance out/hbat.pt --top 40   # every tensor of the lesson's model

Ω^IFA_n is the mean squared change IFA stages made to tensor n, summed over them; Ω^HPA_n likewise for the HPA stages.
An HPA stage is held by F = F_max · Ω^IFA / max Ω^IFA (--f-max), an IFA stage by the same of Ω^HPA (--f-max-ifa).
Reads the checkpoint's EWC state only (either layout, sharded or not).
"""
import argparse
import pickle
import sys

import torch

import ewc


def table(importance, f_max, top):
    """Rows 'tensor  Ω  F' of the `top` tensors by Ω, F = normalise(Ω) at f_max."""
    weights = ewc.normalise(importance, f_max)
    ranked = sorted(importance, key=importance.get, reverse=True)[:top]
    return [f"  {name:<34} {importance[name]:>10.3e} {weights[name]:>8.3f}" for name in ranked]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="OUT/<schedule>.pt of a run whose schedule uses EWC (hbat)")
    p.add_argument("--top", type=int, default=8, help="tensors to show per objective")
    p.add_argument("--f-max", type=float, default=ewc.F_MAX, help="F_max of HPA stages (the run's --f-max)")
    p.add_argument("--f-max-ifa", type=float, default=ewc.F_MAX_IFA, help="F_max of IFA stages (--f-max-ifa)")
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
    print(f"{args.checkpoint}: stages {', '.join(history)}")
    for kind, held, f_max in (("ifa", "an HPA stage", args.f_max), ("hpa", "an IFA stage", args.f_max_ifa)):
        if importance[kind]:
            print(f"Ω^{kind.upper()}: what {kind.upper()} stages changed most, and F, the weight it puts on {held} "
                  f"(F_max {f_max:g})")
            print(f"  {'tensor':<34} {'Ω':>10} {'F':>8}")
            print("\n".join(table(importance[kind], f_max, args.top)))


if __name__ == "__main__":
    main()
