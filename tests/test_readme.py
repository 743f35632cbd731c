"""The README's promises that a file can check: the two-command quick start, CI running
the same test command, and code blocks that are valid Python naming real objects."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lambda_pool

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_quick_start_is_exactly_two_commands_demo_then_tests() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", quick_start, flags=re.DOTALL)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*make test\b", script, flags=re.MULTILINE)


def test_every_python_block_parses_and_imports_only_what_lambda_pool_exports() -> None:
    blocks = _blocks("python")
    assert len(blocks) >= 5
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "lambda_pool":
                for alias in node.names:
                    assert hasattr(lambda_pool, alias.name), alias.name
