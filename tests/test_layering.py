"""The package's dependencies point one way: serving -> models -> generic layers -> contract.

A generic module that imports a model family, or any module below the server that imports
``oncofusion.serving``, is a layering error caught here (imports are read from the source, so an import
inside a function counts too). ``oncofusion/cli.py`` is an entry point beside the MONAI Label app: it
answers ``predict`` through the server's own infer task, so that the command line and HTTP agree.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "oncofusion"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _modules(where: str = "") -> list[Path]:
    return sorted((PACKAGE / where).rglob("*.py"))


def _relative(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


@pytest.mark.parametrize("path", [p for p in _modules() if "serving" not in p.parts and p.name != "cli.py"],
                         ids=_relative)
def test_nothing_below_the_server_imports_serving(path):
    assert not {m for m in _imports(path) if m.startswith("oncofusion.serving")}


@pytest.mark.parametrize("path", [p for p in _modules() if not {"serving", "models"} & set(p.parts)
                                  and p.name != "cli.py"], ids=_relative)
def test_generic_modules_import_no_model_family(path):
    assert not {m for m in _imports(path) if m.startswith("oncofusion.models")}


def test_the_contract_imports_nothing_of_the_package():
    assert not {m for m in _imports(PACKAGE / "contract.py") if m.startswith("oncofusion")}


def test_model_families_do_not_import_each_other():
    families = [p for p in (PACKAGE / "models").iterdir() if p.is_dir() and p.name != "__pycache__"]
    assert len(families) >= 2
    for family in families:
        for path in family.rglob("*.py"):
            others = {m for m in _imports(path) if m.startswith("oncofusion.models.")
                      and m.split(".")[2] != family.name}
            assert not others, (_relative(path), others)
