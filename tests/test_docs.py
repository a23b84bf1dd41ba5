"""Every command shown in the docs is checked by a test: README.md and docs/*.md.

A command is a line of a ```sh, ```bash, ```shell or ```console block (in a console
block, a line after `$ `); every fenced block must name its language, so none hides
a command. Each command is of a kind this file knows how to check, or the test fails:

- `fedsilo ...`: parsed by the real parser (`fedsilo.cli.build_parser`), so a
  misspelt subcommand or a flag that no longer exists fails. Then, by subcommand:
  - `--help`, `provision` (all its actions), `data split` and `audit` run for real,
    in order, in a temporary directory per page, as `fedsilo.cli.main` (what the
    console script calls); an audit's ledgers are made here when the page's earlier
    commands (a simulation) would have made them;
  - `simulate`, `server start` and `client start` take minutes, so each must be in
    COVERED: the test that runs it, whose code (with the helpers and fixtures it
    calls) passes the same subcommand, every flag the page shows and every value
    that is not a path, address or number. `simulate` commands also build and
    validate their run config, as the command would before it runs.
- `make TARGET... [VAR=VALUE]`: dry-run (`make -n`), each VAR read by the Makefile;
  a `fedsilo` command the target runs is checked as above (`make demo`).
- `python -m bench.NAME ARGS`: parsed by the benchmark's own argparse parser, not run.
- `python -m pytest ARGS`: every path (and `::test`) exists.
- `python -m breast_cancer.make_sites ...`: run for real, in the page's directory.
- `pip install -e PATH[EXTRAS]`: PATH is a project and has those extras.
- `ray start ...`: parsed by Ray's own command-line parser.

Beyond commands: an inline `fedsilo ...` span in the prose names a real subcommand and
real flags; every test the docs name (`test_...`) exists, and so does every repository
path they name; every relative link resolves, anchors included; README.md stays a
user's page (at most 180 lines).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
SHELL = {"sh", "bash", "shell", "console"}
README_MAX_LINES = 180

# A command that takes minutes -> the test that runs it (file::function). Keys are the
# command as the page shows it, program normalised (`.venv/bin/fedsilo` -> `fedsilo`),
# without a trailing `&`.
E2E = "tests/e2e"
COVERED = {
    "fedsilo simulate": (
        f"{E2E}/test_simulate.py::test_a_killed_simulation_resumes_and_its_ledgers_audit"
    ),
    "fedsilo simulate --sites 2 --rounds 2 --site-max-epsilon 8,2 --out runs/budgets": (
        f"{E2E}/test_ledger_audit.py::test_refusing_site_then_audit"
    ),
    "fedsilo simulate --dp distributed --rounds 40 --batch-size 300 --lr 2": (
        f"{E2E}/test_simulate.py::test_distributed_dp_simulation_records_both_epsilons"
    ),
    "fedsilo simulate --task breast_cancer.task:task --sites 3 --rounds 5 --target-epsilon 3": (
        f"{E2E}/test_breast_cancer.py::test_simulation_reaches_the_accuracy_target_at_epsilon_3"
    ),
    "fedsilo simulate --sites 5 --hostile-sites 1:sign-flip:10 --aggregation krum:1": (
        f"{E2E}/test_simulate.py::"
        "test_krum_keeps_the_model_that_one_sign_flipping_site_steers_under_fedavg"
    ),
    "fedsilo simulate --ray-address HEAD:6379 --sites 32 --out /shared/runs/x": (
        "tests/simulations/test_ray_cluster.py::"
        "test_sites_run_on_both_nodes_and_compute_what_a_local_run_does"
    ),
    **dict.fromkeys(
        (
            "fedsilo server start --kit fed/server --rounds 2 --eval-data data/server-eval.npz",
            "fedsilo server start --kit fed/server --rounds 3 --eval-data eval.npz --out runs/exp1",
            "fedsilo client start --kit fed/sites/site-a --data data/site-1.npz",
            "fedsilo client start --kit fed/sites/site-b --data data/site-2.npz",
            "fedsilo client start --kit fed/sites/site-a --data /data/site-a.npz",
        ),
        f"{E2E}/test_deploy.py::test_three_sites_over_tls_then_one_is_lost",
    ),
    **dict.fromkeys(
        (
            "fedsilo server start --kit fed/server --rounds 20 --metrics-port 9400",
            "fedsilo client start --kit fed/sites/site-a --data data/site-1.npz "
            "--metrics-port 9401",
        ),
        f"{E2E}/test_deploy_faults.py::test_sites_killed_in_each_stage_of_a_distributed_round",
    ),
    "fedsilo simulate --rounds 5 --out runs/exp1 --metrics-port 9400": (
        f"{E2E}/test_simulate.py::test_a_killed_simulation_resumes_and_its_ledgers_audit"
    ),
    "fedsilo dashboard runs/exp1": (
        f"{E2E}/test_dashboard.py::test_the_dashboard_of_a_3_site_run_in_chromium"
    ),
    "fedsilo export runs/exp1 --tensorboard tb/exp1": (
        "tests/server/test_trackers.py::test_tensorboard_reads_back_every_round"
    ),
    "fedsilo export runs/exp1 --mlflow file:./mlruns": (
        "tests/server/test_trackers.py::test_mlflow_reads_back_the_params_and_metrics"
    ),
    "fedsilo server start --kit fed/server --resume runs/exp1": (
        f"{E2E}/test_deploy.py::test_a_killed_server_resumes_and_the_sites_ledgers_audit"
    ),
    "fedsilo server start --kit fed/server --dp distributed --min-sites 8 --rounds 440 "
    "--dp-max-sample-rate 0.15": (
        f"{E2E}/test_deploy.py::test_live_sites_keep_serving_across_a_server_restart"
    ),
    **dict.fromkeys(
        (
            "fedsilo server start --kit fed/server --task breast_cancer.task:task "
            "--eval-data data/eval.csv",
            "fedsilo client start --kit fed/sites/site-a --task breast_cancer.task:task "
            "--data data/site-1.csv",
            "fedsilo client start --kit fed/sites/site-b --task breast_cancer.task:task "
            "--data data/site-2.csv",
        ),
        f"{E2E}/test_breast_cancer.py::test_deployed_sites_train_the_task_on_their_own_csv_files",
    ),
}
# Flower's own CLI (`flwr ...`) and the variables a page exports for it -> the test that
# runs it: with every argument the page shows (RUN_ID aside), and every variable's name
# (and value, unless a path).
FLWR_TESTS = f"{E2E}/test_flwr_run.py"
FLWR_COVERED = {
    "flwr run . --stream --run-config rounds=2 target-epsilon=3 "
    "--federation-config num-supernodes=3": (
        f"{FLWR_TESTS}::test_flwr_run_dot_simulates_and_the_sites_ledgers_audit"
    ),
    "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1": (
        f"{FLWR_TESTS}::test_flwr_run_dot_simulates_and_the_sites_ledgers_audit"
    ),
    **dict.fromkeys(
        (
            "export FLWR_HOME=runs/exp1/flwr-home",
            "flwr ls",
            "flwr log RUN_ID --stream",
            "flwr stop RUN_ID",
        ),
        f"{FLWR_TESTS}::test_flower_operator_commands_on_a_deployed_federation",
    ),
}
EXPENSIVE = {("simulate",), ("server", "start"), ("client", "start"), ("export",)}
EXPENSIVE |= {("dashboard",)}  # serves until stopped
RUN_HERE = {("provision",), ("provision", "add-site"), ("provision", "renew-server")}
RUN_HERE |= {("provision", "certify-site"), ("data", "split"), ("audit",)}
# Flags whose value is a path, host or address: a test uses its own.
PLACE_FLAGS = {"--kit", "--data", "--out", "--eval-data", "--resume", "--config", "--plot"}
PLACE_FLAGS |= {"--ledger"}
PLACE_FLAGS |= {"--data-dir", "--server-host", "--server", "--listen", "--ray-address"}
RUN_MODULES = {"breast_cancer.make_sites"}  # `python -m` modules cheap enough to run
PROGRAMS = {"fedsilo": "fedsilo", "python": "python", "python3": "python", "pip": "pip"}


@dataclass(frozen=True)
class Command:
    doc: Path
    line: int
    argv: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.argv)

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence
    lang: str
    lines: tuple[str, ...]


@cache
def blocks(doc: Path) -> tuple[Block, ...]:
    out, lang, start, body = [], None, 0, []
    for n, raw in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        if raw.startswith("```"):
            if lang is None:
                lang, start, body = raw[3:].strip(), n, []
            else:
                out.append(Block(start, lang, tuple(body)))
                lang = None
        elif lang is not None:
            body.append(raw)
    assert lang is None, f"{doc.name}: the block opened at line {start} is never closed"
    return tuple(out)


def prose(doc: Path) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^```.*?^```[^\n]*$", "", doc.read_text(encoding="utf-8"), flags=re.S | re.M)


def normalise(tokens: list[str]) -> tuple[str, ...]:
    """Program names without their venv path; no trailing `&`, no redirections."""
    out: list[str] = []
    skip = False
    for tok in tokens:
        if skip:
            skip = False
        elif tok in (">", ">>", "2>", "<"):
            skip = True
        elif tok not in ("&", "2>&1"):
            out.append(tok)
    if out:
        out[0] = PROGRAMS.get(out[0].removeprefix(".venv/bin/"), out[0])
    return tuple(out)


@cache
def commands(doc: Path) -> tuple[Command, ...]:
    found = []
    for block in blocks(doc):
        if block.lang not in SHELL:
            continue
        pending, first = "", 0
        for n, raw in enumerate(block.lines, block.line + 1):
            line = raw
            if block.lang == "console":
                if not (line.startswith("$ ") or pending):
                    continue  # output
                line = line.removeprefix("$ ")
            first = first or n
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            tokens = shlex.split(pending + line, comments=True)
            pending, start, first = "", first, 0
            if tokens:
                found.append(Command(doc, start, normalise(tokens)))
    return tuple(found)


ALL = [c for doc in DOCS for c in commands(doc)]


def of(program: str, *prefix: str) -> list[Command]:
    return [c for c in ALL if c.argv[0] == program and c.argv[1 : 1 + len(prefix)] == prefix]


FEDSILO = of("fedsilo")
MAKE = of("make")
BENCH = [c for c in of("python", "-m") if c.argv[2].startswith("bench.")]
PYTEST = of("python", "-m", "pytest")
MODULES = [c for c in of("python", "-m") if c.argv[2] in RUN_MODULES]
PIP = of("pip", "install", "-e")
RAY = of("ray", "start")
FLWR = [*of("flwr"), *of("export")]


def ids(cmds: list[Command]) -> list[str]:
    return [c.where for c in cmds]


PAGES = [str(d.relative_to(ROOT)) for d in DOCS]


def test_every_command_is_of_a_kind_this_file_checks() -> None:
    known = {*FEDSILO, *MAKE, *BENCH, *PYTEST, *MODULES, *PIP, *RAY, *FLWR}
    unknown = [str(c) for c in ALL if c not in known]
    assert not unknown, f"commands in the docs that no test checks (add a checker): {unknown}"
    assert len(ALL) >= 30, "the docs' commands were not found"  # the extractor works


def test_every_fenced_block_names_its_language() -> None:
    bare = [f"{d.name}:{b.line}" for d in DOCS for b in blocks(d) if not b.lang]
    assert not bare, f"fenced blocks without a language (sh, text, toml, ...): {bare}"


def test_readme_is_a_users_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move some to docs/"


# ----------------------------------------------------------------- fedsilo commands


@cache
def parser() -> argparse.ArgumentParser:
    from fedsilo.cli import build_parser

    root = build_parser()
    todo = [root]
    while todo:  # the docs spell flags out: an abbreviation must not pass for one
        p = todo.pop()
        p.allow_abbrev = False
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return root


def subcommand(args: tuple[str, ...]) -> tuple[tuple[str, ...], argparse.ArgumentParser]:
    """The subcommand path `args` names (("server", "start")) and its parser."""
    path: list[str] = []
    p = parser()
    for tok in args:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or tok.startswith("-"):
            if not subs:
                break
            continue
        if tok not in subs[0].choices:
            break
        path.append(tok)
        p = subs[0].choices[tok]
    return tuple(path), p


def flags_and_values(args: tuple[str, ...]) -> tuple[list[str], list[tuple[str, str]]]:
    """The flags `args` gives, and (flag, value) for each flag that takes one."""
    path, p = subcommand(args)
    options = dict(p._option_string_actions)
    if path[:1] == ("provision",):  # provision's own flags come before its action
        options = subcommand(("provision",))[1]._option_string_actions | options
    flags, values = [], []
    for i, tok in enumerate(args):
        if tok.startswith("--"):
            flags.append(tok)
            if options[tok].nargs != 0 and i + 1 < len(args):
                values.append((tok, args[i + 1]))
    return flags, values


@pytest.mark.parametrize("cmd", FEDSILO, ids=ids(FEDSILO))
def test_fedsilo_command_parses(cmd: Command, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        parser().parse_args(cmd.argv[1:])
    except SystemExit as exc:
        err = capsys.readouterr().err
        assert exc.code == 0, f"{cmd}\n  does not parse: {err.strip()}"
    path, _ = subcommand(cmd.argv[1:])
    helps = "--help" in cmd.argv or "-h" in cmd.argv
    assert helps or path in EXPENSIVE | RUN_HERE, f"{cmd}: classify `fedsilo {' '.join(path)}`"


@cache
def module_info(path: Path) -> tuple[dict[str, ast.AST], dict[str, Path]]:
    """A test module's top-level definitions by name, and names it imports from tests.*."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defs: dict[str, ast.AST] = {}
    imported: dict[str, Path] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            defs[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    defs[target.id] = node
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests."):
            source = ROOT / (node.module or "").replace(".", "/")
            for alias in node.names:
                imported[alias.asname or alias.name] = source.with_suffix(".py")
    return defs, imported


def strings_run_by(node_id: str) -> set[str]:
    """Every string constant in a test function and in what it reaches: the module's
    functions, constants and fixtures it names, and helpers imported from tests.*."""
    file, name = node_id.split("::")
    out: set[str] = set()
    seen: set[tuple[Path, str]] = set()
    todo = [(ROOT / file, name)]
    while todo:
        path, name = todo.pop()
        if (path, name) in seen or not path.is_file():
            continue
        seen.add((path, name))
        defs, imported = module_info(path)
        if name not in defs:
            continue
        for node in ast.walk(defs[name]):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(node.value)
            elif isinstance(node, ast.Name | ast.arg):
                ref = node.id if isinstance(node, ast.Name) else node.arg
                if ref in imported:
                    todo.append((imported[ref], ref))
                elif ref in defs:
                    todo.append((path, ref))
    return out


def is_number(text: str) -> bool:
    return all(re.fullmatch(r"[-+]?[0-9.e-]+", part) for part in text.split(","))


EXPENSIVE_CMDS = [c for c in FEDSILO if subcommand(c.argv[1:])[0] in EXPENSIVE]
EXPENSIVE_CMDS = [c for c in EXPENSIVE_CMDS if "--help" not in c.argv]


def covering_test(cmd: Command) -> str:
    assert cmd.text in COVERED, (
        f"{cmd}\n  takes too long to run here: add it to COVERED in tests/test_docs.py "
        "with the test that runs it (or show a command a test runs)"
    )
    return COVERED[cmd.text]


def check_covered(cmd: Command) -> None:
    node_id = covering_test(cmd)
    file, name = node_id.split("::")
    defs, _ = module_info(ROOT / file)
    assert name in defs and name.startswith("test_"), f"{cmd}: {node_id} does not exist"
    strings = strings_run_by(node_id)
    path, _ = subcommand(cmd.argv[1:])
    flags, values = flags_and_values(cmd.argv[1:])
    needed = [*path, *flags]
    needed += [v for flag, v in values if flag not in PLACE_FLAGS and not is_number(v)]
    missing = [n for n in needed if n not in strings]
    assert not missing, f"{cmd}\n  {node_id} never passes {missing}"


@pytest.mark.parametrize("cmd", EXPENSIVE_CMDS, ids=ids(EXPENSIVE_CMDS))
def test_long_commands_are_run_by_a_named_test(cmd: Command, tmp_path: Path) -> None:
    check_covered(cmd)
    if subcommand(cmd.argv[1:])[0] == ("simulate",):
        # The run config, built and validated as the command would before it runs.
        from fedsilo.simulations.command import config_from_args

        args = parser().parse_args(cmd.argv[1:])
        args.out = str(tmp_path / "run")
        config_from_args(args)


@pytest.mark.parametrize("cmd", FLWR, ids=ids(FLWR))
def test_flower_commands_are_run_by_a_named_test(cmd: Command) -> None:
    assert cmd.text in FLWR_COVERED, f"{cmd}\n  add it to FLWR_COVERED with the test that runs it"
    node_id = FLWR_COVERED[cmd.text]
    file, name = node_id.split("::")
    assert name in module_info(ROOT / file)[0], f"{cmd}: {node_id} does not exist"
    strings = strings_run_by(node_id)
    if cmd.argv[0] == "export":
        var, _, value = cmd.argv[1].partition("=")
        needed = [var] if "/" in value else [var, value]
    else:
        needed = [a for a in cmd.argv[1:] if a != "RUN_ID"]
    missing = [n for n in needed if n not in strings]
    assert not missing, f"{cmd}\n  {node_id} never passes {missing}"


def test_covered_has_no_stale_entries() -> None:
    shown = {c.text for c in EXPENSIVE_CMDS} | {"fedsilo simulate"}  # `make demo`'s
    stale = sorted(set(COVERED) - shown) + sorted(set(FLWR_COVERED) - {c.text for c in FLWR})
    assert not stale, f"COVERED names commands no page shows: {stale}"


# ----------------------------------------------------------------- cheap commands, run


def make_ledgers(paths: list[str], where: Path) -> None:
    """Ledgers at the paths an audit names that the page's earlier commands (a run that
    takes minutes) would have made: a file, or a run directory's ledgers/."""
    from tests.privacy.test_audit import make

    for raw in paths:
        path = where / raw
        if path.exists():
            continue
        if path.suffix == ".jsonl":
            path.parent.mkdir(parents=True, exist_ok=True)
            make(path, budget=100.0, rounds=2, site=path.parent.name)
        else:
            (path / "ledgers").mkdir(parents=True)
            for site in ("site-0", "site-1"):
                make(path / "ledgers" / f"{site}.jsonl", budget=100.0, rounds=2, site=site)


def run_here(cmd: Command, where: Path) -> None:
    from fedsilo.cli import main

    args = cmd.argv[1:]
    if subcommand(args)[0] == ("audit",):
        _, values = flags_and_values(args)
        plotted = {v for f, v in values if f == "--plot"}
        make_ledgers([a for a in args[1:] if not a.startswith("-") and a not in plotted], where)
    try:
        code = main(list(args))
    except SystemExit as exc:  # --help
        code = exc.code
    assert code == 0, f"{cmd}\n  exited {code}"


@pytest.mark.parametrize("doc", DOCS, ids=PAGES)
def test_cheap_commands_run_in_order(
    doc: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")  # main() sets it: restored after
    for cmd in commands(doc):
        if cmd in FEDSILO and ("--help" in cmd.argv or subcommand(cmd.argv[1:])[0] in RUN_HERE):
            run_here(cmd, tmp_path)
        elif cmd in MODULES:
            importlib.import_module(cmd.argv[2]).main(list(cmd.argv[3:]))
        capsys.readouterr()


# ----------------------------------------------------------------- other tools


@pytest.mark.parametrize("cmd", MAKE, ids=ids(MAKE))
def test_make_targets_exist(cmd: Command) -> None:
    targets = [a for a in cmd.argv[1:] if "=" not in a]
    variables = [a.split("=", 1)[0] for a in cmd.argv[1:] if "=" in a]
    res = subprocess.run(
        ["make", "-n", "-C", str(ROOT), *cmd.argv[1:]], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, f"{cmd}\n  {res.stderr.strip()}"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for var in variables:
        assert f"$({var})" in makefile, f"{cmd}: the Makefile never reads {var}"
    assert targets and all(re.search(rf"^{t}:", makefile, re.M) for t in targets), cmd
    for line in res.stdout.splitlines():  # a fedsilo command the target runs
        if not line.split()[:1] or not line.split()[0].endswith("/fedsilo"):
            continue
        tokens = normalise(shlex.split(line))
        if tokens[:1] == ("fedsilo",):
            check_covered(Command(cmd.doc, cmd.line, tokens))


class Parsed(Exception):
    """Raised in place of running a benchmark, once its flags parsed."""


@pytest.mark.parametrize("cmd", BENCH, ids=ids(BENCH))
def test_bench_flags_parse(cmd: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module(cmd.argv[2])
    argv = list(cmd.argv[3:])
    real = argparse.ArgumentParser.parse_args

    def parse_only(self: argparse.ArgumentParser, *_: object, **__: object) -> None:
        self.allow_abbrev = False  # the docs spell flags out
        raise Parsed(real(self, argv))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", [cmd.argv[2], *argv])
    takes_argv = bool(inspect.signature(module.main).parameters)
    with pytest.raises(Parsed):
        module.main(argv) if takes_argv else module.main()


@pytest.mark.parametrize("cmd", PYTEST, ids=ids(PYTEST))
def test_pytest_paths_exist(cmd: Command) -> None:
    args = list(cmd.argv[3:])
    paths = [
        a for i, a in enumerate(args) if not a.startswith("-") and args[i - 1] not in ("-m", "-k")
    ]
    assert paths, cmd
    for arg in paths:
        file, _, name = arg.partition("::")
        assert (ROOT / file).exists(), f"{cmd}: {file} does not exist"
        if name:
            assert name in module_info(ROOT / file)[0], f"{cmd}: {arg} does not exist"


@pytest.mark.parametrize("cmd", PIP, ids=ids(PIP))
def test_pip_installs_a_project(cmd: Command) -> None:
    target = cmd.argv[3]
    path, _, extras = target.partition("[")
    project = tomllib.loads((ROOT / path / "pyproject.toml").read_text(encoding="utf-8"))
    optional = project["project"].get("optional-dependencies", {})
    for extra in filter(None, extras.rstrip("]").split(",")):
        assert extra in optional, f"{cmd}: no extra {extra!r}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own, on import
@pytest.mark.parametrize("cmd", RAY, ids=ids(RAY))
def test_ray_start_flags_parse(cmd: Command) -> None:
    from ray.scripts.scripts import start

    start.make_context("start", list(cmd.argv[2:]))  # click parses; nothing starts


# ----------------------------------------------------------------- prose


def inline_fedsilo(doc: Path) -> Iterator[tuple[str, tuple[str, ...]]]:
    for span in re.findall(r"`([^`]+)`", prose(doc)):
        words = tuple(span.split())
        if words and normalise(list(words))[0] == "fedsilo" and len(words) > 1:
            yield span, words[1:]


@pytest.mark.parametrize("doc", DOCS, ids=PAGES)
def test_inline_fedsilo_mentions_use_real_subcommands_and_flags(doc: Path) -> None:
    problems = []
    for span, words in inline_fedsilo(doc):
        path, p = subcommand(words)
        if not path:
            problems.append(f"`{span}`: no such subcommand")
            continue
        options = set(p._option_string_actions)
        if path[:1] == ("provision",):
            options |= set(subcommand(("provision",))[1]._option_string_actions)
        unknown = [w for w in words if w.startswith("--") and w.split("=")[0] not in options]
        if unknown:
            problems.append(f"`{span}`: fedsilo {' '.join(path)} has no {unknown}")
    assert not problems, f"{doc.name}: {problems}"


@cache
def names_of_tests() -> set[str]:
    names = set()
    for path in (ROOT / "tests").rglob("*.py"):
        names.update(re.findall(r"^\s*def (test_\w+)", path.read_text(encoding="utf-8"), re.M))
    return names


REPO_PATH = re.compile(
    r"`((?:tests|bench|examples|docs|server|clients|privacy|simulations|task|flwr_adapter|\.ci)"
    r"/[\w./-]*)`"
)


@pytest.mark.parametrize("doc", DOCS, ids=PAGES)
def test_named_tests_and_paths_exist(doc: Path) -> None:
    text = prose(doc)
    missing = [n for n in re.findall(r"`(test_\w+)`", text) if n not in names_of_tests()]
    paths = [
        p for p in REPO_PATH.findall(text) if not re.search(r"[A-Z]{2,}", p)
    ]  # NAME: a placeholder
    missing += [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"{doc.name} names what does not exist: {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", prose(doc), re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=PAGES)
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(doc)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
            broken.append(target)
    assert not broken, f"{doc.name}: broken links {broken}"
