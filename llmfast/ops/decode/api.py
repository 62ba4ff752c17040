"""The public op: argument checks (every failure names the argument), the torch-native path, and dispatch."""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from typing import Iterator

import torch
import triton

from llmfast import _backend, _validation
from llmfast.ops._arch import config_arch

from .configs import MAX_HEAD_DIM, _config, _cuda_sm_count, _row_kind_for, choose_num_splits
from .launch import _kvcache_op, _rotate

# ----------------------------------------------------------------------------------------------------------------
# Validation: every failure names the argument, what it got and what it accepts.
# ----------------------------------------------------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_index_tensor(name: str, t: object, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32, got {_dtype_name(t.dtype)}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {t.device}")
    return t


def _check_number(name: str, value: object, accepts: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number ({accepts}), got {type(value).__name__}")
    if not ok(float(value)):
        raise ValueError(f"{name} must be {accepts}, got {value}")
    return float(value)


class _Call:
    """The validated arguments of one call, in the form the kernels take."""

    def __init__(self, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                 block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes,
                 num_splits, return_softmax_lse):
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
            _validation.check_tensor(name, t, ndim=4, dtypes=_DTYPES)
        _validation.check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
        _validation.check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
        batch, seqlen_q, heads, head_d = q.shape
        if not 1 <= head_d <= MAX_HEAD_DIM:
            raise ValueError(f"q has head dim (last dimension) {head_d}; accepted head dims are 1..{MAX_HEAD_DIM}")
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                             f"{tuple(v_cache.shape)}")
        if k_cache.shape[-1] != head_d:
            raise ValueError(f"k_cache's head dim (last dimension) must equal q's ({head_d}), got "
                             f"{k_cache.shape[-1]}")
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if t.stride(-1) != 1 and t.shape[-1] > 1:
                raise ValueError(f"{name} must be contiguous in its last dimension (it is updated in place), got "
                                 f"strides {t.stride()}")
        kv_heads = k_cache.shape[2]
        if kv_heads == 0 or heads % kv_heads:
            raise ValueError(f"q's heads ({heads}) must be a multiple of the cache's key/value heads ({kv_heads})")
        self.paged = block_table is not None
        if self.paged:
            if cache_batch_idx is not None:
                raise ValueError("cache_batch_idx cannot be combined with block_table (a paged cache is addressed "
                                 "through the block table alone)")
            if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 \
                    or block_table.shape[0] != batch:
                got = tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else type(block_table)
                raise ValueError(f"block_table must be (batch={batch}, max_blocks) int32, got {got}")
            _check_index_tensor("block_table", block_table, tuple(block_table.shape), q.device)
            self.page_size = k_cache.shape[1]
            self.capacity = block_table.shape[1] * self.page_size
        else:
            self.page_size = 1
            self.capacity = k_cache.shape[1]
            if cache_batch_idx is not None:
                _check_index_tensor("cache_batch_idx", cache_batch_idx, (batch,), q.device)
            elif k_cache.shape[0] != batch:
                raise ValueError(f"k_cache has {k_cache.shape[0]} sequences but q has batch {batch}; pass "
                                 "cache_batch_idx to pick cache rows")
        if (k is None) != (v is None):
            raise ValueError("k and v must be given together (new keys and values to append) or both be None")
        self.new = 0
        if k is not None:
            want = (batch, k.shape[1], kv_heads, head_d)
            for name, t in (("k", k), ("v", v)):
                _validation.check_tensor(name, t, ndim=4)
                if tuple(t.shape) != want:
                    raise ValueError(f"{name} must have shape (batch, seqlen_new, kv_heads, head_dim) = {want}, "
                                     f"got {tuple(t.shape)}")
            self.new = k.shape[1]
            if cache_seqlens is None:
                raise ValueError("cache_seqlens is required when k and v are appended (it says where they go)")
        if cache_seqlens is None:
            self.seqlens = None
        elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
            if cache_seqlens < 0:
                raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens}")
            self.seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
        elif isinstance(cache_seqlens, torch.Tensor):
            # The kernels index the small index tensors densely: strided ones are copied (a few bytes).
            self.seqlens = _check_index_tensor("cache_seqlens", cache_seqlens, (batch,), q.device).contiguous()
        else:
            raise TypeError(f"cache_seqlens must be an int, a (batch,) int32 tensor or None, got "
                            f"{type(cache_seqlens).__name__}")
        if (rotary_cos is None) != (rotary_sin is None):
            raise ValueError("rotary_cos and rotary_sin must be given together or both be None")
        if rotary_cos is not None:
            if k is None:
                raise ValueError("rotary_cos/rotary_sin need k and v: rotary is applied to the appended keys and "
                                 "to q at their positions")
            for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
                _validation.check_tensor(name, t, ndim=2, dtypes=_DTYPES)
                _validation.check_same_device(q=q, **{name: t})
            if rotary_cos.shape != rotary_sin.shape:
                raise ValueError(f"rotary_cos and rotary_sin must have the same shape, got "
                                 f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
            if not 1 <= 2 * rotary_cos.shape[1] <= head_d:
                raise ValueError(f"rotary_cos must be (seqlen_ro, rotary_dim / 2) with rotary_dim <= head dim "
                                 f"{head_d}, got shape {tuple(rotary_cos.shape)}")
            if rotary_cos.stride(1) != 1 or rotary_sin.stride(1) != 1:
                rotary_cos, rotary_sin = rotary_cos.contiguous(), rotary_sin.contiguous()
        if not isinstance(rotary_interleaved, bool):
            raise TypeError(f"rotary_interleaved must be a bool, got {type(rotary_interleaved).__name__}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        ok = (isinstance(window_size, (tuple, list)) and len(window_size) == 2
              and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size))
        if not ok:
            raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1: unbounded), "
                             f"got {window_size!r}")
        self.left, self.right = int(window_size[0]), int(window_size[1])
        if causal:
            self.right = 0
        self.scale = (1.0 / math.sqrt(head_d) if softmax_scale is None else
                      _check_number("softmax_scale", softmax_scale, "a finite float or None", math.isfinite))
        self.softcap = _check_number("softcap", softcap, "a finite number >= 0 (0: off)",
                                     lambda x: math.isfinite(x) and x >= 0)
        if alibi_slopes is not None:
            _validation.check_tensor("alibi_slopes", alibi_slopes, ndim=(1, 2), dtypes=(torch.float32,))
            _validation.check_same_device(q=q, alibi_slopes=alibi_slopes)
            if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
                raise ValueError(f"alibi_slopes must have shape (nheads,) = ({heads},) or (batch, nheads) = "
                                 f"({batch}, {heads}), got {tuple(alibi_slopes.shape)}")
            if alibi_slopes.stride(-1) != 1:
                alibi_slopes = alibi_slopes.contiguous()
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 0 <= num_splits:
            raise ValueError(f"num_splits must be an int >= 0 (0: chosen by a heuristic), got {num_splits!r}")
        if not isinstance(return_softmax_lse, bool):
            raise TypeError(f"return_softmax_lse must be a bool, got {type(return_softmax_lse).__name__}")
        self.rotary_cos, self.rotary_sin, self.alibi = rotary_cos, rotary_sin, alibi_slopes
        self.block_table = block_table.contiguous() if block_table is not None else None
        self.batch_idx = cache_batch_idx.contiguous() if cache_batch_idx is not None else None
        self.rotary_q_per_row = causal or self.left >= 0 or self.right >= 0
        self.longest = self._check_values(batch, k_cache, cache_batch_idx, block_table)

    def _check_values(self, batch, k_cache, cache_batch_idx, block_table) -> int:
        """Bounds that need the index tensors' values (one device sync): returns the longest key range."""
        self.shortest = 0  # unknown: the torch path then takes its general branch
        if torch.compiler.is_compiling():
            return self.capacity  # reading the tensors would break the graph; the kernels still mask
        known = _KNOWN_LENGTHS.get()
        if known is not None and cache_batch_idx is None and block_table is None:
            # The caller vouched for the lengths (see known_cache_lengths): no device sync.
            self.shortest = known[0]
            return min(known[1], self.capacity)
        if self.seqlens is None:
            lengths = torch.full((batch,), self.capacity, dtype=torch.long)
        else:
            base = self.seqlens.cpu().long()
            if batch and int(base.min()) < 0:
                raise ValueError(f"cache_seqlens must be >= 0, got {base.tolist()}")
            lengths = base + self.new
            if batch and int(lengths.max()) > self.capacity:
                worst = int(lengths.argmax())
                what = (f"cache_seqlens[{worst}] = {int(base[worst])} plus {self.new} new tokens"
                        if self.new else f"cache_seqlens[{worst}] = {int(base[worst])}")
                raise ValueError(f"the cache is too short: {what} needs {int(lengths[worst])} positions, the "
                                 f"cache holds {self.capacity} per sequence")
            if self.rotary_cos is not None:
                steps = max(self.new, 1)
                need = int((base + steps).max()) if batch else 0
                if need > self.rotary_cos.shape[0]:
                    raise ValueError(f"rotary_cos/rotary_sin have {self.rotary_cos.shape[0]} positions, the "
                                     f"appended tokens reach position {need - 1}")
        if cache_batch_idx is not None and batch:
            rows = cache_batch_idx.cpu()
            if int(rows.min()) < 0 or int(rows.max()) >= k_cache.shape[0]:
                raise ValueError(f"cache_batch_idx entries must be in [0, {k_cache.shape[0]}), got {rows.tolist()}")
        if block_table is not None and batch:
            pages_used = (lengths + self.page_size - 1) // self.page_size
            table = block_table.cpu().long()
            used = torch.arange(table.shape[1])[None, :] < pages_used[:, None]
            bad = used & ((table < 0) | (table >= k_cache.shape[0]))
            if bool(bad.any()):
                b, p = (int(x) for x in bad.nonzero()[0])
                raise ValueError(f"block_table[{b}, {p}] = {int(table[b, p])} is not a block of the paged cache "
                                 f"(num_blocks = {k_cache.shape[0]}, accepted 0..{k_cache.shape[0] - 1})")
        self.shortest = int(lengths.min()) if batch else 0
        return int(lengths.max()) if batch else 0


def _kvcache_torch(q, k_cache, v_cache, k, v, call: _Call, cache_batch_idx, block_table, rotary_interleaved,
                   need_lse):
    """The torch-native path (backend "auto" off CUDA, and float64): the same semantics in a few batched torch
    ops over the longest key range of the call only; returns (out, lse or None). Plain attention (no softcap,
    ALiBi or LSE, every row with a key) runs torch's SDPA kernel; the rest float32 math (float64 for float64)."""
    batch, seqlen_q, heads, head_d = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    device = q.device
    base = call.seqlens.long() if call.seqlens is not None else None
    rows_of_batch = (cache_batch_idx.long() if cache_batch_idx is not None
                     else torch.arange(batch, device=device))
    if k is not None and call.new:
        pos = base[:, None] + torch.arange(call.new, device=device)
        if call.rotary_cos is not None:
            k = _rotate(k, call.rotary_cos, call.rotary_sin, pos, rotary_interleaved)
        if call.paged:
            rows, slots = block_table.long().gather(1, pos // call.page_size), pos % call.page_size
        else:
            rows, slots = rows_of_batch[:, None].expand(-1, call.new), pos
        k_cache[rows, slots] = k.to(k_cache.dtype)
        v_cache[rows, slots] = v.to(v_cache.dtype)
    if call.rotary_cos is not None and k is not None:
        steps = (torch.arange(seqlen_q, device=device) if call.rotary_q_per_row
                 else torch.zeros(seqlen_q, dtype=torch.long, device=device))
        q = _rotate(q, call.rotary_cos, call.rotary_sin, base[:, None] + steps, rotary_interleaved)

    length = min(max(call.longest, 0), call.capacity)
    if call.paged:
        pages = triton.cdiv(length, call.page_size)
        # Pages past a sequence's own length may hold anything: clamped just to gather (masked below).
        table = block_table[:, :pages].long().clamp(0, k_cache.shape[0] - 1)
        keys = k_cache[table].flatten(1, 2)[:, :length]
        values = v_cache[table].flatten(1, 2)[:, :length]
    elif cache_batch_idx is not None:
        keys, values = k_cache[rows_of_batch, :length], v_cache[rows_of_batch, :length]
    else:
        keys, values = k_cache[:, :length], v_cache[:, :length]  # views: nothing copied
    seqlens_k = (base + call.new) if base is not None else torch.full((batch,), call.capacity, device=device)
    i = torch.arange(seqlen_q, device=device)[None, :, None]
    j = torch.arange(length, device=device)[None, None, :]
    rel = i + (seqlens_k - seqlen_q)[:, None, None] - j  # (B, Sq, L): the query's position minus the key's
    allowed = j < seqlens_k[:, None, None]
    if call.right >= 0:
        allowed = allowed & (rel >= -call.right)
    if call.left >= 0:
        allowed = allowed & (rel <= call.left)
    if call.softcap == 0 and call.alibi is None and not need_lse and call.shortest >= seqlen_q:
        # Every query row sees at least its own diagonal key, so SDPA never meets an empty row.
        mask = None if bool(allowed.all()) else allowed[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=call.scale,
            enable_gqa=group > 1)
        return out.transpose(1, 2), None
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    # GQA without repeating K/V: the (group x Sq) rows of each KV head against its (L, D) keys, batched matmuls.
    qg = q.to(compute).view(batch, seqlen_q, kv_heads, group, head_d).permute(0, 2, 3, 1, 4).reshape(
        batch, kv_heads, group * seqlen_q, head_d)
    scores = (qg @ keys.to(compute).permute(0, 2, 3, 1)).view(batch, kv_heads, group, seqlen_q, length)
    scores = scores * call.scale
    if call.softcap > 0:
        scores = torch.tanh(scores / call.softcap) * call.softcap
    if call.alibi is not None:
        slopes = call.alibi.to(compute).expand(batch, heads).reshape(batch, kv_heads, group, 1, 1)
        scores = scores - slopes * rel.abs()[:, None, None].to(compute)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])  # empty rows: all zeros
    out = probs.view(batch, kv_heads, group * seqlen_q, length) @ values.to(compute).permute(0, 2, 1, 3)
    out = out.view(batch, kv_heads, group, seqlen_q, head_d).permute(0, 3, 1, 2, 4).reshape(
        batch, seqlen_q, heads, head_d).to(q.dtype)
    lse = lse.reshape(batch, heads, seqlen_q).to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


_KNOWN_LENGTHS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "llmfast_known_cache_lengths", default=None)


@contextlib.contextmanager
def known_cache_lengths(shortest: int, longest: int) -> Iterator[None]:
    """Inside, :func:`flash_attn_with_kvcache` trusts that every sequence's key range (``cache_seqlens`` plus the
    new tokens) lies in ``[shortest, longest]`` and fits the cache, and skips the host-side checks that read
    ``cache_seqlens`` back (a device sync per call, so per layer and token in a generation loop). For callers that
    track the lengths on the host, like :func:`llmfast.models.generation.generate`. Calls with ``block_table`` or
    ``cache_batch_idx`` still check those. The kernels never read or write past the cache either way: a wrong
    promise gives wrong attention, not a stray memory access.
    """
    token = _KNOWN_LENGTHS.set((int(shortest), int(longest)))
    try:
        yield
    finally:
        _KNOWN_LENGTHS.reset(token)


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                            rotary_cos: torch.Tensor | None = None, rotary_sin: torch.Tensor | None = None,
                            cache_seqlens: int | torch.Tensor | None = None,
                            cache_batch_idx: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                            softmax_scale: float | None = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: torch.Tensor | None = None,
                            num_splits: int = 0, return_softmax_lse: bool = False):
    """Attention of ``q`` over a key/value cache, with flash-attn's ``flash_attn_with_kvcache`` semantics.

    ``q`` (B, Sq, H, D); the cache is ``k_cache``/``v_cache`` (B_cache, L, Hk, D), rows picked by
    ``cache_batch_idx`` (B,) int32 (default: row b), or paged (num_blocks, page_size, Hk, D) with ``block_table``
    (B, max_blocks) int32 (position j of sequence b in page ``block_table[b, j // page_size]``). ``k``/``v``
    (B, S_new, Hk, D), if given, are written into the cache *in place* at ``cache_seqlens`` (an int or a (B,)
    int32 tensor, 0 allowed), ``k`` rotated first when ``rotary_cos``/``rotary_sin`` (seqlen_ro, rotary_dim / 2)
    are given; ``q`` is rotated at ``cache_seqlens + i`` (causal or windowed) or ``cache_seqlens``. Attention
    then covers ``cache_seqlens + S_new`` keys per sequence (the whole cache when ``cache_seqlens`` is None).
    ``causal`` and ``window_size`` align bottom-right (Sq > 1 for speculative decoding / chunked prefill);
    ``softcap > 0`` caps scores as ``softcap * tanh(s / softcap)``; ``alibi_slopes`` (H,) or (B, H) float32 adds
    ``-slope * |i + Sk - Sq - j|``. GQA/MQA: H a multiple of Hk. ``num_splits`` splits the key range across
    programs (0: :func:`choose_num_splits` decides). Returns ``out`` (B, Sq, H, D), and with
    ``return_softmax_lse`` also the natural-log LSE (B, H, Sq) float32 (-inf, and output 0, for rows with no key).

    A cache too short for ``cache_seqlens + S_new``, a block table entry outside the cache, or a
    ``cache_batch_idx`` outside it raises ``ValueError``; nothing is ever written past the cache.
    """
    call = _Call(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, block_table,
                 softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
                 return_softmax_lse)
    impl = _backend.resolve("flash_attn_with_kvcache", q)
    if impl == "torch" or (impl == "triton" and q.dtype == torch.float64):
        out, lse = _kvcache_torch(q, k_cache, v_cache, k, v, call, call.batch_idx, call.block_table,
                                  rotary_interleaved, return_softmax_lse)
        return (out, lse) if return_softmax_lse else out
    if impl == "reference":
        from llmfast.reference import decode as reference  # late: only needed when selected

        result = reference.flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, call.rotary_cos, call.rotary_sin,
            call.seqlens if call.seqlens is not None else None, cache_batch_idx, block_table, call.scale, causal,
            window_size, call.softcap, rotary_interleaved, call.alibi, num_splits, return_softmax_lse)
        return result
    batch, seqlen_q, heads, head_d = q.shape
    group = heads // k_cache.shape[2]
    splits = num_splits
    if splits == 0:
        arch = config_arch(q.device)
        kind, block_m = _row_kind_for(seqlen_q * group, q.dtype)
        block_n = _config(arch, kind, max(16, triton.next_power_of_2(head_d)), q.dtype)["BLOCK_N"]
        sms = _cuda_sm_count(q.device.index or 0) if (q.device.type == "cuda" and arch != "interpreter") else None
        splits = choose_num_splits(batch, k_cache.shape[2], triton.cdiv(seqlen_q * group, block_m), call.longest,
                                   block_n, arch, sms)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k is None or k.stride(-1) == 1 else k.contiguous()
    v = v if v is None or v.stride(-1) == 1 else v.contiguous()
    out, lse = _kvcache_op(q, k_cache, v_cache, k, v, call.rotary_cos, call.rotary_sin, call.seqlens,
                           call.batch_idx, call.block_table, call.alibi, call.scale, call.left, call.right,
                           call.softcap, rotary_interleaved, call.rotary_q_per_row, splits)
    return (out, lse) if return_softmax_lse else out
