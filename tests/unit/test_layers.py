"""The layers that import-linter cannot see: service.py and bento.py are modules, not packages.
The BentoML side calls the library only, never the Prefect tasks or flows."""

from __future__ import annotations

import ast
import subprocess
import sys

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


@pytest.mark.parametrize(
    "module",
    [
        "captioning.inference.predict",
        "captioning.registry.locate",
        "captioning.registry.versions",
        "captioning.registry.pyfunc",
        "service",
    ],
)
def test_serving_side_does_not_import_mlflow(module):
    """The container image has no MLflow: the service and the prediction path import it only to
    reach a registry."""
    code = f"import sys, {module}; assert not [m for m in sys.modules if m.split('.')[0] == 'mlflow']"
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, timeout=120)


def test_service_locates_a_folder_without_mlflow(tmp_path):
    """A package folder is located (and a missing one refused) with MLflow not installed."""
    code = (
        "import sys; sys.modules['mlflow'] = None\n"
        "import service\n"
        "from captioning.registry.store import RegistryError\n"
        "from captioning.serving.model_source import locate\n"
        "try:\n"
        f"    locate({str(tmp_path / 'absent')!r}, None)\n"
        "except RegistryError as error:\n"
        "    assert 'no such model package folder' in str(error)\n"
        "else:\n"
        "    raise AssertionError('a missing folder was located')\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, timeout=120)


def test_no_function_in_the_library_is_longer_than_a_screen_or_two():
    """Functions in captioning/ stay under 80 lines; service.py stays its routes (under 400 lines)."""
    import ast

    long = []
    for path in sorted((PROJECT_ROOT / "captioning").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {node.name}")
    assert not long, long
    assert len((PROJECT_ROOT / "service.py").read_text(encoding="utf-8").splitlines()) < 400
