"""The house's layers (docs/DESIGN.md §4): every import inside the installed package points downward, and
nothing test-only is installed."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top, as drawn in DESIGN §4: a module may import from its own layer and the layers below it.
LAYERS = [
    {"kernels", "_ext"},
    {"config", "architectures"},
    {"serialization", "checkpoint"},
    {"models", "data"},
    {"eval"},
    {"head_loss", "loss_reference", "centering", "vmf", "backends", "cpu_memory"},
    {"loss", "ibot", "masking", "prototypes"},
    {"objectives"},
    {"trainer", "parallelize", "optim", "schedules", "stopping", "monitor", "distributed",
     "watchdog", "checkpoint_writer", "run_position", "step_timing"},
    {"train", "plots", "plan"},
    {"cli", "commands"},
]
LEVEL = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: `dinovmf.models.vit` -> models, `dinovmf.kernels.x` -> kernels."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dinovmf"


def _package_modules():
    """(dotted name, path) of every module of the installed package (kernels/ is installed as dinovmf.kernels)."""
    for folder, package in ((ROOT / "dinovmf", "dinovmf"), (ROOT / "kernels", "dinovmf.kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            yield ".".join([package, *parts]), path


def _imports(name: str, path: Path):
    """Every dinovmf module `path` imports (at module level or inside functions), with `from dinovmf import x`
    resolved to dinovmf.x and relative imports resolved against the package."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "dinovmf":
                yield from (f"dinovmf.{a.name}" for a in node.names)
            elif module.startswith("dinovmf."):
                yield module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("dinovmf."))


def test_every_unit_of_the_package_has_a_layer():
    units = {_unit(name) for name, _ in _package_modules()} - {"dinovmf"}
    assert units <= set(LEVEL), f"modules with no layer in DESIGN §4 / LAYERS: {sorted(units - set(LEVEL))}"


def test_imports_point_downward():
    upward = []
    for name, path in _package_modules():
        unit = _unit(name)
        if unit == "dinovmf":  # the package's __init__
            continue
        for target in _imports(name, path):
            other = _unit(target)
            if other in LEVEL and LEVEL[other] > LEVEL[unit]:
                upward.append(f"{path.relative_to(ROOT)} ({unit}) imports {target} ({other})")
    assert not upward, "imports that reach up a layer:\n" + "\n".join(upward)


def test_kernels_import_only_the_kernels():
    for name, path in _package_modules():
        if _unit(name) == "kernels":
            others = [t for t in _imports(name, path) if not t.startswith("dinovmf.kernels")]
            assert not others, f"{path.relative_to(ROOT)} imports {others}"


@pytest.mark.parametrize("module", ["dinovmf.kernels.testing", "dinovmf.kernels.vmf_bias"])
def test_test_code_and_retired_paths_are_not_installed(module):
    assert importlib.util.find_spec(module) is None
