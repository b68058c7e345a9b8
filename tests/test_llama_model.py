"""The Llama model: whole-model gradients against finite differences, and transformers' LlamaForCausalLM
as an independent oracle for logits, loss and every gradient, in float64."""

from dataclasses import replace

import numpy as np
import pytest
from hf_llama import hf_llama

from minilora.backend import count_matmuls
from minilora.generate import KVCache
from minilora.gradcheck import check_model
from minilora.llama import EMBED, Llama, LlamaConfig, init_llama_params

CONFIG = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=16, ffn_hidden=24, vocab_size=23, block_size=12,
                     rope_theta=500.0, rms_eps=1e-5)  # fmt: skip


def perturbed(config=CONFIG, seed=0, frozen=()):
    """A float64 model moved away from its init (gains != 1, larger weights), so no term hides."""
    params = init_llama_params(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for value in params.values():
        value += 0.2 * rng.standard_normal(value.shape)
    return Llama(config, params, frozen=frozen)


def batch(config=CONFIG, B=2, T=7, seed=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))


@pytest.mark.parametrize("tied, pairing, mode", [(True, "half", "elementwise"), (False, "half", "coordinates"),
                                                 (True, "adjacent", "coordinates")])  # fmt: skip
def test_every_gradient_of_a_small_llama_matches_finite_differences(tied, pairing, mode):
    model = perturbed(replace(CONFIG, tie_embeddings=tied, rope_pairing=pairing))
    check_model(model, *batch(), mode=mode, n_samples=24).assert_ok(1e-6)


def test_frozen_weights_get_no_gradient_and_no_weight_gradient_product():
    trainable = {name for name in CONFIG.parameter_shapes() if name.startswith("model.layers.1.")}
    model = perturbed(frozen=[name for name in CONFIG.parameter_shapes() if name not in trainable])
    _, _, cache = model.forward(*batch())
    with count_matmuls() as log:
        grads = model.backward(cache)
    assert set(grads) == trainable
    C, F, kv = CONFIG.n_embd, CONFIG.ffn_hidden, CONFIG.n_kv_head * CONFIG.head_size
    weight_shapes = [(C, C), (C, kv), (C, kv), (C, C), (C, F), (C, F), (F, C)]  # block 1's seven weights
    made = [out for _, _, out in log.products if len(out) == 2 and out != (2 * 7, C)]
    assert sorted(made) == sorted(weight_shapes)  # and no (C, V) product for the frozen tied head


def test_generation_with_the_key_value_cache_equals_the_full_forward():
    model = perturbed()
    ids = np.random.default_rng(4).integers(0, CONFIG.vocab_size, (3, CONFIG.block_size))
    full, _, _ = model.forward(ids)
    cache = KVCache(model, 3)
    assert cache.keys[0].shape == (
        3,
        CONFIG.n_kv_head,
        CONFIG.block_size,
        CONFIG.head_size,
    )  # H_kv heads kept
    steps = [model.forward(ids[:, :4], kv_cache=cache)[0]]  # a prompt of 4, then one position at a time
    steps += [model.forward(ids[:, t : t + 1], kv_cache=cache)[0] for t in range(4, CONFIG.block_size)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-12)


def test_bad_configs_and_parameters_are_refused():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        LlamaConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="rope_pairing"):
        LlamaConfig(rope_pairing="rotate")
    params = init_llama_params(CONFIG, dtype=np.float64)
    params[EMBED] = params[EMBED][:, :8]
    with pytest.raises(ValueError, match="model.embed_tokens.weight"):
        Llama(CONFIG, params)


# The oracle: transformers' own Llama, given minilora's weights (transposed into nn.Linear's layout).


@pytest.mark.parametrize("tied", [True, False])
def test_logits_loss_and_every_gradient_equal_transformers_llama(tied):
    model = perturbed(replace(CONFIG, tie_embeddings=tied), seed=6)
    torch, hf = hf_llama(model)
    idx, targets = batch(seed=7)
    logits, loss, cache = model.forward(idx, targets)
    grads = model.backward(cache)
    hf_logits = hf(input_ids=torch.tensor(idx)).logits
    hf_loss = torch.nn.functional.cross_entropy(
        hf_logits.reshape(-1, CONFIG.vocab_size), torch.tensor(targets).reshape(-1)
    )
    hf_loss.backward()
    np.testing.assert_allclose(logits, hf_logits.detach().numpy(), rtol=0, atol=1e-12)
    assert float(loss) == pytest.approx(float(hf_loss), abs=1e-12)
    hf_params = dict(hf.named_parameters())
    for name, grad in grads.items():
        hf_grad = hf_params[name].grad.numpy()
        expected = hf_grad.T if grad.ndim == 2 and name != EMBED else hf_grad
        np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-12, err_msg=name)
