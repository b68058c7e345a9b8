"""Loss masks and packed rows on the GPU: the kernels against the reference, and a captured packed step.

Skipped without CuPy and a GPU. The cross-entropy kernel with IGNORE targets, the RoPE kernel with
each row's own tables, and both attentions with example starts must give the reference's numbers;
a packed step through the CUDA layer functions must equal the padded one in float64; and the CUDA
graph, whose backward seed now changes from micro-batch to micro-batch, must train as eager steps do.
"""

import numpy as np
import pytest

from minilora.backend import to_device, to_numpy
from minilora.config import GPTConfig
from minilora.fast.cuda import use_cublas
from minilora.fast.cuda.graph import GraphedStep
from minilora.fast.cuda.ops import CUDA_OPS
from minilora.jobs.finetune import make_optimizer
from minilora.layers import IGNORE, REFERENCE_OPS, rope_tables_at
from minilora.llama import Llama, LlamaConfig, init_llama_params
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params
from minilora.training.examples import Example, ExampleSet, pack_rows, packed_batch, padded_batch
from minilora.training.loop import TrainSettings
from minilora.training.step import TrainingStep, forward_backward

pytestmark = pytest.mark.gpu
cupy = pytest.importorskip("cupy")

T = 16


def examples(seed=0, n=7, vocab=64):
    rng = np.random.default_rng(seed)
    made = []
    for length in rng.integers(3, 12, n):
        trained = rng.random(length) < 0.6
        trained[-1] = True
        made.append(Example(rng.integers(0, vocab, length), trained))
    return made


def both_layouts(seed=0):
    chosen = examples(seed)
    padded = padded_batch(chosen, T)
    packed = packed_batch(chosen, pack_rows([len(e.ids) - 1 for e in chosen], T), T)
    return padded, packed


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_cross_entropy_kernel_scores_only_the_targets_not_ignored(dtype):
    rng = np.random.default_rng(1)
    logits = 3 * rng.standard_normal((4, 6, 50))
    targets = np.where(rng.random((4, 6)) < 0.5, rng.integers(0, 50, (4, 6)), IGNORE)
    want_loss, want_cache = REFERENCE_OPS.cross_entropy_forward(logits, targets)
    want = REFERENCE_OPS.cross_entropy_backward(1.3, want_cache)
    loss, cache = CUDA_OPS.cross_entropy_forward(
        to_device(logits.astype(dtype), "cuda"), to_device(targets, "cuda")
    )
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert float(loss) == pytest.approx(float(want_loss), rel=tol)
    np.testing.assert_allclose(
        to_numpy(CUDA_OPS.cross_entropy_backward(1.3, cache)), want, rtol=tol, atol=tol
    )


def test_the_rope_kernel_reads_each_rows_own_tables():
    rng = np.random.default_rng(2)
    _, packed = both_layouts()
    x = rng.standard_normal((packed.x.shape[0], 3, T, 8))
    cos, sin = rope_tables_at(packed.positions, 8, 10000.0, np.float64)
    want = REFERENCE_OPS.rope_forward(x, cos, sin)[0]
    got, cache = CUDA_OPS.rope_forward(*(to_device(a, "cuda") for a in (x, cos, sin)))
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-12, atol=1e-13)
    dout = rng.standard_normal(x.shape)
    back = REFERENCE_OPS.rope_backward(dout, REFERENCE_OPS.rope_forward(x, cos, sin)[1])
    np.testing.assert_allclose(
        to_numpy(CUDA_OPS.rope_backward(to_device(dout, "cuda"), cache)), back, rtol=1e-12
    )


def models(family: str, dtype, device):
    if family == "gpt":
        config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=T, vocab_size=64)
        return GPT(config, init_params(config, seed=1, dtype=dtype, device=device))
    config = LlamaConfig(
        n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48, vocab_size=64, block_size=T
    )
    return Llama(config, init_llama_params(config, seed=1, dtype=dtype, device=device))


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_packed_cuda_step_equals_the_padded_reference_step(family):
    use_cublas()
    padded, packed = both_layouts()
    reference = models(family, np.float64, None)
    want_loss, want = forward_backward(reference, padded.x, padded.y)
    model = models(family, np.float64, "cuda")
    model.use_layer_ops(CUDA_OPS)
    loss, grads = forward_backward(model, packed.x, packed.y, positions=packed.positions)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-11)
    for name in want:
        np.testing.assert_allclose(to_numpy(grads[name]), want[name], rtol=1e-9, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_graph_captured_packed_step_trains_as_eager_steps(family, grad_accum):
    use_cublas()
    lora = LoraConfig(r=4, target_modules="all-linear", init="random")
    pair = [add_lora(models(family, np.float32, "cuda"), lora, seed=2) for _ in "ab"]
    for model in pair:
        model.use_layer_ops(CUDA_OPS)
    optimizers = [make_optimizer(m, TrainSettings(lr=1e-2, weight_decay=0.1)) for m in pair]
    graphed = GraphedStep(pair[1], optimizers[1], grad_clip=1.0, warmup=1, grad_accum=grad_accum)
    eager = TrainingStep(grad_accum=grad_accum)
    source = ExampleSet(examples(seed=3, n=40), packing=True)
    for step in range(5):  # the masks and the micro-batches' shares differ at every step
        x, y, positions = source.train_batch(4, T, np.random.default_rng(step))  # always 4 rows: one graph
        want = float(eager(pair[0], optimizers[0], x, y, None, 1.0, positions=positions))
        got = float(graphed(pair[1], optimizers[1], x, y, None, 1.0, positions=positions))
        assert got == pytest.approx(want, rel=1e-5)
    assert graphed.graph is not None
    for name in pair[0].trainable_names:
        np.testing.assert_allclose(
            to_numpy(pair[1].params[name]), to_numpy(pair[0].params[name]), rtol=1e-4, atol=1e-6, err_msg=name
        )
