"""The agent must import and show --help on a device that has no torch or onnx."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

BLOCKER = """
import importlib.abc, sys
BLOCKED = {"torch", "onnx", "onnxscript", "onnxslim", "torch_pruning", "sklearn", "rich", "builder"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked on a device: {name}")
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


def test_blocker_really_blocks() -> None:
    proc = _run("import torch")
    assert proc.returncode != 0 and "blocked on a device: torch" in proc.stderr


def test_agent_modules_import_without_torch_or_onnx() -> None:
    code = (
        "import pkgutil, importlib, agent\n"
        "mods = [m.name for m in pkgutil.walk_packages(agent.__path__, 'agent.')]\n"
        "[importlib.import_module(m) for m in mods]\n"
        "assert not any(k.split('.')[0] in BLOCKED for k in sys.modules), sorted(sys.modules)\n"
        "print(len(mods))\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 10


def test_agent_cli_help_runs_without_torch_or_onnx() -> None:
    proc = _run(
        "from agent.cli import main; sys.argv = ['edgefleet-agent', '--help']; sys.exit(main())"
    )
    assert proc.returncode == 0, proc.stderr
    assert "edgefleet device agent" in proc.stdout
