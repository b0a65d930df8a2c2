"""The pictures of a run, drawn from its results.json when matplotlib is installed (`pip install matplotlib`; the rest
of the project runs without it):

    OUT/tradeoff.png   IFA score against HPA score: the base, the SFT model, and each schedule's path through its
                       stages (a point where each stage left the model); weight averaging's models on a dashed line
    OUT/curves.png     IFA and HPA score against optimizer steps, a point at each stage's end and a dotted line at
                       each stage boundary, with the SFT model's scores as a grey reference
    OUT/overopt.png    with the over-optimisation instrument on (--overopt-every): the gold judge's and the reward
                       model's scores of sampled answers against √KL from the SFT model, a dot per reading

One colour per schedule in every figure of the project (`COLORS`).
"""
import math
import os

from infra.rundir import read_metrics

COLORS = {"two-stage": "tab:blue", "hbat": "tab:orange", "multi-task": "tab:green", "rpo": "tab:red",
          "alright": "tab:purple", "averaged": "tab:brown", "sft": "tab:gray", "SFT": "tab:gray", "base": "black"}
FILES = ("tradeoff.png", "curves.png")
OVEROPT = "overopt.png"


def color(name):
    return COLORS.get(name.split("@")[0], "tab:pink")


def score(m, key):
    """A score of an evaluation; nan (not drawn) where there is none: the HPA score of real data without a judge."""
    return m.get(key, float("nan"))


def draw(out, results):
    """Write FILES into `out` from a run's results (results.json's dict). Returns the line the run prints about them."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no pictures: `pip install matplotlib` and re-run to draw {' and '.join(FILES)} into {out}"
    runs = {n: r for n, r in results["schedules"].items() if r["stages"]}
    sft = runs["two-stage"]["stages"][0]["eval"] if "two-stage" in runs else None
    start = results.get("base_metrics")

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for label, m in (("base", start), ("SFT", sft)):
        if m:
            ax.plot(score(m, "hpa_score"), m["ifa_score"], "s", color=COLORS[label], label=label)
    for name, r in runs.items():
        path = ([start] if start else []) + [st["eval"] for st in r["stages"] if "eval" in st]
        ax.plot([score(m, "hpa_score") for m in path], [m["ifa_score"] for m in path], "o-", color=color(name), ms=3,
                label=name)
        ax.plot(score(path[-1], "hpa_score"), path[-1]["ifa_score"], "o", color=color(name), ms=9)
    averaged = sorted((float(n.split("@")[1]), r["metrics"]) for n, r in results["schedules"].items()
                      if n.startswith("averaged@"))
    if averaged:
        ax.plot([score(m, "hpa_score") for _, m in averaged], [m["ifa_score"] for _, m in averaged], "d--",
                color=COLORS["averaged"], label="averaged (α = " + ", ".join(f"{a:g}" for a, _ in averaged) + ")")
    ax.set_xlabel("HPA score (the judge's reward)")
    ax.set_ylabel("IFA score (content)")
    ax.set_title("where each stage leaves the model (big dot: the end)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, FILES[0]), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("ifa_score", "hpa_score"), ("IFA score", "HPA score")):
        if sft:
            ax.axhline(score(sft, key), ls="--", color=COLORS["SFT"], lw=1, label="SFT")
        for name, r in runs.items():
            ends, step = [], 0
            for st in r["stages"]:
                step += st["steps"]
                ends.append(step)
                ax.axvline(step, ls=":", color=color(name), lw=0.6, alpha=0.6)
            xs = ([0] if start else []) + [e for e, st in zip(ends, r["stages"]) if "eval" in st]
            ys = ([score(start, key)] if start else []) + [score(st["eval"], key) for st in r["stages"] if "eval" in st]
            ax.plot(xs, ys, "o-", color=color(name), ms=3, label=name)
        ax.set_xlabel("optimizer step (dotted: a stage boundary)")
        ax.set_title(title)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, FILES[1]), dpi=120)
    plt.close(fig)
    drawn = FILES + ((OVEROPT,) if overopt(out, plt) else ())
    return "pictures: " + ", ".join(os.path.join(out, f) for f in drawn)


def overopt(out, plt):
    """OUT/overopt.png from the instrument's rows of OUT/metrics.jsonl (Gao et al.'s picture: a proxy that keeps
    rising while the gold score turns down is over-optimisation). False when the run has none."""
    path = os.path.join(out, "metrics.jsonl")
    rows = [r for r in read_metrics(path) if "overopt/kl_sft" in r] if os.path.exists(path) else []
    if not rows:
        return False
    scores = [k for k in ("gold", "proxy") if f"overopt/{k}" in rows[0]]
    fig, axes = plt.subplots(1, len(scores), figsize=(5.5 * len(scores), 4), squeeze=False)
    for ax, key in zip(axes[0], scores):
        for name in dict.fromkeys(r["schedule"] for r in rows):  # dots, not lines: Hbat's IFA stages move the KL
            rs = [r for r in rows if r["schedule"] == name]       # back, so joined in step order they zig-zag
            ax.plot([math.sqrt(max(r["overopt/kl_sft"], 0.0)) for r in rs], [r[f"overopt/{key}"] for r in rs],
                    "o", ms=4, alpha=0.8, color=color(name), label=name)
        ax.set_xlabel("√KL(π‖π_SFT) of sampled answers (a dot per reading)")
        ax.set_title({"gold": "gold judge (never trained on)", "proxy": "reward model (what PPO climbs)"}[key])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, OVEROPT), dpi=120)
    plt.close(fig)
    return True
