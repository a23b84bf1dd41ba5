"""The packages depend on each other one way; this test keeps it so.

Layers, lowest first (a module may import its own layer and the ones below):

  0 foundation   errors, protocol (the wire keys), config (the run config); flwr_adapter/
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

docs/architecture.md draws the same picture and says where each behaviour lives.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = {"server.launcher", "clients.launcher", "processes"}


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
    if top in ("errors", "protocol", "config", "__init__", "flwr_adapter"):
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
        for target in sorted(resolve(n, known) for n in imports(path)):
            if not target or target == module:
                continue
            t_level, t_group = layer(target)
            if t_level > level:
                problems.append(f"{module} (layer {level}) imports {target} (layer {t_level})")
            elif t_level == level and {group, t_group} in (
                {"server", "clients"},
                {"simulation", "deployment"},
            ):
                problems.append(f"{module} ({group}) imports {target} ({t_group})")
    assert problems == [], "\n".join(problems)


def test_every_module_has_a_layer() -> None:
    for module in modules():
        layer(module)
