"""Training checkpoints: ``torch.distributed.checkpoint`` (DCP) for the sharded state, resumable bit for bit, and
the single-file export (``model.safetensors`` + ``config.json``) that ``llmfast generate`` / ``eval`` load.

Layout under ``--out DIR``::

    DIR/checkpoints/step_00000100/   .metadata + __R_0.distcp ... (DCP: model and optimizer, each rank its shards)
                                     trainer.json (step, model/tokenizer config, history, settings)
                                     rng_rank{R}.pt (the data sampler's, torch's and CUDA's RNG states, the
                                     GradScaler)
    DIR/model.safetensors, DIR/config.json (the export, written at the end)

Every rank writes into ``DIR/checkpoints/.tmp-step_...``; only when all have finished does rank 0 rename it to
``step_...``, so a run killed while saving leaves the previous checkpoint intact (and the partial one under a name
that ``--resume`` ignores). The newest :data:`KEEP` checkpoints are kept.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmfast.training.distributed import Cluster

CHECKPOINTS = "checkpoints"
TRAINER_FILE = "trainer.json"
KEEP = 2
_PREFIX = "step_"


def _error(message: str) -> Exception:
    from llmfast.cli import CliError

    return CliError(message)


def step_dir(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINTS / f"{_PREFIX}{step:08d}"


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Finished checkpoints (renamed from their temporary name, with DCP metadata), oldest first."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(_PREFIX) and path.name[len(_PREFIX):].isdigit() \
                and (path / ".metadata").is_file() and (path / TRAINER_FILE).is_file():
            found.append(path)
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _rng_state(generator: torch.Generator, scaler: Any) -> dict[str, Any]:
    state = {"data": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def save(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, generator: torch.Generator, step: int,
         trainer: dict, out_dir: Path, cluster: Cluster) -> Path:
    """Write the state after ``step`` optimizer steps (a collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    final = step_dir(out_dir, step)
    tmp = final.with_name(".tmp-" + final.name)
    if cluster.is_main:
        if tmp.exists():  # left by a run killed while saving
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    cluster.barrier()
    state = _state(model, optimizer)
    if cluster.active:
        dcp.save(state, checkpoint_id=str(tmp))
    else:  # no process group: DCP writes a single-rank checkpoint without one (and warns that it does)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=str(tmp), no_dist=True)
    torch.save(_rng_state(generator, scaler), tmp / f"rng_rank{cluster.rank}.pt")
    if cluster.is_main:
        meta = dict(trainer, step=step, world_size=cluster.world_size)
        (tmp / TRAINER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    cluster.barrier()  # every rank's files are in tmp
    if cluster.is_main:
        old = final.with_name(".old-" + final.name)
        if final.exists():  # the same step saved again (a resumed run): swap, then drop the old one
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        for stale in complete_checkpoints(out_dir)[:-KEEP]:
            shutil.rmtree(stale, ignore_errors=True)
    cluster.barrier()
    return final


def find_resume(out_dir: Path, trainer: dict) -> tuple[Path, dict]:
    """The newest finished checkpoint under ``out_dir`` and its trainer.json, checked against this run's model and
    tokenizer (raises a CliError naming what differs)."""
    found = complete_checkpoints(out_dir)
    if not found:
        raise _error(f"--resume: no checkpoint in {out_dir / CHECKPOINTS} (train with --save-interval, or without "
                     f"--resume to start afresh)")
    path = found[-1]
    try:
        meta = json.loads((path / TRAINER_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(f"--resume: {path / TRAINER_FILE} is not valid JSON ({exc})") from None
    for key in ("arch", "model", "tokenizer"):
        if meta.get(key) != trainer.get(key):
            raise _error(f"--resume: checkpoint {path} was trained with {key} {json.dumps(meta.get(key))}, this run "
                         f"has {json.dumps(trainer.get(key))}; use the same flags or a new --out")
    if not isinstance(meta.get("step"), int) or meta["step"] > trainer["steps"]:
        raise _error(f"--resume: checkpoint {path} is at step {meta.get('step')}, beyond --steps {trainer['steps']}")
    return path, meta


def load(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, generator: torch.Generator, path: Path,
         cluster: Cluster) -> None:
    """Restore model, optimizer, RNGs and GradScaler from ``path`` (a collective). The world size may differ from
    the saving run's: DCP reshards; a rank without its own RNG file takes rank 0's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=not cluster.active)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{cluster.rank}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng_rank0.pt"
    rng = torch.load(rng_file, weights_only=False)
    generator.set_state(rng["data"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if scaler is not None and "scaler" in rng:
        scaler.load_state_dict(rng["scaler"])


def export(model: nn.Module, model_class: type, config: Any, tokenizer: Any, out_dir: Path, training: dict,
           cluster: Cluster) -> None:
    """The single-file checkpoint: the full weights gathered to rank 0 (on the CPU) and written there as
    ``model.safetensors`` + ``config.json`` in the format ``llmfast generate`` loads (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from llmfast.cli import save_checkpoint

    if not cluster.active:
        save_checkpoint(model, tokenizer, out_dir, training)
        return
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if cluster.is_main:
        plain = model_class(config)
        plain.load_state_dict({k: v.detach().to("cpu") for k, v in full.items()})
        save_checkpoint(plain, tokenizer, out_dir, training)
    cluster.barrier()


def trainer_meta(arch: str, config: Any, tokenizer: Any, args: Any) -> dict:
    """What a checkpoint must agree with to be resumed by this run."""
    return {"arch": arch, "model": dataclasses.asdict(config), "tokenizer": tokenizer.config(), "steps": args.steps,
            "batch_size": args.batch_size, "grad_accum": args.grad_accum, "seed": args.seed}
