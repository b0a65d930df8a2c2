"""train.py's flags: the presets, every flag with its help, and the checks that refuse an impossible run at once.

`get_args(argv)` parses, fills the flags marked "preset" from --preset, and checks; a bad flag ends the run with one
line naming it and exit code 2 (`die`). `run_config(args)` is what defines a run's results: an --out that holds a
run of another configuration is not resumed into. § numbers refer to docs/method.md.
"""
import argparse
import os
import sys

import ewc
import hbat
import ppo

PRESETS = {
    # the reproduction (§6): sizes and rates from the prototype's measurements (docs/design-notes.md)
    "default": dict(n_ifa=1200, n_hpa=1200, n_test=300, n_val=300, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                    pretrain_steps=1500, pretrain_batch=64, batch_size=32, epochs_ifa=2, epochs_hpa=2,
                    lr_ifa=2e-4, lr_hpa=2e-4, rm_epochs=2, ppo_epochs=2, rollout_batch=64, minibatch=32,
                    max_new_tokens=24, ifa_styled=0.0),
    # a class's first run (docs/lesson.md): the reproduction's architecture on less pretraining and data, and DPO at
    # half its lr, set by a few trial runs so that the weaker base shows the tax without its judge score collapsing;
    # under two minutes on 2 CPU cores from an empty cache (700 pretraining steps: 1000 took up to 165 s). The
    # verdicts are the study's (docs/results.md)
    "lesson": dict(n_ifa=800, n_hpa=800, n_test=100, n_val=100, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                   pretrain_steps=700, pretrain_batch=32, batch_size=32, epochs_ifa=2, epochs_hpa=2,
                   lr_ifa=2e-4, lr_hpa=1e-4, rm_epochs=2, ppo_epochs=2, rollout_batch=64, minibatch=32,
                   max_new_tokens=24, ifa_styled=0.0),
    # the whole pipeline in seconds, for tests and a first look
    "smoke": dict(n_ifa=64, n_hpa=64, n_test=16, n_val=16, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  pretrain_steps=30, pretrain_batch=16, batch_size=8, epochs_ifa=1, epochs_hpa=1,
                  lr_ifa=1e-3, lr_hpa=1e-3, rm_epochs=1, ppo_epochs=1, rollout_batch=16, minibatch=8,
                  max_new_tokens=12, ifa_styled=0.0),
}
# docs/design-notes.md: 3 passes over the prompts, policy lr 3e-4; and 10% of the demonstrations in the style, since PPO
# can only reinforce what it samples: with none, the SFT policy samples no styled answer at all
# (docs/results-earlier.md, "PPO")
PPO_OVERRIDES = dict(epochs_hpa=3, lr_hpa=3e-4, ifa_styled=0.1)


def die(message, code=2):
    """Bad input ends the run with one line and exit code 2 (a failed run: 1), never a traceback."""
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; one says why
        print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        die(message)


def get_args(argv=None):
    p = ArgumentParser(description="Hybrid Alignment Training (Hbat) and its baselines.")
    a = p.add_argument
    # what to run
    a("--algo", choices=["dpo", "ppo"], default="dpo", help="HPA objective: DPO on pairs, or PPO against a reward model")
    a("--schedule", default="both", help="comma-separated schedules from hbat.py (two-stage, hbat, multi-task, "
      "averaged, rpo, alright); 'both' = two-stage,hbat (the reproduction)")
    a("--preset", choices=list(PRESETS), default="default", help="sizes and rates for flags marked 'preset'")
    a("--out", default="out", help="output dir: results.json, metrics.jsonl, checkpoints; re-running resumes")
    a("--overwrite", action="store_true", help="start afresh in an --out whose saved config differs")
    a("--save-every", type=int, help="also checkpoint a stage's progress every K optimizer steps (PPO: at the first "
      "rollout boundary after K), so that a re-run resumes inside the stage (default: 250 with --model, else off)")
    a("--seed", type=int, default=0, help="training seed: splits, shuffles, heads, sampling")
    a("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    a("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 autocast on CUDA, fp32 on CPU")
    a("--fsdp", action="store_true", help="under torchrun, shard every model over the ranks (FSDP2 fully_shard: "
      "weights, gradients, AdamW state and the EWC anchor take 1/world each) instead of DDP's full copies")
    a("--compile", action="store_true", help="torch.compile each transformer block (pays off for long runs: the "
      "first steps of every new shape compile)")
    a("--activation-checkpointing", action="store_true", help="recompute each block in backward instead of keeping "
      "its activations: about a third more compute for much less memory")
    a("--cache-dir", default=os.path.expanduser("~/.cache/hbat"), help="where the tokenizer and tiny base are cached")
    # data: the embedded world (§6) unless files are given
    a("--ifa-data", help="IFA demonstrations (JSONL prompt/response, or Alpaca/TL;DR files)")
    a("--hpa-data", help="HPA pairs (JSONL prompt/chosen/rejected, or HH-RLHF/TL;DR/TRL files)")
    a("--test-data", help="held-out prompts with references (IFA format); default: the last --n-test IFA records")
    a("--n-ifa", type=int, help="preset: demonstrations in the embedded world")
    a("--n-hpa", type=int, help="preset: preference pairs in the embedded world")
    a("--n-test", type=int, help="preset: held-out evaluation prompts")
    a("--n-val", type=int, help="preset: validation prompts of the embedded world, apart from the test prompts: every "
      "schedule is scored on them too (val_metrics, val_win_rates), for choosing settings without the test prompts")
    a("--annotator-bias", type=float, default=0.5, help="c: how often annotators prefer a stylish wrong answer to a "
      "plain right one (0..1); the alignment tax is what a run measures, not a setting")
    a("--alignment-tax", type=float, help=argparse.SUPPRESS)  # the old name of --annotator-bias: refused below
    a("--pair-mix", default="0.4,0.3,0.3", help="STYLE,CONTENT,CONFLICT: the shares of the world's three kinds of "
      "preference pairs (world.py)")
    a("--ideal-chosen", type=float, help="the share of the world's pairs whose chosen answer is the ideal one (correct "
      "and styled); the other style and content pairs get a correct, half-styled one (default: all of them, 0.7 at "
      "the default --pair-mix)")
    a("--world-seed", type=int, default=0, help="seed of the embedded world (kept fixed across --seed)")
    a("--ifa-styled", type=float, help="preset: share of the world's demonstrations written in the polite style "
      "(default 0; 0.1 under --algo ppo, which can only reinforce a style its samples show)")
    a("--max-seq-len", type=int, default=128, help="longest prompt+response; longer prompts keep their end")
    # model
    a("--model", help="base model: our .pt, a Meta or a Hugging Face LLaMA dir; default: a tiny base pretrained here")
    a("--tokenizer", help="sentencepiece tokenizer.model (default: next to --model, or trained on the world)")
    a("--dim", type=int, help="preset: tiny base width")
    a("--n-layers", type=int, help="preset: tiny base depth")
    a("--n-heads", type=int, help="preset: attention heads")
    a("--n-kv-heads", type=int, help="preset: key/value heads (GQA)")
    a("--pretrain-steps", type=int, help="preset: steps of next-token pretraining of the tiny base on the corpus")
    a("--pretrain-batch", type=int, help="preset: sequences per pretraining step")
    # schedule (§2)
    a("--n-splits", type=int, default=4, help="N: subsets of D_IFA and D_HPA that hbat alternates over (§2.2)")
    a("--epochs-ifa", type=int, help="preset: E_IFA, passes over each IFA subset")
    a("--epochs-hpa", type=int, help="preset: E_HPA, passes over each HPA subset")
    # optimisation (every stage restarts AdamW and its warm-up + linear decay: §2.2, docs/design-notes.md)
    a("--batch-size", type=int, help="preset: global batch (examples or pairs) per step")
    a("--lr-ifa", type=float, help="preset: peak learning rate of IFA stages")
    a("--lr-hpa", type=float, help="preset: peak learning rate of HPA stages")
    a("--warmup", type=float, default=0.1, help="share of each stage's steps spent warming up the lr")
    a("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    # EWC (§3)
    a("--ewc", choices=ewc.METHODS, default="modified", help="how hbat protects the other objective: modified EWC "
      "(§3.3), uniform (its total weight spread equally over tensors), original EWC (§3.5), freeze/random (§3.6)")
    a("--ewc-norm", choices=["max", "softmax"], default="max", help="normalisation of the importance (§3.3)")
    a("--ewc-scale", type=float, default=1.0, help="s in softmax(s^2 * Omega); the release uses 1e10")
    a("--ewc-elementwise", action="store_true", help="importance per element instead of per tensor (§3.3)")
    a("--f-max", type=float, default=ewc.F_MAX, help="F_max of HPA stages: the largest per-tensor weight of the "
      "penalty that holds what IFA learned (default from the earlier study, docs/results-earlier.md)")
    a("--f-max-ifa", type=float, default=ewc.F_MAX_IFA, help="F_max of IFA stages: holds what HPA learned "
      "(the release: 100)")
    a("--ewc-lambda", type=float, default=1.0, help="lambda inside the square of the penalty (§3.3)")
    # DPO (§4.1)
    a("--beta", type=float, default=0.1, help="DPO beta: strength of the implicit KL to the reference")
    a("--label-smoothing", type=float, default=0.0, help="conservative DPO: assumed share of flipped labels")
    a("--ipo", action="store_true", help="IPO loss instead of DPO")
    a("--live-ref", action="store_true", help="keep a live reference model instead of cached log-probs")
    a("--rpo-alpha", type=float, default=1.0, help="rpo: weight of the chosen answer's mean token NLL added to the "
      "DPO loss (§7.2; TRL's rpo_alpha)")
    a("--alright-lambda", type=float, default=0.5, help="alright: each step is a DPO step with weight λ and an IFA "
      "step with 1 − λ, every batch still taken once (λ > 0.5: the DPO steps come earlier; §7.3)")
    a("--average-alphas", default="0,0.25,0.5,0.75,1", help="averaged: the α of (1 − α)·SFT + α·two-stage to "
      "evaluate, comma-separated (§7.1)")
    a("--grad-probe", type=int, default=32, help="DPO: at the start of every stage, the cosine between the IFA and "
      "the DPO gradient on the first K demonstrations and pairs (§7.4; 0: off)")
    # PPO (§4.2)
    a("--ppo-variant", choices=list(ppo.VARIANTS), default="textbook", help="PPO: textbook PPO with a critic "
      "(§4.2), the paper's release's critic-free variant (§4.3): decayed sequence reward, queue whitening, "
      "positive-advantage tokens only, one epoch; or GRPO (§4.4): --group-size answers per prompt, advantages "
      "relative to the group, the KL to the reference in the loss, no critic")
    a("--release-absolute-positions", action="store_true", help="--ppo-variant release: decay the score by the "
      "position in the left-padded prompt + response, as the release does (default: from the response's start)")
    a("--kl-coef", type=float, help=f"PPO: weight of the per-token KL penalty to the reference (default "
      f"{ppo.PPOConfig.kl_coef}; the release's variant: {ppo.VARIANTS['release']['kl_coef']})")
    a("--rm-epochs", type=int, help="preset: reward-model epochs over D_HPA")
    a("--critic-restart", action="store_true", help="PPO: a fresh critic (a copy of the reward model) at every HPA "
      "stage instead of one carried across a schedule's HPA stages")
    a("--ppo-epochs", type=int, help="preset: PPO epochs over each rollout batch")
    a("--rollout-batch", type=int, help="preset: prompts per rollout")
    a("--minibatch", type=int, help="preset: PPO minibatch size")
    a("--target-kl", type=float, default=None, help="PPO: stop an update early when approx KL passes this")
    a("--group-size", type=int, help=f"--ppo-variant grpo: K answers sampled per prompt (default "
      f"{ppo.VARIANTS['grpo']['group_size']}); each rollout takes --rollout-batch / K prompts, so that GRPO and PPO "
      "sample as many answers")
    a("--adaptive-kl-target", type=float, default=None, help="PPO: adapt --kl-coef so that the KL per sequence "
      "moves towards this many nats (Ziegler et al. 2019); default: a fixed --kl-coef")
    # evaluation
    a("--max-new-tokens", type=int, help="preset: cap on generated tokens (eval and PPO rollouts)")
    a("--eval-every", type=int, default=0, help="also evaluate every K optimizer steps (0: after each stage only)")
    a("--overopt-every", type=int, default=0, help="the embedded world: along each HPA stage, every K optimizer "
      "steps, the over-optimisation instrument on 64 validation prompts: KL from the stage's start, the gold judge's "
      "and the reward model's scores (overopt/* rows of metrics.jsonl; docs/formats.md §4)")
    a("--judge", help="real data: a saved reward model (e.g. OUT/reward_model.pt of a PPO run) that scores the answers "
      "(hpa_score, win rates); default: the run's reward model under PPO, none under DPO")
    a("--export-hf", action="store_true", help="also write each aligned model to OUT/<schedule>-hf in the Hugging "
      "Face LLaMA layout (config.json, model.safetensors, tokenizer.model)")
    args = p.parse_args(argv)
    for flag in ("ifa_styled", "ideal_chosen", "n_val"):
        if getattr(args, flag) is not None and args.ifa_data:
            p.error(f"--{flag.replace('_', '-')} applies to the embedded world, not to --ifa-data")
    if args.save_every is None:
        args.save_every = 250 if args.model else 0  # the tiny world's stages take seconds
    variant = ppo.PPOConfig(**ppo.VARIANTS[args.ppo_variant])  # what the variant sets (ppo.py), e.g. its KL weight
    if args.kl_coef is None:
        args.kl_coef = variant.kl_coef
    if args.ppo_epochs is None and "epochs" in ppo.VARIANTS[args.ppo_variant]:
        args.ppo_epochs = variant.epochs  # a variant's own number of passes over each rollout, whatever the preset
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, PPO_OVERRIDES.get(k, v) if args.algo == "ppo" and args.preset != "smoke" else v)
    check_args(args, p)
    return args


def check_args(args, p):
    """Reject impossible combinations at once, naming the flag."""
    schedules = hbat.SCHEDULES[:2] if args.schedule == "both" else tuple(args.schedule.split(","))
    for s in schedules:
        if s not in hbat.SCHEDULES:
            p.error(f"--schedule: unknown schedule {s!r} (choose from both, {', '.join(hbat.SCHEDULES)})")
    args.schedules = tuple(sorted(schedules, key=lambda s: s == "averaged"))  # after the models it interpolates
    if args.n_splits < 1:
        p.error(f"--n-splits must be >= 1, got {args.n_splits}")
    for flag in ("f_max", "f_max_ifa", "ewc_lambda", "beta", "kl_coef", "lr_ifa", "lr_hpa"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.save_every < 0:
        p.error(f"--save-every must be >= 0, got {args.save_every}")
    if args.alignment_tax is not None:
        p.error("--alignment-tax is now --annotator-bias (the annotators' bias c; the alignment tax is what a run "
                "measures)")
    del args.alignment_tax
    if not 0 <= args.annotator_bias <= 1:
        p.error(f"--annotator-bias must be in [0, 1], got {args.annotator_bias}")
    try:
        args.pair_mix = tuple(float(x) for x in args.pair_mix.split(","))
    except ValueError:
        p.error(f"--pair-mix: not three comma-separated numbers: {args.pair_mix!r}")
    if len(args.pair_mix) != 3 or min(args.pair_mix) < 0 or sum(args.pair_mix) <= 0:
        p.error(f"--pair-mix needs three shares >= 0, not all 0 (style, content, conflict), got {args.pair_mix}")
    if args.ideal_chosen is not None and not 0 <= args.ideal_chosen <= sum(args.pair_mix[:2]) / sum(args.pair_mix):
        p.error(f"--ideal-chosen must be in [0, {sum(args.pair_mix[:2]) / sum(args.pair_mix):g}] (the style and content "
                f"pairs' share of --pair-mix), got {args.ideal_chosen}")
    if args.n_val < 0:
        p.error(f"--n-val must be >= 0, got {args.n_val}")
    if not 0 <= args.ifa_styled <= 1:
        p.error(f"--ifa-styled must be in [0, 1], got {args.ifa_styled}")
    if not 0 <= args.label_smoothing < 0.5:
        p.error(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.ipo and args.label_smoothing:
        p.error("--label-smoothing applies to DPO only, not with --ipo")
    if args.algo != "ppo" and (args.ppo_variant != "textbook" or args.release_absolute_positions):
        p.error("--ppo-variant and --release-absolute-positions apply to --algo ppo")
    if args.overopt_every and (args.ifa_data or not args.n_val):
        p.error("--overopt-every needs the embedded world's gold judge and validation prompts (--n-val > 0)")
    if args.overopt_every < 0:
        p.error(f"--overopt-every must be >= 0, got {args.overopt_every}")
    if args.group_size is not None and args.ppo_variant != "grpo":
        p.error("--group-size applies to --ppo-variant grpo")
    if args.group_size is not None and args.group_size < 2:
        p.error(f"--group-size must be >= 2 (GRPO compares each answer with the others to its prompt), got "
                f"{args.group_size}")
    if args.critic_restart and not ppo.VARIANTS[args.ppo_variant].get("critic", True):
        p.error(f"--critic-restart applies to textbook PPO: --ppo-variant {args.ppo_variant} has no critic")
    if args.release_absolute_positions and args.ppo_variant != "release":
        p.error("--release-absolute-positions applies to --ppo-variant release")
    for s in schedules:
        if args.algo == "ppo" and s in hbat.DPO_ONLY:
            p.error(f"--schedule {s} needs an offline HPA loss: use it with --algo dpo")
    if "averaged" in schedules and "two-stage" not in schedules:
        p.error("--schedule averaged interpolates two-stage's models: list two-stage too")
    try:
        args.average_alphas = [float(x) for x in args.average_alphas.split(",")]
    except ValueError:
        p.error(f"--average-alphas: not a comma-separated list of numbers: {args.average_alphas!r}")
    if not all(0 <= x <= 1 for x in args.average_alphas):
        p.error(f"--average-alphas must lie in [0, 1], got {args.average_alphas}")
    if not 0 <= args.alright_lambda <= 1:
        p.error(f"--alright-lambda must be in [0, 1], got {args.alright_lambda}")
    if args.rpo_alpha < 0 or args.grad_probe < 0:
        p.error("--rpo-alpha and --grad-probe must be >= 0")
    if bool(args.ifa_data) != bool(args.hpa_data):
        p.error("--ifa-data and --hpa-data go together")
    if args.ifa_data and not args.model:
        p.error("--ifa-data/--hpa-data need --model (a tiny base is only pretrained on the embedded world)")
    if args.judge and not args.ifa_data:
        p.error("--judge applies to --ifa-data/--hpa-data runs (the embedded world has its gold judge)")
    if args.fsdp:
        if args.ewc == "original" or args.ewc_elementwise:
            p.error("--fsdp supports per-tensor importance only: not with --ewc original or --ewc-elementwise")
        if "RANK" not in os.environ:
            p.error("--fsdp needs torchrun, e.g. torchrun --nproc_per_node 8 train.py --fsdp ...")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out}: exists and is not a directory")
    for flag in ("ifa_data", "hpa_data", "test_data", "model", "tokenizer", "judge"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            p.error(f"--{flag.replace('_', '-')}: no such file or directory: {path}")


# the flags that change where or how fast a run goes, not what it computes: a run resumes across changes of these
NOT_RUN_CONFIG = {"overwrite", "out", "device", "cache_dir", "eval_every", "overopt_every", "export_hf", "fsdp",
                  "compile", "activation_checkpointing", "save_every"}


# flags added after runs were made: left out of the config while unset, so that those runs still resume
UNSET_LEFT_OUT = {"group_size"}


def run_config(args) -> dict:
    """The settings that define a run's results, as written to OUT/config.json and results.json."""
    return {k: v for k, v in vars(args).items()
            if k not in NOT_RUN_CONFIG and not (k in UNSET_LEFT_OUT and v is None)}


def ppo_config(args, world):
    """The PPOConfig of a PPO stage, of --ppo-variant (§4.2, §4.3) with the flags' settings; minibatches per rank."""
    return ppo.PPOConfig(**ppo.VARIANTS[args.ppo_variant] | dict(
        kl_coef=args.kl_coef, epochs=args.ppo_epochs, minibatch_size=args.minibatch // world,
        max_new_tokens=args.max_new_tokens, target_kl=args.target_kl,
        absolute_positions=args.release_absolute_positions, adaptive_kl=args.adaptive_kl_target is not None,
        kl_target=args.adaptive_kl_target or 6.0) | (dict(group_size=args.group_size) if args.group_size else {}))


def check_world(args, world):
    """Every batch splits evenly over the ranks and the micro-batches, and a GRPO rollout into groups of K."""
    for flag in ("batch_size", "rollout_batch", "minibatch", "pretrain_batch"):
        if getattr(args, flag) % (world * args.grad_accum):
            die(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not divisible by world size x --grad-accum "
                f"= {world * args.grad_accum}")
    k = ppo_config(args, world).group_size if args.algo == "ppo" else 1
    if args.rollout_batch % (world * k):
        die(f"--rollout-batch {args.rollout_batch} is not divisible by world size x --group-size = {world * k}")


def check_sizes(args, n_ifa, n_hpa):
    """Every subset of hbat's split of the data holds at least one batch."""
    smallest, n = min(n_ifa, n_hpa), args.n_splits if "hbat" in args.schedules else 1  # only hbat splits the data
    if n > smallest:
        die(f"--n-splits {n} is larger than the data ({n_ifa} IFA, {n_hpa} HPA examples)")
    batch = max(args.batch_size, args.rollout_batch if args.algo == "ppo" else 0)
    if smallest // n < batch:
        die(f"--n-splits {n} leaves subsets of {smallest // n} examples, fewer than one batch of {batch}")
