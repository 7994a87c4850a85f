"""House rules that keep the dependency direction one-way and the library safe."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"pipelines", "train", "eval"}


def _imports(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0], node


def test_medvlm_never_imports_pipelines_train_or_eval_except_lazily_in_cli():
    offenders = []
    for path in (ROOT / "medvlm").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = {id(node) for node in tree.body}
        for module, node in _imports(tree):
            if module in FORBIDDEN and (path.name != "cli.py" or id(node) in top_level):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_library_code_has_no_print_calls():
    offenders = []
    for package in ("medvlm", "pipelines"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "cli.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_no_unsafe_deserialisation():
    offenders = []
    for package in ("medvlm", "pipelines", "train", "eval"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for needle in ("pickle.load", "trust_remote_code=True", "yaml.load("):
                if needle in text:
                    offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert offenders == []
