"""The package's floors, checked from the source (``ast``; nothing is imported).

* Backends and kernels sit below the API: nothing in ``flashattn_lite/backends/`` or
  ``triton_kernels/`` (installed as ``flashattn_lite.triton_kernels``) imports the
  functional API, the KV-cache API, the modules, the integrations, the SDPA patch, the
  CLI, the benchmarks or a distributed layer, at module level or inside a function.
  What both floors need (validators, launch planning) lives in modules below the API
  (``checks``, ``planning``).
* No module imports a private (underscore) name from another module of the package: a
  private name wanted elsewhere is a shared helper without its shared module.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "flashattn_lite"
# (source folder, dotted package it installs as)
TREES = ((ROOT / "flashattn_lite", PACKAGE), (ROOT / "triton_kernels", f"{PACKAGE}.triton_kernels"))
BELOW_API = (ROOT / "flashattn_lite" / "backends", ROOT / "triton_kernels")
FORBIDDEN_BELOW_API = ("interface", "kvcache", "modules", "integrations", "sdpa_patch", "cli", "bench", "distributed")

# Private modules any module of the package may import.  Each entry says why.
PRIVATE_MODULES_ALLOWED = {
    # Build helpers for the C++ and CUDA extensions.  The underscore keeps them out of the
    # public API (users run ``flashattn-lite build``), not out of the package: the cpu/cuda
    # backends, the CLI and the GPU check are their clients, by importing the module.
    f"{PACKAGE}._build",
    f"{PACKAGE}._build_cuda",
}


def _dotted(path, folder, package):
    rel = path.relative_to(folder).with_suffix("")
    parts = [package, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules():
    """{dotted module name: path} for every module the package installs."""
    return {_dotted(p, folder, package): p for folder, package in TREES for p in sorted(folder.rglob("*.py"))}


MODULES = package_modules()


def _is_package(module):
    return MODULES.get(module, pathlib.Path()).name == "__init__.py"


def _absolute(node, module):
    """The module an ``ImportFrom`` names, made absolute from the importing ``module``."""
    if not node.level:
        return node.module
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]  # a plain module's relative imports start at its package
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _ours(name):
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def imports(tree, module):
    """(line, target module, imported name or None) for every import in ``tree``, nested
    ones included; ``importlib.import_module("...")``/``__import__("...")`` with a constant
    name count too."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, module)
            for alias in node.names:
                yield node.lineno, source, alias.name
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value, None


def api_imports(source, module):
    """Problems: imports in ``source`` (the text of ``module``) that reach above the backends."""
    forbidden = tuple(f"{PACKAGE}.{name}" for name in FORBIDDEN_BELOW_API)
    problems = []
    for line, target, name in imports(ast.parse(source), module):
        full = f"{target}.{name}" if name else target
        for t in (target, full):
            if any(t == f or t.startswith(f + ".") for f in forbidden):
                problems.append(f"{module}:{line} imports {full}")
                break
        else:
            if target == PACKAGE and (name is None or f"{PACKAGE}.{name}" not in MODULES):
                # the top package re-exports the API: importing it, or a name from it, reaches the API
                problems.append(f"{module}:{line} imports {full} (the top package re-exports the API)")
    return problems


def _module_aliases(tree, module):
    """{local name: module} for names bound to modules of the package by imports."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else PACKAGE
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, module)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
    return aliases


def _attribute_chain(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def private_imports(source, module):
    """Problems: private names ``module`` takes from other modules of the package, by
    import (``from .x import _y``) or through an imported module (``x._y``)."""
    tree = ast.parse(source)
    problems = []

    def check(line, owner, name, how):
        full = f"{owner}.{name}"
        if _is_private(name) and full not in PRIVATE_MODULES_ALLOWED and owner != module:
            problems.append(f"{module}:{line} {how} {full}")

    for line, target, name in imports(tree, module):
        if not _ours(target):
            continue
        parts = target.split(".") + ([name] if name else [])
        for i in range(1, len(parts)):
            check(line, ".".join(parts[:i]), parts[i], "imports")
    aliases = _module_aliases(tree, module)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):  # (inner links of a chain repeat its problems; the set drops them)
            chain = _attribute_chain(node)
            if not chain or chain[0] not in aliases:
                continue
            owner = aliases[chain[0]]
            for part in chain[1:]:
                check(node.lineno, owner, part, "uses")
                owner = f"{owner}.{part}"
    return sorted(set(problems))


def _sources(folders=None):
    for module, path in MODULES.items():
        if folders is None or any(folder in path.parents for folder in folders):
            yield module, path.read_text()


def test_the_source_trees_are_found():
    assert f"{PACKAGE}.backends.triton" in MODULES and f"{PACKAGE}.triton_kernels.decode" in MODULES
    assert f"{PACKAGE}.interface" in MODULES and f"{PACKAGE}.kvcache" in MODULES


def test_backends_and_kernels_do_not_import_the_api():
    problems = [p for module, source in _sources(BELOW_API) for p in api_imports(source, module)]
    assert not problems, "backends/kernels import the API above them:\n" + "\n".join(problems)


def test_no_module_takes_a_private_name_from_another():
    problems = [p for module, source in _sources() for p in private_imports(source, module)]
    assert not problems, ("private names used across modules (give them a shared module and a public name):\n"
                          + "\n".join(problems))


# The checks themselves must be able to fail: each snippet below breaks a rule.
@pytest.mark.parametrize("module, snippet", [
    ("backends.triton", "def decode():\n    from flashattn_lite.kvcache import auto_num_splits\n"),  # the old circle
    ("backends.triton", "from ..interface import flash_attn_func\n"),
    ("backends.triton", "from .. import kvcache\n"),
    ("backends", "from ..integrations import transformers\n"),
    ("backends", "from .. import sdpa_patch\n"),
    ("triton_kernels.decode", "from .. import bench\n"),
    ("triton_kernels.decode", "from ..modules import FlashAttention\n"),
    ("backends.cpu", "import flashattn_lite.integrations.transformers\n"),
    ("backends.cpu", "import flashattn_lite.distributed as dist\n"),
    ("backends.cpu", "from flashattn_lite import flash_attn_func\n"),
    ("backends.cpu", "def f():\n    import flashattn_lite as fl\n"),
    ("backends.cpu", "import importlib\nimportlib.import_module('flashattn_lite.cli')\n"),
])
def test_api_import_is_caught(module, snippet):
    assert api_imports(snippet, f"{PACKAGE}.{module}")


@pytest.mark.parametrize("snippet", [
    "from .. import rng, planning\nfrom .base import missing_features\n",
    "def f():\n    from flashattn_lite.triton_kernels import decode\n",
    "from .. import _build\n",
])
def test_layered_imports_pass(snippet):
    assert not api_imports(snippet, f"{PACKAGE}.backends.triton")


@pytest.mark.parametrize("snippet", [
    "from .interface import _check_tensor\n",
    "from .interface import (MAX_HEAD_DIM,\n    _select_backend)\n",
    "from . import testing\nx = testing._max_abs(1)\n",
    "import flashattn_lite.rng as r\nr._recorders.append([])\n",
    "from . import _private_helper\n",
])
def test_private_import_is_caught(snippet):
    assert private_imports(snippet, f"{PACKAGE}.kvcache")


@pytest.mark.parametrize("snippet", [
    "from .checks import check_scale as _check_scale\n",  # a public name kept private here: fine
    "from . import ops as _ops\n_ops.run_decode\n",
    "from . import _build\n_build.build_cpu()\n",
    "import torch\ntorch._C\n",
])
def test_public_import_passes(snippet):
    assert not private_imports(snippet, f"{PACKAGE}.kvcache")
