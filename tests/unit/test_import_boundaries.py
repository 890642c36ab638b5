"""Package boundaries (docs/architecture.md): builder and fleet use only the agent's protocol,
runtime and shared core; builder never imports fleet, and fleet imports builder only in the
demo (which builds the digits example); the fleet installs and runs without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SHARED_CORE = {"agent", "agent.errors", "agent.clikit", "agent.broker", "agent.htmlkit"}
AGENT_PUBLIC = ("agent.protocol", "agent.runtime")
FLEET_MAY_IMPORT_BUILDER = {"fleet/demo_artifacts.py"}


def _imports(package: str) -> dict[str, set[str]]:
    """Every module each file of ``package`` imports, lazily imported ones included."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(
                    f"{node.module}.{a.name}" for a in node.names if node.module == "agent"
                )
        out[str(path.relative_to(ROOT))] = names
    return out


def _agent_allowed(name: str) -> bool:
    if name == "agent.__version__" or name in SHARED_CORE:
        return True
    return any(name == p or name.startswith(p + ".") for p in AGENT_PUBLIC)


def test_builder_and_fleet_use_only_the_agents_protocol_runtime_and_shared_core() -> None:
    bad = [
        f"{f}: {n}"
        for pkg in ("builder", "fleet")
        for f, names in _imports(pkg).items()
        for n in names
        if n.split(".")[0] == "agent" and not _agent_allowed(n)
    ]
    assert not bad, bad


def test_builder_never_imports_fleet_and_fleet_only_its_demo_imports_builder() -> None:
    builder = [
        f
        for f, names in _imports("builder").items()
        if any(n.split(".")[0] == "fleet" for n in names)
    ]
    fleet = {
        f
        for f, names in _imports("fleet").items()
        if any(n.split(".")[0] == "builder" for n in names)
    }
    assert builder == [] and fleet <= FLEET_MAY_IMPORT_BUILDER, (builder, fleet)


def test_the_agent_imports_neither_builder_nor_fleet() -> None:
    bad = [
        f
        for f, names in _imports("agent").items()
        if any(n.split(".")[0] in ("builder", "fleet") for n in names)
    ]
    assert not bad, bad


BLOCKER = """
import importlib.abc, sys
BLOCKED = {"torch", "onnx", "onnxscript", "onnxslim", "torch_pruning", "sklearn", "litert_torch", "builder"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked on a collector host: {name}")
        return None
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_fleet_modules_import_without_torch_or_the_builder() -> None:
    code = (
        "import pkgutil, importlib, fleet\n"
        "mods = [m.name for m in pkgutil.walk_packages(fleet.__path__, 'fleet.')]\n"
        "[importlib.import_module(m) for m in mods]\n"
        "assert not any(k.split('.')[0] in BLOCKED for k in sys.modules), sorted(sys.modules)\n"
        "print(len(mods))\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 15


def test_edgefleet_lists_the_fleet_commands_without_the_builder() -> None:
    proc = _run("from agent.clikit import main; sys.exit(main(['--help']))")
    assert proc.returncode == 0, proc.stderr
    for cmd in ("collect", "deploy", "device", "fleet", "publish", "demo"):
        assert f"\n  {cmd} " in proc.stdout, proc.stdout
    assert "\n  build " not in proc.stdout
    note = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(note) == 1 and "pip install 'edgefleet[builder]'" in note[0], proc.stderr


def test_fleet_extra_declares_what_the_fleet_imports() -> None:
    text = (Path(ROOT) / "pyproject.toml").read_text()
    fleet = text[text.index("\nfleet = [") :]
    fleet = fleet[: fleet.index("]")]
    assert "paho-mqtt" in fleet and "rich" in fleet and "torch" not in fleet
