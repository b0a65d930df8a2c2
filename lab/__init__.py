"""The lab: what measures the method rather than runs it. Each file runs as a command from the repository root.

    study.py         the multi-seed, multi-base study of docs/results.md     python -m lab.study --help
    conflict.py      the gradient-conflict probe train.py records at every DPO stage start (docs/method.md §7.4)
    memory.py        memory per GPU on paper for a LLaMA config               python -m lab.memory llama-2-7b
    bench.py         speed of model.py beside transformers' LLaMA             python -m lab.bench --help
    bench_memory.py  host memory of loading a model under torchrun --fsdp    python -m lab.bench_memory --help
"""
