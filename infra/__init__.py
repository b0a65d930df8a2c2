"""The run's infrastructure: what one run of train.py needs around the method, none of it needed to follow it.

    flags.py       every flag of train.py with its help, the presets, and the checks that refuse an impossible run
    rundir.py      the run directory --out: config check, metrics log, checkpoints and resume inside a stage, results
    parallel.py    where the models live: one process, DDP or FSDP under torchrun; compile, activation checkpointing
    checkpoint.py  model file formats: ours, Meta's and Hugging Face's, the Hugging Face export, atomic writes
    importers.py   real datasets on disk (Alpaca, HH-RLHF, TL;DR, TRL JSONL) as plain records, and tokenizer lookup
"""
