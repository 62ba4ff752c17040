"""A GPT-2-style decoder-only Transformer built from :mod:`llmfast.nn` layers.

Token and learned position embeddings, a stack of pre-norm blocks, a final LayerNorm, and a language-model head
that shares its weight with the token embedding. Attention runs through :func:`llmfast.scaled_dot_product_attention`
and the training loss through :func:`llmfast.fused_linear_cross_entropy` (which never materialises the logits), so
the model gets faster as llmfast's kernels do. Generation keeps a key/value cache: the prompt is encoded once,
then each new token costs one position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import llmfast
from llmfast.nn.attention import KVCache
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
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
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

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Extend ``idx`` (B, T) by ``max_new_tokens`` sampled tokens; returns (B, T + max_new_tokens).

        See :func:`sample_next_token` for ``temperature`` (0 is greedy), ``top_k``, ``top_p`` and ``generator``.
        The model sees at most the last ``block_size`` tokens. With ``use_cache`` the context is encoded once and
        each step then runs one position; the tokens are the same as without the cache. Runs in eval mode
        (no dropout) and restores the previous mode.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must have shape (batch, time) with time >= 1, got shape {tuple(idx.shape)}")
        check_sampling_args(temperature, top_k, top_p)
        block_size = self.config.block_size
        was_training = self.training
        self.eval()
        try:
            caches = None
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits = self(idx[:, -block_size:])
                elif caches is None or caches[0].length == block_size:
                    # Encode the context into fresh caches: at the start, and whenever they are full. Learned
                    # absolute positions cannot slide along, so past block_size every step re-encodes the last
                    # block_size tokens, exactly as the uncached model does.
                    caches = self.new_kv_caches(idx.shape[0])
                    logits = self(idx[:, -block_size:], kv_caches=caches)
                else:
                    logits = self(idx[:, -1:], kv_caches=caches)
                next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
                idx = torch.cat([idx, next_token], dim=1)
        finally:
            self.train(was_training)
        return idx


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError unless the sampling arguments are in range (see :func:`sample_next_token`)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0 \
            or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token id per row of ``logits`` (B, vocab_size); returns (B, 1).

    ``temperature`` divides the logits (0 picks the most likely token, greedy). ``top_k`` keeps the k most
    likely tokens; ``top_p`` keeps the smallest set of most likely tokens whose probability reaches p (nucleus
    sampling). Pass a seeded ``generator`` for reproducible samples.
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = llmfast.softmax(sorted_logits, dim=-1)
        # Drop a token once the tokens ranked above it already reach top_p; the most likely token always stays.
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill(mass_above >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = llmfast.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
