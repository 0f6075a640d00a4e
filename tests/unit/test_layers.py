"""The layers that import-linter cannot see: service.py and bento.py are modules, not packages.
The BentoML side calls the library only, never the Prefect tasks or flows."""

from __future__ import annotations

import ast

import pytest

from captioning.config import PROJECT_ROOT


def imported(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", ["service.py", "bento.py"])
def test_service_side_imports_neither_tasks_nor_flows(module):
    found = imported(PROJECT_ROOT / module)
    assert "captioning" in found
    assert not found & {"tasks", "flows", "tests", "benchmarks"}, found
