"""The PyTorch peer of ``minilora bench``: the same GPT-2, LoRA and AdamW step in PyTorch eager.

This module is a benchmark peer and a test oracle. It is the one module of the package that
imports torch, and nothing in the library imports it: ``minilora bench --peer torch`` imports it
only when asked, gives it minilora's initial weights and the same batches, and times the same step
next to minilora's, in the same process.

It is what a PyTorch user would write for the same model, with nothing compiled:

- the parameters are minilora's flat dict, in GPT-2's layout (W of shape (C_in, C_out), so a
  linear layer is ``torch.addmm(b, x, W)`` like Hugging Face's Conv1D), copied into torch tensors;
- frozen weights have ``requires_grad=False``, so autograd forms no gradient for them;
- a LoRA module adds ``F.linear(F.linear(x, lora_A), lora_B) * scaling``, PEFT's formula;
- attention is the explicit ``softmax(q k^T / sqrt(hs) + causal) v`` over the full T x T, as in
  minilora and nanoGPT's non-flash path (``attention="sdpa"`` switches to
  ``F.scaled_dot_product_attention``, which on the CPU skips the masked half);
- the step is forward, ``loss.backward()``, ``clip_grad_norm_`` and ``torch.optim.AdamW`` with the
  same lr, betas, eps and weight decay on the same parameters (matrices decayed, embeddings, biases
  and LayerNorm gains not), all with torch's defaults otherwise;
- on a GPU (``device="cuda"``) the same code runs on CUDA tensors with TF32 turned off, so both
  sides multiply in full float32; the loss is returned without a host sync, as in a training loop;
- what a PyTorch user on a GPU actually runs is two switches away: ``autocast="bfloat16"`` wraps
  the forward in ``torch.autocast`` (products in bf16 with float32 accumulation, the parameters and
  AdamW's state stay float32), and ``compile=True`` hands the forward to ``torch.compile``
  (kernels fused by Inductor; the first steps compile, so warm up before timing).

The interface takes and returns NumPy arrays and plain values: it imports nothing from minilora, so
the peer stays an independent implementation.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

WTE = "transformer.wte.weight"
WPE = "transformer.wpe.weight"
LAYERNORM_EPS = 1e-5
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
AUTOCAST_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def configure(threads: int, device: str = "cpu", tf32: bool = False) -> dict:
    """Set torch's intra-op threads (the issue's torch.set_num_threads(2)) and, on a GPU, TF32 (off by default).

    Returns what torch reports about itself and the device.
    """
    torch.set_num_threads(threads)
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }  # the SIMD kernels torch dispatches to
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32  # False: full float32 products, as minilora's default
        torch.backends.cudnn.allow_tf32 = tf32
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, tf32=tf32)
    return info


def synchronize(device: str) -> None:
    """Wait for queued GPU work (a no-op on the CPU), so that a clock around a step measures the step."""
    if device == "cuda":
        torch.cuda.synchronize()


def peak_device_bytes(device: str, reset: bool = False):
    """The CUDA caching allocator's high-water mark of allocated bytes (None on the CPU)."""
    if device != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated()


def matmul_peak_gflops(n: int, repeats: int = 5, dtype: str = "float32", device: str = "cpu") -> float:
    """Best GFLOP/s of an (n, n) @ (n, n) product through torch.matmul, after a warm-up."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=TORCH_DTYPES[dtype])
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=TORCH_DTYPES[dtype])
    out = torch.empty(n, n, dtype=TORCH_DTYPES[dtype], device=device)
    torch.matmul(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        torch.matmul(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


class TorchGPT:
    """GPT-2 with optional LoRA, trained by AdamW, in PyTorch eager.

    spec: {"n_layer", "n_head", "n_embd", "vocab_size"}; params: name -> NumPy array (copied);
    trainable: the names that get gradients; adapted: module names with lora_A/lora_B in params;
    scaling: LoRA's s; decay_names: the trainable names that get weight decay; autocast: None
    (products in ``dtype``) or "bfloat16"/"float16" (``torch.autocast`` around the forward);
    compile: the forward through ``torch.compile``.
    """

    def __init__(
        self,
        spec: dict,
        params: dict,
        trainable,
        adapted=(),
        scaling: float = 1.0,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decay_names=(),
        grad_clip: float = 0.0,
        dtype: str = "float32",
        attention: str = "math",
        device: str = "cpu",
        autocast: str | None = None,
        compile: bool = False,
    ):
        if attention not in ("math", "sdpa"):
            raise ValueError(f"attention must be 'math' or 'sdpa', got {attention!r}")
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None, 'bfloat16' or 'float16', got {autocast!r}")
        self.n_layer, self.n_head = spec["n_layer"], spec["n_head"]
        self.n_embd, self.vocab_size = spec["n_embd"], spec["vocab_size"]
        self.adapted = frozenset(adapted)
        self.scaling = scaling
        self.grad_clip = grad_clip
        self.attention = attention
        self.device = device
        self.autocast = AUTOCAST_DTYPES[autocast]
        self._forward = torch.compile(self.forward) if compile else self.forward
        trainable = set(trainable)
        unknown = trainable - set(params)
        if unknown:
            raise KeyError(f"trainable names not in params: {sorted(unknown)}")
        # torch.tensor copies: minilora and the peer update their own weights in place.
        self.p = {
            name: torch.tensor(
                np.asarray(value), dtype=TORCH_DTYPES[dtype], device=device, requires_grad=name in trainable
            )
            for name, value in params.items()
        }
        self.trainable = [self.p[name] for name in params if name in trainable]
        decay = [self.p[name] for name in params if name in trainable and name in set(decay_names)]
        no_decay = [self.p[name] for name in params if name in trainable and name not in set(decay_names)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]  # none for a model that only generates
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps) if groups else None
        self._causal = {}

    def linear(self, name: str, x):
        """y = x W + b (+ s * (x A^T) B^T for an adapted module).   x: (B, T, C_in)."""
        W, b = self.p[f"{name}.weight"], self.p[f"{name}.bias"]
        y = torch.addmm(b, x.reshape(-1, x.shape[-1]), W).view(*x.shape[:-1], W.shape[1])
        if name in self.adapted:
            y = y + F.linear(F.linear(x, self.p[f"{name}.lora_A"]), self.p[f"{name}.lora_B"]) * self.scaling
        return y

    def layernorm(self, name: str, x):
        return F.layer_norm(
            x, (self.n_embd,), self.p[f"{name}.weight"], self.p[f"{name}.bias"], LAYERNORM_EPS
        )

    def causal_mask(self, T: int):
        if T not in self._causal:
            self._causal[T] = torch.ones(T, T, dtype=torch.bool, device=self.device).triu(
                1
            )  # True above the diagonal
        return self._causal[T]

    def attend(self, qkv):
        """Causal self-attention.   qkv: (B, T, 3C) -> (B, T, C)."""
        B, T, _ = qkv.shape
        H, hs = self.n_head, self.n_embd // self.n_head
        q, k, v = (
            t.view(B, T, H, hs).transpose(1, 2) for t in qkv.split(self.n_embd, dim=2)
        )  # (B, H, T, hs)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q * (1.0 / math.sqrt(hs))) @ k.transpose(-2, -1)  # (B, H, T, T)
            att = att.masked_fill(self.causal_mask(T), float("-inf")).softmax(dim=-1)
            y = att @ v  # (B, H, T, hs)
        return y.transpose(1, 2).reshape(B, T, self.n_embd)

    def forward(self, idx, targets):
        """Mean cross-entropy of (B, T) int64 token ids against targets."""
        p = self.p
        T = idx.shape[1]
        x = F.embedding(idx, p[WTE]) + p[WPE][:T]
        for i in range(self.n_layer):
            pre = f"transformer.h.{i}"
            x = x + self.linear(
                f"{pre}.attn.c_proj",
                self.attend(self.linear(f"{pre}.attn.c_attn", self.layernorm(f"{pre}.ln_1", x))),
            )
            h = F.gelu(self.linear(f"{pre}.mlp.c_fc", self.layernorm(f"{pre}.ln_2", x)), approximate="tanh")
            x = x + self.linear(f"{pre}.mlp.c_proj", h)
        x = self.layernorm("transformer.ln_f", x)
        logits = x @ p[WTE].T  # tied head, (B, T, V)
        return F.cross_entropy(logits.view(-1, self.vocab_size), targets.reshape(-1))

    def cached_logits(self, idx, start: int, keys, values):
        """Logits after the last of the new ids idx (B, t) at positions start.., through the key/value cache.

        keys, values: (n_layer, B, H, T_max, hs) tensors, filled at start..start+t-1 here. Attention
        is ``F.scaled_dot_product_attention`` over the cached prefix (causal within a prefill from 0).
        """
        p = self.p
        B, T = idx.shape
        H, hs = self.n_head, self.n_embd // self.n_head
        end = start + T
        x = F.embedding(idx, p[WTE]) + p[WPE][start:end]
        for i in range(self.n_layer):
            pre = f"transformer.h.{i}"
            qkv = self.linear(f"{pre}.attn.c_attn", self.layernorm(f"{pre}.ln_1", x))
            q, k, v = (t.view(B, T, H, hs).transpose(1, 2) for t in qkv.split(self.n_embd, dim=2))
            keys[i, :, :, start:end], values[i, :, :, start:end] = k, v
            y = F.scaled_dot_product_attention(q, keys[i, :, :, :end], values[i, :, :, :end], is_causal=T > 1)
            x = x + self.linear(f"{pre}.attn.c_proj", y.transpose(1, 2).reshape(B, T, self.n_embd))
            h = F.gelu(self.linear(f"{pre}.mlp.c_fc", self.layernorm(f"{pre}.ln_2", x)), approximate="tanh")
            x = x + self.linear(f"{pre}.mlp.c_proj", h)
        return self.layernorm("transformer.ln_f", x[:, -1]) @ p[WTE].T  # (B, V)

    @torch.no_grad()
    def generate(self, prompt_ids: np.ndarray, max_new_tokens: int, temperature: float = 1.0, seed: int = 0):
        """(B, T0 + max_new_tokens) ids: the prompt extended with a key/value cache, eager, within one block.

        Greedy at temperature 0, else ``torch.multinomial`` of softmax(logits / temperature) on the
        device. The ids stay on the device until the end: no host sync per token.
        """
        B, T0 = prompt_ids.shape
        T_max, H, hs = T0 + max_new_tokens, self.n_head, self.n_embd // self.n_head
        dtype = self.p[WTE].dtype
        keys = torch.empty(self.n_layer, B, H, T_max, hs, dtype=dtype, device=self.device)
        values = torch.empty_like(keys)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        ids = torch.empty(B, T_max, dtype=torch.int64, device=self.device)
        ids[:, :T0] = torch.from_numpy(prompt_ids).to(self.device)
        logits = self.cached_logits(ids[:, :T0], 0, keys, values)  # the prefill
        for t in range(T0, T_max):
            if temperature == 0:
                ids[:, t] = logits.argmax(dim=-1)
            else:
                probs = (logits / temperature).softmax(dim=-1)
                ids[:, t] = torch.multinomial(probs, 1, generator=generator)[:, 0]
            if t + 1 < T_max:
                logits = self.cached_logits(ids[:, t : t + 1], t, keys, values)
        return ids.cpu().numpy()

    def step(self, idx: np.ndarray, targets: np.ndarray):
        """One training step on NumPy (B, T) batches: forward, backward, clipping, AdamW. Returns the loss."""
        with torch.autocast(self.device, dtype=self.autocast, enabled=self.autocast is not None):
            loss = self._forward(*self._to_device(idx, targets))
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def loss_and_grads(self, idx: np.ndarray, targets: np.ndarray) -> tuple[float, dict]:
        """The loss and every trainable gradient as NumPy arrays, without a step (for the oracle test)."""
        loss = self.forward(*self._to_device(idx, targets))
        loss.backward()
        grads = {name: t.grad.detach().cpu().numpy().copy() for name, t in self.p.items() if t.requires_grad}
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    def synchronize(self) -> None:
        synchronize(self.device)

    def peak_device_bytes(self):
        return peak_device_bytes(self.device)

    def _to_device(self, *arrays: np.ndarray):
        return tuple(torch.from_numpy(a).to(self.device) for a in arrays)

    def params_numpy(self) -> dict:
        return {name: t.detach().cpu().numpy().copy() for name, t in self.p.items()}
