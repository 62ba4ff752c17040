"""Reference attention: the judge for the Triton FlashAttention kernels and the baseline in benchmarks.

Plain PyTorch that materialises the full (Sq, Sk) score matrix, favouring clarity over speed. It works in any
floating dtype, float64 included, and computes in the dtype of its inputs the way an unfused low-precision model
would (``q @ k^T``, the softmax and ``P @ V`` all return that dtype; torch accumulates float16/bfloat16 in float32
inside each op), so running it on low-precision inputs measures the error that dtype costs, as flash-attn's
``upcast=False`` reference does, while running it on float64 gives the truth.

Conventions shared with the kernels in :mod:`llmfast.ops.attention`:

* Layouts: :func:`attention` and :func:`scaled_dot_product_attention` take ``(B, H, S, D)`` (torch's SDPA);
  :func:`flash_attn_func` takes ``(B, S, H, D)`` and :func:`flash_attn_varlen_func` packed ``(total, H, D)``
  (flash-attn's).
* Masks: a boolean mask marks the pairs that *take part* (``True`` = attend); a floating mask is *added* to the
  scaled scores. Either broadcasts to ``(B, H, Sq, Sk)``.
* Causal alignment: top-left for SDPA (key ``j`` allowed for query ``i`` iff ``j <= i``), bottom-right for
  flash-attn (``j <= i + Sk - Sq``), so the last query always sees the last key.
* Sliding window ``(left, right)``, ``-1`` meaning unbounded: key ``j`` allowed for query ``i`` iff
  ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``. ``causal=True`` sets ``right = 0``.
* Soft-capping (flash-attn's ``softcap > 0``, Gemma 2): the scaled scores become ``softcap * tanh(s / softcap)``
  before any mask or bias is applied.
* ALiBi (``alibi_slopes``, (H,) or (B, H)): ``-slope * |i + Sk - Sq - j|`` is added to the (soft-capped) scores,
  with flash-attn's bottom-right alignment, per sequence for varlen batches. (flash-attn's CUDA kernel adds
  ``slope * j`` instead when ``causal=True``: the same probabilities, an LSE shifted by ``slope * (i + Sk - Sq)``.)
* LSE: natural-log ``logsumexp`` over keys of the scaled, masked scores, shape ``(B, H, Sq)``, float32 for
  float16/bfloat16/float32 inputs and float64 for float64.
* Fully masked rows (no key allowed): output 0, LSE ``-inf``, and zero gradient, never NaN. (Recent torch's math
  SDPA also returns 0 for such rows; flash-attn stores ``+inf`` as their LSE internally, we report ``-inf``,
  the value of an empty logsumexp.)
* GQA/MQA: ``Hq`` a multiple of ``Hkv``; query head ``h`` reads key/value head ``h // (Hq // Hkv)``
  (``repeat_interleave``, as torch's ``enable_gqa``).
* Dropout acts on the attention probabilities after the softmax (the LSE is unaffected): an entry is kept iff
  ``u >= p`` and kept entries are scaled by ``1 / (1 - p)``, where ``u = tl.rand(seed, offset)`` with
  ``offset = ((b * H + h) * Sq + i) * Sk + j`` (``H`` the number of query heads). :func:`dropout_keep_mask`
  recomputes Triton's Philox stream in plain PyTorch, so the reference and the kernels agree bit for bit. The seed
  is drawn per call as ``int(torch.randint(0, 2**31 - 1, (1,)).item())``, so ``torch.manual_seed`` reproduces
  it. Varlen uses the padded indexing ``B = batch, Sq = max_seqlen_q, Sk = max_seqlen_k`` with ``i, j`` local
  to each sequence.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "attention",
    "scaled_dot_product_attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "causal_mask",
    "window_mask",
    "sdpa_mask",
    "flash_mask",
    "varlen_dense_mask",
    "alibi_bias",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "draw_dropout_seed",
    "philox_uniform",
    "dropout_keep_mask",
]

# --------------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------------

def _check_window(window_size: tuple[int, int]) -> tuple[int, int]:
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
            or any(w < -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1 = unbounded), got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def window_mask(seqlen_q: int, seqlen_k: int, window_size: tuple[int, int] = (-1, -1), causal: bool = False,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``(Sq, Sk)`` mask of allowed pairs for flash-attn's bottom-right aligned causal/window rules.

    Key ``j`` is allowed for query ``i`` iff ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``; ``-1`` leaves
    that side unbounded, and ``causal`` forces ``right = 0``.
    """
    left, right = _check_window(window_size)
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    diagonal = i + seqlen_k - seqlen_q  # the key aligned with query i (bottom-right alignment)
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= j >= diagonal - left
    if right >= 0:
        allowed &= j <= diagonal + right
    return allowed


def causal_mask(seqlen_q: int, seqlen_k: int, align: str = "top-left",
                device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``(Sq, Sk)`` causal mask: ``"top-left"`` (torch SDPA, ``j <= i``) or ``"bottom-right"``
    (flash-attn, ``j <= i + Sk - Sq``)."""
    if align == "top-left":
        return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device).tril()
    if align == "bottom-right":
        return window_mask(seqlen_q, seqlen_k, (-1, 0), device=device)
    raise ValueError(f"align must be 'top-left' or 'bottom-right', got {align!r}")


def sdpa_mask(seqlen_q: int, seqlen_k: int, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
              dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> torch.Tensor | None:
    """The mask torch's SDPA applies: ``attn_mask`` combined with the top-left causal mask.

    Returns ``None`` (no masking), a boolean mask (``True`` = attend), or an additive mask in ``dtype`` when
    ``attn_mask`` is floating. A floating mask combined with ``is_causal`` gets ``-inf`` above the diagonal.
    """
    if not is_causal:
        return attn_mask
    causal = causal_mask(seqlen_q, seqlen_k, "top-left", device=device if attn_mask is None else attn_mask.device)
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.to(dtype).masked_fill(~causal, float("-inf"))


def flash_mask(seqlen_q: int, seqlen_k: int, causal: bool = False, window_size: tuple[int, int] = (-1, -1),
               device: torch.device | str | None = None) -> torch.Tensor | None:
    """The boolean ``(Sq, Sk)`` mask flash-attn applies, or ``None`` when nothing is masked."""
    left, right = _check_window(window_size)
    if not causal and left < 0 and right < 0:
        return None
    return window_mask(seqlen_q, seqlen_k, (left, right), causal, device=device)


def varlen_dense_mask(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, causal: bool = False,
                      window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """Boolean ``(total_q, total_k)`` mask that makes dense attention over packed tokens equal varlen attention:
    block-diagonal over sequences, each block with that sequence's bottom-right causal/window rules."""
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    allowed = torch.zeros(cq[-1], ck[-1], dtype=torch.bool, device=cu_seqlens_q.device)
    for b in range(len(cq) - 1):
        sq, sk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        allowed[cq[b]:cq[b + 1], ck[b]:ck[b + 1]] = window_mask(sq, sk, window_size, causal,
                                                                 device=cu_seqlens_q.device)
    return allowed


def alibi_bias(alibi_slopes: torch.Tensor, seqlen_q: int, seqlen_k: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ALiBi's additive bias ``-slope * |i + Sk - Sq - j|``: ``(B, H, Sq, Sk)`` for (B, H) slopes, ``(H, Sq, Sk)``
    for (H,) slopes (broadcasting over the batch)."""
    i = torch.arange(seqlen_q, device=alibi_slopes.device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=alibi_slopes.device).unsqueeze(0)
    distance = (i + seqlen_k - seqlen_q - j).abs().to(dtype)
    return -alibi_slopes.to(dtype)[..., None, None] * distance


# --------------------------------------------------------------------------------------------------------------
# Dropout: Triton's Philox-4x32-10 stream, recomputed in PyTorch
# --------------------------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
# Triton's uint32 -> [0, 1) conversion: the largest float32 scale with (2**31 - 1) * scale < 1.
_UINT32_TO_UNIFORM = 4.6566127342e-10


def draw_dropout_seed() -> int:
    """The per-call dropout seed, drawn from torch's default generator so ``torch.manual_seed`` reproduces it."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product of 32-bit unsigned values held in int64 tensors.

    int64 multiplication wraps modulo 2**64, so the bits of the product are exact even when it reads negative;
    the masks below drop the sign extension of the arithmetic shift.
    """
    product = b * a
    return (product >> 32) & _MASK32, product & _MASK32


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Float32 uniforms in [0, 1), equal bit for bit to Triton's ``tl.rand(seed, offsets)``.

    ``tl.rand`` runs Philox-4x32 with 10 rounds on the counter ``(offset_lo, offset_hi, 0, 0)`` and the key
    ``(seed_lo, seed_hi)``, keeps the first output word, reads it as int32, folds negatives with ``~x`` and
    scales by :data:`_UINT32_TO_UNIFORM` in float32.
    """
    offsets = offsets.to(torch.int64)
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = int(seed) & _MASK32, (int(seed) >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # bitcast uint32 -> int32
    folded = torch.where(signed < 0, ~signed, signed)
    return folded.to(torch.float32) * torch.tensor(_UINT32_TO_UNIFORM, dtype=torch.float32, device=offsets.device)


def dropout_keep_mask(seed: int, p: float, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``(B, H, Sq, Sk)`` mask of the attention probabilities dropout keeps (``u >= p``).

    Same stream as the kernels: ``u = tl.rand(seed, ((b * H + h) * Sq + i) * Sk + j)``.
    """
    offsets = torch.arange(batch * heads * seqlen_q * seqlen_k, dtype=torch.int64, device=device)
    uniform = philox_uniform(seed, offsets).view(batch, heads, seqlen_q, seqlen_k)
    return uniform >= torch.tensor(p, dtype=torch.float32, device=uniform.device)


# --------------------------------------------------------------------------------------------------------------
# Core
# --------------------------------------------------------------------------------------------------------------

def _expand_kv_heads(x: torch.Tensor, query_heads: int, name: str) -> torch.Tensor:
    kv_heads = x.shape[-3]
    if kv_heads == query_heads:
        return x
    if kv_heads == 0 or query_heads % kv_heads != 0:
        raise ValueError(f"{name} has {kv_heads} heads, which must divide the {query_heads} query heads (GQA)")
    return x.repeat_interleave(query_heads // kv_heads, dim=-3)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              mask: torch.Tensor | None = None, dropout_p: float = 0.0, dropout_keep: torch.Tensor | None = None,
              return_lse: bool = False, softcap: float = 0.0,
              bias: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(cap(q k^T * scale) + mask + bias) v in ``(..., H, S, D)`` layout, with the LSE on request.

    Args:
        q: ``(..., Hq, Sq, D)``; ``k``: ``(..., Hkv, Sk, D)``; ``v``: ``(..., Hkv, Sk, Dv)`` with ``Hkv | Hq``.
        scale: multiplies the scores; ``None`` means ``1 / sqrt(D)``.
        mask: boolean (``True`` = attend) or additive floating mask broadcastable to ``(..., Hq, Sq, Sk)``.
        dropout_p: dropout probability, used only with ``dropout_keep``.
        dropout_keep: boolean mask of kept probabilities broadcastable to ``(..., Hq, Sq, Sk)``; kept entries
            are scaled by ``1 / (1 - dropout_p)``. ``None`` means no dropout (this function draws nothing).
        return_lse: also return the ``(..., Hq, Sq)`` log-sum-exp of the masked scaled scores.
        softcap: if > 0, the scaled scores become ``softcap * tanh(scores / softcap)`` before masking.
        bias: additive bias broadcastable to ``(..., Hq, Sq, Sk)`` (ALiBi), added after soft-capping.

    Computation happens in the inputs' dtype (torch's softmax accumulates float16/bfloat16 in float32 and rounds
    its result), the LSE in float32 (float64 for float64). Rows with no allowed key give output 0, LSE ``-inf``
    and zero gradient.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    k = _expand_kv_heads(k, q.shape[-3], "key")
    v = _expand_kv_heads(v, q.shape[-3], "value")

    # Everything in the inputs' dtype, as an unfused model computes it (flash-attn's "upcast=False" reference):
    # torch.softmax on float16/bfloat16 accumulates in float32 but returns, and saves for the backward, rounded
    # probabilities. Its error is the yardstick the kernel tests measure the kernels against.
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)

    # A row with no allowed key would make softmax 0/0 = NaN: give it finite dummy scores, then zero its
    # probabilities. masked_fill passes no gradient to the filled entries, so those rows get gradient 0.
    empty_row = torch.isneginf(scores).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty_row, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty_row, 0.0)

    if dropout_keep is not None:
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1) when a dropout mask is given, got {dropout_p}")
        probs = probs * dropout_keep.to(probs.dtype) * (1.0 / (1.0 - dropout_p))

    out = probs.to(v.dtype) @ v
    if not return_lse:
        return out
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(scores.to(lse_dtype), dim=-1, keepdim=True)
    lse = lse.masked_fill(empty_row, float("-inf"))
    return out, lse.squeeze(-1)


# --------------------------------------------------------------------------------------------------------------
# Public-signature references
# --------------------------------------------------------------------------------------------------------------

def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False, *, softcap: float = 0.0,
                                 dropout_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for torch's ``scaled_dot_product_attention``, ``(..., H, S, D)`` layout, top-left causal.

    ``attn_mask`` and ``is_causal`` together mean both apply (as torch's math path does). With
    ``dropout_p > 0`` the keep mask is drawn as the kernels draw it (see the module docstring) unless
    ``dropout_keep`` is given. Fully masked rows give 0. ``softcap > 0`` soft-caps the scaled scores first.
    """
    if query.shape[-3] != key.shape[-3] and not enable_gqa:
        raise ValueError(f"query has {query.shape[-3]} heads and key {key.shape[-3]}: pass enable_gqa=True "
                         "for grouped-query attention")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    mask = sdpa_mask(query.shape[-2], key.shape[-2], attn_mask, is_causal, query.dtype, query.device)
    if dropout_p > 0.0 and dropout_keep is None:
        if query.dim() != 4:
            raise ValueError(f"dropout needs 4-D (B, H, S, D) inputs, got query of shape {tuple(query.shape)}")
        batch, heads, seqlen_q, _ = query.shape
        dropout_keep = dropout_keep_mask(draw_dropout_seed(), dropout_p, batch, heads, seqlen_q, key.shape[-2],
                                         query.device)
    return attention(query, key, value, scale=scale, mask=mask, dropout_p=dropout_p, dropout_keep=dropout_keep,
                     softcap=softcap)


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False, *, dropout_keep: torch.Tensor | None = None):
    """Reference for flash-attn's ``flash_attn_func``: ``(B, S, H, D)`` layout, bottom-right causal, windows,
    soft-capping and ALiBi (``deterministic`` changes nothing here).

    Returns the output ``(B, Sq, Hq, Dv)``; with ``return_attn_probs`` the tuple ``(out, softmax_lse, S_dmask)``
    where ``softmax_lse`` is ``(B, Hq, Sq)`` float32 (float64 for float64 inputs) and ``S_dmask`` the
    ``(B, Hq, Sq, Sk)`` softmax before dropout, in the inputs' dtype, negated where dropout dropped the entry
    (flash-attn's encoding: negative means dropped).
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    batch, heads, seqlen_q, _ = qh.shape
    seqlen_k = kh.shape[-2]
    mask = flash_mask(seqlen_q, seqlen_k, causal, window_size, q.device)
    bias = None if alibi_slopes is None else alibi_bias(
        alibi_slopes, seqlen_q, seqlen_k, torch.float64 if q.dtype == torch.float64 else torch.float32)
    if dropout_p > 0.0 and dropout_keep is None:
        dropout_keep = dropout_keep_mask(draw_dropout_seed(), dropout_p, batch, heads, seqlen_q, seqlen_k, q.device)
    out, lse = attention(qh, kh, vh, scale=softmax_scale, mask=mask, dropout_p=dropout_p,
                         dropout_keep=dropout_keep, return_lse=True, softcap=softcap, bias=bias)
    out = out.transpose(1, 2)
    if not return_attn_probs:
        return out
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    probs = torch.exp(_scores(qh, kh, softmax_scale, mask, lse.dtype, softcap, bias) - lse.unsqueeze(-1))
    probs = torch.where(torch.isfinite(lse).unsqueeze(-1), probs, torch.zeros_like(probs))
    if dropout_keep is not None:
        probs = torch.where(dropout_keep, probs, -probs)
    return out, lse, probs.to(q.dtype)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float | None, mask: torch.Tensor | None,
            dtype: torch.dtype, softcap: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Masked scaled (soft-capped, biased) scores in ``dtype`` (for the probabilities returned next to the LSE)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    k = _expand_kv_heads(k, q.shape[-3], "key")
    scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.to(dtype)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                           return_attn_probs: bool = False, *, dropout_keep: torch.Tensor | None = None):
    """Reference for flash-attn's ``flash_attn_varlen_func``: packed ``(total, H, D)`` tokens, one
    :func:`flash_attn_func` call per sequence. ``dropout_keep``, if given, is ``(batch, Hq, max_seqlen_q,
    max_seqlen_k)`` and sequence ``b`` uses its top-left ``(sq_b, sk_b)`` corner. With ``return_attn_probs``
    returns ``(out, softmax_lse, S_dmask)``: the LSE ``(Hq, total_q)`` and S_dmask ``(batch, Hq, max_seqlen_q,
    max_seqlen_k)`` with sequence ``b`` in its top-left corner and zeros elsewhere."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {len(cq)} and {len(ck)}")
    batch = len(cq) - 1
    if dropout_p > 0.0 and dropout_keep is None:
        dropout_keep = dropout_keep_mask(draw_dropout_seed(), dropout_p, batch, q.shape[1], max_seqlen_q,
                                         max_seqlen_k, q.device)
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype, device=q.device)
    probs = torch.zeros(batch, q.shape[1], max_seqlen_q, max_seqlen_k, dtype=q.dtype, device=q.device)
    pieces = []
    for b in range(batch):
        sq, sk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        keep = None if dropout_keep is None else dropout_keep[b:b + 1, :, :sq, :sk]
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
        piece, piece_lse, piece_probs = flash_attn_func(
            q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]], dropout_p, softmax_scale,
            causal, window_size, softcap, slopes, deterministic, True, dropout_keep=keep)
        pieces.append(piece[0])
        lse = torch.cat([lse[:, :cq[b]], piece_lse[0], lse[:, cq[b + 1]:]], dim=1)
        probs = _put_corner(probs, b, piece_probs[0])
    result = torch.cat(pieces + [out[cq[-1]:]], dim=0) if pieces else out
    return (result, lse, probs) if return_attn_probs else result


def _put_corner(full: torch.Tensor, b: int, piece: torch.Tensor) -> torch.Tensor:
    """``full`` with ``piece`` (H, sq, sk) written at ``full[b, :, :sq, :sk]`` (out of place, autograd-safe)."""
    padded = torch.nn.functional.pad(piece, (0, full.shape[-1] - piece.shape[-1], 0, full.shape[-2] - piece.shape[-2]))
    return torch.cat([full[:b], padded[None], full[b + 1:]], dim=0)


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                              causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                              return_attn_probs: bool = False, *, dropout_keep: torch.Tensor | None = None):
    """Reference for flash-attn's ``flash_attn_qkvpacked_func``: ``qkv`` (B, S, 3, H, D)."""
    q, k, v = qkv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, dropout_keep=dropout_keep)


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0,
                             softmax_scale: float | None = None, causal: bool = False,
                             window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                             return_attn_probs: bool = False, *, dropout_keep: torch.Tensor | None = None):
    """Reference for flash-attn's ``flash_attn_kvpacked_func``: ``q`` (B, Sq, Hq, D), ``kv`` (B, Sk, 2, Hkv, D)."""
    k, v = kv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, dropout_keep=dropout_keep)


def flash_attn_varlen_qkvpacked_func(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0, softmax_scale: float | None = None,
                                     causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                     softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                                     deterministic: bool = False, return_attn_probs: bool = False, *,
                                     dropout_keep: torch.Tensor | None = None):
    """Reference for flash-attn's ``flash_attn_varlen_qkvpacked_func``: ``qkv`` (total, 3, H, D)."""
    q, k, v = qkv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  dropout_keep=dropout_keep)


def flash_attn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0, softmax_scale: float | None = None,
                                    causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                                    deterministic: bool = False, return_attn_probs: bool = False, *,
                                    dropout_keep: torch.Tensor | None = None):
    """Reference for flash-attn's ``flash_attn_varlen_kvpacked_func``: ``q`` (total_q, Hq, D), ``kv``
    (total_k, 2, Hkv, D)."""
    k, v = kv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, dropout_keep=dropout_keep)
