"""minilora's adapters against Hugging Face PEFT itself, both directions, on the same GPT-2 weights.

A transformers GPT2LMHeadModel holds minilora's base weights (the names and layouts agree). An
adapter exported by minilora is loaded with PeftModel.from_pretrained, and one made by PEFT is
imported into minilora; in each case the logits must agree to 1e-5 (float32). Skipped only where
torch, transformers or peft cannot be imported.
"""

import numpy as np
import pytest

from minilora.config import GPTConfig
from minilora.io.peft import export_peft, import_peft
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
TOL = 1e-5


def minilora_base():
    params = init_params(CONFIG, seed=0, dtype=np.float32)
    rng = np.random.default_rng(1)
    for value in params.values():
        value += (0.05 * rng.standard_normal(value.shape)).astype(np.float32)
    return GPT(CONFIG, params)


def hf_model(base: GPT):
    hf_config = transformers.GPT2Config(
        n_layer=CONFIG.n_layer,
        n_head=CONFIG.n_head,
        n_embd=CONFIG.n_embd,
        n_positions=CONFIG.block_size,
        vocab_size=CONFIG.vocab_size,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v.copy()) for k, v in base.params.items()}, strict=False
    )
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    return model


def tokens():
    return np.random.default_rng(2).integers(0, CONFIG.vocab_size, (2, CONFIG.block_size))


def relative_gap(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize(
    "lora_config",
    [
        LoraConfig(r=4, lora_alpha=8, target_modules=("c_attn",), init="random"),
        LoraConfig(r=2, lora_alpha=5, target_modules="all-linear", init="random", use_rslora=True),
        LoraConfig(
            r=3,
            lora_alpha=6,
            target_modules=("c_attn", "mlp.c_proj"),
            layers_to_transform=[1],
            init="random",
            use_dora=True,
        ),
    ],
    ids=["lora", "rslora-all-linear", "dora"],
)
def test_peft_loads_a_minilora_adapter_and_gives_the_same_logits(tmp_path, lora_config):
    base = minilora_base()
    model = add_lora(base, lora_config, seed=3)
    if lora_config.use_dora:
        for name in model.trainable_names:
            if name.endswith("magnitude_vector"):
                model.params[name] *= np.float32(1.2)  # magnitudes that moved away from the weight norms
    idx = tokens()
    ours = model.forward(idx)[0]
    export_peft(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(hf_model(base), str(tmp_path)).eval()
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(idx)).logits.numpy()
    assert not np.allclose(ours, base.forward(idx)[0], atol=1e-3)  # the adapter really changes the output
    gap = relative_gap(ours, theirs)
    print(f"minilora -> PEFT ({lora_config.target_modules}, dora={lora_config.use_dora}): {gap:.2e}")
    assert gap < TOL


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_minilora_imports_a_peft_adapter_and_gives_the_same_logits(tmp_path, use_dora):
    base = minilora_base()
    torch.manual_seed(0)
    peft_config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
        use_dora=use_dora,
        init_lora_weights=False,
    )  # False: B random, not zero
    peft_model = peft.get_peft_model(hf_model(base), peft_config).eval()
    if use_dora:
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    parameter.mul_(1.3)
    peft_model.save_pretrained(str(tmp_path))
    idx = tokens()
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(idx)).logits.numpy()
    model = import_peft(base, tmp_path)
    assert len(model.adapted_modules) == 6  # per layer: c_attn, and c_proj matches attn.c_proj and mlp.c_proj
    gap = relative_gap(model.forward(idx)[0], theirs)
    print(f"PEFT -> minilora (dora={use_dora}): {gap:.2e}")
    assert gap < TOL


def test_round_trip_through_peft_format_preserves_every_tensor(tmp_path):
    base = minilora_base()
    model = add_lora(base, LoraConfig(r=2, target_modules="all-linear", init="random"))
    export_peft(model, tmp_path)
    again = import_peft(base, tmp_path)
    for name in model.trainable_names:
        np.testing.assert_array_equal(again.params[name], model.params[name])
