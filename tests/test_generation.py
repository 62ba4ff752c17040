"""Generation with the static cache and the decode kernel: the same tokens as the no-cache path, batches of prompts
of different lengths (left or right padding), stop tokens, repetition penalty, streaming, and proof that a decoding
step launches the decode kernel and not the full-sequence one."""
from __future__ import annotations

import pytest
import torch

import llmfast
from llmfast._backend import last_launch_config, reset_kernel_launch_counts
from llmfast.models.generation import apply_repetition_penalty, generate
from llmfast.models.gpt import GPT, GPTConfig
from llmfast.models.llama import Llama, LlamaConfig

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # padded interpreter lanes compute -inf - -inf

TINY = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=24)


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


LLAMA = dict(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def tiny_llama(**overrides) -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(**{**LLAMA, **overrides})).eval()


MODELS = {"gpt": tiny_gpt, "llama": tiny_llama}


PROMPTS = [[3, 1, 4, 1, 5], [9], [2, 6, 5, 3, 5, 8, 9]]


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_greedy_tokens_with_cache_equal_the_no_cache_path(backend, arch):
    model = MODELS[arch]()
    with llmfast.backend(backend):
        cached = model.generate(PROMPTS, 6, temperature=0)
        uncached = model.generate(PROMPTS, 6, temperature=0, use_cache=False)
    assert cached == uncached
    assert [row[:len(p)] for row, p in zip(cached, PROMPTS)] == PROMPTS
    assert all(len(row) == len(p) + 6 for row, p in zip(cached, PROMPTS))


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_a_decode_step_launches_the_decode_kernel_not_the_full_sequence_one(arch):
    model = MODELS[arch]()
    with torch.no_grad(), llmfast.backend("triton"):
        cache = model.new_static_cache(2, 16)
        cache.seqlens.copy_(torch.tensor([3, 5], dtype=torch.int32))
        cache.prefill = True
        reset_kernel_launch_counts()
        prefill_logits = model.forward_cached(torch.randint(0, 37, (2, 5)), cache)
        counts = llmfast.kernel_launch_counts()
        assert counts.get("attention_fwd", 0) == TINY["n_layer"] and counts.get("decode_attention", 0) == 0
        cache.prefill = False
        reset_kernel_launch_counts()
        step_logits = model.forward_cached(torch.randint(0, 37, (2, 1)), cache)
        counts = llmfast.kernel_launch_counts()
    assert counts.get("decode_attention", 0) == TINY["n_layer"], counts
    assert counts.get("decode_kv_append", 0) == TINY["n_layer"], counts
    if arch == "llama":  # the decode kernel's append rotates the new key (the Llama's rotary is fused there)
        assert last_launch_config("decode_kv_append")["rotary_dim"] == LLAMA["n_embd"] // LLAMA["n_head"]

    assert not any(name.startswith("attention_") for name in counts), counts
    assert prefill_logits.shape == (2, 5, 37) and step_logits.shape == (2, 1, 37)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_cached_decode_logits_equal_a_full_forward(arch):
    """Prefill ragged prompts, decode two tokens each: the logits at every step equal a full forward of that
    sequence (through the Triton kernels)."""
    model = MODELS[arch]()
    rows = [[5, 6, 7], [1, 2, 3, 4, 8]]
    extra = [[11, 12], [13, 14]]
    with torch.no_grad(), llmfast.backend("triton"):
        cache = model.new_static_cache(2, 16)
        cache.seqlens.copy_(torch.tensor([3, 5], dtype=torch.int32))
        cache.prefill = True
        model.forward_cached(torch.tensor([rows[0] + [0, 0], rows[1]]), cache)
        cache.prefill = False
        for step in range(2):
            logits = model.forward_cached(torch.tensor([[extra[0][step]], [extra[1][step]]]), cache)[:, 0]
            cache.seqlens += 1
            for b in range(2):
                full = model(torch.tensor([rows[b] + extra[b][:step + 1]]))[0, -1]
                torch.testing.assert_close(logits[b], full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_give_the_same_tokens_as_lists(side):
    model = tiny_gpt()
    width = max(len(p) for p in PROMPTS)
    pad = 0
    rows, mask = [], []
    for p in PROMPTS:
        fill = [pad] * (width - len(p))
        rows.append(fill + p if side == "left" else p + fill)
        mask.append([0] * len(fill) + [1] * len(p) if side == "left" else [1] * len(p) + [0] * len(fill))
    idx, attention_mask = torch.tensor(rows), torch.tensor(mask)
    out = model.generate(idx, 5, temperature=0, attention_mask=attention_mask, pad_token_id=pad)
    lists = model.generate(PROMPTS, 5, temperature=0)
    assert isinstance(out, torch.Tensor) and out.shape == (3, width + 5)
    for row, expect in zip(out.tolist(), lists):
        if side == "left":
            assert row[len(row) - len(expect):] == expect and set(row[:len(row) - len(expect)]) <= {pad}
        else:
            assert row[:len(expect)] == expect and set(row[len(expect):]) <= {pad}


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_stop_tokens_end_each_sequence(arch):
    model = MODELS[arch]()
    free = model.generate(PROMPTS, 6, temperature=0)
    stop = free[0][len(PROMPTS[0])]  # the first token sequence 0 generates
    out = model.generate(PROMPTS, 6, temperature=0, stop_tokens=[stop])
    for row, full, p in zip(out, free, PROMPTS):
        new = full[len(p):]
        cut = new.index(stop) + 1 if stop in new else len(new)
        assert row == p + new[:cut]
    assert len(out[0]) == len(PROMPTS[0]) + 1
    all_stop = model.generate([PROMPTS[0]], 6, temperature=0, stop_tokens=[stop])
    assert all_stop == [PROMPTS[0] + [stop]]


def test_repetition_penalty_math_and_cache_agreement():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    model = tiny_gpt()
    runs = [model.generate(PROMPTS, 8, temperature=0.9, top_k=8, top_p=0.9, repetition_penalty=1.5,
                           generator=torch.Generator().manual_seed(3), use_cache=use_cache)
            for use_cache in (True, False)]
    assert runs[0] == runs[1]
    greedy = model.generate(PROMPTS, 8, temperature=0, repetition_penalty=1e9)
    plain = model.generate(PROMPTS, 8, temperature=0)
    assert greedy != plain  # a huge penalty changes what greedy picks


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_past_the_block_size_cache_and_no_cache_agree(arch):
    model = MODELS[arch](block_size=8)
    with llmfast.backend("triton"):
        cached = model.generate([[1, 2, 3], [4, 5, 6, 7, 8, 9]], 7, temperature=0)
    uncached = model.generate([[1, 2, 3], [4, 5, 6, 7, 8, 9]], 7, temperature=0, use_cache=False)
    assert cached == uncached


def test_stream_reports_every_new_token_in_order():
    model = tiny_gpt()
    seen: list[tuple[int, int]] = []
    out = model.generate(PROMPTS, 4, temperature=0, stream=lambda row, token: seen.append((row, token)))
    for b, (row, p) in enumerate(zip(out, PROMPTS)):
        assert [t for r, t in seen if r == b] == row[len(p):]


def test_generate_accepts_any_model_with_the_protocol():
    model = tiny_gpt()
    out = generate(model, torch.tensor([[1, 2], [3, 4]]), 3, temperature=0)
    assert torch.equal(out, model.generate(torch.tensor([[1, 2], [3, 4]]), 3, temperature=0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(attention_mask=torch.ones(3, 2)), "attention_mask"),
])
def test_bad_generation_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_gpt().generate(torch.zeros(2, 2, dtype=torch.long), 2, **kwargs)


def test_attention_mask_must_be_one_run_per_row():
    with pytest.raises(ValueError, match="contiguous"):
        tiny_gpt().generate(torch.zeros(1, 3, dtype=torch.long), 2, attention_mask=torch.tensor([[1, 0, 1]]))
