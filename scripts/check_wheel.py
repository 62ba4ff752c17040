"""Check a built wheel: it holds the compiled tokenizer extension and the package, and no tests or benchmarks.

    python scripts/check_wheel.py dist/llmfast-*.whl      (run by .ci/run's wheel step)
"""
from __future__ import annotations

import sys
import zipfile


def check(path: str) -> list[str]:
    names = zipfile.ZipFile(path).namelist()
    problems = []
    if not any(n.startswith("llmfast/_C.") and n.endswith((".so", ".pyd")) for n in names):
        problems.append("no compiled extension llmfast/_C.*.so")
    for required in ("llmfast/__init__.py", "llmfast/tokenizer/__init__.py", "llmfast/ops/__init__.py"):
        if required not in names:
            problems.append(f"missing {required}")
    stray = [n for n in names if n.split("/", 1)[0] in ("tests", "benchmarks", "csrc", "scripts")
             or "/tests/" in n or n.rsplit("/", 1)[-1].startswith("test_")]
    if stray:
        problems.append(f"files that are not the package: {stray[:10]}")
    return problems


def main(argv: list[str]) -> int:
    status = 0
    for path in argv:
        problems = check(path)
        if problems:
            status = 1
            print(f"{path}: " + "; ".join(problems), file=sys.stderr)
        else:
            n = len(zipfile.ZipFile(path).namelist())
            print(f"{path}: {n} files, the compiled extension, no tests")
    return status if argv else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
