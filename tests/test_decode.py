"""flash_attn_with_kvcache (Triton decode kernels, interpreter) against the float64 reference.

Accuracy policy (flash-attn's, as tests/test_attention.py): ``|triton - ref64|.max() <= 2 * |ref_lowp - ref64|.max()
+ atol`` for the output and the LSE, where ``ref_lowp`` is the reference run in the tested dtype. Every case also
checks the cache after the call: the appended entries sit exactly where they belong (bit for bit, or within one
rounding of the dtype when rotary rotated them), and every other slot, and every page outside the block table, is
untouched. Every Triton case checks that the decode kernel really launched.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import llmfast
from llmfast._backend import last_launch_config
from llmfast.ops import decode as ops
from llmfast.ops._arch import config_arch
from llmfast.reference import decode as ref

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # exp(-inf - -inf) in padded interpreter lanes

DEVICE = torch.device(os.environ.get("LLMFAST_TEST_DEVICE", "cpu"))
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ATOL = {F16: 1e-3, BF16: 2e-3, F32: 1e-5}


def rand(*shape, dtype=F16):
    return torch.randn(*shape, device=DEVICE, dtype=F32).to(dtype)


def launches(name: str = "decode_attention") -> int:
    return llmfast.kernel_launch_counts().get(name, 0)


def assert_within_policy(name, got, ref64, ref_lowp, atol):
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in the Triton result"
    finite = torch.isfinite(ref64)
    assert torch.equal(got.double()[~finite], ref64[~finite]), f"{name}: non-finite entries differ"
    got, ref64, ref_lowp = got.double()[finite], ref64[finite], ref_lowp.double()[finite]
    if got.numel() == 0:
        return
    err = (got - ref64).abs().max().item()
    bound = 2 * (ref_lowp - ref64).abs().max().item() + atol
    assert err <= bound, f"{name}: max error {err:.3g} exceeds 2 x reference error + atol = {bound:.3g}"


def make_case(*, dtype=F16, batch=2, seqlen_q=1, heads=4, kv_heads=2, head_dim=32, capacity=48, new=1,
              page_size=None, batch_idx=False, seqlens="tensor", rotary=None, rotary_dim=None, alibi=None,
              extra_pages=3):
    """Inputs of one call. ``seqlens``: "tensor" (random, one sequence empty), "int", "zero" or "none"."""
    q = rand(batch, seqlen_q, heads, head_dim, dtype=dtype)
    case = dict(q=q)
    if page_size is None:
        rows = batch + 2 if batch_idx else batch
        case["k_cache"] = rand(rows, capacity, kv_heads, head_dim, dtype=dtype)
        case["v_cache"] = rand(rows, capacity, kv_heads, head_dim, dtype=dtype)
        if batch_idx:
            case["cache_batch_idx"] = torch.randperm(rows)[:batch].to(torch.int32).to(DEVICE)
    else:
        pages = math.ceil(capacity / page_size)
        num_blocks = batch * pages + extra_pages  # some pages belong to no sequence: they must stay untouched
        case["k_cache"] = rand(num_blocks, page_size, kv_heads, head_dim, dtype=dtype)
        case["v_cache"] = rand(num_blocks, page_size, kv_heads, head_dim, dtype=dtype)
        case["block_table"] = torch.randperm(num_blocks)[:batch * pages].view(batch, pages).to(torch.int32).to(
            DEVICE)
        capacity = pages * page_size
    if new:
        case["k"] = rand(batch, new, kv_heads, head_dim, dtype=dtype)
        case["v"] = rand(batch, new, kv_heads, head_dim, dtype=dtype)
    if seqlens == "tensor":
        lengths = torch.randint(0, capacity - new + 1, (batch,))
        lengths[0] = capacity - new  # one sequence fills the cache to the last slot
        if batch > 1:
            lengths[1] = 0 if new else 1  # and one starts empty
        case["cache_seqlens"] = lengths.to(torch.int32).to(DEVICE)
    elif seqlens == "int":
        case["cache_seqlens"] = capacity - new - 3
    elif seqlens == "zero":
        case["cache_seqlens"] = 0
    if rotary:
        rd = rotary_dim or head_dim
        angle = torch.rand(capacity + seqlen_q, rd // 2, device=DEVICE) * 2 * math.pi
        case["rotary_cos"], case["rotary_sin"] = torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)
        case["rotary_interleaved"] = rotary == "interleaved"
    if alibi == "h":
        case["alibi_slopes"] = torch.rand(heads, device=DEVICE) * 0.3
    elif alibi == "bh":
        case["alibi_slopes"] = torch.rand(batch, heads, device=DEVICE) * 0.3
    return case


def _copy(case, dtype=None):
    out = {}
    for name, value in case.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and name != "alibi_slopes":
            out[name] = value.clone() if dtype is None else value.to(dtype)
        elif isinstance(value, torch.Tensor):
            out[name] = value.clone()
        else:
            out[name] = value
    return out


def check(case, *, backend="triton", num_splits=0, **kwargs):
    """Run the public op (on ``backend``) and the reference in float64 and in the case's dtype; compare outputs,
    LSEs and the caches. Returns the public op's (out, lse)."""
    dtype = case["q"].dtype
    mine, lowp, exact = _copy(case), _copy(case), _copy(case, F64)
    before = launches()
    with llmfast.backend(backend):
        out, lse = llmfast.flash_attn_with_kvcache(**mine, num_splits=num_splits, return_softmax_lse=True, **kwargs)
    if backend == "triton":
        assert launches() > before, "the decode kernel did not launch"
    ref_lowp, lse_lowp = ref.flash_attn_with_kvcache(**lowp, return_softmax_lse=True, **kwargs)
    ref64, lse64 = ref.flash_attn_with_kvcache(**exact, return_softmax_lse=True, **kwargs)
    assert out.dtype == dtype and lse.dtype == F32
    assert out.shape == case["q"].shape and lse.shape == (case["q"].shape[0], case["q"].shape[2],
                                                          case["q"].shape[1])
    atol = ATOL[dtype]
    assert_within_policy("out", out, ref64, ref_lowp, atol)
    assert_within_policy("lse", lse, lse64, lse_lowp, atol)
    check_cache(case, mine, lowp)
    return out, lse


def check_cache(case, mine, lowp):
    """The caches after the call equal the reference's: new values exactly, rotated keys within one rounding, and
    everything else bit for bit as before."""
    assert torch.equal(mine["v_cache"], lowp["v_cache"]), "v_cache differs from the reference update"
    if "rotary_cos" not in case or "k" not in case:
        assert torch.equal(mine["k_cache"], lowp["k_cache"]), "k_cache differs from the reference update"
        return
    changed = mine["k_cache"] != case["k_cache"]
    ref_changed = lowp["k_cache"] != case["k_cache"]
    # Outside the appended slots nothing may change (a rotated key may round to its old value, so only check
    # that our changes are a subset of the slots the reference wrote).
    written = ref_changed | (lowp["v_cache"] != case["v_cache"]).expand_as(ref_changed)
    assert not (changed & ~written).any(), "k_cache changed outside the appended slots"
    diff = (mine["k_cache"].double() - lowp["k_cache"].double()).abs()
    ulp = lowp["k_cache"].double().abs() * torch.finfo(case["k_cache"].dtype).eps + 1e-30
    assert (diff <= ulp).all(), "rotated keys differ from the reference by more than one rounding"


# ------------------------------------------------------------------------------------------------ core cases

LAYOUTS = ["contiguous", "batch_idx", "paged16", "paged48"]


def layout_kwargs(layout):
    return dict(contiguous={}, batch_idx=dict(batch_idx=True), paged16=dict(page_size=16),
                paged48=dict(page_size=48, capacity=96))[layout]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_decode_one_token_layouts_and_heads(layout, heads, kv_heads, causal):
    check(make_case(heads=heads, kv_heads=kv_heads, **layout_kwargs(layout)), causal=causal)


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("seqlen_q,new", [(1, 1), (3, 3), (5, 2), (4, 0)])
@pytest.mark.parametrize("layout", ["contiguous", "paged16"])
def test_decode_dtypes_and_several_queries_bottom_right_causal(dtype, seqlen_q, new, layout):
    seqlens = "tensor" if new else "int"
    check(make_case(dtype=dtype, seqlen_q=seqlen_q, new=new, seqlens=seqlens, **layout_kwargs(layout)), causal=True)


@pytest.mark.parametrize("seqlens", ["tensor", "int", "zero", "none"])
def test_cache_seqlens_forms(seqlens):
    new = 0 if seqlens == "none" else 2
    check(make_case(seqlens=seqlens, new=new, seqlen_q=2), causal=True)
    check(make_case(seqlens=seqlens, new=new, seqlen_q=2, page_size=16), causal=False)


def test_zero_cache_and_no_new_tokens_gives_zero_rows():
    """cache_seqlens 0 and nothing appended: no key at all, output 0 and LSE -inf (never NaN)."""
    case = make_case(new=0, seqlens="zero")
    out, lse = check(case)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("window", [(7, -1), (5, 0), (3, 2), (0, 0)])
@pytest.mark.parametrize("layout", ["contiguous", "paged16"])
def test_sliding_window(window, layout):
    check(make_case(seqlen_q=3, new=3, **layout_kwargs(layout)), window_size=window)


@pytest.mark.parametrize("softcap", [0.5, 5.0])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(softcap, causal):
    check(make_case(seqlen_q=2, new=2), softcap=softcap, causal=causal, softmax_scale=0.7)


@pytest.mark.parametrize("alibi", ["h", "bh"])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (6, 2))])
def test_alibi(alibi, causal, window):
    check(make_case(seqlen_q=3, new=3, alibi=alibi, page_size=16), causal=causal, window_size=window)


def test_alibi_softcap_window_together_with_splits():
    case = make_case(seqlen_q=2, new=2, alibi="bh", batch_idx=True, dtype=BF16)
    check(case, causal=True, window_size=(9, 0), softcap=2.0, num_splits=3)


@pytest.mark.parametrize("rotary", ["interleaved", "half"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "paged16", "batch_idx"])
def test_rotary_on_appended_keys_and_queries(rotary, causal, layout):
    check(make_case(seqlen_q=3, new=3, rotary=rotary, **layout_kwargs(layout)), causal=causal)


def test_partial_rotary_dim_and_fp32():
    check(make_case(seqlen_q=2, new=2, rotary="half", rotary_dim=16, dtype=F32), causal=True)
    check(make_case(seqlen_q=1, new=1, rotary="interleaved", rotary_dim=8, dtype=BF16))


@pytest.mark.parametrize("head_dim", [1, 8, 40, 80, 256])
def test_head_dims(head_dim):
    check(make_case(head_dim=head_dim, capacity=33, seqlen_q=2, new=1), causal=True)


@pytest.mark.parametrize("page_size", [16, 32, 256])
def test_page_sizes(page_size):
    check(make_case(page_size=page_size, capacity=page_size + 20, extra_pages=2, batch=2), causal=True)


# ------------------------------------------------------------------------------------------- GQA row blocks

@pytest.mark.parametrize("heads,kv_heads,seqlen_q", [
    (4, 4, 1),    # 1 row: FMA path
    (4, 1, 1),    # 4 rows: a 16-row tl.dot block
    (3, 1, 2),    # 6 rows: a 16-row tl.dot block
    (16, 1, 1),   # 16 rows: tl.dot
    (8, 2, 5),    # 20 rows per KV head: 64-row tl.dot block
    (2, 1, 40),   # 80 rows: two 64-row blocks (chunked prefill)
])
@pytest.mark.parametrize("dtype", [F16, F32], ids=["fp16", "fp32"])
def test_gqa_group_rows_processed_together(heads, kv_heads, seqlen_q, dtype):
    new = min(seqlen_q, 4)
    case = make_case(dtype=dtype, heads=heads, kv_heads=kv_heads, seqlen_q=seqlen_q, new=new, capacity=64,
                     head_dim=16, batch=1, seqlens="int")
    before = launches()
    check(case, causal=True)
    rows = seqlen_q * heads // kv_heads
    _, block_m = ops._row_kind(rows)
    assert launches() == before + 1, "one decode launch per call"
    assert block_m == 1 if rows == 1 else block_m >= min(rows, 16)


# -------------------------------------------------------------------------------------------------- split-KV

def test_splits_one_several_and_auto_agree():
    case = make_case(batch=1, kv_heads=1, heads=2, capacity=120, new=1, seqlens="int", page_size=16)
    results = {}
    for splits in (1, 2, 5, 0, 64):
        before = launches("decode_combine")
        out, lse = check(case, num_splits=splits, causal=True)
        combined = launches("decode_combine") > before
        results[splits] = (out.double(), lse.double(), combined)
    assert not results[1][2] and results[2][2] and results[5][2], "the combine kernel runs exactly when split"
    for splits, (out, lse, _) in results.items():
        assert (out - results[1][0]).abs().max() <= 2e-3, f"{splits} splits disagree with 1 split"
        assert (lse - results[1][1]).abs().max() <= 1e-5, f"{splits} splits disagree with 1 split (lse)"


def test_choose_num_splits_heuristic():
    # A full grid is never split; a small grid over a long cache is, bounded by the work per split and MAX_SPLITS.
    assert ops.choose_num_splits(64, 8, 1, 32768, 64, "sm90", 132) == 1
    assert ops.choose_num_splits(1, 8, 1, 32768, 64, "sm90", 132) == math.ceil(2 * 132 / 8)
    assert ops.choose_num_splits(1, 8, 1, 128, 64, "sm90", 132) == 1  # too short to be worth splitting
    assert ops.choose_num_splits(1, 1, 1, 10**6, 64, "sm90", 132) == ops.MAX_SPLITS
    assert ops.choose_num_splits(1, 1, 1, 100, 16, "interpreter") == 4
    assert ops.choose_num_splits(2, 2, 1, 100, 16, "interpreter") == 1


def test_auto_splits_follow_the_heuristic():
    case = make_case(batch=1, kv_heads=1, heads=1, capacity=100, new=1, seqlens="int")
    check(case, num_splits=0)
    launch = last_launch_config("decode_attention")
    arch = config_arch(DEVICE)
    expected = ops.choose_num_splits(1, 1, 1, case["cache_seqlens"] + 1, launch["BLOCK_N"], arch,
                                     torch.cuda.get_device_properties(DEVICE).multi_processor_count
                                     if DEVICE.type == "cuda" and arch != "interpreter" else None)
    assert launch["num_splits"] == expected
    if arch == "interpreter":
        assert expected == 4 and last_launch_config("decode_combine") == {"num_splits": 4}


# ------------------------------------------------------------------------------------------------ cache update

@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "paged16"])
def test_cache_update_exact_positions_and_untouched_rest(layout):
    """New entries land at cache_seqlens[b] + t of sequence b, bit for bit; every other slot and every page outside
    the block table keeps its bits."""
    case = make_case(seqlen_q=3, new=3, **layout_kwargs(layout))
    mine = _copy(case)
    with llmfast.backend("triton"):
        llmfast.flash_attn_with_kvcache(**mine, causal=True)
    expected_k, expected_v = case["k_cache"].clone(), case["v_cache"].clone()
    lengths = case["cache_seqlens"].tolist()
    for b in range(case["q"].shape[0]):
        for t in range(3):
            pos = lengths[b] + t
            if "block_table" in case:
                page_size = case["k_cache"].shape[1]
                row, slot = int(case["block_table"][b, pos // page_size]), pos % page_size
            else:
                row = int(case["cache_batch_idx"][b]) if "cache_batch_idx" in case else b
                slot = pos
            expected_k[row, slot] = case["k"][b, t]
            expected_v[row, slot] = case["v"][b, t]
    assert torch.equal(mine["k_cache"], expected_k)
    assert torch.equal(mine["v_cache"], expected_v)
    if "block_table" in case:
        unused = sorted(set(range(case["k_cache"].shape[0])) - set(case["block_table"].flatten().tolist()))
        assert unused and torch.equal(mine["k_cache"][unused], case["k_cache"][unused])


def test_64bit_addressing_past_2_to_the_31_elements():
    """A contiguous cache of more than 2**31 elements (torch.empty: only the pages written are ever backed by
    memory): keys near the end sit at element offsets past 2**31, appended and read back correctly."""
    length = 2**25 + 8
    big_k = torch.empty(1, length, 1, 64, dtype=F16, device=DEVICE)
    big_v = torch.empty(1, length, 1, 64, dtype=F16, device=DEVICE)
    assert big_k.numel() > 2**31 and ops._needs_wide(big_k)
    base = 2**25 + 5  # the new token goes to element offset (2**25 + 5) * 64 > 2**31
    lo = base - 40
    big_k[:, lo:base] = rand(1, 40, 1, 64)
    big_v[:, lo:base] = rand(1, 40, 1, 64)
    q, k, v = rand(1, 1, 2, 64), rand(1, 1, 1, 64), rand(1, 1, 1, 64)
    with llmfast.backend("triton"):
        out, lse = llmfast.flash_attn_with_kvcache(q, big_k, big_v, k, v, cache_seqlens=base, causal=True,
                                                   window_size=(30, 0), num_splits=2, return_softmax_lse=True)
    assert torch.equal(big_k[0, base], k[0, 0]) and torch.equal(big_v[0, base], v[0, 0])
    # The same attention on a small cache holding the same keys (positions shifted by lo).
    small = dict(q=q, k_cache=big_k[:, lo:base + 1].clone(), v_cache=big_v[:, lo:base + 1].clone(),
                 cache_seqlens=base + 1 - lo)
    ref64, lse64 = ref.flash_attn_with_kvcache(**_copy(small, F64), causal=True, window_size=(30, 0),
                                               return_softmax_lse=True)
    ref_lowp, lse_lowp = ref.flash_attn_with_kvcache(**_copy(small), causal=True, window_size=(30, 0),
                                                     return_softmax_lse=True)
    assert_within_policy("out", out, ref64, ref_lowp, ATOL[F16])
    assert_within_policy("lse", lse, lse64, lse_lowp, ATOL[F16])


def test_64bit_addressing_paged_block_past_2_to_the_31_elements():
    page = 256
    num_blocks = 2**31 // (page * 64) + 4  # blocks past 2**31 elements exist
    big_k = torch.empty(num_blocks, page, 1, 64, dtype=F16, device=DEVICE)
    big_v = torch.empty(num_blocks, page, 1, 64, dtype=F16, device=DEVICE)
    blocks = [num_blocks - 1, 3]  # the first page lies past 2**31 elements
    for blk in blocks:
        big_k[blk] = rand(page, 1, 64)
        big_v[blk] = rand(page, 1, 64)
    table = torch.tensor([blocks], dtype=torch.int32, device=DEVICE)
    q, k, v = rand(1, 1, 2, 64), rand(1, 1, 1, 64), rand(1, 1, 1, 64)
    pos = page + 10
    with llmfast.backend("triton"):
        out = llmfast.flash_attn_with_kvcache(q, big_k, big_v, k, v, cache_seqlens=pos, block_table=table,
                                             num_splits=3)
    assert torch.equal(big_k[3, 10], k[0, 0]) and torch.equal(big_v[3, 10], v[0, 0])
    small = dict(q=q, k_cache=torch.cat([big_k[blocks[0]], big_k[3]])[None],
                 v_cache=torch.cat([big_v[blocks[0]], big_v[3]])[None], cache_seqlens=pos + 1)
    ref64 = ref.flash_attn_with_kvcache(**_copy(small, F64))
    ref_lowp = ref.flash_attn_with_kvcache(**_copy(small))
    assert_within_policy("out", out, ref64, ref_lowp, ATOL[F16])


# ------------------------------------------------------------------------------------------------- bad input

def test_cache_too_short_is_a_value_error_and_writes_nothing():
    case = make_case(new=3, seqlen_q=3)
    case["cache_seqlens"] = torch.tensor([46, 0], dtype=torch.int32)  # 46 + 3 > 48
    mine = _copy(case)
    with llmfast.backend("triton"), pytest.raises(ValueError, match="too short"):
        llmfast.flash_attn_with_kvcache(**mine)
    assert torch.equal(mine["k_cache"], case["k_cache"]) and torch.equal(mine["v_cache"], case["v_cache"])
    paged = make_case(page_size=16, new=1, capacity=32)
    paged["cache_seqlens"] = 32
    with llmfast.backend("triton"), pytest.raises(ValueError, match="too short"):
        llmfast.flash_attn_with_kvcache(**paged)
    no_new = make_case(new=0)
    no_new["cache_seqlens"] = torch.tensor([49, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="too short"):
        llmfast.flash_attn_with_kvcache(**no_new)


def test_block_table_past_num_blocks_is_a_value_error():
    case = make_case(page_size=16, new=1)
    num_blocks = case["k_cache"].shape[0]
    case["block_table"][1, 0] = num_blocks  # sequence 1 starts empty, so its first page is written
    mine = _copy(case)
    with llmfast.backend("triton"), pytest.raises(ValueError, match=r"block_table\[1, 0\]"):
        llmfast.flash_attn_with_kvcache(**mine)
    assert torch.equal(mine["k_cache"], case["k_cache"])
    case["block_table"][1, 0] = -1
    with pytest.raises(ValueError, match="block_table"):
        llmfast.flash_attn_with_kvcache(**_copy(case))
    # Entries past a sequence's length are never read: any value is accepted there.
    ok = make_case(page_size=16, new=1, seqlens="int", capacity=64)
    ok["cache_seqlens"] = 10
    ok["block_table"][:, 2:] = 10**6
    check(ok)


def _t(*shape, dtype=F16):
    return rand(*shape, dtype=dtype)


BAD = [
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 3, 32), v_cache=_t(2, 8, 3, 32)), ValueError, "multiple"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 16), v_cache=_t(2, 8, 2, 16)), ValueError, "head dim"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 9, 2, 32)), ValueError, "same shape"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(3, 8, 2, 32), v_cache=_t(3, 8, 2, 32)), ValueError, "cache_batch_idx"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32, dtype=F32), v_cache=_t(2, 8, 2, 32, dtype=F32)), TypeError,
     "dtype"),
    (dict(q=_t(2, 1, 4, 300), k_cache=_t(2, 8, 2, 300), v_cache=_t(2, 8, 2, 300)), ValueError, "head dim"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 8, 2, 32), k=_t(2, 1, 2, 32)), ValueError,
     "together"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 8, 2, 32), k=_t(2, 1, 2, 32),
          v=_t(2, 1, 2, 32)), ValueError, "cache_seqlens is required"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 8, 2, 32), k=_t(2, 1, 4, 32),
          v=_t(2, 1, 4, 32), cache_seqlens=1), ValueError, "k must have shape"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 8, 2, 32),
          cache_seqlens=torch.tensor([1, 2])), TypeError, "int32"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 8, 2, 32), cache_seqlens=-1), ValueError,
     ">= 0"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 8, 2, 32), cache_seqlens=2.0), TypeError,
     "cache_seqlens"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(4, 8, 2, 32), v_cache=_t(4, 8, 2, 32),
          cache_batch_idx=torch.tensor([0, 4], dtype=torch.int32)), ValueError, "cache_batch_idx"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(4, 8, 2, 32), v_cache=_t(4, 8, 2, 32),
          block_table=torch.zeros(2, 1, dtype=torch.int32), cache_batch_idx=torch.zeros(2, dtype=torch.int32)),
     ValueError, "cannot be combined"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(4, 8, 2, 32), v_cache=_t(4, 8, 2, 32),
          block_table=torch.zeros(2, 1, dtype=torch.int64)), TypeError, "block_table"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 8, 2, 32), window_size=(-2, 0)), ValueError,
     "window_size"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 8, 2, 32), softcap=-1.0), ValueError,
     "softcap"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 8, 2, 32), num_splits=-1), ValueError,
     "num_splits"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 8, 2, 32),
          alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 8, 2, 32),
          alibi_slopes=torch.ones(4, dtype=torch.float16)), TypeError, "alibi_slopes"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 8, 2, 32), rotary_cos=torch.ones(8, 16),
          rotary_sin=torch.ones(8, 16)), ValueError, "rotary_cos/rotary_sin need k"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 8, 2, 32), k=_t(2, 1, 2, 32),
          v=_t(2, 1, 2, 32), cache_seqlens=6, rotary_cos=torch.ones(4, 16), rotary_sin=torch.ones(4, 16)),
     ValueError, "positions"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 32), v_cache=_t(2, 8, 2, 32), causal=1), TypeError, "causal"),
    (dict(q=_t(2, 1, 4, 32), k_cache=_t(2, 8, 2, 64)[..., ::2], v_cache=_t(2, 8, 2, 32)), ValueError,
     "contiguous in its last"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_raises_naming_the_argument(kwargs, error, message):
    with llmfast.backend("triton"), pytest.raises(error, match=message):
        llmfast.flash_attn_with_kvcache(**kwargs)


# ------------------------------------------------------------------------------------------------- dispatch

@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_reference_and_auto_backends_match_the_reference(backend):
    check(make_case(seqlen_q=2, new=2, page_size=16, alibi="h"), backend=backend, causal=True, softcap=3.0)


@pytest.mark.parametrize("variant", ["batch_idx_rotary", "paged_window_alibi", "no_new_none", "zero", "gqa_full"])
@pytest.mark.parametrize("dtype", [F16, F32], ids=["fp16", "fp32"])
def test_torch_path_of_auto_matches_the_reference(variant, dtype):
    """Backend "auto" off CUDA runs the torch-native path: every feature against the float64 reference."""
    cases = {
        "batch_idx_rotary": (dict(batch_idx=True, rotary="half", seqlen_q=3, new=3), dict(causal=True)),
        "paged_window_alibi": (dict(page_size=16, alibi="bh", seqlen_q=2, new=2), dict(window_size=(5, 1))),
        "no_new_none": (dict(new=0, seqlens="none", seqlen_q=2), dict(causal=True, softcap=2.0)),
        "zero": (dict(new=0, seqlens="zero"), dict()),
        "gqa_full": (dict(heads=6, kv_heads=2, seqlen_q=4, new=1, rotary="interleaved"), dict()),
    }
    case_kwargs, call_kwargs = cases[variant]
    check(make_case(dtype=dtype, **case_kwargs), backend="auto", num_splits=0, **call_kwargs)


@pytest.mark.parametrize("variant", ["decode", "chunk_causal", "paged_window", "ragged_gqa"])
def test_torch_path_sdpa_branch_without_lse(variant):
    """Without softcap, ALiBi or the LSE, and with a key for every row, the torch path runs torch's SDPA kernel."""
    cases = {
        "decode": (dict(seqlens="int"), dict(causal=True)),
        "chunk_causal": (dict(seqlen_q=3, new=3, seqlens="int"), dict(causal=True)),
        "paged_window": (dict(page_size=16, seqlen_q=2, new=2, seqlens="int"), dict(window_size=(4, 0))),
        "ragged_gqa": (dict(heads=6, kv_heads=3, seqlen_q=2, new=2), dict(causal=True)),
    }
    case_kwargs, call_kwargs = cases[variant]
    case = make_case(dtype=F32, **case_kwargs)
    if variant == "ragged_gqa":
        case["cache_seqlens"] = torch.tensor([40, 7], dtype=torch.int32, device=DEVICE)
    mine, exact = _copy(case), _copy(case, F64)
    with llmfast.backend("auto"):
        out = llmfast.flash_attn_with_kvcache(**mine, **call_kwargs)
    ref64 = ref.flash_attn_with_kvcache(**exact, **call_kwargs)
    ref_lowp = ref.flash_attn_with_kvcache(**_copy(case), **call_kwargs)
    assert_within_policy("out", out, ref64, ref_lowp, ATOL[F32])
    assert torch.equal(mine["k_cache"], exact["k_cache"].to(F32))


def test_float64_runs_on_the_torch_path():
    case = make_case(dtype=F32, page_size=16, new=2, seqlen_q=2)
    exact = _copy(case, F64)
    with llmfast.backend("triton"):
        out, lse = llmfast.flash_attn_with_kvcache(**_copy(exact), causal=True, return_softmax_lse=True)
    ref64, lse64 = ref.flash_attn_with_kvcache(**exact, causal=True, return_softmax_lse=True)
    assert out.dtype == F64 and lse.dtype == F64
    torch.testing.assert_close(out, ref64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse64, rtol=1e-12, atol=1e-12)


def test_without_lse_returns_only_the_output():
    case = make_case()
    with llmfast.backend("triton"):
        out = llmfast.flash_attn_with_kvcache(**case)
    assert isinstance(out, torch.Tensor) and out.shape == case["q"].shape


def test_custom_op_declares_the_cache_mutation():
    schema = torch.ops.llmfast.flash_attn_with_kvcache.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["k_cache", "v_cache"]


def test_compile_specs_cover_every_config():
    specs = ops.compile_specs()
    names = {(s.kernel, s.arches[0]) for s in specs}
    assert {("decode_attention", 80), ("decode_attention", 90), ("decode_combine", 80), ("decode_combine", 90),
            ("decode_kv_append", 80), ("decode_kv_append", 90)} <= names
    configs = {s.config.split("_fp16")[0].split("_bf16")[0].split("_batchidx")[0] for s in specs
               if s.kernel == "decode_attention"}
    assert set(ops.DECODE_CONFIGS["sm90"]) <= configs


def test_torch_compile_fullgraph_mutates_the_cache():
    """Under torch.compile(fullgraph=True) the custom op traces (no graph break), appends in place and matches
    eager."""
    def step(q, k_cache, v_cache, k, v, seqlens, block_table):
        return llmfast.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                               block_table=block_table, causal=True, num_splits=2)

    compile_backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"  # CPU inductor would need a compiler
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    case = make_case(page_size=16, seqlen_q=2, new=2)
    args = ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "block_table")
    mine, eager = _copy(case), _copy(case)
    before = launches()
    with llmfast.backend("triton"):
        out = compiled(*(mine[a] for a in args))
        want = step(*(eager[a] for a in args))
    assert launches() == before + 2
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert torch.equal(mine["k_cache"], eager["k_cache"]) and torch.equal(mine["v_cache"], eager["v_cache"])
    assert not torch.equal(mine["k_cache"], case["k_cache"])


def test_strided_index_tensors_are_read_correctly():
    """Strided block_table / cache_seqlens / cache_batch_idx (views) give the same result as dense ones."""
    case = make_case(page_size=16, new=1, seqlen_q=1)
    wide = torch.zeros(case["block_table"].shape[0], 2 * case["block_table"].shape[1], dtype=torch.int32)
    wide[:, ::2] = case["block_table"]
    strided = dict(case, block_table=wide[:, ::2])
    seq = torch.zeros(4, dtype=torch.int32)
    seq[::2] = case["cache_seqlens"]
    strided["cache_seqlens"] = seq[::2]
    mine, dense = _copy(strided), _copy(case)
    mine["block_table"], mine["cache_seqlens"] = strided["block_table"], strided["cache_seqlens"]
    with llmfast.backend("triton"):
        got = llmfast.flash_attn_with_kvcache(**mine, causal=True)
        want = llmfast.flash_attn_with_kvcache(**dense, causal=True)
    assert torch.equal(got, want) and torch.equal(mine["k_cache"], dense["k_cache"])
    rows = make_case(batch_idx=True)
    idx = torch.zeros(4, dtype=torch.int32)
    idx[::2] = rows["cache_batch_idx"]
    mine, dense = _copy(rows), _copy(rows)
    mine["cache_batch_idx"] = idx[::2]
    with llmfast.backend("triton"):
        got = llmfast.flash_attn_with_kvcache(**mine)
        want = llmfast.flash_attn_with_kvcache(**dense)
    assert torch.equal(got, want) and torch.equal(mine["k_cache"], dense["k_cache"])


def test_known_cache_lengths_skips_the_host_checks_but_kernels_still_never_write_out_of_bounds():
    case = make_case(new=1, seqlens="int")
    mine, dense = _copy(case), _copy(case)
    lengths = case["cache_seqlens"] + 1
    with llmfast.backend("triton"):
        with ops.known_cache_lengths(lengths, lengths):
            got = llmfast.flash_attn_with_kvcache(**mine, causal=True)
        want = llmfast.flash_attn_with_kvcache(**dense, causal=True)
    assert torch.equal(got, want) and torch.equal(mine["k_cache"], dense["k_cache"])
    # A broken promise: the cache is full, yet nothing is written past it (the append kernel masks the write).
    full = make_case(new=1, seqlens="int", batch=1)
    full["cache_seqlens"] = full["k_cache"].shape[1]
    mine = _copy(full)
    with llmfast.backend("triton"), ops.known_cache_lengths(1, 1):
        out = llmfast.flash_attn_with_kvcache(**mine)
    assert torch.equal(mine["k_cache"], full["k_cache"]) and torch.equal(mine["v_cache"], full["v_cache"])
    # ... and the keys read stop at the cache's end: the whole cache, as with cache_seqlens = capacity.
    whole = ref.flash_attn_with_kvcache(**_copy(dict(full, cache_seqlens=full["k_cache"].shape[1], k=None, v=None)))
    torch.testing.assert_close(out, whole, rtol=2e-3, atol=2e-3)
