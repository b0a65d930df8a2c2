"""infra/flags.py: every impossible flag is refused at once with one line naming it and exit code 2 (in process,
through the parser: nothing runs), and the flags a variant or a preset decides come out as they say."""
import pytest

import ppo
from conftest import exits_with_one_line
from infra import flags

BAD_FLAGS = {
    # case: (flags, what the one line must name)
    "missing data file": (["--ifa-data", "nowhere.jsonl", "--hpa-data", "nowhere.jsonl", "--model", "x"],
                          "nowhere.jsonl"),
    "--n-splits 0": (["--n-splits", "0"], "--n-splits"),
    "unknown --algo": (["--algo", "sft"], "--algo"),
    "unknown flag": (["--learning-rate", "1"], "--learning-rate"),
    "--f-max -1": (["--f-max", "-1"], "--f-max"),
    "--ipo with --label-smoothing": (["--ipo", "--label-smoothing", "0.1"], "--label-smoothing"),
    "--fsdp without torchrun": (["--fsdp"], "--fsdp"),
    "--fsdp with element-wise EWC": (["--fsdp", "--ewc-elementwise"], "--ewc-elementwise"),
    "--ifa-styled 2": (["--ifa-styled", "2"], "--ifa-styled"),
    "--out is a file": (["--out", __file__], "--out"),
    "averaged without two-stage": (["--schedule", "hbat,averaged"], "two-stage"),
    "rpo under PPO": (["--algo", "ppo", "--schedule", "two-stage,rpo"], "rpo"),
    "alright under PPO": (["--algo", "ppo", "--schedule", "alright"], "alright"),
    "an α above 1": (["--average-alphas", "0,1.5"], "--average-alphas"),
    "an α that is no number": (["--average-alphas", "half"], "--average-alphas"),
    "a negative RPO α": (["--rpo-alpha", "-1"], "--rpo-alpha"),
    "an unknown schedule": (["--schedule", "two-stage,three-stage"], "three-stage"),
    "a release flag under textbook PPO": (["--algo", "ppo", "--release-absolute-positions"],
                                          "--release-absolute-positions"),
    "a critic restart without a critic": (["--algo", "ppo", "--ppo-variant", "release", "--critic-restart"],
                                          "--critic-restart"),
    "a pair mix of two shares": (["--pair-mix", "0.5,0.5"], "--pair-mix"),
    "a pair mix that is no number": (["--pair-mix", "a,b,c"], "--pair-mix"),
    "more ideal chosen answers than style and content pairs": (["--ideal-chosen", "0.8"], "--ideal-chosen"),
    "validation prompts of real data": (["--n-val", "10", "--ifa-data", __file__, "--hpa-data", __file__,
                                         "--model", __file__], "--n-val"),
    "--n-val -1": (["--n-val", "-1"], "--n-val"),
    "the bias knob's old name": (["--alignment-tax", "0.5"], "--annotator-bias"),
    "--annotator-bias 2": (["--annotator-bias", "2"], "--annotator-bias"),
    "an ALRIGHT λ above 1": (["--alright-lambda", "1.5"], "--alright-lambda"),
    "a group size under textbook PPO": (["--algo", "ppo", "--group-size", "4"], "--group-size"),
    "a group of one answer": (["--algo", "ppo", "--ppo-variant", "grpo", "--group-size", "1"], "--group-size"),
    "a critic restart under GRPO": (["--algo", "ppo", "--ppo-variant", "grpo", "--critic-restart"], "--critic-restart"),
}


def test_a_grpo_rollout_must_split_into_groups(capsys):
    """--rollout-batch prompts per rollout become rollout-batch / K prompts of K answers each, on every rank."""
    args = flags.get_args(["--algo", "ppo", "--ppo-variant", "grpo", "--group-size", "3", "--rollout-batch", "16",
                           "--minibatch", "8", "--batch-size", "8"])
    assert "--group-size" in exits_with_one_line(capsys, flags.check_world, args, 1)
    flags.check_world(flags.get_args(["--algo", "ppo", "--ppo-variant", "grpo", "--rollout-batch", "16"]), 2)


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_an_impossible_flag_exits_2_with_one_line_naming_it(case, capsys):
    argv, named = BAD_FLAGS[case]
    assert named in exits_with_one_line(capsys, flags.get_args, argv)


def test_a_variant_sets_its_own_kl_weight_and_epochs_unless_given():
    """ppo.VARIANTS is the one place a PPO variant is defined: the release's β 0.1 and one epoch per rollout
    whatever the preset, textbook's β and the preset's epochs; a flag given wins either way."""
    textbook, release = flags.get_args(["--algo", "ppo"]), flags.get_args(["--algo", "ppo", "--ppo-variant", "release"])
    assert (textbook.kl_coef, textbook.ppo_epochs) == (ppo.PPOConfig.kl_coef, flags.PRESETS["default"]["ppo_epochs"])
    assert (release.kl_coef, release.ppo_epochs) == (ppo.VARIANTS["release"]["kl_coef"], 1) == (0.1, 1)
    given = flags.get_args(["--algo", "ppo", "--ppo-variant", "release", "--kl-coef", "0.3", "--ppo-epochs", "4"])
    assert (given.kl_coef, given.ppo_epochs) == (0.3, 4)
    cfg = flags.ppo_config(release, world=2)
    assert (cfg.variant, cfg.critic, cfg.queue_size, cfg.top_k, cfg.kl_coef) == ("release", False, 1000, 50, 0.1)
    assert cfg.minibatch_size == release.minibatch // 2  # per rank
    assert flags.ppo_config(textbook, world=1).critic and not flags.ppo_config(textbook, world=1).queue_size


def test_presets_fill_only_what_is_not_given():
    smoke = flags.get_args(["--preset", "smoke", "--batch-size", "4"])
    assert smoke.batch_size == 4 and smoke.n_ifa == flags.PRESETS["smoke"]["n_ifa"]
    ppo_default = flags.get_args(["--algo", "ppo"])
    assert (ppo_default.epochs_hpa, ppo_default.lr_hpa, ppo_default.ifa_styled) == (3, 3e-4, 0.1)  # PPO_OVERRIDES


def test_averaged_is_evaluated_after_the_schedules_it_interpolates():
    args = flags.get_args(["--schedule", "averaged,two-stage,hbat"])
    assert args.schedules == ("two-stage", "hbat", "averaged")
    assert flags.get_args([]).schedules == ("two-stage", "hbat")  # "both": the reproduction
