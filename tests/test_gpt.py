"""The small GPT: shapes, weight tying, training, the key/value cache, sampling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmfast
from llmfast._backend import reset_kernel_launch_counts
from llmfast.models.gpt import GPT, GPTConfig, sample_next_token
from llmfast.nn.attention import CausalSelfAttention, KVCache, causal_attention_args
from llmfast.nn.transformer import MLP, Block

TINY = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=24)


def tiny_gpt(**overrides) -> GPT:
    return GPT(GPTConfig(**{**TINY, **overrides}))


# --- configuration and shapes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("n_layer", 0), ("n_head", -1), ("vocab_size", 2.5), ("block_size", True), ("n_embd", 25),
    ("dropout", 1.0), ("dropout", -0.1),
])
def test_config_rejects_bad_sizes_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**TINY, field: value})


def test_shapes_of_layers_and_model():
    x = torch.randn(3, 5, 24)
    assert CausalSelfAttention(24, 4)(x).shape == x.shape
    assert MLP(24)(x).shape == x.shape
    assert Block(24, 4)(x).shape == x.shape
    model = tiny_gpt()
    idx = torch.randint(0, 37, (3, 7))
    assert model(idx).shape == (3, 7, 37)
    loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)
    # A sequence of length 1 and one of exactly block_size both work; longer is refused.
    assert model(idx[:, :1]).shape == (3, 1, 37)
    assert model(torch.randint(0, 37, (1, 16))).shape == (1, 16, 37)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(0, 37, (1, 17)))


def test_loss_is_cross_entropy_of_the_logits():
    model = tiny_gpt()
    idx, targets = torch.randint(0, 37, (2, 2, 11)).unbind(0)
    expected = F.cross_entropy(model(idx).reshape(-1, 37), targets.reshape(-1))
    torch.testing.assert_close(model(idx, targets), expected, rtol=1e-5, atol=1e-6)


def test_attention_is_causal():
    model = tiny_gpt().eval()
    idx = torch.randint(0, 37, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % 37
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])  # positions before the change cannot see it
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_weight_tying():
    model = tiny_gpt()
    assert model.lm_head.weight is model.wte.weight
    expected = sum(p.numel() for name, p in model.named_parameters() if name != "lm_head.weight")
    assert model.num_parameters() == expected  # the shared matrix counts once
    assert "lm_head.weight" not in dict(model.named_parameters())
    # Training moves the one matrix: the head and the embedding stay the same tensor.
    idx = torch.randint(0, 37, (2, 9))
    before = model.wte.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(idx, idx.roll(1, dims=1)).backward()
    optimizer.step()
    assert not torch.equal(model.wte.weight, before)
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


def test_dropout_is_active_in_training_only():
    model = tiny_gpt(dropout=0.5)
    idx = torch.randint(0, 37, (2, 9))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_loss_decreases_on_a_tiny_model():
    torch.manual_seed(1)
    model = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 37, (4, 16))
    x, y = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(25):
        loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- key/value cache ----------------------------------------------------------------------------------------------

def test_causal_attention_args_align_queries_bottom_right():
    assert causal_attention_args(5, 5, torch.device("cpu")) == (None, True)
    assert causal_attention_args(1, 7, torch.device("cpu")) == (None, False)
    mask, is_causal = causal_attention_args(2, 5, torch.device("cpu"))
    assert not is_causal
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_kv_cache_refuses_overflow_and_wrong_batch():
    cache = KVCache(batch_size=2, n_head=1, head_dim=4, max_len=3)
    cache.append(torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))
    with pytest.raises(ValueError, match="holds 3 positions"):
        cache.append(torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))
    with pytest.raises(ValueError, match="batch size 2"):
        cache.append(torch.randn(3, 1, 1, 4), torch.randn(3, 1, 1, 4))


@pytest.mark.parametrize("chunks", [[16], [1] * 16, [5, 1, 1, 4, 5], [3, 13]])
def test_cached_logits_equal_full_forward(chunks):
    """Prefill then one token at a time, or in uneven chunks: same logits as one pass over the sequence."""
    model = tiny_gpt().eval()
    idx = torch.randint(0, 37, (3, 16))
    with torch.no_grad():
        full = model(idx)
        caches = model.new_kv_caches(batch_size=3)
        pieces, start = [], 0
        for n in chunks:
            pieces.append(model(idx[:, start:start + n], kv_caches=caches))
            start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompt_len, new_tokens", [(1, 10), (4, 12), (5, 30), (20, 6)])
def test_generation_with_cache_equals_without(prompt_len, new_tokens):
    """Greedy: identical tokens, within block_size and past it (where the window slides), prompt longer too."""
    model = tiny_gpt()
    prompt = torch.randint(0, 37, (2, prompt_len))
    cached = model.generate(prompt, new_tokens, temperature=0)
    uncached = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + new_tokens)
    assert torch.equal(cached[:, :prompt_len], prompt)
    assert torch.equal(cached, uncached)


def test_sampled_generation_with_cache_equals_without():
    model = tiny_gpt()
    prompt = torch.randint(0, 37, (2, 3))
    runs = [model.generate(prompt, 25, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7),
                           use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_generate_restores_training_mode():
    model = tiny_gpt(dropout=0.3)
    model.train()
    model.generate(torch.zeros(1, 1, dtype=torch.long), 3)
    assert model.training


# --- sampling -----------------------------------------------------------------------------------------------------

def test_top_k_1_and_temperature_0_are_greedy():
    logits = torch.randn(6, 37)
    greedy = logits.argmax(-1, keepdim=True)
    assert torch.equal(sample_next_token(logits, temperature=0), greedy)
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        assert torch.equal(sample_next_token(logits, top_k=1, generator=generator), greedy)
    model = tiny_gpt()
    prompt = torch.randint(0, 37, (2, 3))
    assert torch.equal(model.generate(prompt, 8, top_k=1, generator=torch.Generator().manual_seed(3)),
                       model.generate(prompt, 8, temperature=0))


def test_seeded_sampling_is_reproducible():
    model = tiny_gpt()
    prompt = torch.randint(0, 37, (1, 2))

    def sample(seed):
        return model.generate(prompt, 20, temperature=1.5, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(11), sample(11))
    assert not torch.equal(sample(11), sample(12))


def test_top_k_samples_only_the_k_likeliest():
    logits = torch.randn(1, 37).expand(4000, 37)
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    drawn = set(sample_next_token(logits, top_k=5, generator=torch.Generator().manual_seed(0)).flatten().tolist())
    assert drawn == top5  # never outside the top 5, and with 4000 draws every one of them shows up


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(3000, 4)

    def drawn(top_p):
        generator = torch.Generator().manual_seed(0)
        return set(sample_next_token(logits, top_p=top_p, generator=generator).flatten().tolist())

    assert drawn(0.5) == {1}
    assert drawn(0.7) == {1, 3}
    assert drawn(0.9) == {1, 3, 2}
    assert drawn(1.0) == {0, 1, 2, 3}


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(6000, 3)

    def share_of_top(temperature):
        generator = torch.Generator().manual_seed(0)
        return (sample_next_token(logits, temperature=temperature, generator=generator) == 0).float().mean().item()

    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), -1)[0].item()  # 0.665
    assert abs(share_of_top(1.0) - expected) < 0.03
    assert share_of_top(0.25) > 0.95
    assert share_of_top(10.0) < 0.45


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample_next_token(torch.randn(1, 5), **kwargs)
    with pytest.raises(ValueError, match=name):
        tiny_gpt().generate(torch.zeros(1, 1, dtype=torch.long), 2, **kwargs)


def test_generate_rejects_bad_lengths():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="idx"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 2)


# --- backends -----------------------------------------------------------------------------------------------------

def test_reference_backend_gives_the_same_loss():
    model = tiny_gpt()
    idx, targets = torch.randint(0, 37, (2, 2, 16)).unbind(0)
    with llmfast.backend("auto"):
        auto = model(idx, targets)
    with llmfast.backend("reference"):
        reference = model(idx, targets)
    torch.testing.assert_close(auto, reference, rtol=1e-5, atol=1e-5)


def test_trains_under_the_triton_backend():
    """A few steps of a tiny GPT with llmfast's Triton kernels (the interpreter on CPU): the loss matches the
    reference backend, falls, and the Triton kernels really ran (attention, cross-entropy)."""
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=19, block_size=8, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 19, (2, 9))
    x, y = idx[:, :-1], idx[:, 1:]
    with llmfast.backend("reference"):
        reference_loss = model(x, y).item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    reset_kernel_launch_counts()
    losses = []
    with llmfast.backend("triton"):
        for _ in range(4):
            loss = model(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert abs(losses[0] - reference_loss) < 1e-4
    assert losses[-1] < losses[0], losses
    ran = {name for name, count in llmfast.kernel_launch_counts().items() if count > 0}
    for kernel in ("attention_fwd", "attention_bwd", "cross_entropy"):
        assert any(name.startswith(kernel) for name in ran), f"no {kernel}* Triton kernel ran; ran: {sorted(ran)}"


def test_kv_cache_under_the_triton_backend():
    """The cache's three attention shapes (Sq == Sk causal, Sq == 1 unmasked, a chunk with the bottom-right mask)
    through llmfast's Triton attention: same logits as one pass, same greedy tokens as without the cache."""
    model = GPT(GPTConfig(vocab_size=19, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 19, (2, 8))
    with torch.no_grad(), llmfast.backend("triton"):
        full = model(idx)
        caches = model.new_kv_caches(batch_size=2)
        pieces = [model(idx[:, :3], kv_caches=caches), model(idx[:, 3:4], kv_caches=caches),
                  model(idx[:, 4:], kv_caches=caches)]
        cached = model.generate(idx[:, :2], 6, temperature=0)
        uncached = model.generate(idx[:, :2], 6, temperature=0, use_cache=False)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached, uncached)
