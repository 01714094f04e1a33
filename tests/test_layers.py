"""Layering (DESIGN.md §3): only `pluribus.models` knows transformers/peft; `core` sits below stages and models.

Read from the source's AST, so an import inside a function counts as much as one at the top.
"""

import ast
from pathlib import Path

import pytest

import pluribus

SRC = Path(pluribus.__file__).parent  # src/pluribus
HF_LIBRARIES = ("transformers", "peft")


def imported_modules(source: str, package: str) -> set[str]:
    """Every module name that `source` (a module of `package`) imports, relative imports made absolute.

    `from a import b` yields both `a` and `a.b`, since `b` may be a submodule.
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] if node.level else [])
            module = ".".join(filter(None, [base, node.module]))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def module_imports(file: Path) -> set[str]:
    package = ".".join(file.relative_to(SRC.parent).parent.parts)
    return imported_modules(file.read_text(), package)


def is_under(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def sources(under: Path) -> list[Path]:
    return sorted(under.rglob("*.py"))


OUTSIDE_MODELS = [f for f in sources(SRC) if SRC / "models" not in f.parents]


def test_walker_resolves_relative_and_nested_imports():
    source = "import torch\nfrom ..models import load\nfrom . import grpo\ndef f():\n    from peft import PeftModel\n"
    names = imported_modules(source, "pluribus.core")
    assert {"torch", "pluribus.models.load", "pluribus.core.grpo", "peft"} <= names
    assert any(is_under(n, "peft") for n in names) and not any(is_under(n, "pluribus.stages") for n in names)


def test_models_is_where_the_hf_libraries_are_and_the_walk_sees_it():
    found = set().union(*(module_imports(f) for f in sources(SRC / "models")))
    assert all(any(is_under(n, lib) for n in found) for lib in HF_LIBRARIES)
    assert SRC / "teachers" / "pool.py" in OUTSIDE_MODELS


@pytest.mark.parametrize("file", OUTSIDE_MODELS, ids=lambda f: str(f.relative_to(SRC)))
def test_only_models_imports_transformers_or_peft(file):
    offending = sorted(n for n in module_imports(file) if any(is_under(n, lib) for lib in HF_LIBRARIES))
    assert not offending, f"{file.relative_to(SRC)} imports {offending}: go through pluribus.models"


@pytest.mark.parametrize("file", sources(SRC / "core"), ids=lambda f: f.name)
def test_core_imports_neither_stages_nor_models(file):
    above = ("pluribus.stages", "pluribus.models")
    offending = sorted(n for n in module_imports(file) if any(is_under(n, layer) for layer in above))
    assert not offending, f"core/{file.name} imports {offending}: core is pure tensor maths"
