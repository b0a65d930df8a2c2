"""
The small-scale study: Hbat against two-stage over seeds, and the ablations of the paper's §4, on the embedded world.

    python -m lab.study --algo dpo --seeds 0 1 2              # main comparison at c = 0.5 and c = 0, then ablations
    python -m lab.study --algo ppo --seeds 0 1 2 --only main  # just the main comparison
    python -m lab.study --algo dpo --seeds 0 --only main --dry   # print the train.py commands, run nothing
    python -m lab.study --algo dpo --world-seed 1 --taxes 0.5 --only main   # another world, and so another base
    python -m lab.study --algo ppo --ifa-styled 0.1 --taxes 0.5 --only main  # 10% of demonstrations in the style
    python -m lab.study --algo ppo --ppo-variant release --taxes 0.5 --only main  # the PPO of the paper's release
    python -m lab.study --algo dpo --seeds 0 1 2 3 4 --report    # tables and plots from the runs finished so far

Each setting is one `train.py` run in its own --out (so an interrupted study resumes where it stopped, run by run
and stage by stage; a finished run's results.json is read, not run again: --rerun). Every ablation is compared with
the two-stage run of the same seed and c. Writes
OUT/STUDY.md (mean ± std over seeds of IFA score, HPA score and the gold win rate against two-stage, and the 95%
t-interval of the mean win rate) and, when
matplotlib is installed, OUT/curves.png (IFA and HPA scores over training steps, the paper's Figure 5) and
OUT/sweeps.png (the N, F_max and F_max_ifa sweeps, its Figure 2).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import world
from infra import pictures
from lab import report
from infra.flags import get_args

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")

# (name, extra train.py flags) for each ablation; every one runs the hbat schedule only
ABLATIONS = (
    [(f"N={n}", ["--n-splits", str(n)]) for n in (1, 2, 8)]                          # N = 4: the main runs
    + [(f"F_max={f}", ["--f-max", str(f)]) for f in (0, 0.1, 0.3, 3, 10)]             # HPA stages (IFA's at 10)
    + [(f"F_max_ifa={f}", ["--f-max-ifa", str(f)]) for f in (0, 1, 100)]              # IFA stages (HPA's at 1)
    + [(f"ewc={e}", ["--ewc", e]) for e in ("none", "original", "freeze", "random")]
    + [("norm=softmax(s=1e10)", ["--ewc-norm", "softmax", "--ewc-scale", "1e10"]),
       ("elementwise", ["--ewc-elementwise"])]
    + [("critic-restart", ["--critic-restart"])]                                     # textbook PPO: a fresh critic per stage
    + [("absolute-positions", ["--release-absolute-positions"])]                     # the release's PPO: its γ quirk
)
ONLY = {"critic-restart": ("ppo", "textbook"), "absolute-positions": ("ppo", "release")}  # (algo, PPO variant)
# The protection methods each at its own best strength: the same grid of multipliers of each method's strength knob
# (F_max and F_max_ifa together; λ for original EWC, whose penalty is linear in it), hbat only, as ablations named
# "<method>x<multiplier>". uniform is the control: modified's total weight Σ_n F_n spread equally over the tensors.
METHODS = {"modified": [], "uniform": ["--ewc", "uniform"], "softmax(s=1e10)": ["--ewc-norm", "softmax",
           "--ewc-scale", "1e10"], "elementwise": ["--ewc-elementwise"], "original": ["--ewc", "original"],
           "random": ["--ewc", "random"]}
MULTIPLIERS = (0.1, 0.3, 1, 3, 10, 30, 100)


def strength_flags(method, x):
    if x == 1:  # the method's own default strength
        return METHODS[method]
    if method == "original":
        return METHODS[method] + ["--ewc-lambda", f"{x:g}"]
    return METHODS[method] + ["--f-max", f"{x:g}", "--f-max-ifa", f"{10 * x:g}"]  # the defaults are 1 and 10


ABLATIONS += tuple((f"{m}x{x:g}", strength_flags(m, x)) for m in METHODS for x in MULTIPLIERS
                   if (m, x) != ("modified", 1))  # modified at x1 is the main runs' hbat


def run(args, out, flags):
    cmd = [sys.executable, TRAIN, "--algo", args.algo, "--out", out, "--preset", args.preset,
           "--world-seed", str(args.world_seed)]
    cmd += ["--ifa-styled", str(args.ifa_styled)] if args.ifa_styled is not None else []
    cmd += ["--ppo-variant", args.ppo_variant] if args.ppo_variant != "textbook" else []
    cmd += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    cmd += flags
    path = os.path.join(out, "results.json")
    if not args.report:
        print(" ".join(cmd), flush=True)
        if args.dry:
            return None
        if args.rerun or not os.path.exists(path):  # else a finished run: read it
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if args.quiet else None)
    if not os.path.exists(path):  # --report: not finished yet
        return None
    with open(path) as f:
        return json.load(f)


def responses(out, schedule):
    with open(os.path.join(out, f"{schedule}.responses.jsonl")) as f:
        return [json.loads(line) for line in f]


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def interval(xs):
    """The 95% t-interval of the mean of xs (seeds are few: a normal interval would be too narrow)."""
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return "-"
    _, lo, hi = report.ci(xs)  # beyond 11 seeds t(df = 10): slightly wider than the exact interval
    return f"{lo:.2f} to {hi:.2f}"


def total_weights(res, schedule="hbat"):
    """The penalty's strength in a run: Σ_n F_n (results.json's ewc_total_weight) averaged over the schedule's
    penalised HPA stages and over its penalised IFA stages."""
    stages = [st for st in res["schedules"][schedule]["stages"] if "ewc_total_weight" in st]
    return {f"weight_{kind}": statistics.mean(st["ewc_total_weight"] for st in stages if st["kind"] == kind)
            for kind in ("hpa", "ifa") if any(st["kind"] == kind for st in stages)}


def strength_table(rows, c):
    """Each protection method (a row) at each multiplier of its strength (a column): the mean win rate against
    two-stage over seeds, its best multiplier in bold; and Σ_n F_n at x1 in HPA and IFA stages."""
    lines = ["| method | " + " | ".join(f"x{x:g}" for x in MULTIPLIERS) + " | seeds | Σ F at x1, HPA / IFA stages |",
             "|---|" + "---|" * (len(MULTIPLIERS) + 2)]
    for method in METHODS:
        keys = [f"c={c} hbat" if (method, x) == ("modified", 1) else f"c={c} hbat {method}x{x:g}" for x in MULTIPLIERS]
        wins = [[w for _, w in rows.get(k, []) if w is not None] for k in keys]
        means = [statistics.mean(w) if w else None for w in wins]
        best = max((m for m in means if m is not None), default=None)
        cells = ["-" if m is None else f"**{m:.3f}**" if m == best else f"{m:.3f}" for m in means]
        at1 = [m for m, _ in rows.get(keys[MULTIPLIERS.index(1)], [])]
        weight = " / ".join(f"{statistics.mean(m[k] for m in at1):.2f}" if at1 and all(k in m for m in at1)
                            else "-" for k in ("weight_hpa", "weight_ifa"))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {min(map(len, wins))}-{max(map(len, wins))} | "
                     f"{weight} |")
    return "\n".join(lines)


def pooled(roots, versus=None):
    """Over base models (one study root per world): for every setting that all roots hold, the win rate against
    two-stage per base (mean over its seeds), then pooled with the base as the unit of replication: the mean of the
    per-base means and its 95% t-interval over bases; beside it the mean and interval over every run, and the mean
    metrics over every run. With `versus` (a setting), also the paired difference of win rates, setting − versus,
    on the same base and seed, pooled over bases."""
    studies = []
    for root in roots:
        with open(os.path.join(root, "STUDY.json")) as f:
            studies.append(json.load(f))
    keys = ("ifa_score", "hpa_score", "rm_score", "styled", "length")
    lines = ["| setting | " + " | ".join(f"base {i}" for i in range(len(roots))) + " | pooled over bases (95% CI) | "
             "over all runs (95% CI) | " + " | ".join(keys) + " |" + (f" paired − {versus} (95% CI) |" if versus else ""),
             "|---|" + "---|" * (len(roots) + 2 + len(keys) + bool(versus))]
    for setting in [s for s in studies[0] if all(s in st for st in studies[1:])]:
        runs = [st[setting] for st in studies]
        every = [r for rs in runs for r in rs]
        wins = [[r["win"] for r in rs if r["win"] is not None] for rs in runs]
        means = [statistics.mean(w) for w in wins if w]
        cells = [f"{statistics.mean(w):.3f} ({len(w)})" if w else "-" for w in wins]
        cells += [f"{statistics.mean(means):.3f} ({interval(means)})" if len(means) == len(roots) else "-"]
        flat = [w for ws in wins for w in ws]
        cells += [f"{statistics.mean(flat):.3f} ({interval(flat)})" if flat else "-"]
        cells += [f"{statistics.mean(r[k] for r in every):.3f}" if all(k in r for r in every) else "-" for k in keys]
        if versus:
            diffs = []
            for st in studies:
                ref = {r["seed"]: r["win"] for r in st.get(versus, []) if r["win"] is not None}
                d = [r["win"] - ref[r["seed"]] for r in st[setting] if r["win"] is not None and r["seed"] in ref]
                diffs += [statistics.mean(d)] if d else []
            cells += [f"{statistics.mean(diffs):+.3f} ({interval(diffs)})" if len(diffs) == len(roots) else "-"]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(rows):
    """rows: {setting: [(metrics, win rate vs two-stage), one per seed]} -> markdown table."""
    lines = ["| setting | seeds | IFA score | HPA score | styled | no EOS | win rate vs two-stage | its 95% CI |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        ms = [m for m, _ in runs]
        lines.append(f"| {name} | {len(runs)} | {mean_std([m['ifa_score'] for m in ms])} | "
                     f"{mean_std([m['hpa_score'] for m in ms])} | {mean_std([m.get('styled') for m in ms])} | "
                     f"{mean_std([m['no_eos'] for m in ms])} | {mean_std([w for _, w in runs])} | "
                     f"{interval([w for _, w in runs])} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--algo", choices=["dpo", "ppo"], default="dpo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--taxes", type=float, nargs="+", default=[0.5, 0.0], help="annotator-bias knob c values")
    p.add_argument("--only", choices=["main", "ablations", "all"], default="all")
    p.add_argument("--schedules", help="train.py --schedule of the main runs (default: two-stage,hbat,multi-task "
                   "with dpo, two-stage,hbat with ppo); e.g. add averaged,rpo,alright")
    p.add_argument("--ablations", nargs="+", metavar="NAME", choices=[name for name, _ in ABLATIONS] + ["strengths"],
                   help="run only these ablations (default: all but the strength grid; 'strengths': the grid of "
                   "every protection method at every multiplier)")
    p.add_argument("--preset", default="default")
    p.add_argument("--world-seed", type=int, default=0, help="the embedded world (and so the base model pretrained "
                   "on its corpus); the seeds vary only training")
    p.add_argument("--out", default=None, help="default: runs/study_<algo>")
    p.add_argument("--eval-every", type=int, default=10, help="steps between mid-run evaluations (Figure 5)")
    p.add_argument("--dry", action="store_true", help="print the commands only")
    p.add_argument("--report", action="store_true", help="run nothing: write the tables and plots from the runs "
                   "that have finished")
    p.add_argument("--quiet", action="store_true", help="hide train.py's output")
    p.add_argument("--ifa-styled", type=float, default=None, help="train.py --ifa-styled: share of demonstrations "
                   "written in the style (default: train.py's, 0 for dpo and 0.1 for ppo)")
    p.add_argument("--cache-dir", help="train.py --cache-dir (default: train.py's)")
    p.add_argument("--ppo-variant", choices=["textbook", "release"], default="textbook", help="train.py --ppo-variant")
    p.add_argument("--rerun", action="store_true", help="call train.py for finished runs too (it resumes: only "
                   "their evaluation is repeated); by default their results.json is read")
    p.add_argument("--pool", nargs="+", metavar="ROOT", help="run nothing: pool the finished studies of several "
                   "base models (their OUT directories, each with its STUDY.json) with the base as the unit")
    p.add_argument("--versus", help="--pool: also the paired difference of each setting's win rate to this one's")
    args = p.parse_args()
    if args.pool:
        return print(pooled(args.pool, args.versus))
    if args.ppo_variant != "textbook" and args.algo != "ppo":
        p.error("--ppo-variant applies to --algo ppo")
    root = args.out or (f"runs/study_{args.algo}" + ("_release" if args.ppo_variant == "release" else "")
                        + (f"_world{args.world_seed}" if args.world_seed else "")
                        + (f"_styled{args.ifa_styled}" if args.ifa_styled is not None else ""))
    os.makedirs(root, exist_ok=True)
    table, main_runs = {}, {}
    for c in args.taxes:
        for seed in args.seeds:
            out = f"{root}/main_c{c}_s{seed}"
            schedules = args.schedules or ("two-stage,hbat,multi-task" if args.algo == "dpo" else "two-stage,hbat")
            res = run(args, out, ["--seed", str(seed), "--annotator-bias", str(c), "--schedule", schedules,
                                  "--eval-every", str(args.eval_every)])
            if res is None:
                continue
            main_runs[(c, seed)] = out
            for name, r in res["schedules"].items():
                win = res["win_rates"].get(f"{name}_vs_two-stage")
                table.setdefault(f"c={c} {name}", []).append((r["metrics"] | total_weights(res, name) | {"seed": seed},
                                                              win))
            sft = res["schedules"]["two-stage"]["stages"][0]
            table.setdefault(f"c={c} SFT only (after IFA)", []).append((sft.get("eval", {}) | {"seed": seed}, None))
    if args.only in ("ablations", "all"):
        c = args.taxes[0]
        grid = {name for name, _ in ABLATIONS[-len(METHODS) * len(MULTIPLIERS) + 1:]}
        for name, flags in ABLATIONS:
            wanted = (name in args.ablations or ("strengths" in args.ablations and name in grid)) if args.ablations \
                else name not in grid
            if not wanted or ONLY.get(name, (args.algo, args.ppo_variant)) != (args.algo, args.ppo_variant):
                continue
            for seed in args.seeds:
                out = f"{root}/abl_{name.replace('=', '').replace('(', '').replace(')', '')}_c{c}_s{seed}"
                res = run(args, out, ["--seed", str(seed), "--annotator-bias", str(c), "--schedule", "hbat"] + flags)
                if res is None or (c, seed) not in main_runs:
                    continue
                test = responses(main_runs[(c, seed)], "two-stage")
                win = world.win_rate(test, [r["response"] for r in responses(out, "hbat")],
                                     [r["response"] for r in test])
                table.setdefault(f"c={c} hbat {name}", []).append((res["schedules"]["hbat"]["metrics"]
                                                                   | total_weights(res) | {"seed": seed}, win))
    if args.dry:
        return
    with open(os.path.join(root, "STUDY.json"), "w") as f:  # what --pool reads
        json.dump({setting: [m | {"win": w} for m, w in runs] for setting, runs in table.items()}, f)
    report = summarise(table)
    if args.ablations and "strengths" in args.ablations:
        report += "\n\n" + strength_table(table, args.taxes[0])
    with open(os.path.join(root, "STUDY.md"), "w") as f:
        f.write(f"# Study: {args.algo} ({args.ppo_variant}), world {args.world_seed}, --ifa-styled {args.ifa_styled}, "
                f"seeds {args.seeds}\n\n{report}\n")
    print(report)
    plot(root, main_runs, table, args.taxes[0])


def plot(root, main_runs, table, c):
    """curves.png: IFA and HPA score over optimizer steps, mean over seeds with a ±std band, per schedule and c.
    sweeps.png: for N, F_max and F_max_ifa, hbat's IFA score, HPA score and win rate against two-stage (mean ± std
    over seeds; the default value is the main runs), with two-stage's mean (and a 0.5 win rate) dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: tables written, no plots")
        return
    curves = {}  # (schedule, c) -> {step: [(ifa, hpa), one per seed]}
    for (c_run, seed), out in main_runs.items():
        with open(os.path.join(out, "metrics.jsonl")) as f:
            for r in (json.loads(line) for line in f if '"eval/ifa_score"' in line):
                curves.setdefault((r["schedule"], c_run), {}).setdefault(r["step"], []).append(
                    (r["eval/ifa_score"], r["eval/hpa_score"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {name: pictures.color(name) for name, _ in curves}  # one colour per schedule in every figure
    for (name, c_run), by_step in sorted(curves.items()):
        steps = sorted(by_step)
        for ax, j in zip(axes, (0, 1)):
            ys = [[v[j] for v in by_step[s]] for s in steps]
            mean = [statistics.mean(y) for y in ys]
            std = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
            line, = ax.plot(steps, mean, "-" if c_run == c else "--", color=colors[name],
                            label=f"{name} c={c_run} ({len(ys[0])} seeds)")
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
    for ax, title in zip(axes, ("IFA score (content)", "HPA score (gold reward)")):
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "curves.png"), dpi=120)

    defaults = get_args([])  # the defaults the main runs used: the point every sweep passes through
    sweeps = [("N", "N=", defaults.n_splits), ("F_max (HPA stages)", "F_max=", defaults.f_max),
              ("F_max_ifa (IFA stages)", "F_max_ifa=", defaults.f_max_ifa)]
    main_key, two_stage = f"c={c} hbat", table.get(f"c={c} two-stage", [])
    sweeps = [s for s in sweeps if any(k.startswith(f"c={c} hbat {s[1]}") for k in table)]
    if not sweeps or main_key not in table:
        return
    fig, axes = plt.subplots(len(sweeps), 3, figsize=(13, 3.3 * len(sweeps)), squeeze=False)
    for row, (label, prefix, default) in zip(axes, sweeps):
        pts = sorted([(float(k.split(prefix)[1]), runs) for k, runs in table.items()
                      if k.startswith(f"c={c} hbat {prefix}")] + [(float(default), table[main_key])])
        xs = [x for x, _ in pts]
        for ax, key, title in zip(row, ("ifa_score", "hpa_score", None), ("IFA score", "HPA score", "win rate")):
            ys = [[m[key] for m, _ in runs] if key else [w for _, w in runs] for _, runs in pts]
            ax.errorbar(xs, [statistics.mean(y) for y in ys], [statistics.stdev(y) if len(y) > 1 else 0 for y in ys],
                        fmt="o-", capsize=3, color=pictures.color("hbat"), label="hbat")
            ref = statistics.mean(m[key] for m, _ in two_stage) if key and two_stage else 0.5 if not key else None
            if ref is not None:
                ax.axhline(ref, ls="--", color=pictures.color("two-stage") if key else "gray",
                           label="two-stage" if key else "tie")
            ax.set_xlabel(label)
            ax.set_title(f"{title} (c = {c})")
            if "F_max" in label:
                ax.set_xscale("symlog", linthresh=0.1)
                ax.set_xlim(0, 2 * max(xs))
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "sweeps.png"), dpi=120)


if __name__ == "__main__":
    main()
