"""The packages depend on each other one way; this test keeps it so.

Layers, lowest first (a module may import its own layer and the ones below):

  0 foundation   errors, protocol (the wire keys), config (the run config), exporter
                 (serves a Prometheus collector); flwr_adapter/
                 (the only home of Flower internals, behind a version check: it imports
                 nothing of fedsilo but errors, so the ServerApp and the runners may use it)
  1 task         task/: models, data, DP-SGD training; no Flower
  2 privacy      privacy/: accounting, ledger, policy, audit, refusals, empirical audit;
                 privacy/pki.py and privacy/provision.py: the federation's keys and kits
  3 apps         server/ (ServerApp, strategy, evaluation, run directory) and clients/
                 (ClientApp, DP round, budget, site data and environment); server and
                 clients never import each other
  4 runners      simulations/ (virtual sites, the simulation runner) and deployment
                 (server/launcher.py, clients/launcher.py, processes.py); simulation and
                 deployment never import each other
  5 cli          cli.py, console.py, __main__.py, run_flags.py (the run flags and config
                 builder both commands use) and every `*command.py`

A module named in a string (`importlib.import_module("fedsilo.x")`, `python -m fedsilo.x`)
is an edge too; docstrings, written for the reader, are not.

docs/architecture.md draws the same picture and says where each behaviour lives.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = {"server.launcher", "clients.launcher", "processes"}
MODULE_NAME = re.compile(r"\bfedsilo((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def layer(module: str) -> tuple[int, str]:
    """(layer, group) of a fedsilo module given relative to the package."""
    top = module.split(".")[0]
    if module.endswith("command") or top in ("cli", "console", "__main__", "run_flags"):
        return 5, "cli"
    if module in DEPLOYMENT:
        return 4, "deployment"
    if top == "simulations":
        return 4, "simulation"
    if top in ("server", "clients"):
        return 3, top
    if top == "privacy":
        return 2, "privacy"
    if top == "task":
        return 1, "task"
    if top in ("errors", "protocol", "config", "__init__", "flwr_adapter", "exporter"):
        return 0, "foundation"
    raise AssertionError(f"{module} is in no layer: add it to tests/test_layers.py")


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "bench", "build", ".venv", "examples", "docs"):
            continue
        name = ".".join(rel.with_suffix("").parts)
        found[name.removesuffix(".__init__") if name != "__init__" else name] = path
    return found


def imports(path: Path) -> set[str]:
    """Every fedsilo module `path` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedsilo"):
            base = node.module.removeprefix("fedsilo").lstrip(".")
            names = [f"{base}.{a.name}" if base else a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [
                a.name.removeprefix("fedsilo.") for a in node.names if a.name.startswith("fedsilo.")
            ]
        out.update(n for n in names if n)
    return out


def named(path: Path) -> set[str]:
    """Every fedsilo module `path` names in a string that is not a docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body[0] if node.body else None
            if isinstance(body, ast.Expr) and isinstance(body.value, ast.Constant):
                docstrings.add(id(body.value))
    return {
        match.lstrip(".")
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in docstrings
        for match in MODULE_NAME.findall(node.value)
    }


def resolve(name: str, known: dict[str, Path]) -> str:
    """`privacy.ledger.LedgerError` -> `privacy.ledger`; `privacy.ledger` -> itself."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def test_dependencies_flow_one_way() -> None:
    known = modules()
    problems = []
    for module, path in sorted(known.items()):
        level, group = layer(module)
        edges = {(resolve(n, known), "imports") for n in imports(path)}
        # A logger's name ("fedsilo.client") names no module: it resolves to "".
        edges |= {(resolve(n, known), "names") for n in named(path)}
        for target, how in sorted(edges):
            if not target or target == module:
                continue
            t_level, t_group = layer(target)
            if t_level > level:
                problems.append(f"{module} (layer {level}) {how} {target} (layer {t_level})")
            elif t_level == level and {group, t_group} in (
                {"server", "clients"},
                {"simulation", "deployment"},
            ):
                problems.append(f"{module} ({group}) {how} {target} ({t_group})")
    assert problems == [], "\n".join(problems)


def test_a_module_named_in_a_string_is_an_edge(tmp_path: Path) -> None:
    """An upward name in a string is caught; a docstring that mentions one is not."""
    source = tmp_path / "low.py"
    source.write_text(
        '"""Read by fedsilo.server.server_app."""\n'
        'PRELOAD = ("torch", "fedsilo.clients.client_app")\n'
        'CMD = f"python -m fedsilo.simulations.runner {1}"\n'
        "def f():\n"
        '    """See fedsilo.cli."""\n'
        '    return "fedsilo.task.Task"\n',
        encoding="utf-8",
    )
    assert named(source) == {"clients.client_app", "simulations.runner", "task.Task"}


def test_every_module_has_a_layer() -> None:
    for module in modules():
        layer(module)
