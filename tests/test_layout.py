"""House rules: the dependency direction is one-way and cycle-free, each package owns its commands, the presets
ship with the package, and the library is safe. No rule here has an exception list."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
# The packages in dependency order: each may import those before it, never those after it.
PACKAGE_ORDER = ("medvlm", "pipelines", "train", "eval")


def _imports(path: Path):
    """(imported module, line) for every import of a file, nested (lazy) imports included; relative imports
    resolved against the file's package."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module, node.lineno
            for alias in node.names:  # ``from medvlm import data`` imports the subpackage medvlm.data
                yield f"{module}.{alias.name}", node.lineno


def _sources(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_packages_import_only_those_before_them():
    offenders = []
    for rank, package in enumerate(PACKAGE_ORDER):
        later = set(PACKAGE_ORDER[rank + 1:])
        for path in _sources(package):
            for module, line in _imports(path):
                if module.split(".")[0] in later:
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert offenders == []


def _unit(module: str) -> str | None:
    """The unit of medvlm a module belongs to: ``medvlm.data.io`` -> ``data``, ``medvlm.config`` -> ``config``."""
    parts = module.split(".")
    if parts[0] != "medvlm" or len(parts) < 2:
        return None
    return parts[1]


def _known_units() -> set[str]:
    return {p.stem if p.is_file() else p.name for p in (ROOT / "medvlm").iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` (as a path that returns to its start), or ``[]``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_medvlm_units_have_no_import_cycle():
    """Between medvlm's modules and subpackages (vocabulary, config, text, data, models, ...) imports point one way,
    lazy imports inside functions included (a lazy import hides a cycle, it does not remove it)."""
    units = _known_units()
    graph: dict[str, set[str]] = {unit: set() for unit in units}
    where: dict[tuple[str, str], str] = {}
    for path in _sources("medvlm"):
        relative = path.relative_to(ROOT / "medvlm")
        source = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        if source == "__init__":
            continue
        for module, line in _imports(path):
            target = _unit(module)
            if target in units and target != source:
                graph[source].add(target)
                where.setdefault((source, target), f"{path.relative_to(ROOT)}:{line}")
    cycle = _cycle(graph)
    assert cycle == [], "import cycle " + " -> ".join(cycle) + ": " + ", ".join(
        where[(a, b)] for a, b in zip(cycle, cycle[1:]))


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_training_stages_share_helpers_through_train_common_only():
    offenders = []
    for path in sorted((ROOT / "train").glob("stage_*.py")):
        for module, line in _imports(path):
            if module.startswith("train.stage_"):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert offenders == []


def test_every_package_registers_its_commands_with_the_dispatcher():
    """The ``medvlm`` command is a dispatcher: the command providers are the entry points of pyproject.toml, one per
    package, and together they give every command."""
    from importlib.metadata import entry_points

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["medvlm.commands"]
    assert set(declared) == set(PACKAGE_ORDER)
    installed = {e.name: e.value for e in entry_points(group="medvlm.commands")}
    assert installed == declared, "reinstall medvlm (pip install -e .) after changing its entry points"
    from medvlm.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert set(commands) == {"data", "deid", "models", "contour", "generate", "augment", "classify", "draft", "train", "eval", "demo"}


def test_command_registration_loads_no_heavy_library():
    """``medvlm --help`` and every command's parser come up without torch, diffusers or transformers."""
    import subprocess

    code = ("import sys; from medvlm.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'monai') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("module", ["medvlm", "medvlm.cli"])
def test_python_dash_m_runs_the_same_command(module):
    """``python -m medvlm`` (and ``python -m medvlm.cli``) is the ``medvlm`` command: each command registered once."""
    import subprocess

    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "{data,deid,models," in result.stdout.replace(" ", "").replace("\n", "")


def test_presets_ship_as_package_data():
    from medvlm.config import PRESETS_DIR, preset_names, resolve_config_path

    assert PRESETS_DIR.parent == ROOT / "medvlm" and PRESETS_DIR.resolve() == (ROOT / "configs").resolve()
    assert {"demo", "tiny", "hnc_gpu"} <= set(preset_names())
    assert resolve_config_path("demo").read_bytes() == (ROOT / "configs" / "demo.yaml").read_bytes()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["medvlm"]
    assert "presets/*.yaml" in package_data and "presets/accelerate/*.yaml" in package_data


def test_library_code_has_no_print_calls():
    offenders = []
    for package in ("medvlm", "pipelines"):
        for path in _sources(package):
            if path.name == "cli.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_no_unsafe_deserialisation():
    offenders = []
    for package in PACKAGE_ORDER:
        for path in _sources(package):
            text = path.read_text()
            for needle in ("pickle.load", "trust_remote_code=True", "yaml.load("):
                if needle in text:
                    offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert offenders == []
