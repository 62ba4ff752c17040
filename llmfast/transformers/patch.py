"""Patching Hugging Face models onto llmfast: one table of families, one forward per kind of layer.

Instance patching (:func:`apply_llmfast`) rebinds ``forward`` on the model's own modules, so parameters, buffers
and state-dict keys stay exactly the original architecture's (``save_pretrained`` writes a plain checkpoint).
Rotary embeddings are a module-level function in transformers, so ``rope=True`` replaces that function in the
family's modelling module (for every model of that family in the process; llmfast's kernel computes the same thing).
Class patching (``apply_llmfast_to_llama()`` and friends) rebinds the classes' methods instead, for code that
creates its models later (``from_pretrained`` then train).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import warnings
from typing import Any, Callable

import torch

import llmfast

from . import attention as _attention
from . import loss as _loss

PATCHED = "_llmfast_patched"
# What class and module patching replaced, so revert() can put it back: (owner, attribute, original or None).
_REPLACED: list[tuple[Any, str, Any]] = []
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SUPPORTED_DEVICES = ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class Family:
    """Where one architecture family keeps the pieces llmfast replaces."""

    module: str                      # transformers' modelling module
    norm: str | None                 # its RMSNorm class (None: torch.nn.LayerNorm)
    norm_offset: float = 0.0         # Gemma's (1 + weight)
    mlp: str | None = None           # its gated MLP class
    act_config: str = "hidden_act"   # the config field naming the MLP's activation
    rope: bool = True
    heads: tuple[str, ...] = ()      # model classes whose loss llmfast computes
    masked_lm: bool = False          # BERT: no label shift


FAMILIES: dict[str, Family] = {
    "llama": Family("transformers.models.llama.modeling_llama", "LlamaRMSNorm", mlp="LlamaMLP",
                    heads=("LlamaForCausalLM",)),
    "mistral": Family("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", mlp="MistralMLP",
                      heads=("MistralForCausalLM",)),
    "qwen2": Family("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", mlp="Qwen2MLP",
                    heads=("Qwen2ForCausalLM",)),
    "qwen3": Family("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm", mlp="Qwen3MLP",
                    heads=("Qwen3ForCausalLM",)),
    "gemma2": Family("transformers.models.gemma2.modeling_gemma2", "Gemma2RMSNorm", norm_offset=1.0,
                     mlp="Gemma2MLP", act_config="hidden_activation", heads=("Gemma2ForCausalLM",)),
    "gpt2": Family("transformers.models.gpt2.modeling_gpt2", None, rope=False, heads=("GPT2LMHeadModel",)),
    "bert": Family("transformers.models.bert.modeling_bert", None, rope=False, heads=("BertForMaskedLM",),
                   masked_lm=True),
}


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


def family_of(model: torch.nn.Module) -> tuple[str, Family]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"llmfast.transformers: unsupported architecture {type(model).__name__} "
                         f"(config.model_type={model_type!r}); supported: {', '.join(supported_architectures())}")
    return model_type, FAMILIES[model_type]


# ---------------------------------------------------------------------------------------------------------------
# Layer forwards. Each is written once and bound to a module (instance patching) or a class (class patching).
# ---------------------------------------------------------------------------------------------------------------
def _rms_norm_forward(offset: float) -> Callable:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        eps = getattr(self, "variance_epsilon", None)
        eps = self.eps if eps is None else eps
        return llmfast.rms_norm(hidden_states, self.weight, eps=eps, offset=offset)
    return forward


def _layer_norm_forward(self, input: torch.Tensor) -> torch.Tensor:
    return llmfast.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


def _gated_mlp_forward(activation: str) -> Callable:
    if activation == "silu":
        def gate(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return llmfast.swiglu(g, u)
    else:
        approximate = "tanh" if activation in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast") else "none"

        def gate(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return llmfast.geglu(g, u, approximate=approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gate(self.gate_proj(x), self.up_proj(x)))
    return forward


_GATED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")


def _rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` on llmfast's fused kernel."""
    return llmfast.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


_rotary._llmfast_patched = True  # type: ignore[attr-defined]


def _head_forward(original: Callable, masked_lm: bool) -> Callable:
    """A forward for a causal-LM (or masked-LM) head model with llmfast's loss.

    With labels, in training (or ``return_logits=False``), the loss goes through fused linear cross-entropy and
    ``logits`` is ``None``: the (tokens x vocab) logits are never materialised. Otherwise the logits are computed as
    the original does (``logits_to_keep``, Gemma-2's final soft-capping) and the loss, if labels are given, comes
    from llmfast's cross-entropy. The signature is the original's, so transformers' introspection (``generate``,
    ``Trainer``) sees the same parameters.
    """
    signature = inspect.signature(original)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind == p.VAR_KEYWORD), None)

    def forward(self, *args: Any, **kwargs: Any):
        return_logits = kwargs.pop("return_logits", None)
        bound = signature.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self", None)
        extra = dict(arguments.pop(var_kw, {}) or {}) if var_kw else {}
        labels = arguments.pop("labels", None)
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        return_dict = extra.pop("return_dict", arguments.pop("return_dict", None))
        num_items_in_batch = extra.pop("num_items_in_batch", None)
        shifted = extra.pop("shift_labels", None)
        ignore_index = extra.pop("ignore_index", _loss.IGNORE_INDEX)

        base = getattr(self, self.base_model_prefix)
        outputs = base(**arguments, **extra, return_dict=True)
        hidden = outputs.last_hidden_state
        fuse = labels is not None and (return_logits is False or (return_logits is None and self.training))

        if masked_lm:
            head = self.cls.predictions
            linear, softcap = head.decoder, None
            hidden = head.transform(hidden)
        else:
            linear = self.get_output_embeddings()
            softcap = getattr(self.config, "final_logit_softcapping", None)

        loss = logits = None
        if fuse:
            loss = _loss.fused_causal_lm_loss(hidden, linear.weight, linear.bias, labels,
                                              num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                                              shifted_labels=shifted, shift=not masked_lm, softcap=softcap)
        else:
            if not masked_lm and isinstance(logits_to_keep, int) and logits_to_keep:
                hidden = hidden[:, -logits_to_keep:, :]
            elif not masked_lm and torch.is_tensor(logits_to_keep):
                hidden = hidden[:, logits_to_keep, :]
            logits = linear(hidden)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            if labels is not None:
                loss = _loss.causal_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch,
                                            ignore_index=ignore_index, shifted_labels=shifted, shift=not masked_lm)

        from transformers.modeling_outputs import (CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast,
                                                   MaskedLMOutput)
        rest = {key: outputs[key] for key in outputs.keys() if key not in ("last_hidden_state", "pooler_output")}
        if masked_lm:
            rest = {key: value for key, value in rest.items() if key in ("hidden_states", "attentions")}
            output = MaskedLMOutput(loss=loss, logits=logits, **rest)
        elif "cross_attentions" in rest:
            output = CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, **rest)
        else:
            output = CausalLMOutputWithPast(loss=loss, logits=logits, **rest)
        return output if return_dict is not False else output.to_tuple()

    forward.__signature__ = signature  # type: ignore[attr-defined]
    forward.__doc__ = _head_forward.__doc__
    return forward


# ---------------------------------------------------------------------------------------------------------------
# Instance patching
# ---------------------------------------------------------------------------------------------------------------
def _bind(module: torch.nn.Module, forward: Callable) -> None:
    module.forward = types.MethodType(forward, module)
    setattr(module, PATCHED, True)


def _activation(config: Any, family: Family) -> str | None:
    act = getattr(config, family.act_config, None) or getattr(config, "hidden_act", None)
    return act if act in _GATED_ACTIVATIONS else None


def _can_run(model: torch.nn.Module) -> str | None:
    param = next(model.parameters(), None)
    if param is None:
        return None
    if param.dtype not in _SUPPORTED_DTYPES:
        return f"parameters are {param.dtype}; llmfast's kernels take {', '.join(map(str, _SUPPORTED_DTYPES))}"
    if param.device.type not in _SUPPORTED_DEVICES:
        return f"parameters are on {param.device.type!r}; llmfast runs on {' and '.join(_SUPPORTED_DEVICES)}"
    return None


def _patch_rope(family: Family) -> None:
    module = importlib.import_module(family.module)
    if not getattr(module.apply_rotary_pos_emb, PATCHED, False):
        _REPLACED.append((module, "apply_rotary_pos_emb", module.apply_rotary_pos_emb))
        module.apply_rotary_pos_emb = _rotary


def apply_llmfast(model: torch.nn.Module, *, attention: bool = True, norm: bool = True, rope: bool = True,
                  mlp: bool = True, loss: bool = True) -> torch.nn.Module:
    """Run an instantiated Hugging Face model on llmfast's kernels, in place; returns the model.

    Supported: Llama, Mistral, Qwen2, Qwen3, Gemma-2, GPT-2, BERT (detected from ``config.model_type``). Swaps the
    RMSNorm/LayerNorm modules' forward (weights kept), the rotary function, the gated MLPs, attention
    (``attn_implementation="llmfast"``) and the LM loss (fused linear cross-entropy in training). Patching twice
    changes nothing. A model whose dtype or device llmfast does not serve keeps its own forward, with a warning.
    """
    model_type, family = family_of(model)
    why_not = _can_run(model)
    if why_not is not None:
        warnings.warn(f"llmfast.transformers.apply_llmfast: {why_not}; the model keeps its own forward",
                      stacklevel=2)
        return model
    module = importlib.import_module(family.module)
    norm_cls = getattr(module, family.norm) if family.norm else torch.nn.LayerNorm
    mlp_cls = getattr(module, family.mlp) if family.mlp else None
    activation = _activation(model.config, family)
    norm_forward = _rms_norm_forward(family.norm_offset) if family.norm else _layer_norm_forward
    mlp_forward = _gated_mlp_forward(activation) if activation else None
    if mlp and mlp_cls is not None and mlp_forward is None:
        warnings.warn(f"llmfast.transformers: {model_type}'s MLP activation is not one llmfast fuses "
                      f"({', '.join(_GATED_ACTIVATIONS)}); the MLP keeps its own forward", stacklevel=2)

    for sub in model.modules():
        if getattr(sub, PATCHED, False):
            continue
        if norm and isinstance(sub, norm_cls):
            _bind(sub, norm_forward)
        elif mlp and mlp_cls is not None and mlp_forward is not None and isinstance(sub, mlp_cls):
            _bind(sub, mlp_forward)
    if loss and type(model).__name__ in family.heads and not getattr(model, PATCHED, False):
        _bind(model, _head_forward(type(model).forward, family.masked_lm))
    if rope and family.rope:
        _patch_rope(family)
    if attention:
        _attention.register()
        model.set_attn_implementation(_attention.IMPLEMENTATION)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Class patching, before the model exists
# ---------------------------------------------------------------------------------------------------------------
def _patch_class_method(cls: type, name: str, function: Callable) -> None:
    if getattr(cls.__dict__.get(name), PATCHED, False):
        return
    setattr(function, PATCHED, True)
    original = cls.__dict__.get(name)
    _REPLACED.append((cls, name, original))
    setattr(cls, f"_llmfast_original_{name}", original if original is not None else getattr(cls, name))
    setattr(cls, name, function)


def revert() -> None:
    """Undo every class-level and module-level patch (instances patched with apply_llmfast stay patched)."""
    while _REPLACED:
        owner, name, original = _REPLACED.pop()
        if original is None:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


def apply_llmfast_to(model_type: str, *, attention: bool = True, norm: bool = True, rope: bool = True,
                     mlp: bool = True, loss: bool = True) -> None:
    """Patch a family's classes so every model created afterwards (``from_pretrained`` too) runs on llmfast.

    ``attention=True`` makes models of the family pick ``attn_implementation="llmfast"`` when they are built.
    """
    if model_type not in FAMILIES:
        raise ValueError(f"llmfast.transformers: unsupported architecture {model_type!r}; supported: "
                         f"{', '.join(supported_architectures())}")
    family = FAMILIES[model_type]
    module = importlib.import_module(family.module)
    if norm and family.norm:
        _patch_class_method(getattr(module, family.norm), "forward", _rms_norm_forward(family.norm_offset))
    if mlp and family.mlp:
        # The activation is read per instance at call time: the class does not know its config yet.
        def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
            act = _activation(self.config, family)
            if act is None:
                return type(self)._llmfast_original_forward(self, x)
            return _gated_mlp_forward(act)(self, x)
        _patch_class_method(getattr(module, family.mlp), "forward", mlp_forward)
    if rope and family.rope:
        _patch_rope(family)
    for head in family.heads if loss else ():
        cls = getattr(module, head)
        _patch_class_method(cls, "forward", _head_forward(cls.forward, family.masked_lm))
    if attention:
        _attention.register()
        pretrained = getattr(module, f"{type_prefix(family)}PreTrainedModel")
        original_post_init = pretrained.post_init

        def post_init(self) -> None:
            original_post_init(self)
            self.config._attn_implementation = _attention.IMPLEMENTATION
        _patch_class_method(pretrained, "post_init", post_init)


def type_prefix(family: Family) -> str:
    """``LlamaRMSNorm`` -> ``Llama``: the class-name prefix of a family's modelling module."""
    first = family.heads[0]
    for suffix in ("ForCausalLM", "LMHeadModel", "ForMaskedLM"):
        if first.endswith(suffix):
            return first[: -len(suffix)]
    return first
