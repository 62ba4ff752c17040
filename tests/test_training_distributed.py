"""``llmfast train`` beyond one process, on the CPU with gloo: DDP and FSDP2 over 2 processes give the loss curve
of the one-process run on the same global batch (GPT and Llama, with gradient accumulation); FSDP2 parameter
gradients (fused linear cross-entropy on a sharded lm-head) equal the one-process gradients; DCP checkpoints resume
bit for bit in fp32; bad input stops every rank with one message; ``prepare`` -> train on the memory map equals
training on the text; and the real thing, ``torchrun --standalone --nproc_per_node 2 -m llmfast train --arch llama
--distributed fsdp``, ends where the one-process run does, resumes, and ``generate`` loads its export.

The 2-process scenarios share one spawned pair of processes (importing torch twice per scenario would cost more
than the training itself).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmfast import cli

WORLD = 2
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "8",
        "--eval-iters", "2", "--no-progress", "--threads", "1", "--backend", "auto", "--lr", "1e-2"]
STEPS = ["--steps", "4", "--eval-interval", "1"]  # an evaluation after every step: the loss curve, point by point
RUNS = {  # name -> flags of the runs compared with the one-process run of the same flags (no --distributed)
    "ddp-gpt": ["--arch", "gpt", "--distributed", "ddp", "--grad-accum", "2"],
    "fsdp-gpt": ["--arch", "gpt", "--distributed", "fsdp", "--grad-accum", "2"],
    "ddp-llama": ["--arch", "llama", "--distributed", "ddp"],
    "fsdp-llama": ["--arch", "llama", "--distributed", "fsdp", "--untied-head", "--grad-accum", "2"],
    "fsdp-llama-bf16": ["--arch", "llama", "--distributed", "fsdp", "--dtype", "bf16"],
    "ddp-gpt-fp16": ["--arch", "gpt", "--distributed", "ddp", "--dtype", "fp16", "--grad-accum", "2"],
}
# fp32: only the order of the gradient sums differs; 16-bit: the autocast matmuls round each rank's half batch
# the way they round the whole one, but the fp32 updates differ in the last bits and 16-bit rounding magnifies
# that (measured: 3e-5)
TOLERANCE = {"fsdp-llama-bf16": 3e-4, "ddp-gpt-fp16": 3e-4}
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")


def single_flags(flags: list[str]) -> list[str]:
    """The same run without --distributed (the one-process reference)."""
    i = flags.index("--distributed")
    return flags[:i] + flags[i + 2:]


def history(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "config.json").read_text())["training"]["history"]


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


# --- the worker pair ------------------------------------------------------------------------------------------------


def _fsdp_gradients(rank: int) -> None:
    """One step of a Llama (untied head) and a GPT (tied) under fully_shard against the one-process gradients of the
    global batch: the lm-head weight reaches fused_linear_cross_entropy sharded."""
    from llmfast.models.gpt import GPT, GPTConfig
    from llmfast.models.llama import Llama, LlamaConfig
    from llmfast.training.distributed import Cluster, wrap

    cluster = Cluster("fsdp", rank, WORLD, rank, torch.device("cpu"))
    for model_class, config in ((Llama, LlamaConfig(vocab_size=37, block_size=8, n_layer=2, n_head=2, n_kv_head=1,
                                                    n_embd=16, tie_word_embeddings=False)),
                                (GPT, GPTConfig(vocab_size=37, block_size=8, n_layer=2, n_head=2, n_embd=16))):
        torch.manual_seed(3)
        model, single = model_class(config), model_class(config)
        single.load_state_dict(model.state_dict())
        x = torch.randint(0, 37, (4, 8))
        y = torch.randint(0, 37, (4, 8))
        sharded = wrap(model, cluster)
        sharded(x[rank * 2: rank * 2 + 2], y[rank * 2: rank * 2 + 2]).backward()
        single(x, y).backward()
        want = dict(single.named_parameters())
        for name, param in sharded.named_parameters():
            assert type(param.grad).__name__ == "DTensor", name
            torch.testing.assert_close(param.grad.full_tensor(), want[name].grad, rtol=1e-5, atol=1e-7,
                                       msg=lambda m, name=name: f"{model_class.__name__} {name}: {m}")


def _gradient_sync(rank: int) -> None:
    """--grad-accum's micro-steps: no reduction before the last one (DDP: no all-reduce bucket is sent; FSDP2: the
    sharded gradients stay empty), and after it the gradient of the whole accumulated batch."""
    from llmfast.models.gpt import GPT, GPTConfig
    from llmfast.training.distributed import Cluster, gradient_sync, wrap

    config = GPTConfig(vocab_size=37, block_size=8, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(4)
    x, y = torch.randint(0, 37, (2, WORLD, 8)), torch.randint(0, 37, (2, WORLD, 8))  # (micro-step, rank, time)
    single = GPT(config)
    for m in range(2):
        (single(x[m], y[m]) / 2).backward()
    want = {name: p.grad for name, p in single.named_parameters()}
    for mode in ("ddp", "fsdp"):
        cluster = Cluster(mode, rank, WORLD, rank, torch.device("cpu"))
        model = GPT(config)
        model.load_state_dict(single.state_dict())
        model = wrap(model, cluster)
        sent = []
        if mode == "ddp":
            def hook(state, bucket):
                sent.append(1)
                return dist.all_reduce(bucket.buffer().div_(WORLD), async_op=True).get_future().then(
                    lambda fut: fut.value()[0])
            model.register_comm_hook(None, hook)
        for m in range(2):
            with gradient_sync(model, cluster, sync=m == 1):
                (model(x[m, rank: rank + 1], y[m, rank: rank + 1]) / 2).backward()
            if m == 0:
                if mode == "ddp":
                    assert not sent, "DDP reduced gradients on a no-sync micro-step"
                else:
                    assert all(p.grad is None for p in model.parameters()), "FSDP2 reduced on a no-sync micro-step"
        assert mode == "fsdp" or sent
        for name, param in model.named_parameters():
            name = name.removeprefix("module.")
            got = param.grad.full_tensor() if mode == "fsdp" else param.grad
            torch.testing.assert_close(got, want[name], rtol=1e-5, atol=1e-7,
                                       msg=lambda msg, name=name, mode=mode: f"{mode} {name}: {msg}")


def _worker(rank: int, store: str, tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    results: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
        _fsdp_gradients(rank)
        _gradient_sync(rank)
        corpus, root = Path(tmp) / "corpus.txt", Path(tmp)
        base = ["train", "--data", str(corpus), *TINY]
        for name, flags in RUNS.items():
            results[name] = run_main([*base, *STEPS, *flags, "--out", str(root / name)])[:2]
        # resume: 4 steps saving every 2, then the step-4 checkpoint removed and the run resumed from step 2
        resume = [*base, "--steps", "4", "--eval-interval", "2", "--arch", "llama", "--distributed", "fsdp",
                  "--save-interval", "2", "--out", str(root / "resume")]
        results["resume-first"] = run_main(resume)[:2]
        dist.barrier()
        if rank == 0:
            shutil.copy(root / "resume" / "model.safetensors", root / "first.safetensors")
            shutil.rmtree(root / "resume" / "checkpoints" / "step_00000004")
        dist.barrier()
        results["resume-second"] = run_main([*resume, "--resume"])[:2]
        # bad input: each must end with a message on both ranks (and not hang)
        bad = {
            "indivisible": [*base, "--steps", "1", "--batch-size", "6", "--grad-accum", "2", "--distributed", "ddp"],
            "no-checkpoint": [*base, "--steps", "1", "--distributed", "fsdp", "--resume"],
            "mismatch": [*resume[:-1], str(root / "resume"), "--n-embd", "64", "--resume"],
            "bad-data": [*base, "--steps", "1", "--distributed", "ddp"],
        }
        bad["no-checkpoint"] += ["--out", str(root / "empty")]
        bad["indivisible"] += ["--out", str(root / "bad")]
        bad["bad-data"] = [a if a != str(corpus) else str(root / "wrong-dtype") for a in bad["bad-data"]]
        bad["bad-data"] += ["--out", str(root / "bad")]
        for name, argv in bad.items():
            code, _, err = run_main(argv)
            results[name] = [code, err]
        dist.destroy_process_group()
    except BaseException:
        results["error"] = traceback.format_exc()
    (Path(tmp) / f"results{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The 2-process scenarios, run once in one spawned pair; (directory, each rank's results)."""
    root = tmp_path_factory.mktemp("dist")
    (root / "corpus.txt").write_text(cli.default_text()[:6000], encoding="utf-8")
    wrong = root / "wrong-dtype"  # a prepared directory whose token file is uint32 where meta.json says uint16
    wrong.mkdir()
    np.arange(1000, dtype=np.uint32).tofile(wrong / "tokens.bin")
    (wrong / "meta.json").write_text(json.dumps({"format": "llmfast-tokens", "dtype": "uint16", "count": 1000,
                                                 "tokenizer": {"name": "bytes", "vocab_size": 256}}))
    ctx = mp.start_processes(_worker, args=(str(root / "store"), str(root)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail("the 2-process training scenarios did not finish in 240 s (a hang?)")
    results = [json.loads((root / f"results{r}.json").read_text()) for r in range(WORLD)]
    for r, result in enumerate(results):
        assert "error" not in result, f"rank {r}:\n{result['error']}"
    return root, results


@pytest.mark.parametrize("name", list(RUNS))
def test_distributed_loss_curve_equals_one_process(pair, name, tmp_path):
    root, results = pair
    assert [r[name][0] for r in results] == [0, 0]
    assert "step 4 train_loss" in results[0][name][1] and results[1][name][1] == ""  # rank 0 alone logs
    code, _, err = run_main(["train", "--data", str(root / "corpus.txt"), *TINY, *STEPS, *single_flags(RUNS[name]),
                             "--out", str(tmp_path / "single")])
    assert code == 0, err
    got, want = history(root / name), history(tmp_path / "single")
    assert [h["step"] for h in got] == [0, 1, 2, 3, 4]
    rel = TOLERANCE.get(name, 2e-5)
    for g, w in zip(got, want):
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=rel), (g, w)
        assert g["val_loss"] == pytest.approx(w["val_loss"], rel=rel), (g, w)
    assert want[-1]["val_loss"] < want[0]["val_loss"] - 0.1  # and it did learn


def test_fsdp_resume_is_bit_identical(pair):
    root, results = pair
    for r in results:
        assert r["resume-first"][0] == 0 and r["resume-second"][0] == 0
    assert "resumed from" in results[0]["resume-second"][1] and "step_00000002" in results[0]["resume-second"][1]
    first = [line for line in results[0]["resume-first"][1].splitlines() if line.startswith("step ")]
    second = [line for line in results[0]["resume-second"][1].splitlines() if line.startswith("step ")]
    assert second == first[1:]  # steps 2 and 4 again, to the printed digit
    assert (root / "first.safetensors").read_bytes() == (root / "resume" / "model.safetensors").read_bytes()
    steps = sorted(p.name for p in (root / "resume" / "checkpoints").iterdir())
    assert steps == ["step_00000002", "step_00000004"]  # no temporary directory left behind


@pytest.mark.parametrize("name, message", [
    ("indivisible", "--batch-size 6 is the global batch and must be a multiple of --grad-accum 2 x 2 processes"),
    ("no-checkpoint", "--resume: no checkpoint in"),
    ("mismatch", "--resume: checkpoint"),
    ("bad-data", "not 1000 uint16 tokens"),
])
def test_bad_input_stops_every_rank_with_a_message(pair, name, message):
    _, results = pair
    for rank, result in enumerate(results):
        code, err = result[name]
        assert code != 0, f"rank {rank}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("llmfast: error: ") and message in lines[0], (rank, err)


# --- one process ----------------------------------------------------------------------------------------------------


def test_resume_is_bit_identical_in_one_process(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(cli.default_text()[:6000], encoding="utf-8")
    argv = ["train", "--data", str(corpus), *TINY, "--steps", "6", "--eval-interval", "3", "--save-interval", "3",
            "--out", str(tmp_path / "run")]
    code, first, err = run_main(argv)
    assert code == 0, err
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000006")
    (tmp_path / "run" / "checkpoints" / ".tmp-step_00000006").mkdir()  # a save killed half way: ignored
    code, second, err = run_main([*argv, "--resume"])
    assert code == 0, err
    steps = [line for line in first.splitlines() if line.startswith("step ")]
    assert [line for line in second.splitlines() if line.startswith("step ")] == steps[1:]
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights


def test_prepare_then_train_on_the_memmap_equals_training_on_the_text(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(cli.default_text()[:6000] + "\nnon-ASCII: żółw 日本語\n", encoding="utf-8")
    code, out, err = run_main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--no-progress"])
    assert code == 0, err
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["count"] == len(corpus.read_bytes())
    assert np.array_equal(np.fromfile(tmp_path / "data" / "tokens.bin", dtype=np.uint16),
                          np.frombuffer(corpus.read_bytes(), dtype=np.uint8))
    runs = {}
    for name, data in (("text", corpus), ("memmap", tmp_path / "data")):
        code, out, err = run_main(["train", "--data", str(data), *TINY, "--steps", "3", "--eval-interval", "3",
                                   "--out", str(tmp_path / name)])
        assert code == 0, err
        runs[name] = history(tmp_path / name)
    assert "memmap" in out
    assert runs["text"] == runs["memmap"]


def test_prepare_with_a_bpe_vocabulary_uses_uint32_past_65536_tokens(tmp_path):
    from llmfast.tokenizer import VocabularyNotFoundError, get_encoding

    try:
        encoding = get_encoding("o200k_base")
    except VocabularyNotFoundError:
        pytest.skip("o200k_base is not available offline here")
    corpus = tmp_path / "corpus.txt"
    text = cli.default_text()[:3000]
    corpus.write_text(text, encoding="utf-8")
    code, _, err = run_main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--tokenizer", "o200k_base",
                             "--no-progress"])
    assert code == 0, err
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["tokenizer"]["name"] == "o200k_base"
    assert np.fromfile(tmp_path / "data" / "tokens.bin", dtype=np.uint32).tolist() == encoding.encode_ordinary(text)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_trains(dtype, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(cli.default_text()[:6000], encoding="utf-8")
    code, out, err = run_main(["train", "--data", str(corpus), *TINY, "--steps", "4", "--eval-interval", "4",
                               "--arch", "llama", "--dtype", dtype, "--out", str(tmp_path / "run")])
    assert code == 0, err
    losses = history(tmp_path / "run")
    assert losses[-1]["val_loss"] < losses[0]["val_loss"]


# --- the real launcher ------------------------------------------------------------------------------------------------


def test_torchrun_fsdp_llama_matches_one_process_resumes_and_generates(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(cli.default_text()[:8000], encoding="utf-8")
    flags = ["train", "--arch", "llama", "--data", str(corpus), *TINY, "--steps", "6", "--eval-interval", "6"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "llmfast", *flags, "--distributed", "fsdp", "--out", str(tmp_path / "fsdp")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    code, _, err = run_main([*flags, "--out", str(tmp_path / "single")])
    assert code == 0, err
    got, want = history(tmp_path / "fsdp")[-1]["val_loss"], history(tmp_path / "single")[-1]["val_loss"]
    assert abs(got - want) <= 0.03 * want
    assert (tmp_path / "fsdp" / "checkpoints" / "step_00000006" / ".metadata").is_file()
    # resumed on one process (DCP reshards the 2-rank checkpoint), two steps further
    code, out, err = run_main([*flags[:-4], "--steps", "8", "--eval-interval", "2", "--resume",
                               "--out", str(tmp_path / "fsdp")])
    assert code == 0, err
    assert "resumed from" in out and "step 8 train_loss" in out
    code, out, err = run_main(["generate", str(tmp_path / "fsdp"), "--prompt", "The", "--max-new-tokens", "8",
                               "--seed", "0"])
    assert code == 0, err
    assert out.startswith("The")


def test_prepare_with_a_trained_bpe_vocabulary_then_train_and_generate(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(cli.default_text()[:6000], encoding="utf-8")
    code, _, err = run_main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--tokenizer", "bpe",
                             "--vocab-size", "300", "--no-progress"])
    assert code == 0, err
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["tokenizer"]["name"] == "bpe" and meta["tokenizer"]["vocab_size"] == 300
    assert meta["count"] < len(corpus.read_bytes())  # merges happened
    code, out, err = run_main(["train", "--data", str(tmp_path / "data"), *TINY, "--steps", "2", "--eval-interval",
                               "2", "--out", str(tmp_path / "run")])
    assert code == 0, err
    assert (tmp_path / "run" / "tokenizer.tiktoken").is_file()  # the checkpoint carries its own vocabulary
    code, out, err = run_main(["generate", str(tmp_path / "run"), "--prompt", "The", "--max-new-tokens", "4",
                               "--seed", "0"])
    assert code == 0, err
    assert out.startswith("The")


@pytest.mark.parametrize("extra, message", [
    (["--grad-accum", "3"], "--batch-size 8 is the global batch and must be a multiple of --grad-accum 3 x 1 process"),
    (["--resume"], "--resume: no checkpoint in"),
    (["--tokenizer", "cl100k_base"], "was prepared with bytes"),
    (["CORRUPT"], "holds token id 300, but the tokenizer in meta.json has 256 tokens"),
])
def test_bad_input_in_one_process(extra, message, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(cli.default_text()[:3000], encoding="utf-8")
    assert run_main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--no-progress"])[0] == 0
    if "CORRUPT" in extra:  # an id past the vocabulary in an otherwise well-formed file
        extra = extra[:-1]
        tokens = np.memmap(tmp_path / "data" / "tokens.bin", dtype=np.uint16, mode="r+")
        tokens[1234] = 300
        tokens.flush()
        del tokens
    code, _, err = run_main(["train", "--data", str(tmp_path / "data"), *TINY, "--steps", "1", *extra,
                             "--out", str(tmp_path / "run")])
    assert code != 0 and err.startswith("llmfast: error: ") and message in err, err


def test_compile_flag_traces_the_model_and_trains_the_same(tmp_path, monkeypatch):
    """--compile hands the (wrapped) model to torch.compile; Dynamo's eager backend keeps this test fast (the
    inductor build is what the flag costs for real, about a minute here), and the loss curve must not change."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(cli.default_text()[:4000], encoding="utf-8")
    compiled, real_compile = [], torch.compile

    def eager_compile(model, **kwargs):
        compiled.append(type(model).__name__)
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    runs = {}
    for name, extra in (("plain", []), ("compiled", ["--compile"])):
        code, _, err = run_main(["train", "--data", str(corpus), *TINY, "--arch", "llama", "--steps", "2",
                                 "--eval-interval", "2", *extra, "--out", str(tmp_path / name)])
        assert code == 0, err
        runs[name] = history(tmp_path / name)
    assert compiled == ["Llama"]
    for g, w in zip(runs["compiled"], runs["plain"]):
        assert g["val_loss"] == pytest.approx(w["val_loss"], rel=1e-5)
