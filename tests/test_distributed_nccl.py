"""The GPU data-parallel step on one GPU: a one-rank NCCL communicator inside the CUDA graph.

Skipped without CuPy, a GPU or NCCL. With one rank the all-reduce sums one buffer, so
``NcclGraphedStep`` must train exactly as the plain ``GraphedStep``: the same losses and adapter
weights after warm-up steps, a capture (the all-reduce inside it) and replays.
"""

import numpy as np
import pytest

from minilora.backend import to_numpy
from minilora.config import GPTConfig
from minilora.fast.cuda import use_cublas
from minilora.fast.cuda.graph import GraphedStep
from minilora.fast.cuda.ops import CUDA_OPS
from minilora.fast.distributed.nccl_step import NcclGraphedStep
from minilora.fast.distributed.world import World
from minilora.jobs.finetune import make_optimizer
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params
from minilora.training.loop import TrainSettings

nccl = pytest.importorskip("cupy.cuda.nccl")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not nccl.available, reason="CuPy was built without NCCL")]

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)


def model_and_optimizer(full: bool):
    """A LoRA model (the adapter trains) or, with ``full``, the plain GPT (every weight trains)."""
    model = GPT(CONFIG, init_params(CONFIG, seed=1, device="cuda"))
    if not full:
        model = add_lora(
            model, LoraConfig(r=4, target_modules=("c_attn", "attn.c_proj"), init="random"), seed=2
        )
    model.ops = CUDA_OPS
    return model, make_optimizer(model, TrainSettings(lr=1e-2, weight_decay=0.1))


@pytest.mark.parametrize("full", [False, True])
def test_one_rank_nccl_step_equals_the_graphed_step(full):
    use_cublas()
    (plain_model, plain_opt), (nccl_model, nccl_opt) = (model_and_optimizer(full) for _ in range(2))
    plain = GraphedStep(plain_model, plain_opt, grad_clip=1.0, warmup=1)
    nccl_step = NcclGraphedStep(nccl_model, nccl_opt, grad_clip=1.0, world=World(0, 1), warmup=1)
    rng = np.random.default_rng(3)
    for _ in range(5):
        x, y = rng.integers(0, 256, (4, 16)), rng.integers(0, 256, (4, 16))
        want = float(plain(plain_model, plain_opt, x, y, None, 1.0))
        got = float(nccl_step(nccl_model, nccl_opt, x, y, None, 1.0))
        assert got == pytest.approx(want, rel=1e-6)
    assert nccl_step.graph is not None  # the all-reduce was captured and replayed
    C = CONFIG.n_embd
    for name in nccl_model.trainable_names:
        got, want = to_numpy(nccl_model.params[name]), to_numpy(plain_model.params[name])
        if name.endswith("attn.c_attn.bias"):
            # The key bias's gradient is exactly zero (q . b_k shifts a whole row of scores, which the
            # softmax ignores): it is rounding noise, and AdamW turns noise into steps of up to lr
            # each. Only that bound holds for it; the query and value biases are compared as the rest.
            np.testing.assert_array_less(np.abs(got[C : 2 * C] - want[C : 2 * C]), 5 * 1e-2, err_msg=name)
            got, want = np.concatenate([got[:C], got[2 * C :]]), np.concatenate([want[:C], want[2 * C :]])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)
