"""The captured training step (minilora.fast.cuda.graph.GraphedStep) against ordinary eager steps on the GPU.

Skipped without CuPy and a GPU. Two copies of one LoRA model take the same five batches, one through
the graph (one eager warm-up step, then a capture and replays), one through the eager step of the
benchmark; their losses and adapter weights must agree to float32 rounding.
"""

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
try:
    if cupy.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("no GPU visible", allow_module_level=True)
except Exception as err:  # noqa: BLE001  (CuPy without a driver or device)
    pytest.skip(f"no usable GPU: {err}", allow_module_level=True)

from minilora.backend import to_numpy  # noqa: E402
from minilora.config import GPTConfig  # noqa: E402
from minilora.fast import accelerate  # noqa: E402
from minilora.fast.cuda import use_cublas  # noqa: E402
from minilora.fast.cuda.graph import GraphedStep, cuda_train_step  # noqa: E402
from minilora.fast.cuda.ops import CUDA_OPS  # noqa: E402
from minilora.jobs.finetune import make_optimizer  # noqa: E402
from minilora.lora.config import LoraConfig  # noqa: E402
from minilora.lora.model import add_lora  # noqa: E402
from minilora.model import GPT, init_params  # noqa: E402
from minilora.training.loop import TrainSettings, train_step  # noqa: E402

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
    step.replay(np.zeros((4, 16), dtype=np.int64), np.zeros((4, 16), dtype=np.int64))
    with pytest.raises(ValueError, match="shape"):
        step.replay(np.zeros((2, 16), dtype=np.int64), np.zeros((2, 16), dtype=np.int64))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        step.replay(np.full((4, 16), 999), np.zeros((4, 16), dtype=np.int64))
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
    assert step is cuda_train_step and models[1].ops is CUDA_OPS
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
