"""
Why is the tax paid? Two measurements that only a world with an exact, never-trained-on gold judge can make.

    python -m lab.why --world-seeds 0 1 2 3 --jobs 2    # run (resumes run by run), then collect
    python -m lab.why --world-seeds 0 1 2 3 --collect   # collect what has finished
    python -m lab.why --dry                           # the train.py commands

Per base model (--world-seed), one run of each HPA objective at its default settings with the instrument on
(train.py --overopt-every K): DPO with every schedule, and textbook PPO, the release's PPO and GRPO with two-stage,
Hbat and averaged. Collect writes results/why/why.json and, with matplotlib, results/why/overopt.png and
forgetting.png; `python -m lab.report` turns the file into docs/results.md's tables.

1. Over-optimisation (Gao, Schulman and Hilton 2022). Along every HPA stage, every K optimizer steps, the gold
   judge's and the reward model's mean scores of sampled answers on 64 validation prompts against d = √KL(π‖π_SFT)
   (evaluate.overopt). Model-free: how far each score moved from the first quarter of the readings to the last,
   per base, then over bases. And Gao et al.'s forms fitted by least squares per objective, schedule and base, with
   the score at d = 0 a free intercept R0 (the instrument reads after steps, never at the SFT model itself):
       RL          R(d) = R0 + d(α − β log d)     the fitted curve peaks at d* = exp(α/β − 1) when β > 0
       best-of-n   R(d) = R0 + d(α − β d)         it peaks at d* = α / 2β when α, β > 0
2. Forgetting against KL (Shenfeld et al. 2025, "RL's Razor": forgetting follows one law in KL whatever the
   algorithm, and on-policy RL forgets less because it reaches its gain at a smaller KL). Every schedule's final
   model: its tax (the SFT model's IFA score minus its own, on the test prompts) against its KL from the SFT model on
   the same prompts (train.py's kl_sft; KL(π‖π_SFT) sampled from π, where they measure KL(π_SFT‖π) on the new task's
   inputs: the test prompts are drawn as the HPA prompts are). Pearson's r per base and its interval over bases
   (the base is the unit of replication), on the trained models (averaged ones move KL and tax together by
   construction); and whether one line holds for every objective: each objective's tax minus what the other
   objectives' line gives at its KL.
"""
import argparse
import json
import math
import os
import statistics
import sys

import numpy as np

from infra.rundir import read_metrics
from lab.protocol import run_all
from lab.report import ci, pooled

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
OBJECTIVES = {  # name -> its train.py flags and schedules
    "dpo": (["--algo", "dpo"], "two-stage,hbat,multi-task,rpo,alright,averaged"),
    "ppo_textbook": (["--algo", "ppo", "--ppo-variant", "textbook"], "two-stage,hbat,averaged"),
    "ppo_release": (["--algo", "ppo", "--ppo-variant", "release"], "two-stage,hbat,averaged"),
    "ppo_grpo": (["--algo", "ppo", "--ppo-variant", "grpo"], "two-stage,hbat,averaged"),
}
SHARED = ("two-stage", "hbat")  # the schedules every objective runs
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
    for r in read_metrics(os.path.join(out, "metrics.jsonl")):
        if "overopt/kl" in r:
            readings.setdefault(r["schedule"], []).append({"step": r["step"], "stage_index": r["stage_index"]}
                                                          | {k.split("/")[1]: v for k, v in r.items()
                                                             if k.startswith("overopt/")})
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
    """Least squares of y = R0 + α d − β·FORMS[form](d): {"r0", "alpha", "beta", "beta_se", "r2", "peak"}. beta_se is
    β's ordinary least-squares standard error (readings along one run are correlated, so it is optimistic); peak is
    the d where the fitted curve is highest, given only where the curve turns down clearly (β > 2 standard errors)
    and that d lies within the readings' range, else None."""
    d, y = np.asarray(d, float), np.asarray(y, float)
    X = np.stack([np.ones_like(d), d, -FORMS[form](d)], 1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    r0, alpha, beta = (float(c) for c in coef)
    residual = float(((y - X @ coef) ** 2).sum())
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - residual / ss if ss > 0 else float("nan")
    cov = residual / max(len(d) - 3, 1) * np.linalg.pinv(X.T @ X)
    beta_se = float(math.sqrt(max(cov[2, 2], 0.0)))
    peak = None
    if beta > 2 * beta_se and beta > 0 and (form == "rl" or alpha > 0):
        log_peak = alpha / beta - 1 if form == "rl" else math.log(alpha / (2 * beta))
        if math.log(max(d.min(), 1e-300)) <= log_peak <= math.log(max(d.max(), 1e-300)):
            peak = math.exp(log_peak)
    return {"r0": r0, "alpha": alpha, "beta": beta, "beta_se": beta_se, "r2": r2, "peak": peak}


def d_of(readings):
    return [math.sqrt(max(r["kl_sft"], 0.0)) for r in readings]


def change(readings, score):
    """The score's mean over the last quarter of the readings minus its mean over the first quarter: how far it moved
    along the HPA stages, without a model of the curve."""
    q = max(1, len(readings) // 4)
    return statistics.mean(r[score] for r in readings[-q:]) - statistics.mean(r[score] for r in readings[:q])


def fits(d):
    """{objective: {schedule: {"gold"|"proxy": {form: [the fit on each base], "change": [change() per base]}}}}."""
    out = {}
    for b in d["bases"]:
        for name, run in b["runs"].items():
            for schedule, rs in run["readings"].items():
                for score in ("gold", "proxy"):
                    if score in rs[0]:
                        by = out.setdefault(name, {}).setdefault(schedule, {}).setdefault(score, {})
                        by.setdefault("change", []).append(change(rs, score))
                        for form in FORMS:
                            by.setdefault(form, []).append(fit(d_of(rs), [r[score] for r in rs], form))
    return out


def points(d, only_trained=True):
    """Every final model: (base, objective, schedule, KL from SFT, tax); without the averaged ones unless asked (an
    interpolation between SFT and two-stage moves its KL and its tax together by construction)."""
    return [(b["world_seed"], name, schedule, m["kl_sft"], run["sft_ifa"] - m["ifa_score"])
            for b in d["bases"] for name, run in b["runs"].items() for schedule, m in run["final"].items()
            if trained(schedule) or not only_trained]


def pearson(xs, ys):
    return float(np.corrcoef(xs, ys)[0, 1])


def trained(schedule):
    return not schedule.startswith("averaged")


def fisher_z(r):
    return math.atanh(max(-1 + 1e-12, min(1 - 1e-12, r)))  # finite at r = ±1


def mean_r(rs):
    """(mean, lo, hi) of correlations over bases: the t-interval of their Fisher z, transformed back into [−1, 1]."""
    m, lo, hi = ci([fisher_z(r) for r in rs])
    return math.tanh(m), math.tanh(lo), math.tanh(hi)


def forgetting(d):
    """The numbers of forgetting against KL, on the trained models: Pearson's r per base (and with the averaged
    models), r pooled over every base with its Fisher-z interval, the pooled line; and per objective, on each base,
    the mean of its models' tax minus what a line through the other objectives' models gives at their KL, over those
    of its models whose KL lies within the others' range (no extrapolation), like for like: only the schedules every
    objective runs (SHARED; DPO's others add an IFA loss to the preference stage): does one line hold for every
    objective?"""
    pts, all_pts = points(d), points(d, only_trained=False)
    per_base, with_averaged, residual = [], [], {name: [] for name in OBJECTIVES}
    for b in d["bases"]:
        mine = [p for p in pts if p[0] == b["world_seed"]]
        per_base.append(pearson([p[3] for p in mine], [p[4] for p in mine]))
        every = [p for p in all_pts if p[0] == b["world_seed"]]
        with_averaged.append(pearson([p[3] for p in every], [p[4] for p in every]))
        shared = [p for p in mine if p[2] in SHARED]
        for name in OBJECTIVES:
            others = [p for p in shared if p[1] != name]
            slope, icept = np.polyfit([p[3] for p in others], [p[4] for p in others], 1)
            lo, hi = min(p[3] for p in others), max(p[3] for p in others)
            inside = [p[4] - (icept + slope * p[3]) for p in shared if p[1] == name and lo <= p[3] <= hi]
            if inside:
                residual[name].append(statistics.mean(inside))
    r = pearson([p[3] for p in pts], [p[4] for p in pts])
    z, half = fisher_z(r), 1.96 / math.sqrt(len(pts) - 3)
    slope, icept = np.polyfit([p[3] for p in pts], [p[4] for p in pts], 1)
    return {"n": len(pts), "r_per_base": per_base, "r_with_averaged": with_averaged, "r_pooled": r,
            "r_pooled_ci": (math.tanh(z - half), math.tanh(z + half)), "slope": float(slope),
            "intercept": float(icept), "residual": residual}


NAMES = {"dpo": "DPO", "ppo_textbook": "PPO (textbook)", "ppo_release": "PPO (release)", "ppo_grpo": "GRPO"}


def overopt_table(d):
    """Markdown: per objective and schedule, how gold and proxy moved along the HPA stages (pooled over bases, with
    the t-interval over bases), and the RL form's fit to the gold readings (means over bases)."""
    lines = ["| objective | schedule | readings per base | gold, last quarter − first | proxy, last quarter − first "
             "| gold fit, RL form: α, β, R² (best-of-n form's R²) | bases where the fitted gold curve peaks inside the readings "
             "(median √KL there) |", "|---|---|---|---|---|---|---|"]
    for name, sch in fits(d).items():
        for schedule, by in sch.items():
            n = statistics.mean(len(b["runs"][name]["readings"].get(schedule, [])) for b in d["bases"])
            g, bon = by["gold"]["rl"], by["gold"]["bon"]
            peaks = [x["peak"] for x in g if x["peak"] is not None]
            proxy = pooled(by["proxy"]["change"], signed=True) if "proxy" in by else "–"
            lines.append(f"| {NAMES[name]} | {schedule} | {n:.0f} | {pooled(by['gold']['change'], signed=True)} | "
                         f"{proxy} | {statistics.mean(x['alpha'] for x in g):+.2f}, "
                         f"{statistics.mean(x['beta'] for x in g):+.2f}, {r2(g)} ({r2(bon)}) | {len(peaks)} of {len(g)}"
                         + (f" ({statistics.median(peaks):.2f})" if peaks else "") + " |")
    return "\n".join(lines)


def r2(fs):
    values = [x["r2"] for x in fs if not math.isnan(x["r2"])]
    return f"{statistics.mean(values):.2f}" if values else "–"


def forgetting_table(d):
    """Markdown: every final model's KL from SFT and tax, as means over bases, per objective and schedule."""
    pts = points(d, only_trained=False)
    lines = ["| objective | schedule | KL from SFT (nats per answer) | tax (IFA score lost) |", "|---|---|---|---|"]
    for name in OBJECTIVES:
        for schedule in dict.fromkeys(p[2] for p in pts if p[1] == name):
            mine = [p for p in pts if p[1] == name and p[2] == schedule]
            lines.append(f"| {NAMES[name]} | {schedule} | {statistics.mean(p[3] for p in mine):.1f} | "
                         f"{statistics.mean(p[4] for p in mine):+.3f} |")
    return "\n".join(lines)


def direction(per_base, up, down, flat):
    """up, down or flat by the 95% t-interval over bases of per-base values (flat with one base: no interval)."""
    if len(per_base) < 2:
        return flat
    _, lo, hi = ci(per_base)
    return up if lo > 0 else down if hi < 0 else flat


def answers(d):
    """The question's answers, in sentences computed from the file; a direction is claimed only where its 95%
    interval over bases excludes zero."""
    fo, f, nb = forgetting(d), fits(d), len(d["bases"])
    overopt = [f"{NAMES[n]} {s}" for n, sch in f.items() for s, by in sch.items() if "proxy" in by
               and direction(by["gold"]["change"], 1, -1, 0) == -1 and direction(by["proxy"]["change"], 1, -1, 0) == 1]
    falls, rises = ([f"{NAMES[n]} {s}" for n, sch in f.items() for s, by in sch.items()
                     if direction(by["gold"]["change"], 1, -1, 0) == sign] for sign in (-1, 1))
    m, lo, hi = mean_r(fo["r_per_base"])
    ma, loa, hia = mean_r(fo["r_with_averaged"])
    plo, phi = fo["r_pooled_ci"]
    relation = direction([fisher_z(r) for r in fo["r_per_base"]], "rises with", "falls with",
                         "shows no relation at this power to")
    laws = "; ".join(f"{NAMES[n]} {pooled(v, signed=True)}" + (f" ({len(v)} of {nb} bases)" if len(v) < nb else "")
                     for n, v in fo["residual"].items() if v)
    beyond = [NAMES[n] for n, v in fo["residual"].items() if not v]
    apart = [NAMES[n] for n, v in fo["residual"].items() if len(v) > 1 and direction(v, 1, -1, 0) != 0]
    return "\n".join([
        "- **Over-optimisation.** The reward model's score rises along the HPA stages while the gold score falls, "
        "both intervals over bases excluding zero (last quarter of the readings against the first, §8.1), with: "
        + (", ".join(overopt) or "no objective and schedule") + ". The gold score falls measurably with: "
        + (", ".join(falls) or "none") + "; it rises measurably with: " + (", ".join(rises) or "none") + ".",
        f"- **Forgetting against KL.** Over the {fo['n']} trained final models ({nb} bases; every objective and "
        f"schedule), the tax {relation} the KL from SFT: Pearson's r = {m:+.2f} ({lo:+.2f} to {hi:+.2f}) over bases "
        f"(with the averaged models too: {ma:+.2f}, {loa:+.2f} to {hia:+.2f}); pooled, r = {fo['r_pooled']:+.2f} "
        f"({plo:+.2f} to {phi:+.2f}, as if the models were independent), on the line tax = {fo['intercept']:+.3f} "
        f"{fo['slope']:+.4f} · KL (§8.2).",
        "- **One line for every objective?** Each objective's two-stage and Hbat models: their tax minus what the "
        f"other objectives' two-stage and Hbat models' line gives at their KL, within that line's range of KL: {laws}"
        + (f" ({', '.join(beyond)}: no model within the others' range of KL)" if beyond else "") + ". " + (
            ("Off the line, the interval excluding zero: " + ", ".join(apart) + ".") if apart else
            f"No objective's interval excludes zero: at this power ({nb} bases) one line for every objective is not "
            "rejected" + (" (point estimates: " + ", ".join(f"{NAMES[n]} {'above' if statistics.mean(v) > 0 else 'below'}"
                                                           for n, v in fo["residual"].items() if v) + ")" if laws else "")
            + "."),
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
            else:  # DPO: no reward model to score its answers
                ax.text(0.5, 0.5, f"{NAMES[name]} has no reward model", ha="center", transform=ax.transAxes)
                ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "overopt.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 5))
    markers = dict(zip(OBJECTIVES, "osD^"))
    every = points(d, only_trained=False)
    for _, name, schedule, kl, tax in every:
        ax.plot(kl, tax, markers[name], color=color(schedule), ms=6, mfc="none" if not trained(schedule) else None)
    fo = forgetting(d)
    xs = np.linspace(0, max(p[3] for p in every), 50)
    ax.plot(xs, fo["intercept"] + fo["slope"] * xs, "k--", lw=1,
            label=f"line through the trained models, pooled r = {fo['r_pooled']:+.2f}")
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
    p.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="the base models")
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
