"""
The study's protocol: every schedule tuned alike on validation prompts, then compared head to head on test prompts.

    python -m lab.protocol --algo dpo --world-seeds 0 1 2 3 4 --seeds 0 1 2 --jobs 2   # run (resumes), then collect
    python -m lab.protocol --algo dpo --world-seeds 0 1 2 --seeds 0 --ideal-chosen 0.2  # the world's thumb, lighter
    python -m lab.protocol --algo dpo --world-seeds 0 1 --seeds 0 --collect             # collect what has finished
    python -m lab.protocol --algo dpo --dry                                             # the train.py commands

The protocol is data, `KNOBS`: every schedule, the two-stage baseline included, has one declared knob and the same
number of settings (BUDGET): 1/3, 1 and 3 times the knob's default, or three points of a knob that lives in [0, 1].
Each setting of each schedule is one train.py run per base model (--world-seed) and training seed (--seed), in its
own --out, so an interrupted study resumes run by run. Then, per base:

1. two-stage's setting is the one whose validation answers win most often against two-stage at its default setting
   (its mean win rate over the base's seeds; the default itself scores 1/2);
2. every other schedule's setting is the one whose validation answers win most often against the tuned two-stage;
3. only then are the test prompts read: each tuned schedule's test metrics, the test win rate of every tuned
   schedule against every other (the head-to-head matrix), the averaged models' test metrics, each stage's gradient
   cosine at its start and end, and the examples each schedule trained on (equal data is counted, not assumed);
   and, selecting nothing, every schedule at its default setting against two-stage at its default: what one
   `train.py` run at its defaults prints, over bases and seeds.

Nothing is selected on the test prompts. `averaged` has no runs of its own: it interpolates the SFT model and the
tuned two-stage, so every two-stage run also evaluates the averaged models. Writes --json (default
results/protocol/<algo>[_<variant>][_ideal<share>].json), which `python -m lab.report` turns into tables.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ewc
import ppo
import world

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
BUDGET = 3  # settings per schedule
SCALE = (1 / 3, 1, 3)  # the settings of an unbounded knob, as multiples of its default


@dataclass(frozen=True)
class Knob:
    name: str          # what the report calls it
    flag: str          # the train.py flag it sets ("" for a strength that sets --f-max and --f-max-ifa together)
    settings: tuple    # BUDGET values
    default: float     # train.py's

    def flags(self, value):
        if self.flag == "":  # Hbat's penalty strength: both F_max together, at their default ratio
            return ["--f-max", f"{value * ewc.F_MAX:g}", "--f-max-ifa", f"{value * ewc.F_MAX_IFA:g}"]
        return [self.flag, f"{value:g}"]


def scaled(name, flag, default):
    return Knob(name, flag, tuple(round(default * x, 4) for x in SCALE), default)


def knobs(algo, variant="textbook"):
    """{schedule: its Knob}: the protocol of an --algo (and PPO variant)."""
    strength = Knob("penalty strength (× F_max and F_max_ifa)", "", tuple(round(x, 4) for x in SCALE), 1)
    averaged = Knob("α (in (1 − α)·SFT + α·two-stage)", "--average-alphas", (0.25, 0.5, 0.75), 1)
    if algo == "ppo":
        kl = ppo.VARIANTS[variant].get("kl_coef", ppo.PPOConfig.kl_coef)  # the variant's default KL weight
        return {"two-stage": scaled("KL weight", "--kl-coef", kl), "hbat": strength, "averaged": averaged}
    return {"two-stage": scaled("β", "--beta", 0.1), "hbat": strength, "multi-task": scaled("β", "--beta", 0.1),
            "rpo": scaled("α (NLL weight)", "--rpo-alpha", 1.0),
            "alright": Knob("λ (weight of a DPO step)", "--alright-lambda", (0.25, 0.5, 0.75), 0.5),
            "averaged": averaged}


def run_dir(root, world_seed, seed, schedule, value):
    return os.path.join(root, f"w{world_seed}", f"s{seed}", f"{schedule}_{value:g}")


def commands(args, protocol):
    """(out, train.py command) of every run, seed by seed, so that the first seeds of every base finish first."""
    base = [sys.executable, TRAIN, "--algo", args.algo, "--preset", args.preset]
    base += ["--ppo-variant", args.ppo_variant] if args.algo == "ppo" else []
    base += ["--ideal-chosen", str(args.ideal_chosen)] if args.ideal_chosen is not None else []
    base += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    alphas = ",".join(f"{a:g}" for a in protocol["averaged"].settings)
    runs = []
    for seed in args.seeds:
        for w in args.world_seeds:
            for schedule, knob in protocol.items():
                if schedule == "averaged":
                    continue
                extra = ["--schedule", "two-stage,averaged", "--average-alphas", alphas] if schedule == "two-stage" \
                    else ["--schedule", schedule]
                for value in knob.settings:
                    out = run_dir(args.root, w, seed, schedule, value)
                    runs.append((out, base + ["--world-seed", str(w), "--seed", str(seed), "--out", out]
                                 + extra + knob.flags(value)))
    return runs


def run_all(runs, jobs, quiet):
    """Every run not finished yet (no results.json), `jobs` at a time, each on one thread when jobs > 1."""
    env = os.environ | ({"OMP_NUM_THREADS": "1"} if jobs > 1 else {})

    def one(run):
        out, cmd = run
        if os.path.exists(os.path.join(out, "results.json")):
            return
        print(" ".join(cmd), flush=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(os.devnull, "w") if quiet else open(os.path.join(os.path.dirname(out), "log.txt"), "a") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, runs))  # the first failed run raises here


def rows(out, name, prefix=""):
    with open(os.path.join(out, f"{name}.{prefix}responses.jsonl")) as f:
        return [json.loads(line) for line in f]


def win(a, b):
    """The gold judge's win rate of answer rows a against answer rows b (the same prompts, in order)."""
    if [r["prompt"] for r in a] != [r["prompt"] for r in b]:
        raise ValueError("the two runs answered different prompts")
    return world.win_rate(a, [r["response"] for r in a], [r["response"] for r in b])


def finished(out):
    return os.path.exists(os.path.join(out, "results.json"))


def collect(args, protocol):
    """Choose every schedule's setting per base on the validation prompts, then read the test prompts (the module's
    docstring, steps 1-3). A base takes only the seeds whose runs have all finished; a base with no such seed is left
    out, and the JSON says which."""
    bases, left_out, cache = [], [], {}
    trained = [s for s in protocol if s != "averaged"]

    def read(out):  # every run's results.json, once
        if out not in cache:
            with open(os.path.join(out, "results.json")) as f:
                cache[out] = json.load(f)
        return cache[out]

    for w in args.world_seeds:
        seeds = [s for s in args.seeds if all(finished(run_dir(args.root, w, s, n, v))
                                              for n in trained for v in protocol[n].settings)]
        if not seeds:
            left_out.append(w)
            continue
        # (schedule, setting, seed) -> (run dir, the name of its answers there); averaged's once two-stage is tuned
        models = {(n, v, s): (run_dir(args.root, w, s, n, v), n) for n in trained for v in protocol[n].settings
                  for s in seeds}
        val_win, chosen = {}, {}

        def val_vs(key, ref):
            (out_a, name_a), (out_b, name_b) = key, ref
            return win(rows(out_a, name_a, "val_"), rows(out_b, name_b, "val_"))

        two = protocol["two-stage"]
        val_win["two-stage"] = {v: [val_vs(models[("two-stage", v, s)], models[("two-stage", two.default, s)])
                                    for s in seeds] for v in two.settings}
        chosen["two-stage"] = best(val_win["two-stage"], two.default)
        tuned_two = {s: models[("two-stage", chosen["two-stage"], s)] for s in seeds}
        for v in protocol["averaged"].settings:
            for s in seeds:
                models[("averaged", v, s)] = (tuned_two[s][0], f"averaged@{v:g}")
        for n in protocol:
            if n != "two-stage":
                val_win[n] = {v: [val_vs(models[(n, v, s)], tuned_two[s]) for s in seeds]
                              for v in protocol[n].settings}
                chosen[n] = best(val_win[n], protocol[n].default)
        per_seed = []
        for s in seeds:  # step 3: the test prompts, of the tuned schedules only
            tuned = {n: models[(n, chosen[n], s)] for n in protocol}
            res = {n: read(out) for n, (out, _) in tuned.items()}
            test = {n: rows(out, name) for n, (out, name) in tuned.items()}
            per_seed.append({
                "seed": s,
                "metrics": {n: res[n]["schedules"][name]["metrics"] for n, (_, name) in tuned.items()},
                "val_metrics": {n: res[n]["schedules"][name]["val_metrics"] for n, (_, name) in tuned.items()},
                "sft_metrics": res["two-stage"]["schedules"]["two-stage"]["stages"][0]["eval"],
                "h2h": {a: {b: win(test[a], test[b]) for b in protocol if b != a} for a in protocol},
                "averaged": {f"{v:g}": res["two-stage"]["schedules"][f"averaged@{v:g}"]["metrics"]
                             for v in protocol["averaged"].settings},
                "stages": {n: [{k: st[k] for k in ("name", "kind", "steps", "examples", "grad_cosine",
                                                   "grad_cosine_end") if k in st}
                               for st in res[n]["schedules"][name]["stages"]] for n, (_, name) in tuned.items()},
                "seconds": {n: res[n]["seconds"] for n in trained},
                # what `train.py` at its defaults prints: every trained schedule at its default setting, on test
                "defaults": {n: {"metrics": read(out)["schedules"][n]["metrics"],
                                 "win": win(rows(out, n), rows(*models[("two-stage", two.default, s)]))}
                             for n in trained for out, _ in [models[(n, protocol[n].default, s)]]}})
        seconds = sum(read(out)["seconds"] for (n, _, _), (out, _) in models.items() if n != "averaged")
        bases.append({"world_seed": w, "seeds": seeds, "chosen": chosen, "runs_seconds": seconds,
                      "val_win": {n: {f"{v:g}": ws for v, ws in by.items()} for n, by in val_win.items()},
                      "runs": per_seed})
    return {"algo": args.algo, "ppo_variant": args.ppo_variant if args.algo == "ppo" else None,
            "ideal_chosen": args.ideal_chosen, "preset": args.preset, "budget": BUDGET,
            "knobs": {n: {"name": k.name, "flag": k.flag or "--f-max, --f-max-ifa", "settings": list(k.settings),
                          "default": k.default} for n, k in protocol.items()},
            "bases": bases, "bases_left_out": left_out}


def best(by_setting, default):
    """The setting of the highest mean validation win rate; a tie goes to the default, then to the smaller."""
    return max(by_setting, key=lambda v: (statistics.mean(by_setting[v]), v == default, -v))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--algo", choices=["dpo", "ppo"], default="dpo")
    p.add_argument("--ppo-variant", choices=list(ppo.VARIANTS), default="textbook")
    p.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="the base models")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds per base")
    p.add_argument("--ideal-chosen", type=float, help="train.py --ideal-chosen (default: the world's, 0.7)")
    p.add_argument("--preset", default="default")
    p.add_argument("--cache-dir", help="train.py --cache-dir")
    p.add_argument("--root", help="where the runs go (default: runs/protocol_<name>)")
    p.add_argument("--json", help="what collect writes (default: results/protocol/<name>.json)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each on one thread when more than one")
    p.add_argument("--collect", action="store_true", help="run nothing: collect the finished runs")
    p.add_argument("--dry", action="store_true", help="print the train.py commands only")
    p.add_argument("--quiet", action="store_true", help="hide train.py's output (default: OUT/../log.txt)")
    args = p.parse_args(argv)
    if args.ppo_variant != "textbook" and args.algo != "ppo":
        p.error("--ppo-variant applies to --algo ppo")
    name = args.algo + (f"_{args.ppo_variant}" if args.algo == "ppo" else "") + (
        f"_ideal{args.ideal_chosen:g}" if args.ideal_chosen is not None else "") + (
        f"_{args.preset}" if args.preset != "default" else "")
    args.root = args.root or f"runs/protocol_{name}"
    protocol = knobs(args.algo, args.ppo_variant)
    runs = commands(args, protocol)
    if args.dry:
        return print("\n".join(" ".join(cmd) for _, cmd in runs))
    if not args.collect:
        run_all(runs, args.jobs, args.quiet)
    result = collect(args, protocol)
    if not result["bases"]:
        raise SystemExit(f"lab.protocol: no base has a seed with every run finished under {args.root}")
    path = args.json or f"results/protocol/{name}.json"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}: {len(result['bases'])} bases, left out {result['bases_left_out'] or 'none'}")


if __name__ == "__main__":
    main()
