"""The transformers + PEFT peer of ``minilora bench --preset smollm2``: SmolLM2's LoRA step as a
PyTorch user writes it.

Like ``torch_peer.py`` this is a benchmark peer that minilora itself never imports: ``bench`` loads
it only for ``--peer torch``. It builds transformers' own ``LlamaForCausalLM`` with SmolLM2's config
and the weights minilora holds (handed over as NumPy arrays in Hugging Face's names), wraps it with
``peft.PeftModel.from_pretrained`` on an adapter directory that minilora wrote for the occasion (so
both sides start from the same lora_A and lora_B), and trains it the way PEFT's documentation does:

    logits = model(input_ids).logits; loss = cross_entropy(logits, targets); loss.backward()
    clip_grad_norm_(adapter parameters); AdamW.step(); zero_grad()

with the same lr, betas, eps and weight decay as minilora's AdamW. ``attention`` picks transformers'
``attn_implementation``: "eager" (the explicit softmax over T x T, as minilora) or "sdpa" (PyTorch's
fused kernel). On a GPU TF32 stays off, so in float32 both sides multiply in full float32.

``dtype="bfloat16"`` is what a PEFT user runs in mixed precision: the base model cast to bf16
(``base.to(dtype=torch.bfloat16)``), the adapter loaded over it by ``PeftModel.from_pretrained`` with
``autocast_adapter_dtype=True`` (PEFT's default, passed explicitly: it keeps the LoRA weights in
float32 over a bf16 base, and PEFT's LoRA layer casts their input to float32 and their update back),
AdamW over those float32 parameters, and the cross-entropy of the logits cast to float32, as
transformers' own loss does.
"""

from __future__ import annotations

import numpy as np
import peft
import torch
import torch.nn.functional as F
import transformers

from .torch_peer import TORCH_DTYPES, peak_device_bytes, synchronize

EMBED = "model.embed_tokens.weight"


def versions() -> dict:
    return {"transformers": transformers.__version__, "peft": peft.__version__}


class PeftLlama:
    """transformers' Llama holding ``params`` with the PEFT adapter at ``adapter_dir``, trained by AdamW.

    config: the LlamaConfig's fields as a dict (minilora's names); params: Hugging Face name ->
    NumPy array in minilora's (C_in, C_out) layout, transposed here into nn.Linear's (C_out, C_in).
    dtype: the base's, "float32" or "bfloat16" (the adapter stays float32: see the module docstring).
    """

    def __init__(self, config: dict, params: dict, adapter_dir, lr: float, betas, eps: float,
                 weight_decay: float, grad_clip: float, attention: str = "eager", dtype: str = "float32",
                 device: str = "cpu"):  # fmt: skip
        if attention not in ("eager", "sdpa"):
            raise ValueError(f"attention must be 'eager' or 'sdpa', got {attention!r}")
        hf_config = transformers.LlamaConfig(
            vocab_size=config["vocab_size"], hidden_size=config["n_embd"], intermediate_size=config["ffn_hidden"],
            num_hidden_layers=config["n_layer"], num_attention_heads=config["n_head"],
            num_key_value_heads=config["n_kv_head"], max_position_embeddings=config["block_size"],
            rms_norm_eps=config["rms_eps"], rope_theta=config["rope_theta"],
            tie_word_embeddings=config["tie_embeddings"], attn_implementation=attention,
        )  # fmt: skip
        base = transformers.LlamaForCausalLM(hf_config)
        state = {
            name: torch.from_numpy(
                np.ascontiguousarray(value.T if value.ndim == 2 and name != EMBED else value)
            )
            for name, value in params.items()
        }
        missing, unexpected = base.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise KeyError(
                f"weights do not fit transformers' Llama: missing {missing}, unexpected {unexpected}"
            )
        base = base.to(device=device, dtype=TORCH_DTYPES[dtype])
        # autocast_adapter_dtype (PEFT's default, said here): the LoRA weights float32 over a bf16 base
        self.model = peft.PeftModel.from_pretrained(
            base, str(adapter_dir), is_trainable=True, autocast_adapter_dtype=True
        ).train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
        )
        self.grad_clip, self.device = grad_clip, device
        self.attention = attention

    def step(self, idx: np.ndarray, targets: np.ndarray):
        """One training step on NumPy (B, T) batches: forward, backward, clipping, AdamW. Returns the loss."""
        idx, targets = (
            torch.from_numpy(np.asarray(a, dtype=np.int64)).to(self.device) for a in (idx, targets)
        )
        logits = self.model(input_ids=idx).logits.float()  # (B, T, V); float32 as transformers' loss takes it
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable)

    def synchronize(self) -> None:
        synchronize(self.device)

    def peak_device_bytes(self):
        return peak_device_bytes(self.device)
