"""Text generation shared by llmfast's models: a static key/value cache, sampling, and the generate loop.

A model takes part by providing three methods (the GPT in :mod:`llmfast.models.gpt` does):

* ``max_context() -> int``: the most positions it can attend over;
* ``new_static_cache(batch_size, max_len) -> StaticKVCache``: an empty preallocated cache;
* ``forward_cached(idx, cache, prefill) -> logits``: with ``prefill=True`` it encodes ``idx`` (B, T), right
  padded, from position 0 with the full-sequence (training) attention kernel and stores every layer's keys and
  values in the cache; with ``prefill=False`` it runs one new token per sequence (``idx`` (B, 1)) at position
  ``cache.seqlens[b]`` with the decode kernel (:func:`llmfast.flash_attn_with_kvcache`), which appends the new
  key/value in place. It returns logits (B, T, vocab); it does not advance ``cache.seqlens`` (the loop does).

:func:`generate` drives any such model: a batch of prompts of different lengths (given as lists, or as a padded
tensor with an ``attention_mask``, padding on either side), greedy decoding or sampling with temperature, top-k,
top-p and a repetition penalty, stop tokens, and a streaming callback. Each sequence keeps its own length in the
cache, so no padding ever takes part in attention. ``use_cache=False`` runs the plain full forward every step
instead, one sequence at a time: the slow path the cached one must agree with.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch

import llmfast
from llmfast.nn.attention import LayerCache, StaticKVCache

__all__ = ["StaticKVCache", "LayerCache", "generate", "sample_next_token", "check_sampling_args",
           "apply_repetition_penalty"]


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------
def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None,
                        repetition_penalty: float = 1.0) -> None:
    """Raise ValueError unless the sampling arguments are in range (see :func:`sample_next_token`)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0 \
            or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float)) \
            or not 0.0 < repetition_penalty < math.inf:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1: off), got {repetition_penalty!r}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: the logit of every token in ``seen`` (B, vocab) bool is divided by ``penalty``
    when positive and multiplied by it when negative (``penalty > 1`` discourages repeats)."""
    if penalty == 1.0:
        return logits
    logits = logits.float()
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


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


# --------------------------------------------------------------------------------------------------------------
# Prompts in, prompts out
# --------------------------------------------------------------------------------------------------------------
def _prompts_from(idx, attention_mask) -> tuple[list[list[int]], str]:
    """The prompts as lists of ids, and the padding side to give the output (``"none"``, ``"left"``, ``"right"``)."""
    if isinstance(idx, torch.Tensor):
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must have shape (batch, time) with time >= 1, got shape {tuple(idx.shape)}")
        rows = idx.tolist()
        if attention_mask is None:
            return rows, "none"
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != idx.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise ValueError(f"attention_mask must be a tensor of idx's shape {tuple(idx.shape)}, got {got}")
        mask = attention_mask.bool().tolist()
        prompts, side = [], "none"
        for row, keep in zip(rows, mask):
            n = sum(keep)
            if n == 0:
                raise ValueError("attention_mask has a row with no token; every prompt needs at least one")
            if keep[:n] == [True] * n:
                side = "right" if n < len(keep) else side
            elif keep[-n:] == [True] * n:
                side = "left"
            else:
                raise ValueError("attention_mask must mark one contiguous run of tokens per row (left or right "
                                 "padding)")
            prompts.append([t for t, k in zip(row, keep) if k])
        return prompts, side
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a padded (batch, time) tensor, not with lists of prompts")
    prompts = [list(p) for p in idx]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    return prompts, "lists"


def _right_padded(rows: Sequence[Sequence[int]], device: torch.device, pad: int = 0) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _pack_output(prompts, generated, side, pad_token_id, device):
    rows = [p + g for p, g in zip(prompts, generated)]
    if side == "lists":
        return rows
    width = max(len(r) for r in rows)
    if side == "left":
        return torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: torch.nn.Module, idx, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             stop_tokens: Iterable[int] | None = None, attention_mask: torch.Tensor | None = None,
             pad_token_id: int = 0, generator: torch.Generator | None = None, use_cache: bool = True,
             stream: Callable[[int, int], None] | None = None):
    """Extend each prompt by up to ``max_new_tokens`` tokens.

    ``idx``: a (B, T) tensor (every row a prompt; with ``attention_mask`` (B, T), 1 = token, rows may be padded on
    the left or on the right) or a list of token-id lists of any lengths. Sampling: ``temperature`` (0: greedy),
    ``top_k``, ``top_p``, ``repetition_penalty`` (CTRL's, over the prompt and the tokens so far; 1: off), a seeded
    ``generator`` for reproducible samples. A sequence ends after emitting one of ``stop_tokens`` (kept in the
    output); the loop ends when every sequence has. ``stream(row, token)`` is called for each new token as it is
    chosen. Returns the same form it was given: a (B, T') tensor (padded with ``pad_token_id`` on the input's side
    when lengths differ; new tokens follow each row's own prompt), or lists.

    The model sees at most its last ``model.max_context()`` tokens. With ``use_cache`` it prefills a static cache
    with the prompts and then decodes one token per step with the decode kernel; once a sequence fills the cache,
    every later step re-encodes the last ``max_context()`` tokens, exactly as the uncached model does. Runs in
    eval mode and restores the previous mode.
    """
    from llmfast.ops.decode import known_cache_lengths  # late: Triton loads only when generating

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    stops = set(int(t) for t in stop_tokens) if stop_tokens is not None else set()
    prompts, side = _prompts_from(idx, attention_mask)
    device = next(model.parameters()).device
    batch = len(prompts)
    contexts = [list(p) for p in prompts]
    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    max_context = model.max_context()
    vocab = None
    seen = None
    was_training = model.training
    model.eval()
    try:
        cache = None
        next_tokens = None  # the tokens chosen at the previous step (a decoding step feeds them)
        for step in range(max_new_tokens):
            if not use_cache:
                logits = torch.cat([model(torch.tensor([c[-max_context:]], device=device))[:, -1] for c in contexts])
            elif cache is None or int(max(len(c) for c in contexts)) > cache.max_len:
                # Prefill: at the start, and whenever a sequence has outgrown the cache (then the last
                # max_context tokens of every sequence are encoded again, as the uncached model sees them).
                windows = [c[-max_context:] for c in contexts]
                if cache is None:
                    cache = model.new_static_cache(batch, max_context)
                cache.seqlens.copy_(torch.tensor([len(w) for w in windows], dtype=torch.int32))
                cache.prefill = True
                logits_all = model.forward_cached(_right_padded(windows, device), cache)
                last = torch.tensor([len(w) - 1 for w in windows], device=device)
                logits = logits_all[torch.arange(batch, device=device), last]
            else:
                cache.prefill = False
                # The loop knows every length on the host: the decode kernel skips its device-sync checks.
                lengths = [len(c) for c in contexts]  # cache length + the token being decoded, per sequence
                with known_cache_lengths(min(lengths), max(lengths)):
                    logits = model.forward_cached(next_tokens.view(batch, 1), cache)[:, -1]
                cache.seqlens += 1
            if vocab is None:
                vocab = logits.shape[-1]
                if repetition_penalty != 1.0:
                    seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
                    for b, c in enumerate(contexts):
                        seen[b, torch.tensor(c, device=device).clamp(0, vocab - 1)] = True
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            next_tokens = sample_next_token(logits, temperature, top_k, top_p, generator).view(batch)
            chosen = next_tokens.tolist()
            for b, token in enumerate(chosen):
                if finished[b]:
                    continue
                generated[b].append(token)
                if stream is not None:
                    stream(b, token)
                if token in stops:
                    finished[b] = True
            for b, token in enumerate(chosen):
                contexts[b].append(token)
            if seen is not None:
                seen[torch.arange(batch, device=device), next_tokens.clamp(0, vocab - 1)] = True
            if all(finished):
                break
    finally:
        model.train(was_training)
    return _pack_output(prompts, generated, side, pad_token_id, device)
