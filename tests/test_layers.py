"""The package's layers, read from its source with ``ast``: imports run one way.

    maths   config, schedule, forward, elbo          may import: maths
    data    maskdiff/data/*                           may import: data, maths
    core    model, loss, train, evaluate, sampling,   may import: core, data, maths
            scoring, checkpoint, runtime,
            distributed, oracle, sweep, compare,
            modelcard, ...
    ops     maskdiff/ops/*                            may import: anything of the package

Every ``import`` and ``from`` counts, at module level or inside a function (a lazy import is still
a dependency), and so does ``importlib.import_module("...")`` with a literal name. The package's
``__init__`` (only ``__version__``) imports nothing and anyone may import it. flows/ and tasks/
(the Prefect layer) may import anything; they are the only importers of ops/ outside ops/, and no
module of src/maskdiff imports prefect.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from helpers import REPO

ROOT = REPO
SRC = ROOT / "src"
PACKAGE = SRC / "maskdiff"

MATHS = {"config", "config_sections", "schedule", "forward", "elbo"}
CORE = {"model", "loss", "train", "evaluate", "sampling", "samplers", "infill", "textgen",
        "frontier", "meter", "scoring", "eval_table", "checkpoint", "runtime",
        "distributed", "oracle", "heldout", "launch", "jobs", "sweep", "compare", "worker_args",
        "modelcard", "judges", "markov_judge"}  # fmt: skip
MAY_IMPORT = {
    "root": {"root"},
    "maths": {"root", "maths"},
    "data": {"root", "maths", "data"},
    "core": {"root", "maths", "data", "core"},
    "ops": {"root", "maths", "data", "core", "ops"},
}
PREFECT_LAYER = ("flows", "tasks")


def module_name(path: Path, base: Path) -> str:
    """``src/maskdiff/data/stage.py`` -> ``maskdiff.data.stage``; a package's ``__init__`` -> it."""
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(folder: Path, base: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file below ``folder``."""
    return {module_name(p, base): p for p in sorted(folder.rglob("*.py"))}


PACKAGE_MODULES = sources(PACKAGE, SRC)


def layer(module: str) -> str | None:
    """The layer of a module of the package (None: a module no layer names)."""
    parts = module.split(".")
    if parts == ["maskdiff"]:
        return "root"
    if parts[1] in ("data", "ops"):
        return parts[1]
    if len(parts) == 2 and parts[1] in MATHS:
        return "maths"
    if len(parts) == 2 and parts[1] in CORE:
        return "core"
    return None


def imported_names(path: Path, name: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import in the file, relative ones resolved, including
    ``from A import b`` as both ``A`` and ``A.b`` (b may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def package_imports(path: Path, name: str) -> set[tuple[int, str]]:
    """(line, module of the package) that a file imports: each name resolved to the longest
    prefix that is a module of src/maskdiff."""
    found = set()
    for line, dotted in imported_names(path, name):
        parts = dotted.split(".")
        for k in range(len(parts), 0, -1):
            prefix = ".".join(parts[:k])
            if prefix in PACKAGE_MODULES:
                found.add((line, prefix))
                break
    return found


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_every_module_of_the_package_has_a_layer() -> None:
    unplaced = [m for m in PACKAGE_MODULES if layer(m) is None]
    assert not unplaced, f"modules no layer names (add them to MATHS or CORE): {unplaced}"
    assert {m.split(".")[1] for m in PACKAGE_MODULES if layer(m) == "core"} == CORE


def test_the_reader_sees_every_form_of_import(tmp_path: Path) -> None:
    """The scan is not vacuous: absolute, ``from package import module``, relative and
    function-level imports are all resolved to modules of the package."""
    edges = {
        (name, target)
        for name, path in {**PACKAGE_MODULES, **sources(ROOT / "flows", ROOT)}.items()
        for _, target in package_imports(path, name)
    }
    assert ("maskdiff.train", "maskdiff.checkpoint") in edges  # from maskdiff import checkpoint
    assert ("maskdiff.data.loader", "maskdiff.data.contracts") in edges
    assert ("maskdiff.ops.registry", "maskdiff.textgen") in edges  # inside a function
    assert ("flows.cli", "maskdiff.ops.servers") in edges  # inside a function
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from .stage import read_manifest\n"
        "from .. import elbo\n"
        "def f():\n"
        "    import importlib\n"
        "    return importlib.import_module('maskdiff.ops.plots')\n"
    )
    assert {t for _, t in package_imports(probe, "maskdiff.data.probe")} == {
        "maskdiff",
        "maskdiff.data.stage",
        "maskdiff.elbo",
        "maskdiff.ops.plots",
    }


def test_imports_run_one_way() -> None:
    wrong = []
    for name, path in PACKAGE_MODULES.items():
        mine = layer(name)
        for line, target in sorted(package_imports(path, name)):
            theirs = layer(target)
            if mine is not None and theirs not in MAY_IMPORT[mine]:
                wrong.append(f"{where(path, line)}: {name} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_library_module_imports_prefect() -> None:
    wrong = [
        f"{where(path, line)}: {name} imports {dotted}"
        for name, path in PACKAGE_MODULES.items()
        for line, dotted in imported_names(path, name)
        if dotted.split(".")[0] == "prefect"
    ]
    assert not wrong, "src/maskdiff must run without Prefect:\n" + "\n".join(wrong)


def test_only_the_prefect_layer_imports_ops() -> None:
    trees = {**PACKAGE_MODULES}
    for folder in PREFECT_LAYER:
        trees.update(sources(ROOT / folder, ROOT))
    wrong = [
        f"{where(path, line)}: {name} imports {target}"
        for name, path in trees.items()
        for line, target in sorted(package_imports(path, name))
        if layer(target) == "ops"
        and name.split(".")[0] not in PREFECT_LAYER
        and not name.startswith("maskdiff.ops")
    ]
    assert not wrong, "only flows/ and tasks/ import maskdiff.ops:\n" + "\n".join(wrong)
