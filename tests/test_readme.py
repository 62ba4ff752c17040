"""The README's recipes run as written on a CPU-only machine: every code block under "## Recipes" is extracted and
run in a fresh directory (python blocks as scripts, bash blocks line by line), so the README stays true."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def recipe_blocks() -> list[tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Recipes")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else len(text)]
    return re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.S)


def test_recipes_section_has_the_three_recipes():
    kinds = [kind for kind, _ in recipe_blocks()]
    assert kinds == ["python", "python", "bash"], kinds


@pytest.mark.parametrize("index", range(3), ids=["drop_in_model", "tokenize_dataset", "cli"])
def test_recipe_runs(index, tmp_path):
    kind, code = recipe_blocks()[index]
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: the auto backend
    if kind == "python":
        script = tmp_path / "recipe.py"
        script.write_text(code)
        result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        return
    shutil.copy(README, tmp_path / "README.md")
    for line in code.splitlines():
        command = line.split("  #", 1)[0].strip()
        if not command:
            continue
        command = re.sub(r"^python ", f"{sys.executable} ", command)
        result = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        if " generate " in command:
            assert result.stdout.startswith("The ")
        if " eval " in command:
            assert "ppl" in result.stdout.lower() or "perplexity" in result.stdout.lower(), result.stdout
