"""docs/lesson.md: its `>>>` steps print what it shows; its commands run (train.py at the smoke preset's sizes) and
give what it describes, a table with base and SFT rows, a tax column and the legend, and the pictures; each of its
tables is the committed results.json of its command, made by that command as it stands."""
import doctest
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

from conftest import ENV, ROOT, ok, read_json
from infra import flags

LESSON = os.path.join(ROOT, "docs", "lesson.md")


def commands(prefix):
    """The lines of the lesson's bash blocks that start with `prefix`, as argument lists."""
    with open(LESSON) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.startswith(prefix)]


def out_of(cmd):
    return cmd[cmd.index("--out") + 1]


def test_the_lessons_python_steps_print_what_it_shows():
    failed, attempted = doctest.testfile(LESSON, module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert attempted >= 20 and failed == 0


def test_each_lesson_table_is_its_commands_committed_run():
    """results/lesson/<name>.json, whose table the lesson prints, is the run of `train.py ... --out lesson/<name>`
    with the command's settings exactly (the lesson preset's, and what the command adds)."""
    runs = commands("python train.py")
    assert [out_of(cmd) for cmd in runs] == ["lesson/dpo", "lesson/alternatives", "lesson/ppo"]
    for cmd in runs:
        committed = read_json(os.path.join(ROOT, "results", "lesson", os.path.basename(out_of(cmd)) + ".json"))
        assert committed["config"] == json.loads(json.dumps(flags.run_config(flags.get_args(cmd[2:])))), cmd
        assert committed["config"]["preset"] == "lesson"
    # the answers it quotes (steps 2 and 8) are the committed run's first two test answers
    samples = {n: r["samples"][:2] for n, r in read_json(os.path.join(ROOT, "results", "lesson", "dpo.json"))[
        "schedules"].items()}
    first, second = ([s[i] for s in (samples["two-stage"], samples["hbat"])] for i in (0, 1))
    assert [s["prompt"] for s in first] == ["reverse the words : dog bird book answer :"] * 2
    assert [s["response"] for s in first] == ["book bird dog", "sure , book bird dog hope this helps"]
    assert [s["reference"] for s in second] == ["ben found big bike"] * 2
    assert [s["response"] for s in second] == ["sure , ben found big bike hope this helps", "ben found big bag"]


def test_the_lessons_commands_run(tmp_path, cache):
    """Every command of the lesson, run from a folder of its own as a student would from the repository's: train.py
    at the smoke preset's sizes (the last --preset wins), then sample.py and lab.importance on the runs they name."""
    env = ENV | {"PYTHONPATH": ROOT}  # `python -m lab.importance` from outside the repository

    def run(cmd):
        script = [os.path.join(ROOT, cmd[1])] if cmd[1].endswith(".py") else cmd[1:3]  # FILE.py or -m MODULE
        rest = cmd[2:] if cmd[1].endswith(".py") else cmd[3:]
        return ok(subprocess.run([sys.executable, *script, *rest], cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=300))

    for cmd in commands("python train.py"):
        out = run(cmd + ["--preset", "smoke", "--device", "cpu", "--cache-dir", str(cache)]).stdout
        table = out[out.index("schedule "):]
        assert [line.split()[0] for line in table.splitlines()[1:3]] == ["base", "SFT"], table
        assert " tax " in table.splitlines()[0] and "  tax: IFA score lost against the SFT model" in table
        if importlib.util.find_spec("matplotlib"):
            assert all((tmp_path / out_of(cmd) / f).exists() for f in ("tradeoff.png", "curves.png"))
            assert (tmp_path / out_of(cmd) / "overopt.png").exists() == ("--overopt-every" in cmd)
    for cmd in commands("python sample.py") + commands("python -m lab.importance"):
        assert run(cmd).stdout.strip()
