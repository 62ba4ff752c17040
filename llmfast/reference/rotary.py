"""Reference rotary position embeddings in both conventions people call, in the input's dtype.

* :func:`apply_rotary_emb`: flash-attn's ``flash_attn.layers.rotary.apply_rotary_emb``. ``x`` is (B, S, H, D);
  ``cos``/``sin`` are (S_total, rotary_dim / 2), one angle per rotated pair; token ``s`` of sequence ``b`` sits at
  position ``s + seqlen_offsets[b]``. The first ``rotary_dim`` channels are rotated, the rest pass through.
  ``interleaved=False`` (GPT-NeoX style) pairs channel ``i`` with ``i + rotary_dim / 2``; ``interleaved=True``
  (GPT-J style) pairs ``2i`` with ``2i + 1``.
* :func:`apply_rotary_pos_emb`: Hugging Face's ``transformers`` function: ``q * cos + rotate_half(q) * sin`` with
  ``cos``/``sin`` of shape (B, S, D) (duplicated halves), unsqueezed at ``unsqueeze_dim`` to broadcast over heads.

Called on float64 tensors they judge the Triton kernels; on fp16/bf16 tensors they measure the error plain torch
math makes in that dtype. Both are differentiable by autograd (in x, q, k, and in cos/sin).
"""
from __future__ import annotations

import torch


def _positions(seqlen: int, seqlen_offsets: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Positions of the tokens: (S,) for an int offset, (B, S) for a per-sequence offset tensor."""
    steps = torch.arange(seqlen, device=device)
    if isinstance(seqlen_offsets, torch.Tensor):
        return seqlen_offsets.to(device=device, dtype=torch.long)[:, None] + steps[None, :]
    return steps + int(seqlen_offsets)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
                     inplace: bool = False, seqlen_offsets: int | torch.Tensor = 0) -> torch.Tensor:
    """flash-attn's rotary embedding of ``x`` (B, S, H, D) by ``cos``/``sin`` (S_total, rotary_dim / 2)."""
    seqlen, rotary_dim = x.shape[1], 2 * cos.shape[-1]
    pos = _positions(seqlen, seqlen_offsets, x.device)
    # (S, R/2) -> (1, S, 1, R/2) or (B, S, R/2) -> (B, S, 1, R/2): broadcast over heads.
    c = cos.to(x.dtype)[pos].unsqueeze(-2)
    s = sin.to(x.dtype)[pos].unsqueeze(-2)
    if c.dim() == 3:
        c, s = c.unsqueeze(0), s.unsqueeze(0)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    out = torch.cat((rotated, x_pass), dim=-1)
    if inplace:
        return x.copy_(out)
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) along the last dim, as in Hugging Face's Llama."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         position_ids: torch.Tensor | None = None, unsqueeze_dim: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb``: ``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)``.

    ``cos``/``sin`` (B, S, D) or (1, S, D) are used as given (``position_ids`` is ignored, as in current
    ``transformers``). A 2-d (S_total, D) table is indexed by ``position_ids`` (B, S) when given (older
    ``transformers``), otherwise its first S rows serve every sequence. If the table covers fewer channels than
    q (D_rot < D), the first D_rot channels are rotated and the rest pass through.
    """
    if cos.dim() == 2:
        if position_ids is not None:
            cos, sin = cos[position_ids], sin[position_ids]
        else:
            seqlen = q.shape[2] if unsqueeze_dim == 1 else q.shape[1]
            cos, sin = cos[:seqlen].unsqueeze(0), sin[:seqlen].unsqueeze(0)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]

    def rotate(t: torch.Tensor) -> torch.Tensor:
        t_rot, t_pass = t[..., :rotary_dim], t[..., rotary_dim:]
        return torch.cat((t_rot * cos.to(t.dtype) + rotate_half(t_rot) * sin.to(t.dtype), t_pass), dim=-1)

    return rotate(q), rotate(k)
