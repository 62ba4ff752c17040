"""docs/COMPATIBILITY.md is true: every row marked supported exists in llmfast with the listed arguments.

The page lists each upstream function's arguments as a Python parameter list in upstream order with upstream
defaults. For a row marked "supported" the llmfast function must take each of those arguments at the same position
(counting the function's earlier rows) with the same default and kind; "supported (keyword)" asks only for the name and
the default. Where tiktoken is installed its table must list exactly tiktoken's API.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "COMPATIBILITY.md"
STATUSES = {"supported", "supported (keyword)", "not yet", "not planned"}
SUPPORTED = {"supported", "supported (keyword)"}
_MISSING = object()


@dataclass
class Param:
    name: str
    default: object  # _MISSING when required
    keyword_only: bool


@dataclass
class Row:
    section: str
    upstream: list[str]
    target: str | None
    args: str
    status: str
    notes: str
    line: int

    @property
    def where(self) -> str:
        return f"docs/COMPATIBILITY.md:{self.line} ({self.upstream[0]})"

    def params(self) -> list[Param]:
        text = self.args.strip("`")
        if text == "()":
            return []
        fn = ast.parse(f"def f({text}): pass").body[0].args
        out = []
        positional = fn.posonlyargs + fn.args
        defaults = [_MISSING] * (len(positional) - len(fn.defaults)) + [ast.literal_eval(d) for d in fn.defaults]
        out += [Param(a.arg, d, False) for a, d in zip(positional, defaults)]
        out += [Param(a.arg, _MISSING if d is None else ast.literal_eval(d), True)
                for a, d in zip(fn.kwonlyargs, fn.kw_defaults)]
        return out

    @property
    def has_param_list(self) -> bool:
        return self.args.startswith("`")


def parse_rows() -> list[Row]:
    rows = []
    section = ""
    for number, line in enumerate(DOC.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("## "):
            section = line[3:].strip()
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 5, f"docs/COMPATIBILITY.md:{number}: expected 5 cells, got {len(cells)}: {line}"
        upstream = re.findall(r"`([^`]+)`", cells[0])
        target = cells[1].strip("`") if cells[1] != "—" else None
        rows.append(Row(section, upstream, target, cells[2], cells[3], cells[4], number))
    return rows


ROWS = parse_rows()


def resolve(path: str):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = inspect.getattr_static(obj, attr) if inspect.isclass(obj) else getattr(obj, attr)
        return obj
    raise ImportError(path)


def _llmfast_params(fn) -> list[inspect.Parameter]:
    if isinstance(fn, (staticmethod, classmethod)):
        fn = fn.__func__
    params = list(inspect.signature(fn).parameters.values())
    return params[1:] if params and params[0].name == "self" else params


def test_the_page_parses_and_every_status_is_known():
    assert len(ROWS) > 30
    sections = {r.section for r in ROWS}
    assert any(s.startswith("tiktoken") for s in sections)
    for row in ROWS:
        assert row.status in STATUSES, f"{row.where}: unknown status {row.status!r}"
        if row.status not in SUPPORTED:
            assert row.notes, f"{row.where}: a row that is not supported must give the reason"
        else:
            assert row.target, f"{row.where}: a supported row must name the llmfast function"
        if row.has_param_list:
            row.params()  # parses


def _groups() -> dict[tuple[str, str], list[Row]]:
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in ROWS:
        groups.setdefault((row.section, row.upstream[0]), []).append(row)
    return groups


@pytest.mark.parametrize("key", sorted(k for k, rows in _groups().items() if any(r.status in SUPPORTED for r in rows)),
                         ids=lambda k: k[1])
def test_supported_rows_exist_with_the_listed_arguments(key):
    rows = _groups()[key]
    index = 0
    for row in rows:
        if row.status not in SUPPORTED:
            index += len(row.params()) if row.has_param_list else 0
            continue
        obj = resolve(row.target)
        if row.args in ("property", "attributes", "module"):
            if row.args == "property":
                assert isinstance(obj, (property, __import__("functools").cached_property)), row.where
            elif row.args == "attributes":
                _check_instance_attributes(row, obj)
            continue
        assert callable(obj) or isinstance(obj, (staticmethod, classmethod)), f"{row.where}: {row.target} not callable"
        ours = _llmfast_params(obj)
        by_name = {p.name: (i, p) for i, p in enumerate(ours)}
        for param in row.params():
            assert param.name in by_name, f"{row.where}: {row.target} lacks argument {param.name!r}"
            i, p = by_name[param.name]
            if param.default is not _MISSING:
                assert p.default is not inspect.Parameter.empty, f"{row.where}: {param.name} must be optional"
                assert p.default == param.default and type(p.default) is type(param.default) or (
                    isinstance(param.default, (set, frozenset)) and isinstance(p.default, (set, frozenset))
                    and p.default == param.default), (
                    f"{row.where}: default of {param.name} is {p.default!r}, upstream {param.default!r}")
            if row.status == "supported":
                if param.keyword_only:
                    assert p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD), f"{row.where}: {param.name}"
                else:
                    assert p.kind == p.POSITIONAL_OR_KEYWORD and i == index, (
                        f"{row.where}: {param.name} is argument {i} of {row.target}, upstream {index}")
            index += 1
    # Arguments llmfast adds must be optional, so upstream calls never miss one.
    last = rows[-1]
    if last.status in SUPPORTED and last.has_param_list:
        listed = {p.name for r in rows if r.has_param_list for p in r.params()}
        for p in _llmfast_params(resolve(last.target)):
            if p.name not in listed:
                assert p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD), (
                    f"{last.where}: llmfast's extra argument {p.name} must be optional")


def _check_instance_attributes(row: Row, cls) -> None:
    from llmfast.tokenizer import Encoding

    assert cls is Encoding, f"{row.where}: attribute rows are only known for the tokenizer's Encoding"
    enc = Encoding("t", pat_str=r"\S+|\s+", mergeable_ranks={bytes([b]): b for b in range(256)},
                   special_tokens={"<|endoftext|>": 256})
    for name in row.upstream:
        assert hasattr(enc, name.rsplit(".", 1)[-1]), f"{row.where}: Encoding instances lack {name}"


def test_tiktoken_table_lists_exactly_tiktokens_api():
    tiktoken = pytest.importorskip("tiktoken")
    import tiktoken.load

    rows = [r for r in ROWS if r.section.startswith("tiktoken")]
    listed: dict[str, list[Row]] = {}
    for r in rows:
        listed.setdefault(r.upstream[0], []).append(r)
    expected = {}
    for name in vars(tiktoken.Encoding):
        if not name.startswith("_") or name in ("_encode_bytes", "_encode_single_piece", "_encode_only_native_bpe",
                                                "__init__", "__repr__", "__getstate__", "__setstate__"):
            expected[f"tiktoken.Encoding.{name}"] = inspect.getattr_static(tiktoken.Encoding, name)
    for name in ("get_encoding", "list_encoding_names", "encoding_for_model", "encoding_name_for_model"):
        expected[f"tiktoken.{name}"] = getattr(tiktoken, name)
    for name, fn in vars(tiktoken.load).items():
        if inspect.isfunction(fn) and fn.__module__ == "tiktoken.load" and not name.startswith("_"):
            expected[f"tiktoken.load.{name}"] = fn
    assert set(expected) <= set(listed), f"missing from the page: {sorted(set(expected) - set(listed))}"
    for name, theirs in expected.items():
        group = listed[name]
        if isinstance(theirs, (property, __import__("functools").cached_property)):
            assert group[0].args == "property", name
            continue
        params = [p for r in group for p in r.params()]
        sig = [p for p in inspect.signature(theirs).parameters.values() if p.name != "self"]
        assert [p.name for p in params] == [p.name for p in sig], name
        for mine, p in zip(params, sig):
            assert mine.keyword_only == (p.kind == p.KEYWORD_ONLY), (name, p.name)
            assert (mine.default is _MISSING) == (p.default is p.empty), (name, p.name)
            if p.default is not p.empty:
                assert mine.default == p.default, (name, p.name)


def test_flash_cross_attention_takes_flash_attns_positional_order():
    torch = pytest.importorskip("torch")
    from llmfast.nn import FlashCrossAttention, FlashSelfAttention

    slopes = torch.tensor([0.5, 0.25])
    cross = FlashCrossAttention(True, 0.5, 0.0, slopes, (3, 0), True)  # flash-attn: ..., alibi_slopes, window_size
    assert torch.equal(cross.alibi_slopes, slopes) and cross.window_size == (3, 0) and cross.deterministic
    self_attn = FlashSelfAttention(True, 0.5, 0.0, (3, 0), slopes, True)  # flash-attn: ..., window_size, alibi
    assert torch.equal(self_attn.alibi_slopes, slopes) and self_attn.window_size == (3, 0)
