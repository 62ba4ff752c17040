"""Modules over the public ops: drop-in where torch.nn has an equivalent, with torch's constructor arguments."""
from llmfast.nn.attention import (CausalSelfAttention, FlashCrossAttention, FlashSelfAttention, KVCache, LayerCache,
                                  StaticKVCache)
from llmfast.nn.cross_entropy import (CrossEntropyLoss, FusedLinearCrossEntropyLoss, LigerCrossEntropyLoss,
                                      LigerFusedLinearCrossEntropyLoss)
from llmfast.nn.normalization import LayerNorm, RMSNorm
from llmfast.nn.rotary import RotaryEmbedding
from llmfast.nn.softmax import LogSoftmax, Softmax
from llmfast.nn.swiglu import GeGLUMLP, SwiGLUMLP
from llmfast.nn.transformer import MLP, Block

__all__ = [
    "Block",
    "CausalSelfAttention",
    "CrossEntropyLoss",
    "FlashCrossAttention",
    "FlashSelfAttention",
    "FusedLinearCrossEntropyLoss",
    "GeGLUMLP",
    "KVCache",
    "LayerNorm",
    "LayerCache",
    "LigerCrossEntropyLoss",
    "LigerFusedLinearCrossEntropyLoss",
    "LogSoftmax",
    "MLP",
    "RMSNorm",
    "RotaryEmbedding",
    "Softmax",
    "SwiGLUMLP",
    "StaticKVCache",
]
