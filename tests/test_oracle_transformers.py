"""An independent oracle: minilora's GPT-2 against Hugging Face's GPT2LMHeadModel and torch autograd.

Both models get the same float64 weights (minilora's flat dict is loaded into the Hugging Face model
by name, since the layouts agree), then logits, loss and every gradient are compared. The weights are
moved away from their init (non-zero biases, LayerNorm gains != 1) so that no term can hide behind a
zero. Skipped only when torch or transformers cannot be imported.

Run with ``-s`` to see the largest differences observed.
"""

import re

import numpy as np
import pytest

from minilora.config import GPTConfig
from minilora.model import GPT, WPE, WTE, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

# Measured in float64: logits 8e-16, loss 0, gradients 2e-15 relative. The tolerances keep a margin
# of about 500 and no more, so that a wrong constant (GELU's 0.044716 for 0.044715 moves the logits by
# 4e-7) fails here instead of hiding under a float32-sized tolerance.
LOGITS_TOL = 1e-12  # max |minilora - torch| / max |torch|
LOSS_TOL = 1e-12
GRAD_TOL = 1e-12

CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64)
B, T = 2, 12  # T < block_size: the position rows T.. must get exactly zero gradient, in both models

# Keys a GPT2LMHeadModel may list as missing when loaded from minilora's dict: the tied output head
# (it is wte itself), and, in transformers versions that saved them, the per-block attention buffers
# (the causal mask "attn.bias" and "attn.masked_bias"), which hold constants, not parameters.
TIED_HEAD = "lm_head.weight"
ATTENTION_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def hf_config(config: GPTConfig):
    """The transformers.GPT2Config of the same architecture, with every dropout off."""
    return transformers.GPT2Config(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        n_positions=config.block_size,
        vocab_size=config.vocab_size,
        activation_function="gelu_new",  # GPT-2's tanh approximation, as minilora's gelu
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )


def perturbed_params(config: GPTConfig, seed: int = 0) -> dict:
    """float64 parameters moved away from init: biases != 0, gains != 1, larger weights."""
    params = init_params(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for value in params.values():
        value += 0.1 * rng.standard_normal(value.shape)
    return params


def batch(config: GPTConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    idx[1, 5] = idx[0, 3] = idx[0, 0]  # a token repeated across positions and sequences (embedding add-at)
    return idx, targets


def hf_model(config: GPTConfig, params: dict):
    """A float64 GPT2LMHeadModel holding ``params``; checks the load left out only what it may."""
    model = transformers.GPT2LMHeadModel(hf_config(config)).double().eval()
    assert model.config._attn_implementation == "eager"
    state = {name: torch.from_numpy(value.copy()) for name, value in params.items()}
    result = model.load_state_dict(state, strict=False)
    persistent_buffers = {name for name, _ in model.named_buffers()} & set(model.state_dict())
    bad_missing = [
        k
        for k in result.missing_keys
        if k != TIED_HEAD and not (k in persistent_buffers and ATTENTION_BUFFER.fullmatch(k))
    ]
    assert not bad_missing, f"parameters missing from minilora's dict: {bad_missing}"
    assert not result.unexpected_keys, f"minilora names Hugging Face does not know: {result.unexpected_keys}"
    assert model.lm_head.weight is model.transformer.wte.weight, "the output head is not tied to wte"
    assert np.array_equal(model.lm_head.weight.detach().numpy(), params[WTE])
    for name, tensor in model.state_dict().items():
        if name in params:
            assert np.array_equal(tensor.numpy(), params[name]), f"{name} did not load verbatim"
    return model


def torch_loss_and_grads(model, idx, targets):
    """Logits, mean cross-entropy over the same un-shifted targets, and autograd grads by name.

    HF's own ``labels=`` would shift targets by one position; minilora's loss does not, so the loss is
    computed here from the logits. The tied wte collects both the embedding's and the head's gradient.
    """
    model.zero_grad(set_to_none=True)
    logits = model(torch.from_numpy(idx)).logits  # (B, T, V)
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, V), torch.from_numpy(targets).reshape(-1))
    loss.backward()
    # named_parameters() lists a tied tensor once, under its first name (transformer.wte.weight)
    grads = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach().numpy(), float(loss.detach()), grads


def rel_diff(a, b) -> tuple[float, float]:
    """(max |a - b| / max |b|, max |a - b|), the error measure of every comparison here."""
    a, b = np.asarray(a), np.asarray(b)
    abs_diff = float(np.max(np.abs(a - b)))
    return abs_diff / max(float(np.max(np.abs(b))), 1e-300), abs_diff


def assert_grads_match(grads: dict, torch_grads: dict, names) -> None:
    worst = []
    for name in names:
        ours, theirs = grads[name], torch_grads[name]
        assert ours.shape == theirs.shape and ours.dtype == np.float64, f"{name}: {ours.shape} {ours.dtype}"
        assert np.max(np.abs(theirs)) > 0, f"torch's gradient of {name} is all zeros: the check is vacuous"
        rel, abs_diff = rel_diff(ours, theirs)
        worst.append((rel, abs_diff, name))
    worst.sort(reverse=True)
    rel, abs_diff, name = worst[0]
    print(f"\nworst gradient over {len(worst)} parameters: {name} rel {rel:.3e} abs {abs_diff:.3e}")
    failing = [f"{n}: rel {r:.3e} abs {a:.3e}" for r, a, n in worst if r > GRAD_TOL]
    assert not failing, "gradients differ from torch autograd:\n" + "\n".join(failing)


@pytest.fixture(scope="module")
def models_and_batch():
    params = perturbed_params(CONFIG)
    return GPT(CONFIG, params), hf_model(CONFIG, params), *batch(CONFIG)


def test_minilora_state_dict_loads_into_hugging_face_gpt2_with_only_the_tied_head_missing():
    params = perturbed_params(CONFIG)
    model = transformers.GPT2LMHeadModel(hf_config(CONFIG)).double()
    result = model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()}, strict=False)
    persistent_buffers = {name for name, _ in model.named_buffers()} & set(model.state_dict())
    assert set(result.missing_keys) - persistent_buffers == {TIED_HEAD}
    assert all(ATTENTION_BUFFER.fullmatch(k) for k in persistent_buffers), persistent_buffers
    assert result.unexpected_keys == []
    assert set(model.state_dict()) - persistent_buffers == set(params) | {TIED_HEAD}


def test_perturbed_weights_are_away_from_init():
    params = perturbed_params(CONFIG)
    assert np.min(np.abs(params["transformer.h.0.attn.c_attn.bias"])) > 0
    assert np.max(np.abs(params["transformer.h.1.ln_2.weight"] - 1.0)) > 0.05
    assert np.max(np.abs(params["transformer.ln_f.bias"])) > 0.05


def test_logits_and_loss_match_hugging_face_in_float64(models_and_batch):
    model, reference, idx, targets = models_and_batch
    logits, loss, _ = model.forward(idx, targets)
    ref_logits, ref_loss, _ = torch_loss_and_grads(reference, idx, targets)
    assert logits.shape == ref_logits.shape == (B, T, CONFIG.vocab_size) and logits.dtype == np.float64
    rel, abs_diff = rel_diff(logits, ref_logits)
    loss_diff = abs(float(loss) - ref_loss)
    print(
        f"\nlogits: max abs diff {abs_diff:.3e}, relative {rel:.3e} (scale {np.max(np.abs(ref_logits)):.3f})"
    )
    print(f"loss: minilora {float(loss):.15f} torch {ref_loss:.15f} abs diff {loss_diff:.3e}")
    assert np.ndim(loss) == 0
    assert rel <= LOGITS_TOL, f"logits differ: max abs {abs_diff:.3e}, relative {rel:.3e}"
    assert loss_diff <= LOSS_TOL * abs(ref_loss), f"loss {float(loss)!r} vs torch {ref_loss!r}"


def test_every_gradient_matches_torch_autograd_including_the_tied_embedding(models_and_batch):
    model, reference, idx, targets = models_and_batch
    grads = model.backward(model.forward(idx, targets)[2])
    _, _, torch_grads = torch_loss_and_grads(reference, idx, targets)
    assert set(torch_grads) == set(model.params)  # the tied head has no gradient of its own
    assert list(grads) == list(model.params)  # every parameter, in parameter order
    assert_grads_match(grads, torch_grads, model.params)
    # positions T.. were never used: zero gradient, in both
    assert np.all(grads[WPE][T:] == 0) and np.all(torch_grads[WPE][T:] == 0)


def test_wte_gradient_is_the_sum_of_the_embedding_and_the_head_paths(models_and_batch):
    """Untie the head in torch: wte's gradient is exactly the embedding's plus the head's."""
    model, reference, idx, targets = models_and_batch
    wte = reference.transformer.wte.weight.detach()
    head = wte.clone().requires_grad_(True)
    emb = wte.clone().requires_grad_(True)
    hidden = reference.transformer(inputs_embeds=F.embedding(torch.from_numpy(idx), emb)).last_hidden_state
    logits = hidden @ head.T
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1)).backward()
    grads = model.backward(model.forward(idx, targets)[2])
    assert np.max(np.abs(head.grad.numpy())) > 0 and np.max(np.abs(emb.grad.numpy())) > 0
    rel, abs_diff = rel_diff(grads[WTE], (head.grad + emb.grad).numpy())
    assert rel <= GRAD_TOL, f"wte gradient vs embedding + head paths: relative {rel:.3e}"
    # and it is neither path alone
    assert rel_diff(grads[WTE], head.grad.numpy())[0] > 1e-3
    assert rel_diff(grads[WTE], emb.grad.numpy())[0] > 1e-3


FROZEN_SETS = {
    "embeddings_and_block_0": [WTE, WPE]
    + [name for name in perturbed_params(CONFIG) if name.startswith("transformer.h.0.")],
    "lora_style_only_attention_biases_train": [
        name for name in perturbed_params(CONFIG) if not re.search(r"attn\.c_(attn|proj)\.bias$", name)
    ],
    "scattered": [
        WPE,
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.ln_1.bias",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.ln_f.weight",
    ],
}


@pytest.mark.parametrize("frozen_set", sorted(FROZEN_SETS))
def test_frozen_model_returns_gradients_for_exactly_the_trainable_names_matching_torch(
    frozen_set, models_and_batch
):
    _, reference, idx, targets = models_and_batch
    params = perturbed_params(CONFIG)
    frozen = FROZEN_SETS[frozen_set]
    model = GPT(CONFIG, params, frozen=frozen)
    for name, p in reference.named_parameters():
        p.requires_grad_(name not in frozen)
    try:
        _, _, torch_grads = torch_loss_and_grads(reference, idx, targets)
    finally:
        for p in reference.parameters():
            p.requires_grad_(True)
    grads = model.backward(model.forward(idx, targets)[2])
    trainable = [name for name in params if name not in frozen]
    assert list(grads) == trainable
    assert set(torch_grads) == set(trainable)
    assert_grads_match(grads, torch_grads, trainable)
