"""Generation on the GPU (minilora.fast.cuda.decode) against the reference generation on the same model.

The GPU tests are skipped without CuPy and a GPU. The decoder draws the reference generator's own
uniforms and applies the reference's inverse-CDF rule, so for one seed both must produce the very
same ids: greedy, sampled, with top-k, with a LoRA adapter, with a stop id, and past the block size
(where both rebuild the cache from the last half of the context).
"""

import numpy as np
import pytest

from minilora.config import GPTConfig
from minilora.fast import accelerate_generation
from minilora.fast.cuda.decode import uniform_draws
from minilora.generate import generate, generate_ids
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, WPE, WTE, init_params

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)


def test_the_uniform_draws_are_the_reference_generators_step_by_step():
    rng = np.random.default_rng([7])  # generate.generate_ids: host_rng(seed), one (B, 1) draw per step
    sequential = np.concatenate([rng.random((3, 1)).T for _ in range(5)])  # (5, 3)
    np.testing.assert_array_equal(uniform_draws(7, 5, 3), sequential)


def test_a_model_on_the_cpu_keeps_the_reference_generation():
    assert accelerate_generation(GPT(CONFIG, init_params(CONFIG, seed=0))) is generate_ids


def gpu_model(seed: int = 1, lora: bool = False):
    params = init_params(CONFIG, seed=seed, device="cuda")
    params[WTE] *= 10  # peaked logits: greedy decoding has clear winners, far above float32 rounding
    params[WPE] *= 30  # strong positions: greedy ids change along the sequence instead of repeating one token
    model = GPT(CONFIG, params)
    if lora:  # init="random": lora_B is not zero, so the adapter changes every adapted layer
        model = add_lora(model, LoraConfig(r=4, target_modules=("c_attn", "mlp.c_fc"), init="random"), seed=3)
    return model


def prompts(B: int, T0: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, size=(B, T0))


@pytest.mark.gpu
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize(
    "temperature, top_k", [(0.0, None), (1.0, None), (0.7, 5), (1.3, 1)], ids=["greedy", "t1", "top5", "top1"]
)
def test_gpu_ids_equal_the_reference_ids_past_the_block_size(lora, temperature, top_k):
    model = gpu_model(lora=lora)
    decoder = accelerate_generation(model)
    assert decoder is not generate_ids
    ids = prompts(3, 5)
    new = 3 * CONFIG.block_size  # 48 new tokens: the cache is rebuilt from the kept half several times
    expected = generate_ids(model, ids, new, temperature, top_k, seed=11)
    got = decoder(model, ids, new, temperature, top_k, seed=11)
    assert got.shape == expected.shape == (3, 5 + new)
    np.testing.assert_array_equal(got, expected)
    assert min(len(set(row.tolist())) for row in got[:, 5:]) > 3  # real sequences, not one token repeated


@pytest.mark.gpu
def test_gpu_generation_of_text_equals_the_reference_and_leaves_the_model_as_it_was():
    model = gpu_model(seed=4, lora=True)
    ops = model.ops
    expected = generate(model, "KING.\n", 40, temperature=0.8, seed=2)
    assert (
        generate(model, "KING.\n", 40, temperature=0.8, seed=2, decoder=accelerate_generation(model))
        == expected
    )
    assert model.ops is ops


@pytest.mark.gpu
def test_a_long_prompt_and_a_stop_id_end_where_the_reference_ends():
    model = gpu_model(seed=5)
    decoder = accelerate_generation(model)
    ids = prompts(2, CONFIG.block_size + 7, seed=1)  # longer than the block: only its last block is seen
    free = generate_ids(model, ids, 30, 1.0, None, seed=3)
    stop_id = int(free[1, ids.shape[1] + 9])  # a token row 1 makes at its 10th step
    expected = generate_ids(model, ids, 30, 1.0, None, seed=3, stop_id=stop_id)
    got = decoder(model, ids, 30, 1.0, None, seed=3, stop_id=stop_id)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(decoder(model, ids, 0, 1.0, None, seed=3), ids)


@pytest.mark.gpu
def test_non_finite_logits_raise_as_in_the_reference():
    model = gpu_model(seed=6)
    model.params["transformer.h.1.mlp.c_proj.bias"][3] = np.nan
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        generate_ids(model, prompts(1, 4), 5, 1.0, None)
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        accelerate_generation(model)(model, prompts(1, 4), 5, 1.0, None)
