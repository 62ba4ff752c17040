"""Rotary position embedding module: builds the cos/sin tables once and rotates q and k with llmfast's kernels."""
from __future__ import annotations

import torch
from torch import nn

from llmfast.ops import rotary as ops


class RotaryEmbedding(nn.Module):
    """Rotary embedding of the first ``dim`` channels of each head (``dim`` even, at most the head dim).

    Angles are ``position * base ** (-2i / dim)`` for pair ``i``, precomputed in fp32 for
    ``max_position_embeddings`` positions (non-persistent buffers: state dicts carry no tables, as in Hugging
    Face). ``interleaved=False`` rotates the two halves of the rotary channels (GPT-NeoX, Llama);
    ``interleaved=True`` adjacent pairs (GPT-J).

    ``forward(q, k, seqlen_offsets=0)`` takes q (B, S, H, D) and k (B, S, Hk, D) in flash-attn's layout
    (Hk may be smaller: GQA) and returns the rotated pair; ``seqlen_offsets`` (an int or a (B,) integer tensor)
    shifts the positions, for decoding after a KV cache. Non-interleaved q and k are rotated in one launch.
    """

    inv_freq: torch.Tensor
    cos_cached: torch.Tensor
    sin_cached: torch.Tensor

    def __init__(self, dim: int, base: float = 10000.0, max_position_embeddings: int = 2048,
                 interleaved: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"dim (the rotary dim) must be a positive even int, got {dim!r}")
        if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, int) \
                or max_position_embeddings <= 0:
            raise ValueError(f"max_position_embeddings must be a positive int, got {max_position_embeddings!r}")
        if not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 0:
            raise ValueError(f"base must be a positive number, got {base!r}")
        self.dim, self.base, self.interleaved = dim, float(base), bool(interleaved)
        self.max_position_embeddings = max_position_embeddings
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        # Angles in float64, rounded once: long tables keep their precision at high positions.
        angles = torch.outer(torch.arange(max_position_embeddings, dtype=torch.float64, device=device), inv_freq)
        full = torch.cat((angles, angles), dim=-1)  # Hugging Face's layout: the two halves duplicated
        self.register_buffer("cos_cached", full.cos().float(), persistent=False)
        self.register_buffer("sin_cached", full.sin().float(), persistent=False)

    def cos_sin(self, half: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The (max_position_embeddings, dim / 2) tables of flash-attn (``half=True``) or the (.., dim) ones of
        Hugging Face with duplicated halves (``half=False``)."""
        if half:
            return self.cos_cached[:, : self.dim // 2], self.sin_cached[:, : self.dim // 2]
        return self.cos_cached, self.sin_cached

    def forward(self, q: torch.Tensor, k: torch.Tensor, seqlen_offsets: int | torch.Tensor = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        seqlen = q.shape[1]
        if isinstance(seqlen_offsets, int) and not isinstance(seqlen_offsets, bool) \
                and seqlen_offsets + seqlen > self.max_position_embeddings:
            raise ValueError(f"positions up to {seqlen_offsets + seqlen - 1} asked for, but the RotaryEmbedding "
                             f"tables hold max_position_embeddings={self.max_position_embeddings}")
        if self.interleaved:
            cos, sin = self.cos_sin(half=True)
            return (ops.apply_rotary_emb(q, cos, sin, True, False, seqlen_offsets),
                    ops.apply_rotary_emb(k, cos, sin, True, False, seqlen_offsets))
        cos, sin = self.cos_sin(half=False)
        if isinstance(seqlen_offsets, torch.Tensor):
            position_ids = seqlen_offsets.reshape(-1, 1) + torch.arange(seqlen, device=q.device)
            return ops.apply_rotary_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim=2)
        # An int offset: the table's rows from the offset on (a view), used as Hugging Face's 2-d table.
        rows = slice(int(seqlen_offsets), int(seqlen_offsets) + seqlen)
        return ops.apply_rotary_pos_emb(q, k, cos[rows], sin[rows], unsqueeze_dim=2)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, base={self.base:g}, max_position_embeddings={self.max_position_embeddings}, "
                f"interleaved={self.interleaved}")
