"""A Llama-family language model (SmolLM2, Llama 2 and 3) with hand-written backprop.

The architecture differs from GPT-2's in four places, each a layer of its own in layers/:

    x = x + o_proj(attention(rope(q_proj(h)), rope(k_proj(h)), v_proj(h)))     h = rmsnorm(x)
    x = x + down_proj(silu(gate_proj(h)) * up_proj(h))                          h = rmsnorm(x)

- RMSNorm instead of LayerNorm (no mean, no bias);
- rotary position embeddings on q and k instead of a learned position table;
- grouped-query attention: n_kv_head key/value heads shared by n_head query heads;
- a SwiGLU MLP with three bias-free projections.

Parameters use Hugging Face's Llama names (``model.layers.0.self_attn.q_proj.weight``, PEFT's target
names), in minilora's linear layout: W of shape (C_in, C_out), the transpose of ``torch.nn.Linear``'s,
so that every projection is the same ``linear_forward(x, W)`` as in the GPT. The output head is tied
to the token embedding unless the config says otherwise.

Like the GPT, the model calls its layer functions through ``self.ops``, every linear layer through
the ``linear_forward`` / ``linear_backward`` hooks (where LoRA adds its path), and generation runs
the same blocks with a key/value cache (``forward(idx, kv_cache=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np

from .activation_memory import checkpointed_block_forward, chunked_head_loss
from .backend import to_device
from .language_model import LanguageModel, LinearHookCache
from .layers import ROPE_PAIRINGS, LayerOps, merge_heads, rope_tables, rope_tables_at, to_heads
from .validate import ConfigFields, check_bool, check_choice, check_float, check_int

EMBED = "model.embed_tokens.weight"
NORM = "model.norm"
HEAD = "lm_head"  # its weight exists only when the head is not tied to the embedding
INIT_STD = 0.02  # Hugging Face's initializer_range for Llama
LLAMA_LINEAR_MODULES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip


@dataclass(frozen=True)
class LlamaConfig(ConfigFields):
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # query heads (H)
    n_kv_head: int = 2  # key/value heads (H_kv); n_head must be a multiple of it
    n_embd: int = 64  # channels of the residual stream (C)
    ffn_hidden: int = 128  # width of the SwiGLU MLP (Hugging Face's intermediate_size)
    vocab_size: int = 256  # V
    block_size: int = 128  # the longest sequence (context length)
    rope_theta: float = 10000.0  # the rotary embedding's base
    rms_eps: float = 1e-5  # RMSNorm's epsilon
    rope_pairing: str = (
        "half"  # "half" for Hugging Face's weights, "adjacent" for GGUF's (see layers/rope.py)
    )
    tie_embeddings: bool = True  # the output head is the token embedding, transposed

    family: ClassVar[str] = "llama"  # the family's name, as the fast path's per-family twins know it
    default_lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "v_proj")  # finetune --targets (PEFT's)
    default_eval_windows: ClassVar[int] = 8  # finetune --eval-windows: 64 of SmolLM2's took 20 min on 2 cores
    dropout: ClassVar[float] = 0.0  # the Llama applies none (a LoRA adapter may, on its own input)

    def __post_init__(self):
        set_field = object.__setattr__
        for field in ("n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "vocab_size", "block_size"):
            set_field(self, field, check_int(f"LlamaConfig.{field}", getattr(self, field), minimum=1))
        set_field(
            self, "rope_theta", check_float("LlamaConfig.rope_theta", self.rope_theta, 0.0, low_open=True)
        )
        set_field(self, "rms_eps", check_float("LlamaConfig.rms_eps", self.rms_eps, 0.0, low_open=True))
        set_field(self, "tie_embeddings", check_bool("LlamaConfig.tie_embeddings", self.tie_embeddings))
        check_choice("LlamaConfig.rope_pairing", self.rope_pairing, ROPE_PAIRINGS)
        if self.n_embd % self.n_head != 0 or (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(
                f"LlamaConfig.n_embd={self.n_embd} must be n_head={self.n_head} times an even head size"
            )
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"LlamaConfig.n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}"
            )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def block_prefix(self, i: int) -> str:
        """The names of block i's parameters begin with this: ``model.layers.3.``."""
        return f"model.layers.{i}."

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's name and shape, in the order of a Hugging Face Llama state dict."""
        C, F, V = self.n_embd, self.ffn_hidden, self.vocab_size
        kv = self.n_kv_head * self.head_size  # width of k and v
        shapes = {EMBED: (V, C)}
        for i in range(self.n_layer):
            p = self.block_prefix(i)
            shapes.update({
                f"{p}input_layernorm.weight": (C,),
                f"{p}self_attn.q_proj.weight": (C, C),
                f"{p}self_attn.k_proj.weight": (C, kv),
                f"{p}self_attn.v_proj.weight": (C, kv),
                f"{p}self_attn.o_proj.weight": (C, C),
                f"{p}post_attention_layernorm.weight": (C,),
                f"{p}mlp.gate_proj.weight": (C, F),
                f"{p}mlp.up_proj.weight": (C, F),
                f"{p}mlp.down_proj.weight": (F, C),
            })  # fmt: skip
        shapes[f"{NORM}.weight"] = (C,)
        if not self.tie_embeddings:
            shapes[f"{HEAD}.weight"] = (C, V)
        return shapes

    def linear_modules(self) -> dict[str, tuple[int, int]]:
        """Every projection an adapter may target (PEFT's names), with its weight's (C_in, C_out); not the head."""
        shapes = self.parameter_shapes()
        return {
            f"{self.block_prefix(i)}{m}": shapes[f"{self.block_prefix(i)}{m}.weight"]
            for i in range(self.n_layer)
            for m in LLAMA_LINEAR_MODULES
        }


def init_llama_params(
    config: LlamaConfig, seed: int = 0, dtype=np.float32, device: str | None = None
) -> dict:
    """Weights ~ N(0, 0.02^2) and RMSNorm gains 1, drawn on the host from a seeded generator, then moved."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in config.parameter_shapes().items():
        if len(shape) == 1:
            value = np.ones(shape, dtype=dtype)
        else:
            value = (INIT_STD * rng.standard_normal(shape, dtype=np.float64)).astype(dtype)
        params[name] = to_device(value, device)
    return params


class LlamaBlockCache(NamedTuple):
    input_norm: object
    q_proj: object
    k_proj: object
    v_proj: object
    rope_q: object
    rope_k: object
    attn: object  # None in generation
    o_proj: object
    post_norm: object
    gate_proj: object
    up_proj: object
    swiglu: object
    down_proj: object

    def activations(self, model, i: int, rope, example_start) -> LlamaBlockCache:
        """What block i's backward reads: this cache itself (activation_memory.BlockCheckpoint is the other kind)."""
        return self


class HeadLoss(NamedTuple):
    """The output head's cache and the loss's: the head's cache keeps the format whose backward to use."""

    head: LinearHookCache  # the head's weight format (a quantized tied table gives only dx) and layer cache
    loss: object  # CrossEntropyCache

    def backward(self, model, dloss: float):
        """(dx (B, T, C), the head weight's gradient (C, V) or None): the loss, then the head, backwards."""
        dlogits = model.ops.cross_entropy_backward(dloss, self.loss)  # (B, T, V)
        train_head = model.is_trainable(model.head_weight_name)
        dx, dW_head, _ = self.head.format.linear_backward(
            model.ops, dlogits, self.head.layer, train_head, False
        )
        return dx, dW_head


class LlamaCache(NamedTuple):
    ops: LayerOps  # the layer functions that made this cache
    token_embedding: object  # the lookup's cache (None for a quantized table: frozen)
    rope: tuple  # the (cos, sin) tables, to recompute checkpointed blocks
    example_start: object  # packed rows: (B, T) where each token's example starts; else None
    blocks: list  # one LlamaBlockCache (or activation_memory.BlockCheckpoint) per layer
    norm: object
    loss: object  # HeadLoss, or activation_memory.ChunkedHeadLoss; None when no targets were given


class Llama(LanguageModel):
    """A Llama-family model: its config, its flat parameter dict, and which parameters are frozen.

    Two switches trade compute for activation memory in training (both off by default, see
    ``set_activation_memory`` and activation_memory.py, which the GPT shares): ``gradient_checkpointing``
    keeps only each block's input and recomputes the block's activations in the backward (one more
    forward of every block); ``loss_chunk_rows = n`` takes the output head and the cross-entropy n
    rows at a time, so the (B, T, V) logits never exist whole (with a frozen head; the gradient with
    respect to the head's input is made in the forward, chunk by chunk, while each chunk's
    probabilities exist).
    """

    embedding_name = EMBED
    context_in_weights = False  # RoPE computes its angles: the same weights serve any block_size
    no_decay = (EMBED,)  # the token table is looked up, not multiplied: AdamW leaves it undecayed
    peft_fan_in_fan_out = False  # nn.Linear's layout in Hugging Face's files
    supports_activation_memory = True

    @property
    def head_weight_name(self) -> str:
        """The parameter the output head multiplies by: the embedding when tied, else lm_head.weight."""
        return EMBED if self.config.tie_embeddings else f"{HEAD}.weight"

    def _norm_forward(self, name: str, x):
        return self.ops.rmsnorm_forward(x, self.params[f"{name}.weight"], self.config.rms_eps)

    def _norm_backward(self, name: str, dout, cache, grads: dict):
        dx, dw = self.ops.rmsnorm_backward(dout, cache)
        if self.is_trainable(f"{name}.weight"):
            grads[f"{name}.weight"] = dw
        return dx

    def final_norm(self, x):
        """The RMSNorm after the last block: (out, cache)."""
        return self._norm_forward(NORM, x)

    def block_forward(self, i: int, x, rope, example_start, rng, kv_cache=None):
        """One block.   x: (B, T, C) -> (B, T, C); rope: the (cos, sin) tables of these positions.

        example_start: (B, T) for packed rows (layers/attention.py), or None.
        """
        ops, config, p = self.ops, self.config, f"model.layers.{i}"
        H, H_kv = config.n_head, config.n_kv_head
        cos, sin = rope
        h, input_norm = self._norm_forward(f"{p}.input_layernorm", x)
        q, q_proj = self.linear_forward(f"{p}.self_attn.q_proj", h, rng)  # (B, T, H hs)
        k, k_proj = self.linear_forward(f"{p}.self_attn.k_proj", h, rng)  # (B, T, H_kv hs)
        v, v_proj = self.linear_forward(f"{p}.self_attn.v_proj", h, rng)  # (B, T, H_kv hs)
        q, rope_q = ops.rope_forward(to_heads(q, H), cos, sin, config.rope_pairing)  # (B, H, T, hs)
        k, rope_k = ops.rope_forward(to_heads(k, H_kv), cos, sin, config.rope_pairing)  # (B, H_kv, T, hs)
        v = to_heads(v, H_kv)  # (B, H_kv, T, hs)
        if kv_cache is None:
            y, attn = ops.gqa_attention_forward(q, k, v, None, example_start)  # (B, H, T, hs)
        else:  # generation: the new positions attend over the cached ones too
            keys, values = kv_cache.keys[i], kv_cache.values[i]
            y, attn = ops.cached_gqa_attention_forward(q, k, v, keys, values, kv_cache.length), None
        a, o_proj = self.linear_forward(f"{p}.self_attn.o_proj", merge_heads(y), rng)  # (B, T, C)
        x = ops.residual_add(x, a)  # residual: x + a
        h, post_norm = self._norm_forward(f"{p}.post_attention_layernorm", x)
        g, gate_proj = self.linear_forward(f"{p}.mlp.gate_proj", h, rng)  # (B, T, F)
        u, up_proj = self.linear_forward(f"{p}.mlp.up_proj", h, rng)  # (B, T, F)
        m, swiglu = ops.swiglu_forward(g, u)  # silu(g) * u
        d, down_proj = self.linear_forward(f"{p}.mlp.down_proj", m, rng)  # (B, T, C)
        x = ops.residual_add(x, d)  # residual: x + d
        cache = LlamaBlockCache(
            input_norm=input_norm, q_proj=q_proj, k_proj=k_proj, v_proj=v_proj, rope_q=rope_q, rope_k=rope_k,
            attn=attn, o_proj=o_proj, post_norm=post_norm, gate_proj=gate_proj, up_proj=up_proj, swiglu=swiglu,
            down_proj=down_proj,
        )  # fmt: skip
        return x, cache

    def block_backward(self, i: int, dx, cache: LlamaBlockCache, grads: dict):
        ops, p, H = self.ops, f"model.layers.{i}", self.config.n_head
        # x_out = x_mid + down_proj(m): the residual hands dx unchanged to x_mid and to the MLP.
        dm = self.linear_backward(f"{p}.mlp.down_proj", dx, cache.down_proj, grads)
        dg, du = ops.swiglu_backward(dm, cache.swiglu)
        del dm  # a spent (B, T, F) gradient is let go at once, as autograd does: less memory at the peak
        dh = self.linear_backward(f"{p}.mlp.gate_proj", dg, cache.gate_proj, grads)
        del dg
        dh = dh + self.linear_backward(f"{p}.mlp.up_proj", du, cache.up_proj, grads)  # h feeds both: sum
        del du
        dx = dx + self._norm_backward(f"{p}.post_attention_layernorm", dh, cache.post_norm, grads)
        # x_mid = x + o_proj(merge_heads(y)): the same split for the attention branch.
        dy = to_heads(
            self.linear_backward(f"{p}.self_attn.o_proj", dx, cache.o_proj, grads), H
        )  # (B, H, T, hs)
        dq, dk, dv = ops.gqa_attention_backward(dy, cache.attn)
        dq = merge_heads(ops.rope_backward(dq, cache.rope_q))  # (B, T, H hs): undo the rotation, join heads
        dk = merge_heads(ops.rope_backward(dk, cache.rope_k))  # (B, T, H_kv hs)
        dh = self.linear_backward(f"{p}.self_attn.q_proj", dq, cache.q_proj, grads)
        dh = dh + self.linear_backward(f"{p}.self_attn.k_proj", dk, cache.k_proj, grads)  # h feeds three
        dh = dh + self.linear_backward(f"{p}.self_attn.v_proj", merge_heads(dv), cache.v_proj, grads)
        return dx + self._norm_backward(f"{p}.input_layernorm", dh, cache.input_norm, grads)

    def forward(self, idx, targets=None, dropout_rng=None, kv_cache=None, positions=None):
        """Logits for every position, and the mean cross-entropy if targets are given.

        idx, targets: (B, T) token ids; dropout_rng serves LoRA's dropout (the model has none);
        kv_cache (generate.KVCache): idx holds only the positions after the kv_cache.length cached ones.
        positions: (B, T) for rows that pack several examples (training/examples.py): each token's
        position within its example, which sets its rotation and keeps its attention in its example.
        Returns (logits (B, T, V), loss or None, cache for ``backward``; None with kv_cache).
        With ``loss_chunk_rows`` the logits are never made whole: None is returned for them.
        """
        ops, config = self.ops, self.config
        idx = self.check_token_ids(idx, "idx")
        B, T = idx.shape
        start = self.first_position(T, kv_cache)
        compute_dtype = self.params[f"{NORM}.weight"].dtype  # the dtype the model computes in (its norms')
        x, token_embedding = self.formats[EMBED].embedding_forward(
            ops, idx, self.params[EMBED], compute_dtype
        )
        rope, example_start = self._rope_and_examples(positions, idx, start, x.dtype)
        checkpointing = self.gradient_checkpointing and targets is not None and kv_cache is None
        blocks = []
        for i in range(config.n_layer):
            if checkpointing:  # keep the input; the block's caches are let go as soon as it returns
                x, block = checkpointed_block_forward(
                    self, i, x, rope, example_start, dropout_rng=dropout_rng
                )
            else:
                x, block = self.block_forward(i, x, rope, example_start, dropout_rng, kv_cache)
            blocks.append(block)
        x, norm = self.final_norm(x)
        if self.loss_chunk_rows is not None and targets is not None and kv_cache is None:
            loss, head_loss = chunked_head_loss(self, x, self.check_targets(targets, idx))
            return None, loss, LlamaCache(ops, token_embedding, rope, example_start, blocks, norm, head_loss)
        logits, head = self.head_forward(x)  # (B, T, V)
        if kv_cache is not None:
            kv_cache.length = start + T
            return logits, None, None
        loss, loss_cache = self.loss_forward(logits, targets, idx)
        head_loss = None if loss_cache is None else HeadLoss(head=head, loss=loss_cache)
        return logits, loss, LlamaCache(ops, token_embedding, rope, example_start, blocks, norm, head_loss)

    def _rope_and_examples(self, positions, idx, start: int, dtype):
        """The rotary tables of these positions, (T, hs/2) each, and None; for packed rows each row's own
        tables, (B, 1, T, hs/2), and where each token's example starts, (B, T)."""
        config, T = self.config, idx.shape[1]
        if positions is None:
            return rope_tables(T, config.head_size, start, config.rope_theta, dtype, self.xp), None
        positions = self.check_positions(positions, idx)
        return rope_tables_at(positions, config.head_size, config.rope_theta, dtype), self.example_start(
            positions, T
        )

    def head_forward(self, x):
        """logits = x W_head, through the pair of the format W_head is held in.   x: (..., C) -> (..., V).

        Tied, W_head is the embedding transposed (for a quantized table, its blocks read as (C, V)).
        Returns (logits, the head's LinearHookCache).
        """
        name = self.head_weight_name
        fmt, weight = self.formats[name], self.params[name]
        logits, head = fmt.linear_forward(
            self.ops, x, fmt.transpose(weight) if name == EMBED else weight, None
        )
        return logits, LinearHookCache(format=fmt, layer=head)

    def frozen_head_backward(self, dlogits, head: LinearHookCache):
        """The head's input gradient alone, its weight's never made.   dlogits: (..., V) -> (..., C)."""
        return head.format.linear_backward(self.ops, dlogits, head.layer, False, False)[0]

    def backward(self, cache: LlamaCache, dloss: float = 1.0) -> dict:
        """Gradients of the loss for every trainable parameter, keyed like ``params``."""
        self.check_cache(cache)
        grads = {}
        dx, dW_head = cache.loss.backward(self, dloss)  # (B, T, C); (C, V) or None
        tied = self.config.tie_embeddings
        if dW_head is not None and not tied:
            grads[f"{HEAD}.weight"] = dW_head
        dx = self._norm_backward(NORM, dx, cache.norm, grads)
        for i in reversed(range(self.config.n_layer)):
            block = cache.blocks[i].activations(
                self, i, cache.rope, cache.example_start
            )  # a checkpoint runs again
            dx = self.block_backward(i, dx, block, grads)
        if self.is_trainable(EMBED):
            dembed = self.ops.embedding_backward(dx, cache.token_embedding)  # (V, C)
            # tied: the embedding is used twice, by the lookup and by the head, so its gradient is the sum
            grads[EMBED] = dembed + dW_head.T if tied else dembed
        return {name: grads[name] for name in self.params if name in grads}  # in parameter order
