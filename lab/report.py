"""
The numbers of README.md, docs/results.md and docs/lesson.md, from the committed result files of lab.protocol, of
lab.why (results/why/why.json) and of the lesson's runs (results/lesson/<name>.json: the results.json of
`train.py ... --out lesson/<name>`).

    python -m lab.report            # rewrite every generated block of README.md, docs/results.md, docs/lesson.md
    python -m lab.report --check    # exit 1 if a generated block differs from what the result files give

A generated block sits between `<!-- lab.report NAME -->` and `<!-- /lab.report -->` in a document; `BLOCKS` says
what fills each NAME, from which results/protocol/*.json. Nothing here runs a model: the tables are arithmetic on the
committed files, so anyone can check them, and tests/test_report.py does on every run of the tests.
"""
import argparse
import json
import os
import re
import statistics
import sys

import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # two-sided 95% t, df = 1..10
SHORT = {"two-stage": "two-stage", "hbat": "Hbat", "multi-task": "multi-task", "rpo": "RPO", "alright": "ALRIGHT",
         "averaged": "averaged"}


def load(name):
    with open(os.path.join(ROOT, "results", "protocol", f"{name}.json")) as f:
        return json.load(f)


def ci(per_base):
    """(mean, lo, hi): the mean of per-base values and its 95% t-interval over bases (infinite with one base)."""
    m = statistics.mean(per_base)
    half = T95[min(len(per_base), 11) - 2] * statistics.stdev(per_base) / len(per_base) ** 0.5 if len(per_base) > 1 \
        else float("inf")
    return m, m - half, m + half


def pooled(per_base, signed=False):
    """'mean (lo to hi)': the mean of per-base values and its 95% t-interval over bases (the base is the unit)."""
    fmt = "{:+.3f}" if signed else "{:.3f}"
    m, lo, hi = ci(per_base)
    return fmt.format(m) if len(per_base) < 2 else f"{fmt.format(m)} ({fmt.format(lo)} to {fmt.format(hi)})"


def base_mean(base, f):
    """The mean over a base's seeds of f(run)."""
    return statistics.mean(f(run) for run in base["runs"])


def over_bases(d, f):
    """The mean over bases of each base's mean of f(run): a pooled score."""
    return statistics.mean(base_mean(b, f) for b in d["bases"])


def objective(d):
    """What a study's HPA stages ran: "DPO", "PPO (textbook)", "PPO (release)" or "GRPO"."""
    if d["algo"] == "dpo":
        return "DPO"
    return "GRPO" if d["ppo_variant"] == "grpo" else f"PPO ({d['ppo_variant']})"


def schedules(d):
    return list(d["knobs"])


def header(d):
    seeds = sorted({len(b["seeds"]) for b in d["bases"]})
    worlds = ", ".join(str(b["world_seed"]) for b in d["bases"])
    text = (f"{objective(d)}, "
            f"{len(d['bases'])} bases (worlds {worlds}), "
            f"{seeds[0] if len(seeds) == 1 else f'{seeds[0]} to {seeds[-1]}'} seed{'s' if seeds != [1] else ''} each")
    if d["ideal_chosen"] is not None:
        text += f", --ideal-chosen {d['ideal_chosen']:g}"
    if d["bases_left_out"]:
        text += f"; left out, no seed with every run finished: worlds {', '.join(map(str, d['bases_left_out']))}"
    return text


def settings_table(d):
    """Each schedule's knob, its settings, and the setting chosen on each base's validation prompts."""
    runs = sum(len(b["seeds"]) for b in d["bases"]) * sum(len(k["settings"]) for n, k in d["knobs"].items()
                                                         if n != "averaged")
    hours = sum(b["runs_seconds"] for b in d["bases"]) / 3600
    lines = [f"Protocol: {header(d)}; {runs} train.py runs, {hours:.1f} hours of wall time in all (one thread each, "
             "two at a time on 2 cores).", "",
             "| schedule | knob | settings | chosen per base | bases chosen at an end of the grid | validation win "
             "rate of each setting, pooled |", "|---|---|---|---|---|---|"]
    for n, k in d["knobs"].items():
        chosen = " ".join(f"{b['chosen'][n]:g}" for b in d["bases"])
        wins = ", ".join(f"{v:g}: {statistics.mean(statistics.mean(b['val_win'][n][f'{v:g}']) for b in d['bases']):.3f}"
                         for v in k["settings"])
        ends = sum(b["chosen"][n] in (min(k["settings"]), max(k["settings"])) for b in d["bases"])
        lines.append(f"| {SHORT[n]} | {k['name']} (`{k['flag']}`) | {', '.join(f'{v:g}' for v in k['settings'])} "
                     f"| {chosen} | {ends} of {len(d['bases'])} | {wins} |")
    lines += ["", "The validation win rate is against two-stage at its default setting for two-stage itself, and "
              "against the tuned two-stage for every other schedule. A setting chosen at an end of its grid may not "
              "be the schedule's best: a wider grid could choose further out, for that schedule as for any other."]
    return "\n".join(lines)


def test_table(d):
    """The tuned schedules on the test prompts: scores, the win rate against the tuned two-stage, and the examples
    each trained on."""
    rows = [("SFT (two-stage's first stage)", lambda r: r["sft_metrics"], None)]
    lines = ["| schedule | IFA score | HPA score | styled | win rate vs two-stage, per base | pooled over bases "
             "(95% CI) | examples trained on |", "|---|---|---|---|---|---|---|"]
    for label, get, _ in rows:
        m = {k: over_bases(d, lambda r: get(r)[k]) for k in ("ifa_score", "hpa_score", "styled")}
        lines.append(f"| {label} | {m['ifa_score']:.3f} | {m['hpa_score']:.3f} | {m['styled']:.3f} | | | |")
    for n in schedules(d):
        m = {k: over_bases(d, lambda r: r["metrics"][n][k]) for k in ("ifa_score", "hpa_score", "styled")}
        examples = {sum(st["examples"] for st in r["stages"][n]) for b in d["bases"] for r in b["runs"]}
        if n == "two-stage":
            win = "| |"
        else:
            per = [base_mean(b, lambda r: r["h2h"][n]["two-stage"]) for b in d["bases"]]
            win = " ".join(f"{w:.3f}" for w in per) + f" | {pooled(per)} |"
        lines.append(f"| {SHORT[n]} | {m['ifa_score']:.3f} | {m['hpa_score']:.3f} | {m['styled']:.3f} | {win} "
                     f"{', '.join(map(str, sorted(examples))) if n != 'averaged' else '(two-stage and SFT)'} |")
    return "\n".join(lines)


def matrix(d):
    """The test win rate of every tuned schedule (row) against every other (column), pooled over bases."""
    names = schedules(d)
    lines = ["| row vs column | " + " | ".join(SHORT[n] for n in names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        cells = []
        for b in names:
            if a == b:
                cells.append("")
                continue
            per = [base_mean(base, lambda r: r["h2h"][a][b]) for base in d["bases"]]
            cells.append(pooled(per).replace(" (", "<br>(").replace(" to ", "–"))
        lines.append(f"| {SHORT[a]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gaps(d):
    """Measures that cannot fold: each schedule's paired IFA and HPA gaps against the tuned two-stage (per base,
    then pooled), and on how many bases an averaged model beats it on both axes."""
    lines = ["| schedule | IFA − two-stage, pooled (95% CI) | HPA − two-stage, pooled (95% CI) | bases where an "
             "averaged model beats it on both IFA and HPA |", "|---|---|---|---|"]
    for n in schedules(d):
        cells = []
        for k in ("ifa_score", "hpa_score"):
            per = [base_mean(b, lambda r: r["metrics"][n][k] - r["metrics"]["two-stage"][k]) for b in d["bases"]]
            cells.append("" if n == "two-stage" else pooled(per, signed=True))
        beaten = 0
        for b in d["bases"]:
            own = [base_mean(b, lambda r: r["metrics"][n][k]) for k in ("ifa_score", "hpa_score")]
            for alpha in b["runs"][0]["averaged"]:
                avg = [base_mean(b, lambda r: r["averaged"][alpha][k]) for k in ("ifa_score", "hpa_score")]
                if avg[0] > own[0] and avg[1] > own[1]:
                    beaten += 1
                    break
        lines.append(f"| {SHORT[n]} | {cells[0]} | {cells[1]} | {beaten} of {len(d['bases'])} |")
    alphas = ", ".join(d["bases"][0]["runs"][0]["averaged"])
    lines += ["", f"The averaged models are (1 − α)·SFT + α·tuned two-stage at α = {alphas}, each base's mean "
              "over its seeds against the schedule's; the count says whether any of them does better on both test "
              "scores, it chooses nothing."]
    return "\n".join(lines)


def cosines(d):
    """The IFA–DPO gradient cosine at the start and at the end of every stage of every tuned schedule."""
    lines = ["| schedule | stage: cosine at its start → at its end (mean over every run) |", "|---|---|"]
    for n in schedules(d):
        every = [r["stages"][n] for b in d["bases"] for r in b["runs"]]
        if n == "averaged" or not every[0] or "grad_cosine" not in every[0][0]:
            continue
        cells = [f"{sts[0]['name']} {statistics.mean(s['grad_cosine'] for s in sts):+.3f} → "
                 f"{statistics.mean(s['grad_cosine_end'] for s in sts):+.3f}" for sts in zip(*every)]
        lines.append(f"| {SHORT[n]} | " + ", ".join(cells) + " |")
    n_runs = sum(len(b["runs"]) for b in d["bases"])
    lines += ["", f"{n_runs} runs; the cosine is measured on the first 32 demonstrations and pairs (`--grad-probe`)."]
    return "\n".join(lines)


def sweep(main, lighter):
    """Each schedule's test win rate against the tuned two-stage as the share of ideal chosen answers falls, on the
    bases and seeds of the lighter worlds (the main study restricted to them)."""
    worlds = [b["world_seed"] for b in lighter[0]["bases"]]
    seeds = lighter[0]["bases"][0]["seeds"]
    restricted = dict(main, bases=[dict(b, runs=[r for r in b["runs"] if r["seed"] in seeds])
                                   for b in main["bases"] if b["world_seed"] in worlds])
    studies = [restricted] + lighter
    names = [n for n in schedules(main) if n != "two-stage"]
    lines = ["| chosen answers that are ideal | two-stage: IFA / HPA score | " + " | ".join(SHORT[n] for n in names)
             + " | chosen settings (two-stage first) |", "|---|" + "---|" * (len(names) + 2)]
    for d in studies:
        share = 0.7 if d["ideal_chosen"] is None else d["ideal_chosen"]
        two = {k: over_bases(d, lambda r: r["metrics"]["two-stage"][k]) for k in ("ifa_score", "hpa_score")}
        cells = [f"{two['ifa_score']:.3f} / {two['hpa_score']:.3f}"] + [
            pooled([base_mean(b, lambda r: r["h2h"][n]["two-stage"]) for b in d["bases"]]) for n in names]
        chosen = "; ".join(" ".join(f"{b['chosen'][n]:g}" for n in schedules(d)) for b in d["bases"])
        lines.append(f"| {share:g} | " + " | ".join(cells) + f" | {chosen} |")
    lines += ["", f"Win rates against the tuned two-stage on the test prompts, pooled over worlds "
              f"{', '.join(map(str, worlds))} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}), "
              "every schedule tuned again at each share (at 0.7, the main study's settings, chosen on the "
              "validation answers of all its seeds)."]
    return "\n".join(lines)


def verdict_of(per_base):
    """'beats' / 'loses to' where the 95% interval of the win rate over bases excludes a tie, else 'ties'."""
    _, lo, hi = ci(per_base)
    return "beats" if lo > 0.5 else "loses to" if hi < 0.5 else "ties"


def verdicts(d):
    """The verdicts the measurements carry, as sentences: every head-to-head classified by its interval over bases,
    the alignment tax, and whether every schedule trained on the same examples."""
    names = schedules(d)
    ifa = {n: over_bases(d, lambda r: r["metrics"][n]["ifa_score"]) for n in names}
    sft = over_bases(d, lambda r: r["sft_metrics"]["ifa_score"])
    lines = [f"- **The alignment tax**: the SFT model's IFA score is {sft:.3f}; the tuned two-stage ends at "
             f"{ifa['two-stage']:.3f}."]
    for a in names:
        by = {}
        for b in names:
            if b != a:
                by.setdefault(verdict_of([base_mean(x, lambda r: r["h2h"][a][b]) for x in d["bases"]]), []).append(b)
        vs_two = "" if a == "two-stage" else [k for k, v in by.items() if "two-stage" in v][0] + " two-stage, " + \
            pooled([base_mean(x, lambda r: r["h2h"][a]["two-stage"]) for x in d["bases"]])
        parts = [f"{k} {', '.join(SHORT[b] for b in by[k])}" for k in ("beats", "ties", "loses to") if k in by]
        lines.append(f"- **{SHORT[a]}** ({'the baseline' if a == 'two-stage' else vs_two}): "
                     + "; ".join(parts) + ".")
    examples = {n: {sum(st["examples"] for st in r["stages"][n]) for b in d["bases"] for r in b["runs"]}
                for n in names if n != "averaged"}
    same = len({e for es in examples.values() for e in es}) == 1
    lines.append("- **Equal data**: every trained schedule took "
                 + (f"the same {next(iter(examples['two-stage']))} examples (demonstrations, and pairs or PPO "
                    "prompts; repeats counted) in every run." if same else "different numbers of examples: "
                    + ", ".join(f"{SHORT[n]} {sorted(e)}" for n, e in examples.items()) + "."))
    lines += ["", f"A verdict is \"beats\" or \"loses to\" only where the 95% interval of the test win rate over the "
              f"{len(d['bases'])} bases excludes a tie; everything else is a tie at this power."]
    return "\n".join(lines)


def readme(d):
    """The README's table: each tuned schedule's setting per base, scores and win rate against the tuned two-stage;
    then the verdicts."""
    lines = [f"{header(d)}:", "", "| schedule | knob: setting chosen per base | IFA score | HPA score | win rate vs "
             "two-stage, pooled over bases (95% CI) |", "|---|---|---|---|---|"]
    sft = {k: over_bases(d, lambda r: r["sft_metrics"][k]) for k in ("ifa_score", "hpa_score")}
    lines.append(f"| SFT | | {sft['ifa_score']:.3f} | {sft['hpa_score']:.3f} | |")
    for n, k in d["knobs"].items():
        m = {key: over_bases(d, lambda r: r["metrics"][n][key]) for key in ("ifa_score", "hpa_score")}
        win = "" if n == "two-stage" else pooled([base_mean(b, lambda r: r["h2h"][n]["two-stage"]) for b in d["bases"]])
        chosen = " ".join(f"{b['chosen'][n]:g}" for b in d["bases"])
        lines.append(f"| {SHORT[n]} | {k['name'].split(' (')[0]}: {chosen} | {m['ifa_score']:.3f} "
                     f"| {m['hpa_score']:.3f} | {win} |")
    return "\n".join(lines) + "\n\n" + verdicts(d)


def default_range(d):
    """What `python train.py` at its defaults prints, as the range a user lands in: every base and seed of the study
    at the default settings (nothing tuned), two-stage and Hbat."""
    runs = [(b["world_seed"], r) for b in d["bases"] for r in b["runs"] if "defaults" in r]
    seeds = sorted({len(b["runs"]) for b in d["bases"]})

    def span(f):
        values = sorted(f(r) for _, r in runs)
        return f"{values[0]:.3f}–{values[-1]:.3f} (median {statistics.median(values):.3f})"
    sft = span(lambda r: r["sft_metrics"]["ifa_score"])
    lines = [f"Over the study's {len(runs)} default runs ({len({w for w, _ in runs})} bases × "
             f"{'-'.join(map(str, seeds))} seeds; `--world-seed`, `--seed`), the same command lands in:", "",
             "| row | IFA score | HPA score | tax | win rate vs two-stage |", "|---|---|---|---|---|",
             f"| SFT | {sft} | {span(lambda r: r['sft_metrics']['hpa_score'])} | | |"]
    for n in ("two-stage", "hbat"):
        m = lambda k: lambda r: r["defaults"][n]["metrics"][k]  # noqa: E731
        tax = span(lambda r: r["sft_metrics"]["ifa_score"] - r["defaults"][n]["metrics"]["ifa_score"])
        win = "" if n == "two-stage" else span(lambda r: r["defaults"][n]["win"])
        lines.append(f"| {n} | {span(m('ifa_score'))} | {span(m('hpa_score'))} | {tax} | {win} |")
    return "\n".join(lines)


def earlier(path):
    """{schedule: its pooled win rate against two-stage} from an earlier study's committed table (lab.study
    --alternatives, before the protocol): every schedule at its default setting, pooled as a difference from a tie."""
    with open(os.path.join(ROOT, path)) as f:
        rows = [line.strip("|\n").split("|") for line in f if line.startswith("| ")]
    rows = [r for r in rows if len(r) > 5 and r[0].strip() != "schedule"]
    return {r[0].strip(): 0.5 + float(r[5].split()[0]) for r in rows}


def moved(d, path):
    """Each schedule's pooled test win rate against two-stage before the protocol (defaults, no validation) and under
    it (every schedule tuned, two-stage too), on the same worlds."""
    before = earlier(path)
    lines = [f"| schedule | before: at its default, against two-stage at its default (`{path}`) | under the protocol: "
             "tuned, against the tuned two-stage | setting chosen per base |", "|---|---|---|---|"]
    for n in schedules(d):
        if n == "two-stage":
            continue
        old = before.get(n)
        per = [base_mean(b, lambda r: r["h2h"][n]["two-stage"]) for b in d["bases"]]
        chosen = " ".join(f"{b['chosen'][n]:g}" for b in d["bases"])
        then = "every α reported" if n == "averaged" else "-" if old is None else f"{old:.3f}"
        lines.append(f"| {SHORT[n]} | {then} | {pooled(per)} | {chosen} |")
    lines += ["", "Before, ALRIGHT alternated its steps in a fixed 1:1 order; now it draws them (λ = 1/2 is the same "
              "mix in a random order)."]
    return "\n".join(lines)


def answers(d, lighter, ppo=()):
    """The questions a reader asks, each answered first, in sentences computed from the result files."""
    def per_base(f):
        return [base_mean(b, f) for b in d["bases"]]

    def win(a, b):
        return per_base(lambda r: r["h2h"][a][b])

    tax = per_base(lambda r: r["sft_metrics"]["ifa_score"] - r["metrics"]["two-stage"]["ifa_score"])
    _, lo, hi = ci(tax)
    lines = [f"1. **Is there an alignment tax?** {'Yes' if lo > 0 else 'No' if hi < 0 else 'Not measurably'}: the "
             f"SFT model's IFA score minus the tuned two-stage's, paired per base, is {pooled(tax, signed=True)} "
             "(§2)."]
    v = verdict_of(win("hbat", "two-stage"))
    with_ppo = "; ".join(
        f"with {objective(p)} it {verdict_of(w)} two-stage, win rate {pooled(w)} over {len(p['bases'])} bases"
        f" (§3.2)"
        for p in ppo for w in [[base_mean(b, lambda r: r["h2h"]["hbat"]["two-stage"]) for b in p["bases"]]])
    lines.append(f"2. **Does Hbat beat two-stage?** With DPO, every schedule tuned alike: it {v} two-stage, win "
                 f"rate {pooled(win('hbat', 'two-stage'))} over {len(d['bases'])} bases (§3.1); " + (
                     with_ppo or "with PPO it has not been measured under the protocol yet (the earlier studies: "
                     "[results-earlier.md](results-earlier.md))") + ".")
    others = [n for n in schedules(d) if n != "two-stage"]
    beaten = {a: [b for b in schedules(d) if b != a and verdict_of(win(a, b)) == "beats"] for a in others}
    most = max(len(b) for b in beaten.values())
    tops = [a for a in others if len(beaten[a]) == most]
    lines.append("3. **Against the cheap alternatives?** " + ("No schedule beats another head to head" if not most else
                 "; ".join(f"{SHORT[a]} beats " + ", ".join(SHORT[b] for b in beaten[a]) for a in tops)
                 + f" head to head ({most} of {len(schedules(d)) - 1}), the most of any schedule")
                 + "; Hbat beats " + (", ".join(SHORT[b] for b in beaten["hbat"]) or "none") + " (§3.1, §5).")
    if d["algo"] == "dpo":
        every = [r["stages"] for b in d["bases"] for r in b["runs"]]

        def end(n, i):
            return statistics.mean(s[n][i]["grad_cosine_end"] for s in every)
        start = statistics.mean(s["two-stage"][0]["grad_cosine"] for s in every)
        hb = [end("hbat", i) for i in range(len(every[0]["hbat"]))]
        lines.append(f"4. **Where do the objectives conflict?** The cosine between the IFA and the DPO gradient is "
                     f"{start:+.3f} at the base; two-stage's DPO stage ends at {end('two-stage', 1):+.3f}, Hbat's "
                     f"stages end between {min(hb):+.3f} and {max(hb):+.3f} (a mean over {len(every)} runs; "
                     "negative: a step down one loss is a step up the other; §6).")
    if lighter:
        shares = [(0.7, d)] + [(x["ideal_chosen"], x) for x in lighter]
        worlds = [b["world_seed"] for b in lighter[0]["bases"]]

        seeds = lighter[0]["bases"][0]["seeds"]

        def on(x, n):  # the main study restricted to the lighter studies' bases and seeds, as in the sweep table
            return pooled([statistics.mean(r["h2h"][n]["two-stage"] for r in b["runs"] if r["seed"] in seeds)
                           for b in x["bases"] if b["world_seed"] in worlds])
        lines.append("5. **Does the world's construction decide it?** As fewer chosen answers are the ideal one, the "
                     "win rates against the tuned two-stage on worlds " + ", ".join(map(str, worlds)) + " go: "
                     + "; ".join(f"{SHORT[n]} " + " → ".join(f"{on(x, n)} at {share:g}" for share, x in shares)
                                 for n in ("rpo", "hbat")) + " (§7).")
    return "\n".join(lines)


def moved_by_equal_answers(before, after):
    """What making GRPO's rollouts take exactly PPO's answers moved: examples, verdicts and win rates, before and
    after, from the two committed files."""
    def examples(d):
        return {n: sorted({sum(st["examples"] for st in r["stages"][n]) for b in d["bases"] for r in b["runs"]})
                for n in schedules(d) if n != "averaged"}

    def wins(d):
        return {n: [base_mean(b, lambda r: r["h2h"][n]["two-stage"]) for b in d["bases"]] for n in schedules(d)
                if n != "two-stage"}
    w0, w1 = wins(before), wins(after)
    return ("Examples trained on, before → after: " + "; ".join(
        f"{SHORT[n]} {', '.join(map(str, examples(before)[n]))} → {', '.join(map(str, examples(after)[n]))}"
        for n in examples(after)) + ". Win rate against the tuned two-stage, before → after: " + "; ".join(
        f"{SHORT[n]} {pooled(w0[n])} ({verdict_of(w0[n])}) → {pooled(w1[n])} ({verdict_of(w1[n])})" for n in w1)
        + ".")


def blocks():
    """NAME -> its text, for every generated block."""
    out = {}
    names = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "results", "protocol"))
             if f.endswith(".json")} if os.path.isdir(os.path.join(ROOT, "results", "protocol")) else set()
    for name in sorted(names):
        d = load(name)
        if d["ideal_chosen"] is not None:
            continue
        out[f"{name}-settings"] = settings_table(d)
        out[f"{name}-test"] = test_table(d)
        out[f"{name}-matrix"] = matrix(d)
        out[f"{name}-gaps"] = gaps(d)
        out[f"{name}-verdicts"] = verdicts(d)
        if name == "dpo":
            out["dpo-moved"] = moved(d, "results/alternatives/dpo_ALTERNATIVES.md")
            if all("defaults" in r for b in d["bases"] for r in b["runs"]):
                out["dpo-default-range"] = default_range(d)
        out[f"{name}-readme"] = readme(d)
        if d["algo"] == "dpo":
            out[f"{name}-cosines"] = cosines(d)
    lighter = sorted((load(n) for n in names if "_ideal" in n and n.startswith("dpo_")),
                     key=lambda d: -d["ideal_chosen"])
    if lighter and "dpo" in names:
        out["dpo-sweep"] = sweep(load("dpo"), lighter)
    if "dpo" in names:
        out["dpo-answers"] = answers(load("dpo"), lighter, [load(n) for n in sorted(names) if n.startswith("ppo_")])
    earlier = os.path.join(ROOT, "results", "earlier", "ppo_grpo_unequal_answers.json")
    if "ppo_grpo" in names and os.path.exists(earlier):
        with open(earlier) as f:
            out["ppo_grpo-moved"] = moved_by_equal_answers(json.load(f), load("ppo_grpo"))
    path = os.path.join(ROOT, "results", "why", "why.json")
    if os.path.exists(path):  # docs/results.md §8, from lab.why's file
        from lab import why
        with open(path) as f:
            d = json.load(f)
        out |= {"why-answers": why.answers(d), "why-overopt": why.overopt_table(d),
                "why-forgetting": why.forgetting_table(d)}
    lessons = os.path.join(ROOT, "results", "lesson")
    for f in sorted(os.listdir(lessons)) if os.path.isdir(lessons) else []:
        if f.endswith(".json"):  # docs/lesson.md's tables: each lesson command's own, from its results.json
            with open(os.path.join(lessons, f)) as fh:
                out[f"lesson-{f[:-5]}"] = "```\n" + evaluate.table(json.load(fh)) + "\n```"
    return out


BLOCK = re.compile(r"(<!-- lab\.report (\S+) -->\n)(.*?)(<!-- /lab\.report -->)", re.S)
DOCUMENTS = ("README.md", os.path.join("docs", "results.md"), os.path.join("docs", "lesson.md"))


def fill(text, generated):
    """The document with every block's text replaced; a block whose NAME nothing generates is an error."""
    def sub(m):
        if m.group(2) not in generated:
            raise SystemExit(f"lab.report: no result file gives block {m.group(2)!r}")
        return m.group(1) + generated[m.group(2)] + "\n" + m.group(4)
    return BLOCK.sub(sub, text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing: exit 1 if a block is not what the files give")
    args = p.parse_args(argv)
    generated, stale = blocks(), []
    for doc in DOCUMENTS:
        path = os.path.join(ROOT, doc)
        with open(path) as f:
            text = f.read()
        new = fill(text, generated)
        if new != text:
            stale.append(doc)
            if not args.check:
                with open(path, "w") as f:
                    f.write(new)
    if args.check and stale:
        print(f"lab.report: out of date with results/protocol: {', '.join(stale)} (run python -m lab.report)")
        sys.exit(1)
    print(("rewrote " + ", ".join(stale)) if stale and not args.check else "every generated block is up to date")


if __name__ == "__main__":
    main()
