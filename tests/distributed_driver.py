"""Programs that tests/test_distributed.py starts under ``mpirun``; each takes its arguments from argv.

``train OUT MODE``: a float64 tiny GPT (MODE "lora" or "full"), three AdamW steps of the MPI step on a
fixed global batch of 5 sequences; rank 0 saves the trainable parameters, the losses and the bytes
sent per step to OUT (.npz).

``fit SEED``: ``minilora.fit`` of a float64 tiny GPT for one step on a small random corpus, with
``TrainSettings(seed=SEED)``.

``pretrain-dies RANK STEP HOW OUT ...``: the pretrain command with OUT, whose step makes rank RANK
stop at step STEP, by ``os._exit(1)`` (HOW "exit") or by raising (HOW "raise").
"""

from __future__ import annotations

import os
import sys

import numpy as np


def train(out: str, mode: str) -> None:
    from minilora.config import GPTConfig
    from minilora.fast.distributed.mpi_step import MpiStep
    from minilora.fast.distributed.world import current_world
    from minilora.lora.config import LoraConfig
    from minilora.lora.model import add_lora
    from minilora.model import GPT, init_params
    from minilora.optim import AdamW

    config = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    model = GPT(config, init_params(config, seed=1, dtype=np.float64))
    if mode == "lora":
        model = add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=("c_attn", "mlp.c_fc")), seed=2)
    optimizer = AdamW(model.params, model.trainable_names, lr=1e-2)
    world = current_world()
    step = MpiStep(world, optimizer.names)
    losses = []
    for index in range(3):
        rng = np.random.default_rng(index)
        x, y = (
            rng.integers(0, 32, (5, 8)),
            rng.integers(0, 32, (5, 8)),
        )  # the global batch: 5 rows, uneven shards
        losses.append(float(step(model, optimizer, x, y, 1e-2, 1.0)))
    if world.is_writer:
        trainable = {name: model.params[name] for name in model.trainable_names}
        np.savez(out, losses=np.array(losses), bytes_sent=step.bytes_sent, **trainable)


def fit(seed: int) -> None:
    from minilora import fit as fit_model
    from minilora.config import GPTConfig
    from minilora.io.data import Corpus
    from minilora.model import GPT, init_params
    from minilora.training.loop import TrainSettings

    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=256)
    model = GPT(config, init_params(config, seed=1, dtype=np.float64))
    tokens = np.random.default_rng(0).integers(0, 256, 200).astype(np.uint8)  # (200,) bytes
    corpus = Corpus("random", tokens[:160], tokens[160:])
    settings = TrainSettings(steps=1, batch_size=2, warmup_steps=0, eval_windows=1, seed=seed)
    fit_model(model, corpus, settings, progress=False)


def pretrain_dies(rank: int, at_step: int, how: str, cli_args: list[str]) -> None:
    import minilora.jobs.pretrain as pretrain_job
    from minilora.cli import main
    from minilora.fast.distributed.world import current_world

    accelerate = pretrain_job.accelerate

    def dying_accelerate(model, optimizer, grad_clip, *args, **kwargs):
        step, calls = accelerate(model, optimizer, grad_clip, *args, **kwargs), [0]

        def dying_step(*step_args):
            if current_world().rank == rank and calls[0] == at_step:
                if how == "exit":
                    os._exit(1)  # abrupt: no exception, no MPI_Finalize, as a killed process
                raise RuntimeError(f"planted failure at step {at_step}")
            calls[0] += 1
            return step(*step_args)

        return dying_step

    pretrain_job.accelerate = dying_accelerate
    sys.exit(main(["pretrain", *cli_args]))


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "fit":
        fit(int(sys.argv[2]))
    elif sys.argv[1] == "pretrain-dies":
        pretrain_dies(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:])
    else:
        raise SystemExit(f"unknown program {sys.argv[1]!r}")
