"""The Llama-style model: configuration, shapes, GQA and rotary behaviour, the key/value cache, the Triton path, and
the command line (``--arch llama``: train, checkpoint, generate, eval) including the learning criterion on Japanese
text."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llmfast
from llmfast import cli
from llmfast._backend import reset_kernel_launch_counts
from llmfast.models.llama import Llama, LlamaConfig

TINY = dict(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
JAPANESE = Path(__file__).parent / "data" / "neko_ja_excerpt.txt"  # 22 KB of 『吾輩は猫である』 (public domain)
LOG_LINE = re.compile(r"^step (\d+) train_loss (\S+) val_loss (\S+) val_ppl (\S+)$", re.MULTILINE)


def tiny_llama(**overrides) -> Llama:
    return Llama(LlamaConfig(**{**TINY, **overrides}))


# --- configuration and shapes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, match", [
    ("n_layer", 0, "n_layer"), ("n_kv_head", 3, "multiple of n_kv_head"), ("n_embd", 30, "multiple of n_head"),
    ("n_embd", 12, "even"), ("rope_theta", 0, "rope_theta"), ("dropout", 1.0, "dropout"),
    ("intermediate_size", 0, "intermediate_size"), ("tie_word_embeddings", 1, "tie_word_embeddings"),
])
def test_config_rejects_bad_values_naming_the_field(field, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LlamaConfig(**{**TINY, field: value})


def test_config_defaults():
    config = LlamaConfig(n_embd=128)
    assert config.intermediate_size == 352  # 8/3 * 128 = 341.3, rounded up to a multiple of 32
    assert config.head_dim == 32 and config.n_head % config.n_kv_head == 0


def test_shapes_and_huggingface_parameter_names():
    model = tiny_llama()
    names = set(model.state_dict())
    for name in ("embed_tokens.weight", "norm.weight", "lm_head.weight", "layers.1.input_layernorm.weight",
                 "layers.1.post_attention_layernorm.weight", "layers.0.self_attn.q_proj.weight",
                 "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"):
        assert name in names, name
    attn = model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (2 * 8, 32) and attn.q_proj.weight.shape == (4 * 8, 32)  # GQA: 2 KV heads
    assert not any("rotary" in n or "cos" in n for n in names)  # the rotary tables are not state
    idx = torch.randint(0, 37, (3, 7))
    assert model(idx).shape == (3, 7, 37)
    loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)
    assert model(torch.randint(0, 37, (1, 16))).shape == (1, 16, 37)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(0, 37, (1, 17)))
    with pytest.raises(ValueError, match="targets"):
        model(idx, idx[:, :3])


def test_tied_and_untied_heads():
    tied, untied = tiny_llama(), tiny_llama(tie_word_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_parameters() == tied.num_parameters() + 37 * 32


def test_loss_is_cross_entropy_of_the_logits():
    model = tiny_llama()
    idx, targets = torch.randint(0, 37, (2, 2, 11)).unbind(0)
    expected = F.cross_entropy(model(idx).reshape(-1, 37), targets.reshape(-1))
    torch.testing.assert_close(model(idx, targets), expected, rtol=1e-5, atol=1e-6)


def test_attention_is_causal_and_positions_matter():
    model = tiny_llama().eval()
    idx = torch.randint(0, 37, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % 37
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[0, :8], b[0, :8])
    assert not torch.allclose(a[0, 8:], b[0, 8:])
    # No position embeddings: only the rotary embedding tells positions apart. Without it, the last token's
    # attention over the earlier ones would not depend on their order.
    swapped = idx.clone()
    swapped[0, [2, 5]] = idx[0, [5, 2]]
    assert idx[0, 2] != idx[0, 5]
    with torch.no_grad():
        last, last_swapped = model(idx)[0, -1], model(swapped)[0, -1]
    assert not torch.allclose(last, last_swapped, atol=1e-4)


def test_matches_a_plain_torch_llama():
    """The same weights through textbook torch ops (HF's formulas: RMSNorm, rotate_half, repeated KV heads, SwiGLU)."""
    model = tiny_llama().eval()
    idx = torch.randint(0, 37, (2, 10))
    c = model.config

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * w

    def rotate_half(t):
        t1, t2 = t.chunk(2, -1)
        return torch.cat((-t2, t1), -1)

    inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)
    angles = torch.outer(torch.arange(10, dtype=torch.float64), inv_freq)
    cos, sin = (torch.cat((f(angles), f(angles)), -1).float() for f in (torch.cos, torch.sin))
    with torch.no_grad():
        x = model.embed_tokens(idx)
        for layer in model.layers:
            a = layer.self_attn
            h = rms(x, layer.input_layernorm.weight)
            q = a.q_proj(h).view(2, 10, c.n_head, c.head_dim).transpose(1, 2)
            k = a.k_proj(h).view(2, 10, c.n_kv_head, c.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(2, 10, c.n_kv_head, c.head_dim).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            groups = c.n_head // c.n_kv_head
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + a.o_proj(y.transpose(1, 2).reshape(2, 10, -1))
            h = rms(x, layer.post_attention_layernorm.weight)
            m = layer.mlp
            x = x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))
        want = model.lm_head(rms(x, model.norm.weight))
        got = model(idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --- the key/value cache and generation ---------------------------------------------------------------------------

@pytest.mark.parametrize("chunks", [[16], [5, 1, 1, 9], [1] * 16, [7, 9]])
def test_cached_logits_equal_full_forward(chunks):
    model = tiny_llama().eval()
    idx = torch.randint(0, 37, (2, 16))
    with torch.no_grad():
        full = model(idx)
        caches = model.new_kv_caches(batch_size=2)
        assert caches[0].keys.shape == (2, 2, 16, 8)  # n_kv_head heads cached, not n_head
        pieces, start = [], 0
        for n in chunks:
            pieces.append(model(idx[:, start:start + n], kv_caches=caches))
            start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompt_len, new_tokens", [(1, 5), (4, 30)])  # 30: past block_size, the window slides
def test_generation_with_cache_equals_without(prompt_len, new_tokens):
    model = tiny_llama()
    idx = torch.randint(0, 37, (2, prompt_len))
    cached = model.generate(idx, new_tokens, temperature=0)
    assert cached.shape == (2, prompt_len + new_tokens) and torch.equal(cached[:, :prompt_len], idx)
    assert torch.equal(cached, model.generate(idx, new_tokens, temperature=0, use_cache=False))
    gen = [torch.Generator().manual_seed(3) for _ in range(2)]
    assert torch.equal(model.generate(idx, 12, top_k=5, top_p=0.9, generator=gen[0]),
                       model.generate(idx, 12, top_k=5, top_p=0.9, generator=gen[1], use_cache=False))
    assert model.training  # restored


def test_generate_rejects_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="idx"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, top_p=2.0)


# --- backends -----------------------------------------------------------------------------------------------------

def test_reference_backend_gives_the_same_loss():
    model = tiny_llama()
    idx, targets = torch.randint(0, 37, (2, 2, 16)).unbind(0)
    with llmfast.backend("auto"):
        auto = model(idx, targets)
    with llmfast.backend("reference"):
        reference = model(idx, targets)
    torch.testing.assert_close(auto, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes padding lanes of partial tiles
def test_trains_and_decodes_under_the_triton_backend():
    """A few steps with llmfast's Triton kernels (the interpreter on CPU): the loss matches the reference backend
    and falls, every kernel family of the model really ran, and cached decoding matches one full pass."""
    torch.manual_seed(2)
    model = Llama(LlamaConfig(vocab_size=19, block_size=8, n_layer=1, n_head=4, n_kv_head=2, n_embd=16))
    idx = torch.randint(0, 19, (2, 9))
    x, y = idx[:, :-1], idx[:, 1:]
    with llmfast.backend("reference"):
        reference_loss = model(x, y).item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    reset_kernel_launch_counts()
    losses = []
    with llmfast.backend("triton"):
        for _ in range(3):
            loss = model(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert abs(losses[0] - reference_loss) < 1e-4
    assert losses[-1] < losses[0], losses
    ran = {name for name, count in llmfast.kernel_launch_counts().items() if count > 0}
    for kernel in ("rms_norm", "rotary_qk_fwd", "rotary_qk_bwd", "silu_gated_fwd", "silu_gated_bwd",
                   "attention_fwd", "attention_bwd", "cross_entropy"):
        assert any(name.startswith(kernel) for name in ran), f"no {kernel}* Triton kernel ran; ran: {sorted(ran)}"
    model.eval()
    with torch.no_grad(), llmfast.backend("triton"):
        full = model(x)
        caches = model.new_kv_caches(batch_size=2)
        pieces = [model(x[:, :3], kv_caches=caches), model(x[:, 3:4], kv_caches=caches),
                  model(x[:, 4:], kv_caches=caches)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_torch_compile_fullgraph_under_the_triton_backend():
    """The whole model (logits, then backward) traces into one graph: every llmfast op is a custom op."""
    torch.manual_seed(1)
    model = Llama(LlamaConfig(vocab_size=19, block_size=8, n_layer=1, n_head=4, n_kv_head=2, n_embd=16))
    idx = torch.randint(0, 19, (2, 8))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with llmfast.backend("triton"):
        logits = compiled(idx)
        logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with llmfast.backend("reference"):
        want = model(idx)
        want.square().mean().backward()
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-3, atol=1e-5, msg=name)


# --- the command line ---------------------------------------------------------------------------------------------

TINY_FLAGS = ["--arch", "llama", "--n-layer", "1", "--n-head", "4", "--n-kv-head", "2", "--n-embd", "32",
              "--block-size", "32", "--batch-size", "8", "--eval-iters", "2", "--no-progress"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def log_lines(out: str) -> list[tuple[int, float, float, float]]:
    return [(int(s), float(t), float(v), float(p)) for s, t, v, p in LOG_LINE.findall(out)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("llama") / "run"
    code = cli.main(["train", "--data", str(JAPANESE), "--steps", "20", "--eval-interval", "10", "--lr", "1e-2",
                     "--out", str(out_dir), *TINY_FLAGS])
    assert code == 0
    return out_dir


def test_train_writes_a_llama_checkpoint(tmp_path, capsys):
    out_dir = tmp_path / "ckpt"
    code, out, err = run_cli(capsys, "train", "--data", str(JAPANESE), "--steps", "12", "--eval-interval", "6",
                             "--out", str(out_dir), "--untied-head", "--intermediate-size", "48",
                             "--rope-theta", "500", *TINY_FLAGS)
    assert code == 0, err
    assert "model llama " in out and "n_kv_head 2" in out
    lines = log_lines(out)
    assert [step for step, *_ in lines] == [0, 6, 12]
    for _, train_loss, val_loss, val_ppl in lines:
        assert math.isfinite(train_loss) and math.isclose(val_ppl, math.exp(val_loss), rel_tol=1e-2)
    meta = json.loads((out_dir / "config.json").read_text())
    assert meta["arch"] == "llama"
    assert meta["model"] == dict(vocab_size=256, block_size=32, n_layer=1, n_head=4, n_kv_head=2, n_embd=32,
                                 intermediate_size=48, rope_theta=500.0, rms_norm_eps=1e-5,
                                 tie_word_embeddings=False, dropout=0.0)
    model, _, _ = cli.load_checkpoint(str(out_dir), torch.device("cpu"))
    assert isinstance(model, Llama) and model.config.intermediate_size == 48
    assert model.lm_head.weight is not model.embed_tokens.weight


def test_checkpoint_round_trip_gives_the_same_model(checkpoint, capsys):
    model, tokenizer, meta = cli.load_checkpoint(str(checkpoint), torch.device("cpu"))
    assert isinstance(model, Llama) and meta["arch"] == "llama" and tokenizer.name == "bytes"
    assert model.lm_head.weight is model.embed_tokens.weight  # tied by default, stored once
    code, out, err = run_cli(capsys, "eval", str(checkpoint), "--data", str(JAPANESE))
    assert code == 0, err
    match = re.fullmatch(r"tokens (\d+) loss (\S+) ppl (\S+)\n", out)
    assert match and int(match[1]) == len(JAPANESE.read_bytes()) - 1
    assert 1 < float(match[3]) < 256  # it learned something in 20 steps


def test_generate_from_a_llama_checkpoint(checkpoint, capsys):
    args = ["generate", str(checkpoint), "--prompt", "吾輩は", "--max-new-tokens", "40", "--seed", "5"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert out.startswith("吾輩は") and len(out.encode("utf-8")) > len("吾輩は".encode("utf-8")) + 20
    assert run_cli(capsys, *args)[1] == out  # same seed, same text
    code, out, err = run_cli(capsys, "generate", str(checkpoint), "--max-new-tokens", "50", "--top-k", "5",
                             "--temperature", "0")  # empty prompt, past the 32-token block: the window slides
    assert code == 0, err


def test_gpt_checkpoints_without_an_arch_still_load(tmp_path, capsys):
    out_dir = tmp_path / "gpt"
    code, _, err = run_cli(capsys, "train", "--data", str(JAPANESE), "--steps", "1", "--eval-interval", "1",
                           "--out", str(out_dir), "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                           "--block-size", "16", "--batch-size", "2", "--eval-iters", "1", "--no-progress")
    assert code == 0, err
    meta = json.loads((out_dir / "config.json").read_text())
    assert meta["arch"] == "gpt"
    del meta["arch"]  # a checkpoint written before --arch existed
    (out_dir / "config.json").write_text(json.dumps(meta))
    model, _, _ = cli.load_checkpoint(str(out_dir), torch.device("cpu"))
    assert type(model).__name__ == "GPT"


@pytest.mark.parametrize("argv, message", [
    (["--arch", "llama", "--n-head", "4", "--n-kv-head", "3"], "multiple of --n-kv-head"),
    (["--arch", "llama", "--n-embd", "12", "--n-head", "4"], "even head dim"),
    (["--arch", "mamba"], "invalid choice"),
    (["--n-kv-head", "2"], "--arch llama option"),
    (["--untied-head"], "--arch llama option"),
    (["--arch", "llama", "--rope-theta", "0"], "--rope-theta"),
])
def test_bad_llama_flags_give_one_line(argv, message, tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--data", str(JAPANESE), "--out", str(tmp_path / "o"), *argv)
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("llmfast: error: ") and message in err, err


def test_unknown_arch_in_a_checkpoint(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((checkpoint / "config.json").read_text())
    meta["arch"] = "mamba"
    (bad / "config.json").write_text(json.dumps(meta))
    (bad / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    code, _, err = run_cli(capsys, "generate", str(bad), "--prompt", "x")
    assert code == 1 and "unknown arch 'mamba'" in err


def test_llama_learns_japanese_in_300_steps(tmp_path, capsys):
    """The learning criterion: 300 steps on the CPU on 22 KB of Japanese cut validation perplexity >= 3x."""
    code, out, err = run_cli(capsys, "train", "--arch", "llama", "--data", str(JAPANESE), "--steps", "300",
                             "--eval-interval", "300", "--eval-iters", "4", "--n-layer", "2", "--n-head", "4",
                             "--n-kv-head", "2", "--n-embd", "64", "--block-size", "64", "--batch-size", "8",
                             "--out", str(tmp_path / "ckpt"), "--no-progress")
    assert code == 0, err
    lines = log_lines(out)
    assert [step for step, *_ in lines] == [0, 300]
    first_ppl, last_ppl = lines[0][3], lines[-1][3]
    assert 200 < first_ppl < 320  # an untrained byte-level model: about 256
    assert first_ppl / last_ppl >= 3, out
