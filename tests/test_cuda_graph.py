"""The captured training step (minilora.fast.cuda.graph.GraphedStep) against ordinary eager steps on the GPU.

Skipped without CuPy and a GPU. Two copies of one LoRA model take the same five batches, one through
the graph (one eager warm-up step, then a capture and replays), one through the eager step of the
benchmark; their losses and adapter weights must agree to float32 rounding.
"""

import numpy as np
import pytest

from minilora.backend import to_numpy
from minilora.config import GPTConfig
from minilora.fast import accelerate
from minilora.fast.cuda import use_cublas
from minilora.fast.cuda.graph import GraphedStep
from minilora.fast.cuda.ops import CUDA_OPS
from minilora.fast.cuda.optim import fused_apply_update
from minilora.jobs.finetune import make_optimizer
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params
from minilora.training.loop import TrainSettings
from minilora.training.step import train_step

pytestmark = pytest.mark.gpu

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)


def lora_model_and_optimizer():
    model = add_lora(
        GPT(CONFIG, init_params(CONFIG, seed=1, device="cuda")),
        LoraConfig(r=4, target_modules=("c_attn", "attn.c_proj"), init="random"),
        seed=2,
    )
    return model, make_optimizer(model, TrainSettings(lr=1e-2, weight_decay=0.1))


@pytest.mark.parametrize("fast", [False, True])
def test_graph_replays_match_eager_reference_steps(fast):
    """The reference train_step (reference layers, eager) against the graph, with the reference or the CUDA ops."""
    graphed_model, graphed_optimizer = lora_model_and_optimizer()
    eager_model, eager_optimizer = lora_model_and_optimizer()
    if fast:
        use_cublas()
        graphed_model.ops = CUDA_OPS
    step = GraphedStep(graphed_model, graphed_optimizer, grad_clip=1.0, warmup=1)
    rng = np.random.default_rng(3)
    for _ in range(5):
        x, y = rng.integers(0, 256, (4, 16)), rng.integers(0, 256, (4, 16))
        loss_graph = float(step(graphed_model, graphed_optimizer, x, y, None, 1.0))
        loss_eager = float(train_step(eager_model, eager_optimizer, x, y, None, 1.0))
        assert loss_graph == pytest.approx(loss_eager, rel=1e-5)
    assert step.graph is not None  # the last four steps were replays
    for name in graphed_model.trainable_names:
        np.testing.assert_allclose(
            to_numpy(graphed_model.params[name]),
            to_numpy(eager_model.params[name]),
            rtol=1e-4,
            atol=1e-6,
            err_msg=name,
        )


def test_the_fast_llama_step_is_a_graph_and_trains_like_the_reference_step():
    from minilora.llama import Llama, LlamaConfig, init_llama_params

    config = LlamaConfig(
        n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48, vocab_size=64, block_size=16
    )
    lora = LoraConfig(r=4, target_modules=("q_proj", "v_proj", "down_proj"), init="random")
    models = [
        add_lora(Llama(config, init_llama_params(config, seed=1, device="cuda")), lora, seed=2) for _ in "ab"
    ]
    optimizers = [make_optimizer(m, TrainSettings(lr=1e-2, weight_decay=0.1)) for m in models]
    step = accelerate(models[1], optimizers[1], grad_clip=1.0, graph_warmup=1)
    assert isinstance(step, GraphedStep) and models[1].ops is CUDA_OPS
    rng = np.random.default_rng(4)
    for _ in range(4):
        x, y = rng.integers(0, 64, (3, 16)), rng.integers(0, 64, (3, 16))
        want = float(train_step(models[0], optimizers[0], x, y, None, 1.0))
        assert float(step(models[1], optimizers[1], x, y, None, 1.0)) == pytest.approx(want, rel=1e-5)
    assert step.graph is not None
    for name in models[0].trainable_names:
        np.testing.assert_allclose(to_numpy(models[1].params[name]), to_numpy(models[0].params[name]),
                                   rtol=1e-4, atol=1e-6, err_msg=name)  # fmt: skip


def test_graph_refuses_dropout_and_bad_batches():
    model, optimizer = lora_model_and_optimizer()
    dropout_model = GPT(
        GPTConfig.from_dict({**CONFIG.to_dict(), "dropout": 0.1}), init_params(CONFIG, device="cuda")
    )
    with pytest.raises(ValueError, match="dropout"):
        GraphedStep(dropout_model, optimizer, grad_clip=1.0)
    step = GraphedStep(model, optimizer, grad_clip=1.0)
    zeros = np.zeros((4, 16), dtype=np.int64)
    step(model, optimizer, zeros, zeros, None, 1.0)
    with pytest.raises(ValueError, match="shape"):
        step(model, optimizer, zeros[:2], zeros[:2], None, 1.0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        step(model, optimizer, np.full((4, 16), 999), zeros, None, 1.0)
    with pytest.raises(ValueError, match="another model"):
        step(
            dropout_model,
            optimizer,
            np.zeros((4, 16), dtype=np.int64),
            np.zeros((4, 16), dtype=np.int64),
            None,
            1.0,
        )


def test_the_eager_cuda_step_with_dropout_trains_like_the_reference_step():
    config = GPTConfig.from_dict({**CONFIG.to_dict(), "dropout": 0.1})
    models = [GPT(config, init_params(config, seed=4, device="cuda")) for _ in range(2)]
    optimizers = [make_optimizer(m, TrainSettings(lr=1e-2, weight_decay=0.1)) for m in models]
    step = accelerate(models[1], optimizers[1], grad_clip=1.0)
    assert step.apply_update is fused_apply_update and models[1].ops is CUDA_OPS  # cuda_train_step()
    rng = np.random.default_rng(5)
    for i in range(3):
        x, y = rng.integers(0, 256, (4, 16)), rng.integers(0, 256, (4, 16))
        want = float(train_step(models[0], optimizers[0], x, y, None, 1.0, (0, 1, i)))
        assert float(step(models[1], optimizers[1], x, y, None, 1.0, (0, 1, i))) == pytest.approx(
            want, rel=1e-5
        )
    C = config.n_embd
    for name in models[
        0
    ].params:  # float32 gradients summed in other orders; AdamW's steps are lr = 1e-2 each
        got, want = to_numpy(models[1].params[name]), to_numpy(models[0].params[name])
        if name.endswith("attn.c_attn.bias"):
            # The key bias's gradient is exactly 0 (the softmax ignores a shift shared by a row), so both sides
            # step on float32 noise, which AdamW normalises: compare it against its start, not across paths.
            assert np.abs(got[C : 2 * C]).max() < 1e-4 and np.abs(want[C : 2 * C]).max() < 1e-4
            got, want = np.delete(got, np.s_[C : 2 * C]), np.delete(want, np.s_[C : 2 * C])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("grad_accum", [2, 4])
def test_graphed_grad_accumulation_equals_the_big_batch_in_float64(grad_accum):
    """N micro-batches, each a replay of the captured first half, give the step of one batch N times as large."""
    use_cublas()
    models, optimizers, steps = [], [], []
    for accum in (1, grad_accum):
        model = add_lora(
            GPT(CONFIG, init_params(CONFIG, seed=1, dtype=np.float64, device="cuda")),
            LoraConfig(r=4, target_modules=("c_attn", "attn.c_proj"), init="random"),
            seed=2,
        )
        optimizer = make_optimizer(model, TrainSettings(lr=1e-2, weight_decay=0.1))
        models.append(model)
        optimizers.append(optimizer)
        steps.append(accelerate(model, optimizer, grad_clip=0.5, graph_warmup=1, grad_accum=accum))
    assert all(isinstance(step, GraphedStep) for step in steps)
    rng = np.random.default_rng(4)
    for _ in range(4):  # an eager warm-up, the capture, then replays
        x, y = rng.integers(0, 256, (8, 16)), rng.integers(0, 256, (8, 16))
        losses = [float(step(m, o, x, y, None, 0.5)) for step, m, o in zip(steps, models, optimizers)]
        assert losses[1] == pytest.approx(losses[0], rel=1e-12)
    for name in models[0].trainable_names:
        np.testing.assert_allclose(
            to_numpy(models[1].params[name]),
            to_numpy(models[0].params[name]),
            rtol=1e-12,
            atol=1e-12,
            err_msg=name,
        )
