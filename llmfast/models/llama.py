"""A Llama-style decoder-only Transformer built only from llmfast's ops.

Token embeddings, a stack of pre-norm blocks and a final RMSNorm; no position embeddings: every attention layer
rotates its queries and keys by their positions (rotary embeddings). Each block is

    h   = x + attention(rms_norm(x))        grouped-query attention: n_kv_head key/value heads shared by the
    out = h + swiglu_mlp(rms_norm(h))       n_head query heads; MLP down(silu(gate(x)) * up(x))

with the second norm and the residual add fused in one kernel. The language-model head is tied to the token
embedding by default (``tie_word_embeddings``, as small Llamas do) or a separate matrix, and the training loss goes
through :func:`llmfast.fused_linear_cross_entropy`, which never materialises the logits. Module and parameter
names follow Hugging Face's ``LlamaForCausalLM`` (``embed_tokens``, ``layers.N.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ``norm``, ``lm_head``...). Generation goes through
:mod:`llmfast.models.generation`, as :class:`llmfast.models.GPT`'s does: a static key/value cache prefilled with the
full-sequence kernel, then one token per step through :func:`llmfast.flash_attn_with_kvcache`, which also rotates
the new query and key (the cache holds rotated keys).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

import llmfast
from llmfast.models import generation
from llmfast.models.gpt import check_sampling_args, sample_next_token  # noqa: F401  (re-exported)
from llmfast.nn import RMSNorm, RotaryEmbedding, SwiGLUMLP
from llmfast.nn.attention import KVCache, LayerCache, StaticKVCache, causal_attention_args


@dataclass
class LlamaConfig:
    """Sizes of a :class:`Llama`. The defaults are a small byte-level model the CLI trains on a CPU."""

    vocab_size: int = 256
    block_size: int = 128  # longest context, in tokens (the rotary tables' length)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # key/value heads; n_head must be a multiple (grouped-query attention)
    n_embd: int = 128
    intermediate_size: int | None = None  # the MLP's width; None: Llama's rule, 8/3 n_embd rounded up to 32
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 32 * math.ceil(8 * self.n_embd / 3 / 32)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd must be a multiple of n_head, got n_embd={self.n_embd} and "
                             f"n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"the head dim n_embd / n_head must be even (rotary embeddings rotate pairs), got "
                             f"{self.n_embd} / {self.n_head} = {self.n_embd // self.n_head}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head must be a multiple of n_kv_head, got n_head={self.n_head} and "
                             f"n_kv_head={self.n_kv_head}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise TypeError(f"tie_word_embeddings must be a bool, got {type(self.tie_word_embeddings).__name__}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with rotary positions; Hugging Face's projection names, no biases."""

    def __init__(self, config: LlamaConfig, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.rotary_emb = rotary_emb  # one module shared by every layer (its tables are not in the state dict)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | LayerCache | None = None) -> torch.Tensor:
        """Attend over ``x`` (B, T, C); with ``kv_cache``, ``x`` continues the cached positions.

        A :class:`LayerCache` selects the generation path: a prefill (positions from 0, right-padded prompts) runs
        :func:`llmfast.flash_attn_func` and stores the rotated keys; a decoding step passes the unrotated query
        and key to :func:`llmfast.flash_attn_with_kvcache`, which rotates both at ``seqlens`` and appends in place.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if isinstance(kv_cache, LayerCache):
            if kv_cache.prefill:
                q, k = self.rotary_emb(q, k, 0)
                y = llmfast.flash_attn_func(q, k, v, causal=True)
                kv_cache.k[:, :T] = k
                kv_cache.v[:, :T] = v
            else:
                cos, sin = self.rotary_emb.cos_sin(half=True)
                y = llmfast.flash_attn_with_kvcache(q, kv_cache.k, kv_cache.v, k, v, rotary_cos=cos, rotary_sin=sin,
                                                    cache_seqlens=kv_cache.seqlens, causal=True,
                                                    rotary_interleaved=False)
            return self.o_proj(y.reshape(B, T, self.n_head * self.head_dim))
        # Positions start after the cached ones; q and k are rotated in one kernel, in (B, T, heads, D) layout.
        q, k = self.rotary_emb(q, k, kv_cache.length if kv_cache is not None else 0)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D) for SDPA
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        attn_mask, is_causal = causal_attention_args(T, k.shape[2], x.device)
        y = llmfast.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 dropout_p=self.dropout if self.training else 0.0,
                                                 enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class LlamaBlock(nn.Module):
    """Pre-norm decoder layer: attention then the SwiGLU MLP, each behind an RMSNorm, with residual adds."""

    def __init__(self, config: LlamaConfig, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rotary_emb)
        self.post_attention_layernorm = RMSNorm(config.n_embd, eps=config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.n_embd, config.intermediate_size)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | LayerCache | None = None) -> torch.Tensor:
        attn_out = self.drop(self.self_attn(self.input_layernorm(x), kv_cache=kv_cache))
        # One pass: h = x + attn_out and its norm.
        normed, h = self.post_attention_layernorm(attn_out, residual=x)
        return h + self.drop(self.mlp(normed))


class Llama(nn.Module):
    """Llama-style language model. ``model(idx)`` gives logits; ``model(idx, targets)`` gives the mean loss."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.rotary_emb = RotaryEmbedding(config.head_dim, base=config.rope_theta,
                                          max_position_embeddings=config.block_size)
        self.layers = nn.ModuleList(LlamaBlock(config, self.rotary_emb) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

        # N(0, 0.02) for matrices, with the projections that write into the residual stream scaled down by
        # sqrt(2 * n_layer) so the stream's variance does not grow with depth (RMSNorm gains start at one).
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Parameter count; a tied embedding/head matrix counts once."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx: torch.Tensor, kv_caches: list[KVCache] | None = None) -> torch.Tensor:
        """Final-RMSNorm outputs (B, T, n_embd) for token ids ``idx`` (B, T).

        With ``kv_caches`` (one per layer, from :meth:`new_kv_caches`), ``idx`` continues the cached positions.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        start = kv_caches[0].length if kv_caches is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} positions is longer than block_size="
                             f"{self.config.block_size}")
        x = self.drop(self.embed_tokens(idx))
        for i, layer in enumerate(self.layers):
            x = layer(x, kv_cache=kv_caches[i] if kv_caches is not None else None)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_caches: list[KVCache] | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for ``idx`` (B, T); or, given ``targets`` (B, T), the mean cross-entropy.

        The loss goes through :func:`llmfast.fused_linear_cross_entropy` (head and loss together, no (B*T, V)
        logits kept). Targets equal to -100 are ignored.
        """
        x = self.hidden_states(idx, kv_caches)
        if targets is None:
            return self.lm_head(x)
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        return llmfast.fused_linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight,
                                                  targets.reshape(-1))

    def new_kv_caches(self, batch_size: int) -> list[KVCache]:
        """Empty key/value caches, one per layer (n_kv_head heads), room for ``block_size`` positions."""
        c = self.config
        param = self.embed_tokens.weight
        return [KVCache(batch_size, c.n_kv_head, c.head_dim, c.block_size, device=param.device, dtype=param.dtype)
                for _ in range(c.n_layer)]

    # --- generation (llmfast.models.generation drives these) -------------------------------------------------
    def max_context(self) -> int:
        """The most positions the model attends over (the rotary tables': ``block_size``)."""
        return self.config.block_size

    def new_static_cache(self, batch_size: int, max_len: int | None = None) -> StaticKVCache:
        """An empty preallocated key/value cache (n_kv_head heads) for every layer, ``max_len`` positions."""
        c = self.config
        param = self.embed_tokens.weight
        return StaticKVCache(c.n_layer, batch_size, max_len or c.block_size, c.n_kv_head, c.head_dim,
                             device=param.device, dtype=param.dtype)

    def forward_cached(self, idx: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """Logits (B, T, vocab) through ``cache``: a prefill of right-padded prompts from position 0, or, when
        ``cache.prefill`` is False, one token per sequence at position ``cache.seqlens[b]`` (the decode kernel)."""
        x = self.drop(self.embed_tokens(idx))
        for i, layer in enumerate(self.layers):
            x = layer(x, kv_cache=cache.layer(i))
        return self.lm_head(self.norm(x))

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None, use_cache: bool = True, *,
                 repetition_penalty: float = 1.0, stop_tokens: Iterable[int] | None = None,
                 attention_mask: torch.Tensor | None = None, pad_token_id: int = 0,
                 stream: Callable[[int, int], None] | None = None):
        """Extend ``idx`` by up to ``max_new_tokens`` tokens: the same interface and behaviour as
        :meth:`llmfast.models.GPT.generate` (see :func:`llmfast.models.generation.generate`)."""
        return generation.generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, stop_tokens=stop_tokens,
                                   attention_mask=attention_mask, pad_token_id=pad_token_id, generator=generator,
                                   use_cache=use_cache, stream=stream)
