"""A GPT-2-style decoder-only Transformer built from :mod:`llmfast.nn` layers.

Token and learned position embeddings, a stack of pre-norm blocks, a final LayerNorm, and a language-model head
that shares its weight with the token embedding. Attention runs through :func:`llmfast.scaled_dot_product_attention`
and the training loss through :func:`llmfast.fused_linear_cross_entropy` (which never materialises the logits), so
the model gets faster as llmfast's kernels do. Generation (:mod:`llmfast.models.generation`) prefills a static
key/value cache with the full-sequence kernel, then decodes one token per step with the decode kernel
(:func:`llmfast.flash_attn_with_kvcache`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

import llmfast
from llmfast.models import generation
from llmfast.models.generation import check_sampling_args, sample_next_token  # noqa: F401  (re-exported)
from llmfast.nn.attention import KVCache, StaticKVCache
from llmfast.nn.normalization import LayerNorm
from llmfast.nn.transformer import Block


@dataclass
class GPTConfig:
    """Sizes of a :class:`GPT`. The defaults are the small byte-level model the CLI trains."""

    vocab_size: int = 256
    block_size: int = 128  # longest context, in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in the Linear and LayerNorm layers, as GPT-2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd must be a multiple of n_head, got n_embd={self.n_embd} and "
                             f"n_head={self.n_head}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise TypeError(f"bias must be a bool, got {type(self.bias).__name__}")


class GPT(nn.Module):
    """GPT-2-style language model. ``model(idx)`` gives logits; ``model(idx, targets)`` gives the mean loss."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embeddings
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config.n_embd, config.n_head, dropout=config.dropout, bias=config.bias)
            for _ in range(config.n_layer)
        )
        self.ln_f = LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: predicting a token and embedding it share one matrix (fewer parameters, better
        # perplexity for small models).
        self.lm_head.weight = self.wte.weight

        # GPT-2 initialisation: N(0, 0.02), with the projections that write into the residual stream scaled
        # down by sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_position_embeddings: bool = False) -> int:
        """Parameter count; the tied embedding/head matrix counts once."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        return n - self.wpe.weight.numel() if exclude_position_embeddings else n

    def hidden_states(self, idx: torch.Tensor, kv_caches: list[KVCache] | None = None) -> torch.Tensor:
        """Final-LayerNorm outputs (B, T, n_embd) for token ids ``idx`` (B, T).

        With ``kv_caches`` (one per layer, from :meth:`new_kv_caches`), ``idx`` continues the cached positions.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        start = kv_caches[0].length if kv_caches is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} positions is longer than block_size="
                             f"{self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=kv_caches[i] if kv_caches is not None else None)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_caches: list[KVCache] | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for ``idx`` (B, T); or, given ``targets`` (B, T), the mean cross-entropy.

        The loss goes through :func:`llmfast.fused_linear_cross_entropy`, which applies the head and the loss
        together without keeping the (B*T, vocab_size) logits. Targets equal to -100 are ignored.
        """
        x = self.hidden_states(idx, kv_caches)
        if targets is None:
            return self.lm_head(x)
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        return llmfast.fused_linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight,
                                                  targets.reshape(-1))

    def new_kv_caches(self, batch_size: int) -> list[KVCache]:
        """Empty key/value caches, one per layer, room for ``block_size`` positions."""
        c = self.config
        param = self.wte.weight
        return [KVCache(batch_size, c.n_head, c.n_embd // c.n_head, c.block_size, device=param.device,
                        dtype=param.dtype) for _ in range(c.n_layer)]

    # --- generation (llmfast.models.generation drives these) -------------------------------------------------
    def max_context(self) -> int:
        """The most positions the model attends over (learned positions: ``block_size``)."""
        return self.config.block_size

    def new_static_cache(self, batch_size: int, max_len: int | None = None) -> StaticKVCache:
        """An empty preallocated key/value cache for every layer, room for ``max_len`` (default block_size)."""
        c = self.config
        param = self.wte.weight
        return StaticKVCache(c.n_layer, batch_size, max_len or c.block_size, c.n_head, c.n_embd // c.n_head,
                             device=param.device, dtype=param.dtype)

    def forward_cached(self, idx: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """Logits (B, T, vocab) through ``cache``: a prefill of right-padded prompts from position 0 (the
        full-sequence attention kernel), or, when ``cache.prefill`` is False, one token per sequence at position
        ``cache.seqlens[b]`` (the decode kernel, appending its key/value in place)."""
        B, T = idx.shape
        if cache.prefill:
            pos = torch.arange(T, device=idx.device)[None, :]
        else:
            pos = cache.seqlens.to(device=idx.device, dtype=torch.long)[:, None] + torch.arange(T, device=idx.device)
        # A decoding step's positions live on the device; the generation loop keeps them below block_size, so only
        # the prefill (positions known on the host) is checked here.
        if cache.prefill and T > self.config.block_size:
            raise ValueError(f"position {T - 1} is past block_size={self.config.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=cache.layer(i))
        return self.lm_head(self.ln_f(x))

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None, use_cache: bool = True, *,
                 repetition_penalty: float = 1.0, stop_tokens: Iterable[int] | None = None,
                 attention_mask: torch.Tensor | None = None, pad_token_id: int = 0,
                 stream: Callable[[int, int], None] | None = None):
        """Extend ``idx`` by up to ``max_new_tokens`` tokens; see :func:`llmfast.models.generation.generate`.

        ``idx`` (B, T) returns (B, T + new); prompts of different lengths go in as lists, or as a padded tensor
        with ``attention_mask``. ``temperature`` 0 is greedy; ``top_k``, ``top_p``, ``repetition_penalty``,
        ``stop_tokens``, ``stream(row, token)``. With ``use_cache`` the prompts are encoded once into a static
        cache and each step runs one position through the decode kernel; the tokens are the same as without it.
        """
        return generation.generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, stop_tokens=stop_tokens,
                                   attention_mask=attention_mask, pad_token_id=pad_token_id, generator=generator,
                                   use_cache=use_cache, stream=stream)
