"""llmfast.transformers: Hugging Face models patched onto llmfast give the eager model's numbers.

Tiny models are built from configs (nothing is downloaded), one per supported family. The patched model runs
llmfast's Triton kernels in the interpreter (fp32); the unpatched eager model is the judge: logits and loss within
1e-4 relative, every parameter gradient within 1e-3.
"""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import llmfast
from llmfast._backend import reset_kernel_launch_counts
import llmfast.transformers as lt

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")

VOCAB = 96


def _config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=5)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=16)
    if family == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                         attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if family == "bert":
        return transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0)
    raise AssertionError(family)


CAUSAL = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt2")
FAMILIES = CAUSAL + ("bert",)


def _model(family: str):
    config = _config(family)
    cls = transformers.BertForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    model = cls.from_config(config, attn_implementation="eager") if family != "bert" else cls(config)
    if family == "bert":
        model.set_attn_implementation("eager")
    with torch.no_grad():  # Gemma's norms start at zero offsets and BERT's head bias at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias") or "LayerNorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(autouse=True)
def _restore_transformers():
    """Rotary patching is process-wide (transformers keeps it in a module-level function): undo it after a test."""
    yield
    lt.revert()


def _batch(family: str, batch: int = 2, length: int = 11):
    ids = torch.randint(0, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    if family == "bert":
        mask[1, -3:] = 0                                  # right padding
        labels = torch.full_like(ids, -100)
        picked = torch.rand(batch, length) < 0.4
        labels[picked & mask.bool()] = ids[picked & mask.bool()]
    else:
        mask[1, :3] = 0                                   # left padding, as generate pads
        labels = ids.masked_fill(mask == 0, -100)
        # Hugging Face scores token 3 of row 1 from position 2, a padding position whose attention row is empty;
        # eager and SDPA disagree there (uniform weights vs zeros), so that label is left out.
        labels[1, 3] = -100
    return ids, mask, labels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_matches_eager(family):
    reference = _model(family)
    patched = lt.apply_llmfast(copy.deepcopy(reference))
    ids, mask, labels = _batch(family)
    valid = mask.bool()

    # Inference: logits are returned, the loss comes from llmfast's cross-entropy.
    reference.eval(), patched.eval()
    want = reference(input_ids=ids, attention_mask=mask, labels=labels)
    reset_kernel_launch_counts()
    with llmfast.backend("triton"):
        got = patched(input_ids=ids, attention_mask=mask, labels=labels)
    launched = llmfast.kernel_launch_counts()
    assert _rel(got.logits[valid], want.logits[valid]) < 1e-4
    assert abs(got.loss.item() - want.loss.item()) < 1e-4 * abs(want.loss.item())
    assert got.loss.dtype == torch.float32
    assert any(name.startswith("attention") for name in launched), launched

    # Training: the fused loss, no logits, and every gradient.
    reference.train(), patched.train()
    want = reference(input_ids=ids, attention_mask=mask, labels=labels)
    want.loss.backward()
    with llmfast.backend("triton"):
        got = patched(input_ids=ids, attention_mask=mask, labels=labels)
        got.loss.backward()
    assert got.logits is None
    assert abs(got.loss.item() - want.loss.item()) < 1e-4 * abs(want.loss.item())
    # Some gradients are zero in exact math (a key bias shifts every score of a row alike): those are judged
    # against the size of the whole gradient, not their own rounding noise.
    floor = 1e-6 * torch.stack([p.grad.norm() for p in reference.parameters() if p.grad is not None]).max()
    for (name, p_got), p_want in zip(patched.named_parameters(), reference.parameters()):
        if p_want.grad is None:
            assert p_got.grad is None or p_got.grad.abs().max() == 0, name
            continue
        assert p_got.grad is not None, name
        error = (p_got.grad - p_want.grad).norm()
        assert error <= 1e-3 * torch.maximum(p_want.grad.norm(), floor), (name, error, p_want.grad.norm())


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_num_items_in_batch_sums_then_divides(family):
    reference = _model(family).train()
    patched = lt.apply_llmfast(copy.deepcopy(reference))
    ids, mask, labels = _batch(family)
    n_items = torch.tensor(37)
    want = reference(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items).loss
    got = patched(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items).loss
    assert abs(got.item() - want.item()) < 1e-4 * abs(want.item())


def test_attn_implementation_by_name_selects_llmfast():
    lt.register()
    config = _config("llama")
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="llmfast").eval()
    assert model.config._attn_implementation == "llmfast"
    ids, mask, _ = _batch("llama")
    reset_kernel_launch_counts()
    with llmfast.backend("triton"):
        got = model(input_ids=ids, attention_mask=mask).logits
    assert llmfast.kernel_launch_counts().get("attention_fwd", 0) == config.num_hidden_layers
    model.set_attn_implementation("eager")
    want = model(input_ids=ids, attention_mask=mask).logits
    assert _rel(got[mask.bool()], want[mask.bool()]) < 1e-4

    # The config switch works too.
    model.config._attn_implementation = "llmfast"
    reset_kernel_launch_counts()
    with llmfast.backend("triton"):
        model(input_ids=ids, attention_mask=mask)
    assert llmfast.kernel_launch_counts().get("attention_fwd", 0) == config.num_hidden_layers


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_generate_greedy_is_identical(family):
    reference = _model(family).eval()
    patched = lt.apply_llmfast(copy.deepcopy(reference))
    ids, mask, _ = _batch(family, length=7)
    want = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              pad_token_id=0)
    reset_kernel_launch_counts()
    with llmfast.backend("triton"):
        got = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(got, want)
    assert llmfast.kernel_launch_counts().get("attention_fwd", 0) >= 6 * patched.config.num_hidden_layers


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_decodes_through_the_kv_cache_kernel(family):
    # One unpadded prompt: every decoding step has no mask, so it runs the split-KV decode kernel.
    reference = _model(family).eval()
    patched = lt.apply_llmfast(copy.deepcopy(reference))
    ids = torch.randint(0, VOCAB, (1, 9))
    want = reference.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    reset_kernel_launch_counts()
    with llmfast.backend("triton"):
        got = patched.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    counts = llmfast.kernel_launch_counts()
    assert torch.equal(got, want)
    layers = patched.config.num_hidden_layers
    assert counts.get("decode_attention", 0) == 4 * layers, counts   # the steps after the prompt
    assert counts.get("attention_fwd", 0) == layers, counts          # the prompt (prefill)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 2)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


def test_pipeline_text_generation():
    reference = _model("llama").eval()
    patched = lt.apply_llmfast(copy.deepcopy(reference))
    tokenizer = _word_tokenizer()
    prompt = "w1 w5 w9 w12"
    want = transformers.pipeline("text-generation", model=reference, tokenizer=tokenizer)(
        prompt, max_new_tokens=5, do_sample=False)
    got = transformers.pipeline("text-generation", model=patched, tokenizer=tokenizer)(
        prompt, max_new_tokens=5, do_sample=False)
    assert got[0]["generated_text"] == want[0]["generated_text"]
    assert got[0]["generated_text"].startswith(prompt)


def test_trainer_runs_and_learns(tmp_path):
    model = lt.apply_llmfast(_model("llama"))
    torch.manual_seed(1)
    rows = [{"input_ids": (torch.arange(12) * (i % 5 + 1) % VOCAB).tolist()} for i in range(16)]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12,
                                          learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, gradient_accumulation_steps=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 10 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])


def test_torch_compile_has_no_graph_breaks_in_llmfast_ops():
    model = lt.apply_llmfast(_model("llama")).eval()
    ids, mask, labels = _batch("llama")
    explanation = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels)
    reasons = [str(getattr(b, "reason", b)) for b in explanation.break_reasons]
    assert not [r for r in reasons if "llmfast" in r], reasons
    compiled = torch.compile(model, backend="eager")
    want = model(input_ids=ids, attention_mask=mask, labels=labels)
    got = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    assert _rel(got.logits, want.logits) < 1e-5


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_save_pretrained_writes_the_original_architecture(tmp_path, family):
    reference = _model(family).eval()
    patched = lt.apply_llmfast(copy.deepcopy(reference))
    assert patched.state_dict().keys() == reference.state_dict().keys()
    patched.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "llmfast" not in text.replace('"_attn_implementation_autoset"', "")
    cls = type(reference)
    loaded = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask, _ = _batch(family)
    want = reference(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, want)


def test_patching_twice_is_a_no_op():
    model = lt.apply_llmfast(_model("llama"))
    forwards = {name: module.forward for name, module in model.named_modules()}
    lt.apply_llmfast(model)
    assert all(module.forward == forwards[name] for name, module in model.named_modules())
    norm = model.model.norm
    assert norm.forward.__func__ is not type(norm).forward


def test_unknown_architecture_names_the_supported_ones():
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                    num_attention_heads=2, word_embed_proj_dim=32)
    model = transformers.OPTForCausalLM(config)
    with pytest.raises(ValueError, match="unsupported architecture.*llama.*mistral"):
        lt.apply_llmfast(model)


def test_unsupported_dtype_keeps_its_own_forward_with_one_warning():
    model = _model("llama").double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lt.apply_llmfast(model)
    assert len([w for w in caught if "llmfast" in str(w.message)]) == 1
    assert model.model.norm.forward.__func__ is type(model.model.norm).forward
    assert model.config._attn_implementation == "eager"


def test_class_level_patching_before_construction():
    # Class patching is process-wide: run it in its own interpreter so the other tests keep pristine classes.
    code = textwrap.dedent("""
        import torch, llmfast, llmfast.transformers as lt, transformers
        from llmfast._backend import reset_kernel_launch_counts
        lt.apply_llmfast_to_llama()
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(config).train()
        assert model.config._attn_implementation == "llmfast", model.config._attn_implementation
        ids = torch.randint(0, 96, (2, 9))
        reset_kernel_launch_counts()
        with llmfast.backend("triton"):
            out = model(input_ids=ids, labels=ids)
        counts = llmfast.kernel_launch_counts()
        assert out.logits is None and torch.isfinite(out.loss), out
        assert counts.get("attention_fwd") == 2, counts
        assert any("rms" in name for name in counts), counts
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_readme_example_runs_as_written(tmp_path):
    """The README's Hugging Face example (the first python block of its section), run as a user would."""
    from pathlib import Path
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Hugging Face models"):]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {key: value for key, value in __import__("os").environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tensor([[" in result.stdout
