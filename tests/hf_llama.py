"""transformers' LlamaForCausalLM holding a minilora Llama's weights, exact in float64: an oracle for tests."""

import pytest

from minilora.llama import EMBED


def hf_llama(model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.block_size, rms_norm_eps=config.rms_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
        attention_dropout=0.0,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_config).to(torch.float64)
    state = {}
    for name, value in model.params.items():
        state[name] = torch.tensor(value.T.copy() if value.ndim == 2 and name != EMBED else value)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    # transformers builds its rotary tables in float32 even in a float64 model (about 4e-5 off at these
    # angles): give it the same formula in float64, so the oracle is exact to float64 rounding.
    hs = config.head_size
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)

    def rotary_float64(x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * inv_freq  # (B, T, hs/2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)

    hf.model.rotary_emb.forward = rotary_float64
    # Its RMSNorm likewise computes in float32; the same formula in the input's own dtype:
    for module in hf.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = rmsnorm_in_own_dtype(torch, module)
    return torch, hf


def rmsnorm_in_own_dtype(torch, module):
    def forward(x):
        return module.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)

    return forward
