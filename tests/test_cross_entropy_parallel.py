"""Vocabulary-parallel cross-entropy (``process_group=``) on gloo: two CPU processes, each holding a slice of the
classes, against the unsharded float64 reference (loss, logging outputs, and each rank's slice of the gradient);
and ``fused_linear_cross_entropy`` with an FSDP2-sharded (DTensor) lm-head weight, by hand and under
``fully_shard``, against the single-process gradients of the global batch."""
from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
SPLIT = (19, 18)  # unequal shards of V = 37 (prime)


def _init(rank: int, store_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD)


def _vocab_parallel_worker(rank: int, store_file: str, errors: str) -> None:
    import llmfast
    from llmfast import _backend
    from llmfast.reference import cross_entropy as ref

    try:
        _init(rank, store_file)
        torch.manual_seed(0)  # the same full problem on every rank
        v, n = sum(SPLIT), 11
        start = sum(SPLIT[:rank])
        full = torch.randn(n, v, dtype=torch.float64) * 3
        target = torch.randint(0, v, (n,))
        target[3] = -100
        target[5], target[6] = 2, SPLIT[0] + 2  # a target in each shard at least
        weight = torch.rand(v, dtype=torch.float64) + 0.2
        cases = [
            dict(),
            dict(reduction="sum", label_smoothing=0.1),
            dict(weight=weight, label_smoothing=0.2, reduction="mean"),
            dict(weight=weight, lse_square_scale=1e-2, softcap=4.0, reduction="none", return_z_loss=True,
                 return_token_accuracy=True, return_predicted_tokens=True),
        ]
        for backend in ("triton", "auto", "reference"):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for kw in cases:
                    red = kw.get("reduction", "mean")
                    grad_out = torch.rand(n if red == "none" else (), dtype=torch.float64) + 0.5
                    x64 = full.to(dtype).double().requires_grad_()  # the judge sees the rounded logits
                    want = ref.cross_entropy(x64, target, **kw)
                    want_loss = want.loss if isinstance(want, ref.CrossEntropyOutput) else want
                    want_loss.backward(grad_out)
                    shard = full[:, start:start + SPLIT[rank]].to(dtype).requires_grad_()
                    call_kw = {k: (w.float() if k == "weight" else w) for k, w in kw.items()}
                    _backend.reset_kernel_launch_counts()
                    with llmfast.backend(backend):
                        got = llmfast.cross_entropy(shard, target, process_group=dist.group.WORLD, **call_kw)
                    got_loss = got.loss if isinstance(got, llmfast.CrossEntropyOutput) else got
                    got_loss.backward(grad_out.to(got_loss.dtype))
                    # fp32 math on both sides: what is left is the rounding of the loss / gradient outputs
                    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-4),
                           torch.bfloat16: dict(rtol=8e-3, atol=1e-3)}[dtype]
                    if backend == "reference" and dtype != torch.float32:  # the reference computes in 16 bits
                        tol = {k: 8 * t for k, t in tol.items()}
                    torch.testing.assert_close(got_loss.double(), want_loss.detach(), **tol)
                    want_grad = x64.grad[:, start:start + SPLIT[rank]]
                    torch.testing.assert_close(shard.grad.double(), want_grad, **tol,
                                               msg=lambda m: f"{backend} {dtype} {kw}: {m}")
                    if isinstance(want, ref.CrossEntropyOutput):
                        torch.testing.assert_close(got.z_loss.double(), want.z_loss, **tol)
                        if dtype == torch.float32:
                            assert torch.equal(got.predicted_tokens, want.predicted_tokens)
                            torch.testing.assert_close(got.token_accuracy, want.token_accuracy.float())
                    launched = llmfast.kernel_launch_counts()
                    if backend == "triton":
                        assert launched == {"cross_entropy_shard_stats": 1, "cross_entropy_shard_grad": 1}, launched
                    else:
                        assert launched == {}, launched
        # a target out of the global range names its position
        bad = target.clone()
        bad[2] = v
        try:
            llmfast.cross_entropy(torch.randn(n, SPLIT[rank]), bad, process_group=dist.group.WORLD)
        except ValueError as err:
            assert f"target[2] = {v} is out of range" in str(err) and f"[0, {v})" in str(err), err
        else:
            raise AssertionError("no ValueError for an out-of-range target")
        dist.barrier()  # no rank tears its connections down while the other still has gloo work in flight
        dist.destroy_process_group()
    except BaseException:
        with open(f"{errors}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise


def _fsdp_weight_worker(rank: int, store_file: str, errors: str) -> None:
    """Data parallel with an FSDP2-style sharded lm-head: each rank has its own tokens; the weight's (sharded)
    gradient is the average of the ranks' gradients, i.e. the single-process gradient of the global batch."""
    import llmfast
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    try:
        _init(rank, store_file)
        torch.manual_seed(0)
        n, c, v = 10, 8, 30
        hidden = torch.randn(WORLD, n, c)  # every rank's batch, the same on all ranks
        weight = torch.randn(v, c) * 0.3
        bias = torch.randn(v) * 0.1
        target = torch.randint(0, v, (WORLD, n))
        mesh = init_device_mesh("cpu", (WORLD,))
        w_sharded = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
        b_sharded = torch.nn.Parameter(distribute_tensor(bias, mesh, [Shard(0)]))
        h = hidden[rank].clone().requires_grad_()
        with llmfast.backend("triton"):
            loss = llmfast.fused_linear_cross_entropy(h, w_sharded, target[rank], b_sharded, chunk_size=4)
        loss.backward()
        # single process, global batch (2 x n tokens: the mean of the ranks' means)
        h64, w64, b64 = hidden.double().requires_grad_(), weight.double().requires_grad_(), \
            bias.double().requires_grad_()
        want = torch.nn.functional.cross_entropy((h64 @ w64.t() + b64).reshape(-1, v), target.reshape(-1))
        want.backward()
        want_rank = torch.nn.functional.cross_entropy(h64[rank].detach() @ w64.detach().t() + b64.detach(),
                                                      target[rank])
        torch.testing.assert_close(loss.double(), want_rank, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h.grad.double(), h64.grad[rank] * WORLD, rtol=1e-5, atol=1e-6)
        assert type(w_sharded.grad).__name__ == "DTensor"  # the gradient went back to the shards
        assert w_sharded.grad.placements == w_sharded.placements
        torch.testing.assert_close(w_sharded.grad.full_tensor().double(), w64.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b_sharded.grad.full_tensor().double(), b64.grad, rtol=1e-5, atol=1e-6)
        _fully_shard_model(rank, hidden, target)
        dist.barrier()  # no rank tears its connections down while the other still has gloo work in flight
        dist.destroy_process_group()
    except BaseException:
        with open(f"{errors}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise


def _fully_shard_model(rank: int, hidden: torch.Tensor, target: torch.Tensor) -> None:
    """A model under torch's FSDP2 (``fully_shard`` per block and at the root): the loss takes
    ``model.lm_head.weight``, which FSDP2 has resharded after the model's forward (a DTensor); every gradient
    matches the single-process run on the global batch."""
    import llmfast
    from torch.distributed.fsdp import fully_shard

    c, v = hidden.shape[-1], 30

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(c, c)
            self.lm_head = torch.nn.Linear(c, v, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.body(x))

    torch.manual_seed(1)
    model, single = Model(), Model()
    single.load_state_dict(model.state_dict())
    fully_shard(model.body)
    fully_shard(model.lm_head)
    fully_shard(model)
    h = model(hidden[rank])
    assert type(model.lm_head.weight).__name__ == "DTensor"
    with llmfast.backend("triton"):
        llmfast.fused_linear_cross_entropy(h, model.lm_head.weight, target[rank], chunk_size=3).backward()
    want = torch.nn.functional.cross_entropy(single.lm_head(single(hidden.reshape(-1, c))), target.reshape(-1))
    want.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad.full_tensor(), dict(single.named_parameters())[name].grad,
                                   rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def _spawn(worker) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store, errors = os.path.join(tmp, "store"), os.path.join(tmp, "error")
        try:
            mp.spawn(worker, args=(store, errors), nprocs=WORLD, join=True)
        except Exception:
            reports = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)) if f.startswith("error")]
            pytest.fail("\n".join(reports) or "a worker failed")


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_vocab_parallel_matches_unsharded():
    _spawn(_vocab_parallel_worker)


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_fused_linear_with_sharded_dtensor_weight():
    _spawn(_fsdp_weight_worker)
