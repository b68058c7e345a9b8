"""The workbench around the library: benchmarks, the memory ledger, experiments, plots, the demo, the
PyTorch peers and the n-gram baseline.

These modules measure and show the reference and the fast path, which never import them (the
command line does, inside its subcommands). The two peers are the only modules that import torch
(transformers and peft too, for the second), and they are loaded only when asked.

Reading order:

    demo.py               ``minilora demo``: the Shakespeare base taught the First Folio's spelling with LoRA
    baseline.py           the smoothed byte 4-gram model, the baseline a neural model has to beat
    plots.py              loss curves and fine-tuning runs as PNG files, no screen needed
    memory.py             the memory ledger: where a step's bytes go, full fine-tuning against LoRA
    bench.py              ``minilora bench``: a training step's time, throughput, FLOPs, MFU and memory
    torch_peer.py         the same GPT-2, LoRA and AdamW step in PyTorch eager: a benchmark peer and a
                          test oracle
    peft_peer.py          bench --preset smollm2's peer: SmolLM2's LoRA step as a transformers + PEFT user
                          writes it
    generation_bench.py   tokens per second of generation: the reference, the fast decoder, PyTorch eager
    bench_distributed.py  the MPI data-parallel step's time at N ranks, and communication's share
    experiments.py        ``minilora experiment``: what LoRA is good and bad at, measured (docs/experiments)
    experiment_plots.py   one figure per experiment: means over seeds with their min-max spread
    small_sweep.py        the experiments' protocol at a budget small enough to run live (notebook 04)
    chat.py               the ``minilora chat`` session with SmolLM2-135M-Instruct: template, decoding,
                          end of turn
"""
