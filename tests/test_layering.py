"""The import graph's rules, read from the source: the engine knows no workflow, the libraries no command line.

- ``ich_engine`` imports neither ``sam3d`` nor ``blip`` and names none of their settings (each workflow
  declares its own, e.g. which a resume may change).
- A library module (anything outside a ``cli`` package) never imports a ``cli`` module; ``blip`` imports
  none at all, and ``sam3d`` never imports ``blip`` (but for the benchmark, which also times blip's report path).
- One training orchestrator: only ``ich_engine.run`` builds a :class:`~ich_engine.trainer.Trainer`
  for a workflow (LM pre-training, a plain loop on the engine, is the one other user).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from blip.training import ReportTrainingConfig
from ich_engine.settings import TrainingConfig
from sam3d.training import SegmentationTrainingConfig
from tests.conftest import REPO

PACKAGES = ("ich_engine", "sam3d", "blip")


def _modules(package: str) -> dict[str, Path]:
    root = REPO / package
    return {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
        for path in sorted(root.rglob("*.py"))
    }


def _source(path: Path) -> str:
    return path.read_text(encoding="utf-8")  # CI may run without a UTF-8 locale


def _imports(module: str, path: Path) -> set[str]:
    """Every module ``module`` imports (relative imports resolved)."""
    tree = ast.parse(_source(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def _is_cli(module: str) -> bool:
    return ".cli." in f".{module}."


def test_the_engine_imports_no_workflow_and_names_none_of_their_settings():
    engine_settings = {f.name for f in dataclasses.fields(TrainingConfig)}
    workflow_settings = {
        f.name for cls in (SegmentationTrainingConfig, ReportTrainingConfig) for f in dataclasses.fields(cls)
    } - engine_settings
    for module, path in _modules("ich_engine").items():
        assert not {name for name in _imports(module, path) if name.split(".")[0] in ("sam3d", "blip")}, module
        strings = [n.value for n in ast.walk(ast.parse(_source(path))) if isinstance(n, ast.Constant)]
        # A setting named as a string ("cache_tokens"; one-word names such as "stage" are ordinary words) or a flag.
        named = {s for s in strings if isinstance(s, str) and "_" in s and s in workflow_settings}
        named |= {flag for s in strings if isinstance(s, str) for flag in re.findall(r"--(\w+)", s)} & workflow_settings
        assert not named, f"{module} names workflow settings {sorted(named)}"


def test_libraries_import_no_command_line_and_sam3d_no_blip():
    for package in PACKAGES:
        for module, path in _modules(package).items():
            imported = _imports(module, path)
            if not _is_cli(module):  # a library: no command line, not even the engine's console runner
                assert not {name for name in imported if _is_cli(name)}, f"{module} imports a cli module"
            if package == "blip":  # its commands use sam3d's library, never sam3d's commands
                assert not {name for name in imported if name.startswith(("sam3d.cli", "blip.cli"))}, module
            if package == "sam3d" and module != "sam3d.cli.bench":  # bench --report_model times blip's path too
                assert not {name for name in imported if name.split(".")[0] == "blip"}, module


def test_one_training_orchestrator():
    builders = set()
    for package in PACKAGES:
        for module, path in _modules(package).items():
            calls = [n for n in ast.walk(ast.parse(_source(path))) if isinstance(n, ast.Call)]
            if any(isinstance(c.func, ast.Name) and c.func.id == "Trainer" for c in calls):
                builders.add(module)
    assert builders == {"ich_engine.run", "blip.training.lm_pretraining"}
    assert not [m for p in PACKAGES for m, path in _modules(p).items() if "def _run_training" in _source(path)]
