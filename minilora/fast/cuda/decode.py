"""Generation on the GPU: the one-token step of a GPT captured as a CUDA graph, sampling on the device.

Why. The reference (``minilora.generate``) runs the model's blocks on one position per token and
samples on the host. On a GPU each token is then a few hundred small launches from Python, plus a
copy of the logits to the host and a wait for it: the GPU idles between launches, and a small
model generates more slowly than on two CPU cores.

What this does instead, with the reference's own cache layout and block code:

- the keys and values stay on the device in a ``generate.KVCache`` of fixed size (B, H, T_max, hs)
  per layer; the prompt (and, once the context is full, the kept half) is a prefill through the
  model's own ``forward(idx, kv_cache=...)``, as in the reference;
- the one-token step is the model's own ``block_forward`` per layer (so LoRA adapters, biases and
  every variant's linear layer apply as in training), handed a layer namespace whose
  ``cached_attention_forward`` reads the position from a device counter
  (``kernels/decode.decode_attention_forward``). Every shape is fixed, so the step is captured once
  as a CUDA graph and replayed at every position: one launch per token instead of hundreds;
- the next token is drawn on the device (``kernels/decode.sample_tokens``) from the same uniform
  draws the reference's generator makes, by the reference's inverse-CDF rule, and written into a
  device buffer of ids that the next step reads. Nothing reaches the host until the end, except,
  with a stop id, the B new ids of each step (to know when every row has stopped).

The same seed therefore gives the same text as the reference, unless a draw falls within rounding
(about 1e-6 in float32) of a boundary between two tokens' probabilities.

``cuda_generate_ids`` has ``generate.generate_ids``'s signature: it is the ``decoder=`` that
``minilora.fast.accelerate_generation`` returns for a GPT on a GPU.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from ...backend import host_rng
from ...generate import KVCache, checked_request
from ...model import WPE, WTE
from . import use_cublas
from .kernels.decode import decode_attention_forward, decode_embedding, sample_tokens
from .ops import CUDA_OPS


class DeviceLengthCache(NamedTuple):
    """What ``block_forward`` reads from a cache in the decode step: the buffers, and the length on the device."""

    keys: list  # (B, H, T_max, hs) per layer, the KVCache's own arrays
    values: list
    length: object  # the device counters (pos, n): int32 (2,)


def uniform_draws(seed: int, steps: int, batch_size: int) -> np.ndarray:
    """(steps, B) float64: the uniforms the reference draws, one (B, 1) row per sampled step, in order."""
    return host_rng(seed).random((steps, batch_size))


class GraphedDecoder:
    """A GPT's one-token step on the GPU for batches of B rows and ids of up to L columns, as a CUDA graph.

    The graph is captured on the first ``run`` and bound to the model's parameter arrays and
    adapters as they are then: make a new decoder after changing them (``cuda_generate_ids`` makes
    one per call).
    """

    def __init__(self, model, batch_size: int, length: int):
        import cupy

        use_cublas()  # CuPy's matmul refuses capture; our cuBLAS handle does not
        self.cupy = cupy
        self.model = model
        config = model.config
        self.block_size = config.block_size
        self.ids = cupy.zeros((batch_size, length), dtype=cupy.int64)  # (B, L) prompt and new ids
        self.counters = cupy.zeros(2, dtype=cupy.int32)  # (pos, n), see kernels/decode.py
        self.stopped = cupy.zeros(batch_size, dtype=cupy.int32)  # (B,) rows that produced the stop id
        self.logits = cupy.empty((batch_size, config.vocab_size), dtype=model.params[WTE].dtype)  # (B, V)
        self.cache = KVCache(model, batch_size)
        self.step_cache = DeviceLengthCache(self.cache.keys, self.cache.values, self.counters)
        # Two views of the model that share its parameters: the prefill with the fused layers, the
        # step with attention at a device position. The caller's model is left as it is.
        self.prefill_model = copy.copy(model)
        self.prefill_model.ops = CUDA_OPS
        self.step_model = copy.copy(model)
        self.step_model.ops = replace(
            CUDA_OPS, name="cuda-decode", cached_attention_forward=decode_attention_forward
        )
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.pool = cupy.cuda.MemoryPool()  # the graph's own memory: its addresses stay valid
        self.graph = None

    def _step(self) -> None:
        """Embed ids[:, n] at pos, run every block and the head into ``logits``; pos and n advance."""
        model, params = self.step_model, self.model.params
        x = decode_embedding(self.ids, self.counters, params[WTE], params[WPE])  # (B, 1, C)
        for i in range(model.config.n_layer):
            x, _ = model.block_forward(i, x, None, None, self.step_cache)  # unpacked, no dropout
        x, _ = model.final_norm(x)
        logits, _ = model.ops.linear_forward(x, params[WTE].T)  # tied head, (B, 1, V)
        self.logits[...] = logits[:, 0]
        self.counters += 1

    def _capture(self) -> None:
        """One eager step (its allocations fill the private pool), then the same step captured."""
        cupy = self.cupy
        with cupy.cuda.using_allocator(self.pool.malloc):
            self._step()
            self.stream.begin_capture()
            try:
                self._step()
            finally:
                graph = self.stream.end_capture()
        self.graph = graph

    def _prefill(self, ids, n: int) -> int:
        """Rebuild the cache from ids (B, t) on the device, set logits and counters = (t, n); returns t."""
        self.cache.length = 0
        logits, _, _ = self.prefill_model.forward(ids, kv_cache=self.cache)  # (B, t, V)
        self.logits[...] = logits[:, -1]
        self.counters.set(np.array([self.cache.length, n], dtype=np.int32), stream=self.stream)
        return self.cache.length

    def run(self, prompt_ids, max_new_tokens: int, temperature, top_k, seed: int, stop_id) -> np.ndarray:
        """The reference's loop (``generate.generate_ids``) with the step replayed and sampling on the device."""
        cupy = self.cupy
        B, T0 = prompt_ids.shape
        keep = max(1, self.block_size // 2)  # positions kept when the context is full
        draws = uniform_draws(seed, max_new_tokens, B) if temperature > 0 else np.zeros((1, B))
        caller = cupy.cuda.get_current_stream()
        with self.stream:
            self.stream.wait_event(caller.record())  # after the caller's work (a training step's update)
            self.ids[:, :T0] = cupy.asarray(prompt_ids)
            if self.graph is None:
                self._capture()  # a step at pos 0 on ids[:, 0]: the prefill below overwrites what it wrote
            uniforms = cupy.asarray(draws)
            self.stopped.fill(0)
            length = self._prefill(self.ids[:, max(0, T0 - self.block_size) : T0], T0)
            n = T0
            for step in range(max_new_tokens):
                sample_tokens(
                    self.logits,
                    uniforms,
                    T0,
                    self.ids,
                    self.counters,
                    self.stopped,
                    stop_id,
                    temperature,
                    top_k,
                )
                n += 1
                if stop_id is not None:  # the B new ids reach the host: has every row stopped?
                    new = self.ids[:, n - 1].get(stream=self.stream)
                    if (new < 0).any() or (new == stop_id).all():
                        break
                if step == max_new_tokens - 1:
                    break  # the last token needs no logits after it
                if length == self.block_size:  # context full: restart from the most recent tokens
                    length = self._prefill(self.ids[:, n - keep : n], n)
                else:
                    self.graph.launch(self.stream)
                    length += 1
            ids = self.ids[:, :n].get(stream=self.stream)
        failed = np.argwhere(ids[:, T0:] < 0)
        if failed.size:
            row, step = (int(i) for i in failed[0])
            raise FloatingPointError(
                f"the model's logits are NaN or infinite (row {row}, new token {step}): a weight or an "
                "adapter (lora_alpha?) is not finite"
            )
        return ids


def cuda_generate_ids(
    model,
    prompt_ids: np.ndarray,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_id: int | None = None,
) -> np.ndarray:
    """``generate.generate_ids`` for a GPT on a GPU: the same arguments, checks and result (B, T0 + n)."""
    prompt_ids = checked_request(prompt_ids, max_new_tokens, temperature, top_k)
    model.check_token_ids(prompt_ids[:, -model.config.block_size :], "idx")  # on the host, as the reference
    if max_new_tokens == 0:
        return prompt_ids.copy()
    B, T0 = prompt_ids.shape
    decoder = GraphedDecoder(model, B, T0 + max_new_tokens)
    return decoder.run(prompt_ids, max_new_tokens, temperature, top_k, seed, stop_id)


def can_decode(model) -> bool:
    """Whether ``cuda_generate_ids`` takes this model: a GPT (LoRA or not) on a GPU, float32/64, not quantized.

    The decoder is the GPT family's twin: it embeds at a device position through the GPT's position
    table, so a model of another family (``config.family``) goes to the reference's decoder.
    """
    if model.config.family != "gpt" or model.xp.__name__ != "cupy" or model.quantized_names:
        return False
    return model.params[WTE].dtype.name in ("float32", "float64")
