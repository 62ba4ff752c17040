"""The training loop behind ``llmfast train``: one process, or many under torchrun with ``--distributed ddp|fsdp``.

Every step draws one *global* batch of ``--batch-size`` windows (the same draws on every rank), cuts it into
``--grad-accum`` micro-batches and each of those into one share per rank; each rank's loss is the mean over its
share and the gradient reduction (DDP's all-reduce, FSDP2's reduce-scatter) averages over ranks, so the update, and
the loss curve, are those of the one-process run whatever the number of processes. Only rank 0 prints and writes
the export; evaluations run on every rank (each its share of each batch) and are averaged.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmfast.cli import (ARCHITECTURES, CONFIG_FILE, WEIGHTS_FILE, CliError, check_model_args, default_text,
                         learning_rate, log_line, make_optimizer, model_config, read_text, load_tokenizer,
                         tokenizer_classes)
from llmfast.training import checkpoint, data
from llmfast.training.distributed import Cluster, gradient_sync, setup, world_from_env, wrap

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_batch(args: argparse.Namespace, world_size: int) -> None:
    """The global batch must split evenly into micro-batches and ranks. Checked on every rank from the arguments
    and WORLD_SIZE alone, before any collective, so every rank stops with this message."""
    parts = args.grad_accum * world_size
    if args.batch_size % parts:
        raise CliError(f"--batch-size {args.batch_size} is the global batch and must be a multiple of --grad-accum "
                       f"{args.grad_accum} x {world_size} process{'es' if world_size != 1 else ''} = {parts}",
                       exit_code=2)


def train(args: argparse.Namespace) -> int:
    """``llmfast train``: see :mod:`llmfast.training.loop`."""
    check_model_args(args)
    _, world_size, _ = world_from_env()
    check_batch(args, world_size if args.distributed else 1)
    cluster = setup(args.distributed, args.device)
    try:
        return _train(args, cluster)
    finally:
        cluster.close()


def _load_data(args: argparse.Namespace, cluster: Cluster, out_dir: Path):
    """Tokenizer and token array (in memory, or a memory map of a prepared directory) and a name for the log."""
    if args.data is not None and data.is_prepared(args.data):
        prepared = data.load_prepared(args.data)
        tokenizer = load_tokenizer(prepared.meta.get("tokenizer"), prepared.directory)
        if args.tokenizer is not None and args.tokenizer != prepared.meta["tokenizer"]["name"]:
            raise CliError(f"--tokenizer {args.tokenizer}: --data {args.data} was prepared with "
                           f"{prepared.meta['tokenizer']['name']} (leave --tokenizer out)")
        if cluster.is_main:
            data.copy_tokenizer_files(prepared.meta["tokenizer"], prepared.directory, out_dir)
        source = f"{args.data} (prepared, {prepared.meta['dtype']} memmap)"
        return tokenizer, prepared.tokens, source, prepared.meta["tokenizer"]["name"]
    name = args.tokenizer or "bytes"
    text = read_text(args.data) if args.data is not None else default_text()
    source = args.data if args.data is not None else "pydoc_data.topics (built in)"
    # A tokenizer trained on the text writes its file into --out: rank 0 writes it, the others into a scratch dir.
    scratch = tempfile.TemporaryDirectory() if not cluster.is_main else contextlib.nullcontext(None)
    with scratch as other_dir:
        try:
            tokenizer = tokenizer_classes()[name].train(name, text, Path(other_dir or out_dir), args)
        except ValueError as exc:  # e.g. a --vocab-size the BPE trainer refuses
            raise CliError(f"--tokenizer {name}: {exc}") from None
        ids = data.encode_text(tokenizer, text)
    return tokenizer, ids, source, name


def _train(args: argparse.Namespace, cluster: Cluster) -> int:
    from tqdm import tqdm

    device = cluster.device
    out_dir = Path(args.out)
    say = print if cluster.is_main else (lambda *a, **k: None)
    # Everything that can fail on bad input happens before the first collective, and the ranks compare outcomes.
    error = None
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise CliError(f"--out {args.out}: exists and is not a directory")
        if args.data is not None and not Path(args.data).exists():
            raise CliError(f"--data {args.data}: no such file")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CliError(f"--out {args.out}: cannot create it ({exc.strerror})") from None
        torch.manual_seed(args.seed)
        tokenizer, ids, source, tokenizer_name = _load_data(args, cluster, out_dir)
        train_ids, val_ids = data.split_train_val(ids, args.block_size)
        config = model_config(args, tokenizer.vocab_size)
        trainer = checkpoint.trainer_meta(args.arch, config, tokenizer, args)
        resume_from = checkpoint.find_resume(out_dir, trainer) if args.resume else None
    except CliError as exc:
        error = str(exc)
    cluster.agree(error)

    model_class = ARCHITECTURES[args.arch][0]
    torch.manual_seed(args.seed)  # the same initial weights on every rank (FSDP2 shards them as they are)
    model = model_class(config).to(device)
    n_params = model.num_parameters()
    model = wrap(model, cluster)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    forward = torch.compile(model) if args.compile else model
    amp_dtype = DTYPES[args.dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype != torch.float32 \
        else contextlib.nullcontext
    scaler = None
    if amp_dtype == torch.float16:
        if cluster.mode == "fsdp":  # its inf check is all-reduced over the ranks' shards
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler(device.type)
        else:
            scaler = torch.amp.GradScaler(device.type)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(100, args.steps // 10)
    min_lr = args.lr * args.min_lr_ratio
    batches = torch.Generator().manual_seed(args.seed)
    history: list[dict] = []
    start_step = 0
    if resume_from is not None:
        path, meta = resume_from
        checkpoint.load(model, optimizer, scaler, batches, path, cluster)
        start_step, history = meta["step"], [h for h in meta.get("history", []) if h["step"] < meta["step"]]
        say(f"resumed from {path} at step {start_step}")

    say(f"data {source}: {len(ids)} tokens ({tokenizer_name}), {len(train_ids)} train / {len(val_ids)} val")
    heads = f"n_head {config.n_head}" + (f" n_kv_head {config.n_kv_head}" if args.arch == "llama" else "")
    plural = "es" if cluster.world_size != 1 else ""
    where = f"; {cluster.world_size} process{plural} ({cluster.mode})" if cluster.active else ""
    say(f"model {args.arch} {n_params} parameters: n_layer {config.n_layer} {heads} "
        f"n_embd {config.n_embd} block_size {config.block_size}; device {device}, backend {args.backend}, "
        f"{torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() != 1 else ''}{where}")

    micro = args.batch_size // args.grad_accum

    @torch.no_grad()
    def estimate(token_ids: np.ndarray, seed: int) -> float:
        """Mean loss over ``--eval-iters`` batches of ``micro`` windows, the same batches at every call, each rank
        its share, averaged over ranks."""
        generator = torch.Generator().manual_seed(seed)
        forward.eval()
        total = torch.zeros((), dtype=torch.float64)
        for _ in range(args.eval_iters):
            x, y = data.get_batch(token_ids, args.block_size, micro, generator, device, cluster.rank,
                                  cluster.world_size)
            with autocast():
                total += forward(x, y).double().cpu()
        forward.train()
        return cluster.mean(total / args.eval_iters)

    started = time.perf_counter()
    forward.train()
    progress = tqdm(total=args.steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                    disable=args.no_progress or not cluster.is_main, dynamic_ncols=True)

    def save(step: int) -> None:
        checkpoint.save(model, optimizer, scaler, batches, step, dict(trainer, history=history), out_dir, cluster)

    for step in range(start_step, args.steps + 1):
        if step % args.eval_interval == 0 or step == args.steps:
            train_loss, val_loss = estimate(train_ids, args.seed + 1), estimate(val_ids, args.seed + 2)
            history.append({"step": step, "train_loss": train_loss, "val_loss": val_loss})
            if cluster.is_main:
                progress.write(log_line(step, train_loss, val_loss), file=sys.stdout)
                sys.stdout.flush()
            if not math.isfinite(val_loss):  # the same averaged value on every rank: all stop together
                progress.close()
                raise CliError(f"training diverged at step {step} (val_loss {val_loss}); lower --lr")
        if step == args.steps:
            break
        lr = learning_rate(step, args.lr, min_lr, warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), dtype=torch.float64)
        shares = data.micro_batches(train_ids, args.block_size, args.batch_size, args.grad_accum, batches, device,
                                    cluster.rank, cluster.world_size)
        for i, (x, y) in enumerate(shares):
            with gradient_sync(model, cluster, sync=i == len(shares) - 1):
                with autocast():
                    loss = forward(x, y) / args.grad_accum
                (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.detach().double().cpu()
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        progress.update()
        progress.set_postfix(loss=f"{float(step_loss):.3f}", lr=f"{lr:.2e}", refresh=False)
        if args.save_interval and (step + 1) % args.save_interval == 0 and step + 1 < args.steps:
            save(step + 1)
    progress.close()
    elapsed = time.perf_counter() - started

    training = {key: getattr(args, key) for key in ("steps", "batch_size", "lr", "min_lr_ratio", "weight_decay",
                                                     "grad_clip", "eval_interval", "eval_iters", "seed")}
    training.update(data=source, warmup_steps=warmup, seconds=round(elapsed, 2), history=history)
    if cluster.active or args.save_interval:
        training.update(grad_accum=args.grad_accum, dtype=args.dtype, distributed=args.distributed,
                        world_size=cluster.world_size)
    if args.save_interval or cluster.active or args.resume:
        save(args.steps)
    checkpoint.export(model, model_class, config, tokenizer, out_dir, training, cluster)
    say(f"saved {out_dir / WEIGHTS_FILE} and {out_dir / CONFIG_FILE} "
        f"({args.steps - start_step} steps in {elapsed:.1f} s)")
    return 0
