"""
Why is the tax paid? Two measurements that only a world with an exact, never-trained-on gold judge can make.

    python -m lab.why --world-seeds 0 1 2 --jobs 2    # run (resumes run by run), then collect
    python -m lab.why --world-seeds 0 1 2 --collect   # collect what has finished
    python -m lab.why --dry                           # the train.py commands

Per base model (--world-seed), one run of each HPA objective at its default settings with the instrument on
(train.py --overopt-every K): DPO with every schedule, and textbook PPO, the release's PPO and GRPO with two-stage,
Hbat and averaged. Collect writes results/why/why.json and, with matplotlib, results/why/overopt.png and
forgetting.png; `python -m lab.report` turns the file into docs/results.md's tables.

1. Over-optimisation (Gao, Schulman and Hilton 2022). Along every HPA stage, every K optimizer steps, the gold
   judge's and the reward model's mean scores of sampled answers on 64 validation prompts against d = √KL(π‖π_SFT)
   (evaluate.overopt). Per objective, schedule and base, both of their forms fitted by least squares, with the
   score at d = 0 a free intercept R0 (the instrument reads after steps, never at the SFT model itself):
       RL          R(d) = R0 + d(α − β log d)     gold peaks at d* = exp(α/β − 1) when β > 0
       best-of-n   R(d) = R0 + d(α − β d)         gold peaks at d* = α / 2β when β > 0
2. Forgetting against KL (Shenfeld et al. 2025, "RL's Razor"). Every schedule's final model: its tax (the SFT
   model's IFA score minus its own, on the test prompts) against its KL from the SFT model on the same prompts
   (train.py's kl_sft). Pearson's r per base and its t-interval over bases (the base is the unit of replication),
   r pooled over every point; and whether the on-policy objectives forget less than DPO at the same KL: each PPO or
   GRPO model's tax minus the tax DPO's models would have at its KL (a line fitted to that base's trained DPO
   models), its mean per base, then over bases.
"""
import argparse
import json
import math
import os
import statistics
import sys

import numpy as np

from lab.protocol import run_all
from lab.report import ci, pooled

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
OBJECTIVES = {  # name -> its train.py flags and schedules
    "dpo": (["--algo", "dpo"], "two-stage,hbat,multi-task,rpo,alright,averaged"),
    "ppo_textbook": (["--algo", "ppo", "--ppo-variant", "textbook"], "two-stage,hbat,averaged"),
    "ppo_release": (["--algo", "ppo", "--ppo-variant", "release"], "two-stage,hbat,averaged"),
    "ppo_grpo": (["--algo", "ppo", "--ppo-variant", "grpo"], "two-stage,hbat,averaged"),
}
ALPHAS = "0.25,0.5,0.75"  # averaged's α: 0 and 1 are the SFT model and two-stage themselves
EVERY = 4                 # --overopt-every
FORMS = {"rl": lambda d: d * np.log(np.where(d > 0, d, 1.0)), "bon": lambda d: d * d}  # the β term, without β


def commands(args):
    runs = []
    for w in args.world_seeds:
        for name, (flags, schedules) in OBJECTIVES.items():
            out = os.path.join(args.root, f"w{w}", name)
            runs.append((out, [sys.executable, TRAIN, *flags, "--world-seed", str(w), "--seed", str(args.seed),
                               "--out", out, "--schedule", schedules, "--average-alphas", ALPHAS,
                               "--overopt-every", str(EVERY)]))
    return runs


# -----------------------------------------------------------------------------
# collect: one record per run, from its results.json and metrics.jsonl


def collect_run(out):
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    readings = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "overopt/kl" in r:
                readings.setdefault(r["schedule"], []).append(
                    {"step": r["step"], "stage_index": r["stage_index"]}
                    | {k.split("/")[1]: v for k, v in r.items() if k.startswith("overopt/")})
    schedules = res["schedules"]
    keep = ("ifa_score", "hpa_score", "rm_score", "kl_sft")
    return {"sft_ifa": schedules["two-stage"]["stages"][0]["eval"]["ifa_score"],
            "final": {n: {k: s["metrics"][k] for k in keep if k in s["metrics"]} for n, s in schedules.items()},
            "readings": readings, "seconds": res["seconds"]}


def collect(args):
    bases = []
    for w in args.world_seeds:
        outs = {name: os.path.join(args.root, f"w{w}", name) for name in OBJECTIVES}
        if all(os.path.exists(os.path.join(o, "results.json")) for o in outs.values()):
            bases.append({"world_seed": w, "runs": {name: collect_run(o) for name, o in outs.items()}})
    return {"seed": args.seed, "overopt_every": EVERY, "average_alphas": ALPHAS, "bases": bases,
            "bases_left_out": [w for w in args.world_seeds if w not in {b["world_seed"] for b in bases}]}


# -----------------------------------------------------------------------------
# the arithmetic, on the collected file (lab.report calls these)


def fit(d, y, form):
    """Least squares of y = R0 + α d − β·FORMS[form](d): {"r0", "alpha", "beta", "r2", "peak"} (peak: the d where
    the fitted curve is highest, None unless it turns down within the readings, d ≤ max(d))."""
    d, y = np.asarray(d, float), np.asarray(y, float)
    X = np.stack([np.ones_like(d), d, -FORMS[form](d)], 1)
    (r0, alpha, beta), *_ = np.linalg.lstsq(X, y, rcond=None)
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float(((y - X @ np.array([r0, alpha, beta])) ** 2).sum()) / ss if ss > 0 else float("nan")
    log_peak = None if beta <= 0 else alpha / beta - 1 if form == "rl" else math.log(max(alpha / (2 * beta), 1e-300))
    peak = math.exp(log_peak) if log_peak is not None and log_peak <= math.log(max(d.max(), 1e-300)) else None
    return {"r0": float(r0), "alpha": float(alpha), "beta": float(beta), "r2": r2, "peak": peak}


def d_of(readings):
    return [math.sqrt(max(r["kl_sft"], 0.0)) for r in readings]


def fits(d):
    """{objective: {schedule: {"gold"|"proxy": {form: [the fit on each base]}}}}."""
    out = {}
    for b in d["bases"]:
        for name, run in b["runs"].items():
            for schedule, rs in run["readings"].items():
                for score in ("gold", "proxy"):
                    if score in rs[0]:
                        for form in FORMS:
                            out.setdefault(name, {}).setdefault(schedule, {}).setdefault(score, {}).setdefault(
                                form, []).append(fit(d_of(rs), [r[score] for r in rs], form))
    return out


def points(d):
    """Every final model: (base, objective, schedule, KL from SFT, tax)."""
    return [(b["world_seed"], name, schedule, m["kl_sft"], run["sft_ifa"] - m["ifa_score"])
            for b in d["bases"] for name, run in b["runs"].items() for schedule, m in run["final"].items()]


def pearson(xs, ys):
    return float(np.corrcoef(xs, ys)[0, 1])


def trained(schedule):
    return not schedule.startswith("averaged")


def forgetting(d):
    """The numbers of question 2: r per base, pooled r with its Fisher-z interval, the pooled line, and the on-policy
    objectives' tax minus DPO's at the same KL, per base."""
    pts, per_base, residual = points(d), [], []
    for b in d["bases"]:
        mine = [p for p in pts if p[0] == b["world_seed"]]
        per_base.append(pearson([p[3] for p in mine], [p[4] for p in mine]))
        dpo = [p for p in mine if p[1] == "dpo" and trained(p[2])]
        slope, icept = np.polyfit([p[3] for p in dpo], [p[4] for p in dpo], 1)
        online = [p for p in mine if p[1] != "dpo" and trained(p[2])]
        residual.append(statistics.mean(p[4] - (icept + slope * p[3]) for p in online))
    r = pearson([p[3] for p in pts], [p[4] for p in pts])
    z, half = math.atanh(max(-1 + 1e-12, min(1 - 1e-12, r))), 1.96 / math.sqrt(len(pts) - 3)  # Fisher's z
    slope, icept = np.polyfit([p[3] for p in pts], [p[4] for p in pts], 1)
    return {"n": len(pts), "r_per_base": per_base, "r_pooled": r, "r_pooled_ci": (math.tanh(z - half),
                                                                                   math.tanh(z + half)),
            "slope": float(slope), "intercept": float(icept), "online_minus_dpo": residual}


NAMES = {"dpo": "DPO", "ppo_textbook": "PPO (textbook)", "ppo_release": "PPO (release)", "ppo_grpo": "GRPO"}


def overopt_table(d):
    """Markdown: per objective and schedule, the fits' coefficients as means over bases."""
    lines = ["| objective | schedule | readings per base | gold: α, β (RL form) | gold R² RL / best-of-n | gold "
             "peaks at √KL | proxy: α, β (RL form) | proxy R² RL |", "|---|---|---|---|---|---|---|---|"]
    f = fits(d)
    for name in OBJECTIVES:
        for schedule, by in f.get(name, {}).items():
            n = statistics.mean(len(b["runs"][name]["readings"][schedule]) for b in d["bases"])
            g, b_ = by["gold"]["rl"], by["gold"]["bon"]
            peaks = [x["peak"] for x in g]
            peak = (f"{statistics.median([p for p in peaks if p is not None]):.2f} (median; "
                    f"{sum(p is not None for p in peaks)} of {len(peaks)} bases turn down)") if any(
                p is not None for p in peaks) else "never (no base turns down)"
            row = [NAMES[name], schedule, f"{n:.0f}", coef(g), r2(g) + " / " + r2(b_), peak]
            row += [coef(by["proxy"]["rl"]), r2(by["proxy"]["rl"])] if "proxy" in by else ["–", "–"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def coef(fs):
    return f"{statistics.mean(x['alpha'] for x in fs):+.2f}, {statistics.mean(x['beta'] for x in fs):+.2f}"


def r2(fs):
    return f"{statistics.mean(x['r2'] for x in fs):.2f}"


def forgetting_table(d):
    """Markdown: every final model's KL from SFT and tax, as means over bases, per objective and schedule."""
    pts = points(d)
    lines = ["| objective | schedule | KL from SFT (nats per answer) | tax (IFA score lost) |", "|---|---|---|---|"]
    for name in OBJECTIVES:
        for schedule in dict.fromkeys(p[2] for p in pts if p[1] == name):
            mine = [p for p in pts if p[1] == name and p[2] == schedule]
            lines.append(f"| {NAMES[name]} | {schedule} | {statistics.mean(p[3] for p in mine):.1f} | "
                         f"{statistics.mean(p[4] for p in mine):+.3f} |")
    return "\n".join(lines)


def answers(d):
    """The question's answers, in sentences computed from the file."""
    fo, f = forgetting(d), fits(d)
    nb = len(d["bases"])
    turned = {(NAMES[n], s): sum(x["peak"] is not None for x in by["gold"]["rl"]) for n, sch in f.items()
              for s, by in sch.items()}
    rising = {(NAMES[n], s): statistics.mean(x["alpha"] for x in by["proxy"]["rl"]) for n, sch in f.items()
              for s, by in sch.items() if "proxy" in by}
    lo, hi = fo["r_pooled_ci"]
    m, rlo, rhi = ci(fo["r_per_base"])
    res = fo["online_minus_dpo"]
    verdict = ("forget less than" if ci(res)[2] < 0 else "forget more than" if ci(res)[1] > 0 else
               "forget neither more nor less than") if nb > 1 else "(one base: no interval)"
    return "\n".join([
        "- **Over-optimisation.** The gold score turns down along the stage (the RL form's β > 0) on "
        + ", ".join(f"{k} {v}" for k, v in sorted(turned.items(), key=lambda kv: -kv[1]))
        + f" of {nb} bases (objective and schedule); the reward model's score rises with d at the start (mean α "
        + ", ".join(f"{a[0]} {a[1]} {v:+.2f}" for a, v in rising.items()) + ").",
        f"- **Forgetting against KL.** Over {fo['n']} final models ({nb} bases, every objective and schedule), the "
        f"tax rises with the KL from SFT: Pearson's r = {fo['r_pooled']:+.2f} pooled (95% {lo:+.2f} to {hi:+.2f}, "
        f"treating models as independent), {m:+.2f} ({rlo:+.2f} to {rhi:+.2f}) as a mean of per-base r over bases; "
        f"the pooled line is tax = {fo['intercept']:+.3f} {fo['slope']:+.4f} · KL."
        if fo["r_pooled"] > 0 else
        f"- **Forgetting against KL.** Over {fo['n']} final models, Pearson's r = {fo['r_pooled']:+.2f} pooled "
        f"(95% {lo:+.2f} to {hi:+.2f}), {m:+.2f} ({rlo:+.2f} to {rhi:+.2f}) over bases: KL does not predict the tax "
        "here.",
        f"- **On-policy against DPO at the same KL.** PPO and GRPO's trained models {verdict} DPO's line predicts at "
        f"their KL: tax minus DPO's at the same KL {pooled(res, signed=True)} over {nb} bases.",
    ])


# -----------------------------------------------------------------------------
# the figures


def draw(d, directory):
    """overopt.png (gold and proxy against √KL from SFT, per objective, one colour per schedule, the RL form's fit
    over the pooled readings) and forgetting.png (tax against KL over every final model). None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from infra.pictures import color
    fig, axes = plt.subplots(2, len(OBJECTIVES), figsize=(4 * len(OBJECTIVES), 7), sharex="col")
    for j, name in enumerate(OBJECTIVES):
        for i, score in enumerate(("gold", "proxy")):
            ax = axes[i, j]
            schedules = dict.fromkeys(s for b in d["bases"] for s in b["runs"][name]["readings"])
            for schedule in schedules:
                rs = [r for b in d["bases"] for r in b["runs"][name]["readings"].get(schedule, [])]
                if score not in rs[0]:
                    continue
                xs, ys = d_of(rs), [r[score] for r in rs]
                ax.plot(xs, ys, ".", color=color(schedule), alpha=0.35, ms=4)
                f, grid = fit(xs, ys, "rl"), np.linspace(0, max(xs), 100)
                ax.plot(grid, f["r0"] + f["alpha"] * grid - f["beta"] * FORMS["rl"](grid), color=color(schedule),
                        label=schedule)
            ax.set_title(f"{NAMES[name]}: {score}")
            if i == 1:
                ax.set_xlabel("√KL(π‖π_SFT)")
            if j == 0:
                ax.set_ylabel(f"{score} score of sampled answers")
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "overopt.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 5))
    markers = dict(zip(OBJECTIVES, "osD^"))
    for _, name, schedule, kl, tax in points(d):
        ax.plot(kl, tax, markers[name], color=color(schedule), ms=6, mfc="none" if not trained(schedule) else None)
    fo = forgetting(d)
    xs = np.linspace(0, max(p[3] for p in points(d)), 50)
    ax.plot(xs, fo["intercept"] + fo["slope"] * xs, "k--", lw=1, label=f"pooled fit, r = {fo['r_pooled']:+.2f}")
    for name, mk in markers.items():
        ax.plot([], [], mk, color="gray", label=NAMES[name])
    ax.set_xlabel("KL(π‖π_SFT) on the test prompts (nats per answer)")
    ax.set_ylabel("tax: SFT's IFA score minus the model's")
    ax.set_title("forgetting against KL (colour: schedule; hollow: averaged)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "forgetting.png"), dpi=110)
    plt.close(fig)
    return [os.path.join(directory, f) for f in ("overopt.png", "forgetting.png")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1, 2], help="the base models")
    p.add_argument("--seed", type=int, default=0, help="the training seed")
    p.add_argument("--root", default="runs/why", help="where the runs go")
    p.add_argument("--json", default="results/why/why.json", help="what collect writes")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each on one thread when more than one")
    p.add_argument("--collect", action="store_true", help="run nothing: collect the finished runs")
    p.add_argument("--dry", action="store_true", help="print the train.py commands only")
    args = p.parse_args(argv)
    runs = commands(args)
    if args.dry:
        return print("\n".join(" ".join(cmd) for _, cmd in runs))
    if not args.collect:
        run_all(runs, args.jobs, quiet=False)
    result = collect(args)
    if not result["bases"]:
        raise SystemExit(f"lab.why: no base has every run finished under {args.root}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    pictures = draw(result, os.path.dirname(args.json) or ".")
    print(f"wrote {args.json}: {len(result['bases'])} bases, left out {result['bases_left_out'] or 'none'}; "
          + ("pictures: " + ", ".join(pictures) if pictures else "no pictures: `pip install matplotlib`"))


if __name__ == "__main__":
    main()
