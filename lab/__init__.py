"""The lab: what measures the method rather than runs it. Each file runs as a command from the repository root.

    protocol.py      every schedule tuned alike on validation prompts, then   python -m lab.protocol --help
                     compared head to head on test prompts (docs/results.md §1-7)
    report.py        the tables of README and docs/results.md, from the       python -m lab.report [--check]
                     committed results/protocol/*.json
    study.py         the ablation studies over seeds and bases (docs/results-earlier.md)   python -m lab.study --help
    conflict.py      the gradient-conflict probe train.py records at every DPO stage's start and end (§7.4)
    memory.py        memory per GPU on paper for a LLaMA config               python -m lab.memory llama-2-7b
    bench.py         speed of model.py beside transformers' LLaMA             python -m lab.bench --help
    bench_memory.py  host memory of loading a model under torchrun --fsdp    python -m lab.bench_memory --help
"""
