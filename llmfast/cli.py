"""``python -m llmfast`` / ``llmfast``: train a small GPT or Llama on a text file, sample from it, measure perplexity.

    llmfast train --data FILE --steps N --out DIR     # prints "step N train_loss X val_loss Y val_ppl Z" lines
    llmfast train --arch llama ...                    # the Llama-style model (RMSNorm, rotary, GQA, SwiGLU)
    torchrun --nproc_per_node N -m llmfast train --distributed ddp|fsdp ...   # several processes / GPUs
    llmfast prepare FILE --out DIR                    # tokenize once; then train --data DIR reads a memory map
    llmfast generate DIR --prompt TEXT --max-new-tokens N
    llmfast eval DIR --data FILE

A checkpoint directory holds ``model.safetensors`` (the weights) and ``config.json`` (the architecture and its
sizes, the tokenizer, the training settings and final losses); generate and eval rebuild whichever model it
records. Bad arguments end with one line on stderr and a non-zero exit status. This module parses the arguments;
the training itself is :mod:`llmfast.training` (loop, distributed, checkpoint, data).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

import llmfast
from llmfast import _backend
from llmfast.models.gpt import GPT, GPTConfig
from llmfast.models.llama import Llama, LlamaConfig

if TYPE_CHECKING:
    from llmfast.tokenizer import Encoding

CHECKPOINT_FORMAT = "llmfast-gpt"  # the format's name predates --arch; config.json's "arch" names the model
# --arch: the model class and its config class. A checkpoint without "arch" (older ones) is a GPT.
ARCHITECTURES: dict[str, tuple[type, type]] = {"gpt": (GPT, GPTConfig), "llama": (Llama, LlamaConfig)}
Model = GPT | Llama
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CliError(Exception):
    """A problem with the user's input: reported as one line on stderr, never a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers. Each one turns text into ids and back, records itself in the checkpoint's config and rebuilds from
# it, so that generate and eval use the tokenizer the model was trained with. Adding one is a class with
# train/load/config/encode/decode and an entry in tokenizer_classes().


class ByteTokenizer:
    """UTF-8 bytes as tokens: a vocabulary of 256, nothing to train or store."""

    name = "bytes"
    vocab_size = 256

    @classmethod
    def train(cls, name: str, text: str, out_dir: Path, args: argparse.Namespace) -> ByteTokenizer:
        return cls()

    @classmethod
    def load(cls, meta: dict, checkpoint_dir: Path) -> ByteTokenizer:
        return cls()

    def config(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Sampled bytes need not form valid UTF-8; show the damage instead of failing.
        return bytes(ids).decode("utf-8", errors="replace")


class NamedBPETokenizer:
    """A published BPE vocabulary (``cl100k_base``, ``o200k_base``, ...) through :mod:`llmfast.tokenizer`."""

    def __init__(self, encoding: Encoding) -> None:
        self.encoding = encoding
        self.name = encoding.name
        self.vocab_size = encoding.n_vocab

    @classmethod
    def named(cls, name: str) -> NamedBPETokenizer:
        from llmfast.tokenizer import VocabularyNotFoundError, get_encoding

        try:
            return cls(get_encoding(name))
        except VocabularyNotFoundError as exc:
            raise CliError(f"tokenizer {name}: {str(exc).splitlines()[0]}") from None

    @classmethod
    def train(cls, name: str, text: str, out_dir: Path, args: argparse.Namespace) -> NamedBPETokenizer:
        return cls.named(name)

    @classmethod
    def load(cls, meta: dict, checkpoint_dir: Path) -> NamedBPETokenizer:
        return cls.named(meta["name"])

    def config(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)  # special-token text is ordinary text in a training corpus

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(ids, errors="replace")


class TrainedBPETokenizer(NamedBPETokenizer):
    """A BPE vocabulary trained on the training text (``--vocab-size`` tokens), saved beside the weights."""

    FILE = "tokenizer.tiktoken"

    @classmethod
    def train(cls, name: str, text: str, out_dir: Path, args: argparse.Namespace) -> TrainedBPETokenizer:
        from llmfast.tokenizer import train_bpe

        tokenizer = cls(train_bpe(text, args.vocab_size))
        tokenizer.encoding.save(str(out_dir / cls.FILE))
        return tokenizer

    @classmethod
    def load(cls, meta: dict, checkpoint_dir: Path) -> TrainedBPETokenizer:
        from llmfast.tokenizer import Encoding, load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(checkpoint_dir / meta["file"]))
        return cls(Encoding("bpe", pat_str=meta["pat_str"], mergeable_ranks=ranks,
                            special_tokens=meta["special_tokens"]))

    def config(self) -> dict:
        return {"name": "bpe", "vocab_size": self.vocab_size, "file": self.FILE,
                "pat_str": self.encoding.pat_str, "special_tokens": self.encoding.special_tokens}


def tokenizer_classes() -> dict[str, type]:
    """Every ``--tokenizer`` choice and the class that makes it."""
    import llmfast.tokenizer as bpe

    choices: dict[str, type] = {"bytes": ByteTokenizer, "bpe": TrainedBPETokenizer}
    choices.update((name, NamedBPETokenizer) for name in bpe.list_encoding_names())
    return choices


def load_tokenizer(meta: object, checkpoint_dir: Path) -> ByteTokenizer | NamedBPETokenizer:
    classes = tokenizer_classes()
    name = meta.get("name") if isinstance(meta, dict) else None
    if name not in classes:
        raise CliError(f"checkpoint {checkpoint_dir}: unknown tokenizer {name!r} in {CONFIG_FILE} "
                       f"(accepts {', '.join(classes)})")
    try:
        return classes[name].load(meta, checkpoint_dir)
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise CliError(f"checkpoint {checkpoint_dir}: cannot load tokenizer {name!r} ({exc})") from None


# ---------------------------------------------------------------------------------------------------------------
# Input: text files, checkpoints.


def default_text() -> str:
    """Python's own help texts: about 460 KB of English that every Python installation has."""
    from pydoc_data.topics import topics

    return "\n".join(topics.values())


def read_text(path: str, flag: str = "--data") -> str:
    file = Path(path)
    if not file.exists():
        raise CliError(f"{flag} {path}: no such file")
    if file.is_dir():
        raise CliError(f"{flag} {path}: is a directory, expected a text file")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CliError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    if not data:
        raise CliError(f"{flag} {path}: the file is empty")
    try:
        return data.decode("utf-8-sig")  # drops a byte-order mark if there is one
    except UnicodeDecodeError as exc:
        raise CliError(f"{flag} {path}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def save_checkpoint(model: Model, tokenizer: ByteTokenizer | NamedBPETokenizer, out_dir: Path, training: dict) -> None:
    from safetensors.torch import save_model

    save_model(model, str(out_dir / WEIGHTS_FILE))  # stores the tied embedding/head matrix once
    meta = {
        "format": CHECKPOINT_FORMAT,
        "llmfast_version": llmfast.__version__,
        "arch": next(name for name, (cls, _) in ARCHITECTURES.items() if isinstance(model, cls)),
        "model": dataclasses.asdict(model.config),
        "tokenizer": tokenizer.config(),
        "training": training,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint(directory: str, device: torch.device) -> tuple[Model, ByteTokenizer | NamedBPETokenizer, dict]:
    from safetensors.torch import load_model

    ckpt = Path(directory)
    if not ckpt.is_dir():
        raise CliError(f"checkpoint {directory}: no such directory")
    config_path, weights_path = ckpt / CONFIG_FILE, ckpt / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CliError(f"checkpoint {directory}: {path.name} is missing (train one with `llmfast train`)")
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CliError(f"checkpoint {directory}: {CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CliError(f"checkpoint {directory}: {CONFIG_FILE} is not an llmfast model checkpoint config")
    arch = meta.get("arch", "gpt")
    if arch not in ARCHITECTURES:
        raise CliError(f"checkpoint {directory}: unknown arch {arch!r} in {CONFIG_FILE} "
                       f"(accepts {', '.join(ARCHITECTURES)})")
    model_class, config_class = ARCHITECTURES[arch]
    try:
        config = config_class(**meta["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CliError(f"checkpoint {directory}: bad model config in {CONFIG_FILE} ({exc})") from None
    tokenizer = load_tokenizer(meta.get("tokenizer"), ckpt)
    if tokenizer.vocab_size > config.vocab_size:
        raise CliError(f"checkpoint {directory}: tokenizer has {tokenizer.vocab_size} tokens but the model "
                       f"only {config.vocab_size}")
    model = model_class(config)
    try:
        load_model(model, str(weights_path), strict=True)
    except Exception as exc:  # safetensors and load_state_dict raise several types, with multi-line messages
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"checkpoint {directory}: cannot load {WEIGHTS_FILE} ({first_line})") from None
    return model.to(device).eval(), tokenizer, meta


# ---------------------------------------------------------------------------------------------------------------
# Training helpers.


def learning_rate(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to ``max_lr``, then a cosine decay to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: Model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on biases and norm gains)."""
    params = list(model.parameters())  # the tied embedding/head matrix appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))


def log_line(step: int, train_loss: float, val_loss: float) -> str:
    return (f"step {step} train_loss {train_loss:.4f} val_loss {val_loss:.4f} "
            f"val_ppl {math.exp(min(val_loss, 700.0)):.2f}")


# ---------------------------------------------------------------------------------------------------------------
# Commands.


def check_model_args(args: argparse.Namespace) -> None:
    """The size flags' combinations each --arch needs, reported naming the flags (before any data is read)."""
    if args.n_embd % args.n_head != 0:
        raise CliError(f"--n-embd must be a multiple of --n-head, got --n-embd {args.n_embd} and "
                       f"--n-head {args.n_head}", exit_code=2)
    if args.arch != "llama":
        for flag in ("n_kv_head", "intermediate_size", "rope_theta"):
            if getattr(args, flag) is not None:
                raise CliError(f"--{flag.replace('_', '-')} is a --arch llama option (got --arch {args.arch})",
                               exit_code=2)
        if args.untied_head:
            raise CliError(f"--untied-head is a --arch llama option (got --arch {args.arch})", exit_code=2)
        return
    if (args.n_embd // args.n_head) % 2:
        raise CliError(f"--arch llama needs an even head dim --n-embd / --n-head (rotary embeddings rotate pairs), "
                       f"got {args.n_embd} / {args.n_head} = {args.n_embd // args.n_head}", exit_code=2)
    n_kv_head = default_kv_heads(args.n_head) if args.n_kv_head is None else args.n_kv_head
    if args.n_head % n_kv_head:
        raise CliError(f"--n-head must be a multiple of --n-kv-head, got --n-head {args.n_head} and "
                       f"--n-kv-head {n_kv_head}", exit_code=2)


def default_kv_heads(n_head: int) -> int:
    """Llama's grouped-query attention by default: half as many key/value heads as query heads (when even)."""
    return n_head // 2 if n_head % 2 == 0 else n_head


def model_config(args: argparse.Namespace, vocab_size: int) -> GPTConfig | LlamaConfig:
    """The --arch model's config from the size flags."""
    common = dict(vocab_size=vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                  n_embd=args.n_embd, dropout=args.dropout)
    if args.arch == "llama":
        return LlamaConfig(**common,
                           n_kv_head=default_kv_heads(args.n_head) if args.n_kv_head is None else args.n_kv_head,
                           intermediate_size=args.intermediate_size,
                           rope_theta=args.rope_theta if args.rope_theta is not None else 10000.0,
                           tie_word_embeddings=not args.untied_head)
    return GPTConfig(**common)


def cmd_train(args: argparse.Namespace) -> int:
    """``llmfast train``: the loop lives in :mod:`llmfast.training.loop` (one process, or DDP/FSDP2 under torchrun)."""
    from llmfast.training.loop import train

    return train(args)


def cmd_prepare(args: argparse.Namespace) -> int:
    """``llmfast prepare TEXT --out DIR``: see :func:`llmfast.training.data.cmd_prepare`."""
    from llmfast.training.data import cmd_prepare as prepare

    return prepare(args)


def cmd_generate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device)
    prompt_ids = tokenizer.encode(args.prompt)
    shown_ids = list(prompt_ids)
    if not prompt_ids:  # the model needs one token to condition on: start an empty prompt at a line break
        prompt_ids = tokenizer.encode("\n")
    generator = torch.Generator(device=device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new_ids: list[int] = []
    printed = tokenizer.decode(shown_ids)

    def stream(row: int, token: int) -> None:
        # Print the text as it grows; hold back a trailing partial character (a multi-byte token split).
        nonlocal printed
        new_ids.append(token)
        text = tokenizer.decode(shown_ids + new_ids)
        if text.startswith(printed) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    if args.stream:
        sys.stdout.write(printed)
        sys.stdout.flush()
    start = time.perf_counter()
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, generator=generator, repetition_penalty=args.repetition_penalty,
                         stop_tokens=args.stop_token, stream=stream if args.stream else None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    new_ids = out[0, len(prompt_ids):].tolist()
    text = tokenizer.decode(shown_ids + new_ids)
    if args.stream:
        print(text[len(printed):] if text.startswith(printed) else "")
    else:
        print(text)
    rate = len(new_ids) / seconds if seconds > 0 else float("inf")
    print(f"generated {len(new_ids)} tokens in {seconds:.2f} s: {rate:.1f} tokens/s", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device)
    ids = torch.tensor(tokenizer.encode(read_text(args.data)), dtype=torch.long)
    if len(ids) < 2:
        raise CliError(f"--data {args.data}: needs at least 2 tokens to measure perplexity, got {len(ids)}")
    nll = evaluate_nll(model, ids, args.batch_size, device)
    print(f"tokens {len(ids) - 1} loss {nll:.4f} ppl {math.exp(min(nll, 700.0)):.2f}")
    return 0


@torch.no_grad()
def evaluate_nll(model: Model, ids: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token loss over all of ``ids``, in consecutive windows of ``block_size`` predictions."""
    block_size = model.config.block_size
    n_targets = len(ids) - 1
    n_full = n_targets // block_size
    inputs = ids[: n_full * block_size].view(n_full, block_size)
    targets = ids[1: n_full * block_size + 1].view(n_full, block_size)
    total = 0.0
    for start in range(0, n_full, batch_size):
        x, y = inputs[start: start + batch_size], targets[start: start + batch_size]
        total += model(x.to(device), y.to(device)).item() * y.numel()
    rest = n_targets - n_full * block_size
    if rest:  # the tail is shorter than a block
        x, y = ids[n_full * block_size: -1], ids[n_full * block_size + 1:]
        total += model(x[None].to(device), y[None].to(device)).item() * rest
    return total / n_targets


# ---------------------------------------------------------------------------------------------------------------
# Argument parsing: every bad value is reported in one line naming the flag, what it got and what it accepts.


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage plus the message and exits; we want one line
        raise CliError(message, exit_code=2)


def _number(kind: type, accepts: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {accepts}, got {text!r}") from None
        if not (ok(value) and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected {accepts}, got {text!r}")
        return value

    parse.__name__ = accepts  # argparse names the type in some messages
    return parse


positive_int = _number(int, "an integer >= 1", lambda v: v >= 1)
non_negative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a number > 0", lambda v: v > 0)
non_negative_float = _number(float, "a number >= 0", lambda v: v >= 0)
dropout_float = _number(float, "a number in [0, 1)", lambda v: 0 <= v < 1)
unit_float = _number(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
top_p_float = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}", exit_code=2) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: CUDA is not available on this machine", exit_code=2)
    return device


def version_string() -> str:
    """``llmfast 0.1.0 (torch ..., triton ..., native tokenizer ...)``: what ``--version`` prints."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        from llmfast import _C  # noqa: F401
        native = "built"
    except ImportError:
        native = "missing"
    return f"llmfast {llmfast.__version__} (torch {torch.__version__}, triton {triton_version}, native tokenizer {native})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmfast", description="Train, sample from and evaluate llmfast's small GPT or Llama.")
    parser.add_argument("--version", action="version", version=version_string())
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,prepare,generate,eval}")

    def add_common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
        sub.add_argument("--backend", default="auto", choices=_backend.BACKENDS,
                         help="which implementation runs llmfast's ops (default auto)")
        sub.add_argument("--threads", type=positive_int, default=None,
                         help="CPU threads for torch (default: the idle usable cores, at least 1)")

    def add_tokenizer(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--tokenizer", default=None, choices=list(tokenizer_classes()),
                         help="bytes (default, 256 tokens), bpe (trained on the text, if available) or a published "
                              "vocabulary found offline; a prepared --data directory brings its own")
        sub.add_argument("--vocab-size", type=positive_int, default=512, help="for --tokenizer bpe (default 512)")

    defaults = GPTConfig()
    train = commands.add_parser("train", help="train a GPT or a Llama on a text file")
    train.add_argument("--arch", default="gpt", choices=list(ARCHITECTURES),
                       help="gpt (GPT-2 style, default) or llama (RMSNorm, rotary, grouped-query attention, SwiGLU)")
    train.add_argument("--data", help="UTF-8 text file, or a directory written by `llmfast prepare` (read as a "
                                      "memory map); default: Python's built-in pydoc_data.topics")
    train.add_argument("--out", required=True, help="directory for model.safetensors and config.json")
    train.add_argument("--steps", type=non_negative_int, default=300, help="optimizer steps (default 300)")
    add_tokenizer(train)
    train.add_argument("--n-layer", type=positive_int, default=defaults.n_layer)
    train.add_argument("--n-head", type=positive_int, default=defaults.n_head)
    train.add_argument("--n-embd", type=positive_int, default=defaults.n_embd)
    train.add_argument("--block-size", type=positive_int, default=defaults.block_size, help="context length")
    train.add_argument("--n-kv-head", type=positive_int, default=None,
                       help="--arch llama: key/value heads (default: half of --n-head when even)")
    train.add_argument("--intermediate-size", type=positive_int, default=None,
                       help="--arch llama: SwiGLU width (default: 8/3 of --n-embd rounded up to 32)")
    train.add_argument("--rope-theta", type=positive_float, default=None,
                       help="--arch llama: rotary base (default 10000)")
    train.add_argument("--untied-head", action="store_true",
                       help="--arch llama: a separate output matrix instead of the tied token embedding")
    train.add_argument("--dropout", type=dropout_float, default=defaults.dropout)
    train.add_argument("--batch-size", type=positive_int, default=16)
    train.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate (default 3e-3)")
    train.add_argument("--min-lr-ratio", type=unit_float, default=0.1,
                       help="final learning rate as a fraction of --lr (default 0.1)")
    train.add_argument("--warmup-steps", type=non_negative_int, default=None,
                       help="linear warmup steps (default: 10%% of --steps, at most 100)")
    train.add_argument("--weight-decay", type=non_negative_float, default=0.1)
    train.add_argument("--grad-clip", type=positive_float, default=1.0, help="max gradient norm (default 1)")
    train.add_argument("--eval-interval", type=positive_int, default=100, help="steps between evaluations")
    train.add_argument("--eval-iters", type=positive_int, default=20, help="batches per evaluation")
    train.add_argument("--seed", type=non_negative_int, default=1337)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--distributed", default=None, choices=["ddp", "fsdp"],
                       help="under torchrun: DistributedDataParallel or FSDP2 fully_shard (NCCL on CUDA, gloo on "
                            "the CPU); --batch-size stays the global batch")
    train.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                       help="autocast precision (fp16 adds a gradient scaler; default fp32)")
    train.add_argument("--grad-accum", type=positive_int, default=1,
                       help="micro-batches per optimizer step (gradients synced on the last only; default 1)")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_argument("--save-interval", type=non_negative_int, default=0,
                       help="write a resumable checkpoint (DCP) under OUT/checkpoints every N steps (0: only at "
                            "the end of a distributed, resumed or --save-interval run)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint under --out (same flags)")
    add_common(train)
    train.set_defaults(run=cmd_train)

    prepare = commands.add_parser("prepare", help="tokenize a text once into a memory-mapped token file")
    prepare.add_argument("text", metavar="TEXT", help="UTF-8 text file")
    prepare.add_argument("--out", required=True, help="directory for tokens.bin and meta.json")
    add_tokenizer(prepare)
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    prepare.add_argument("--threads", type=positive_int, default=None,
                         help="tokenizer threads (default: all usable cores)")
    prepare.set_defaults(run=cmd_prepare, device="cpu", backend="auto")

    generate = commands.add_parser("generate", help="sample text from a checkpoint")
    generate.add_argument("checkpoint", help="directory written by `llmfast train`")
    generate.add_argument("--prompt", default="", help="text to continue (default: start of a line)")
    generate.add_argument("--max-new-tokens", type=non_negative_int, default=200)
    generate.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 is greedy")
    generate.add_argument("--top-k", type=positive_int, default=None, help="sample from the k likeliest tokens")
    generate.add_argument("--top-p", type=top_p_float, default=None, help="nucleus sampling threshold")
    generate.add_argument("--seed", type=non_negative_int, default=None, help="for reproducible samples")
    generate.add_argument("--repetition-penalty", type=positive_float, default=1.0,
                          help="divide the logits of tokens already present (CTRL's penalty; 1 is off)")
    generate.add_argument("--stop-token", type=non_negative_int, action="append", default=None,
                          help="token id that ends generation (repeatable)")
    generate.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_common(generate)
    generate.set_defaults(run=cmd_generate)

    evaluate = commands.add_parser("eval", help="perplexity of a checkpoint on a text file")
    evaluate.add_argument("checkpoint", help="directory written by `llmfast train`")
    evaluate.add_argument("--data", required=True, help="UTF-8 text file")
    evaluate.add_argument("--batch-size", type=positive_int, default=16)
    add_common(evaluate)
    evaluate.set_defaults(run=cmd_eval)
    return parser


def default_threads() -> int:
    """CPU threads for torch: the usable cores that are idle by the 1-minute load average, at least one.

    On a shared machine, more threads than idle cores make torch's OpenMP workers spin against each other:
    measured here, a training step on 2 busy cores took 8x longer with 2 threads than with 1.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        idle = usable - os.getloadavg()[0]
    except OSError:  # no load average on this platform
        idle = usable
    return max(1, min(torch.get_num_threads(), usable, round(idle)))


def check_backend(name: str, device_name: str) -> None:
    if name == "triton":
        probe = torch.empty(0, device=resolve_device(device_name))
        if not _backend.triton_can_run_on(probe):
            raise CliError("--backend triton: Triton cannot run here (it needs a CUDA device, or "
                           "TRITON_INTERPRET=1 set for the slow CPU interpreter)", exit_code=2)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m llmfast`` and the ``llmfast`` console script; returns the exit status."""
    threads_before = torch.get_num_threads()
    try:
        args = build_parser().parse_args(argv)
        torch.set_num_threads(args.threads if args.threads is not None else default_threads())
        check_backend(args.backend, args.device)
        with llmfast.backend(args.backend):
            return args.run(args)
    except CliError as exc:
        print(f"llmfast: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("llmfast: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads_before)  # main() may be called in-process (tests); leave torch as it was
