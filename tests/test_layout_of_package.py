"""The package's architecture, checked: no import circles, release knowledge only in the table,
dropping old releases is local, and nothing test-only ships in the wheel (issue 19)."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mxfp8_compat
from mxfp8_compat.providers.table import GENERATIONS, TORCH_GENERATIONS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mxfp8_compat"
TOOLS = ROOT / "tools" / "mxfp8_compat_dev"
OLD_RELEASES = "torchao_013_015"  # the module of torchao 0.13-0.15


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> set[str]:
    """Every mxfp8_compat module ``name`` imports, at any depth (lazy imports in functions too),
    except under ``if TYPE_CHECKING:``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("mxfp8_compat"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.startswith("mxfp8_compat"):
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if candidate in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return {module for module in found if module in MODULES}


def test_no_import_circles():
    """No module reaches itself through imports, lazy ones included (the isolated child runs the
    probes, not resolve(); reset() calls registered hooks instead of importing dropin)."""
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert "mxfp8_compat.resolution" not in graph["mxfp8_compat.probes.isolated"]
    assert "mxfp8_compat.dropin" not in graph["mxfp8_compat.resolution"]
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == 1:
                cycles.append(stack[stack.index(successor):] + [successor])
            elif successor not in state:
                walk(successor)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_every_module_imports_first_in_a_fresh_interpreter():
    """The modules on either side of the circles issue 19 removed import on their own, first (a circle
    fails at some entry; the AST walk above covers every module, this proves the walk is not fooling itself)."""
    code = (
        "import importlib, subprocess, sys\n"
        "names = sys.argv[1:]\n"
        "for name in names:\n"
        "    done = subprocess.run([sys.executable, '-c', f'import {name}'], capture_output=True, text=True)\n"
        "    if done.returncode: print(name, done.stderr.strip().splitlines()[-1:])\n"
    )
    entries = sorted(name for name in MODULES if name.startswith(("mxfp8_compat.probes.", "mxfp8_compat.providers.")))
    entries += ["mxfp8_compat.resolution", "mxfp8_compat.dropin", "mxfp8_compat.backends.torchao_paths"]
    done = subprocess.run([sys.executable, "-c", code, *entries], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    """String constants that are code, not docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


_KEYS = sorted({row.key for row in GENERATIONS} | {row.key for row in TORCH_GENERATIONS}, key=len, reverse=True)
_RELEASE = re.compile(r"(?<![\w.])(?:" + "|".join(re.escape(key) for key in _KEYS) + r"|0\.\d{2}(?:\.\d+)?)(?![\w.]*\d)")


def _outside_the_table() -> list[Path]:
    files = [path for path in PACKAGE.rglob("*.py") if "providers" not in path.relative_to(PACKAGE).parts]
    return files + sorted(TOOLS.rglob("*.py"))


def test_no_module_outside_the_table_names_a_release_or_tests_a_row_key():
    """Release knowledge lives in providers/: no code elsewhere holds a torchao version or row key,
    nor compares a row's ``key`` (messages may show ``row.key``; branching on it is the table's job)."""
    problems = []
    for path in _outside_the_table():
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        for node in _code_strings(tree):
            if _RELEASE.search(node.value):
                problems.append(f"{where}:{node.lineno}: names a release: {node.value!r}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(side, ast.Attribute) and side.attr == "key" for side in sides):
                    problems.append(f"{where}:{node.lineno}: compares a row key: {ast.unparse(node)}")
    assert not problems, "\n".join(problems)


def test_the_release_check_catches_what_it_is_for():
    """The check above is not vacuous: it flags the constructs that issue 19 removed."""
    samples = {
        'rhs = a if key in ("0.13", "0.16") else b': True,
        'x = r.get("generation") not in (None, "0.13")': True,
        'if res.generation.key < "0.16": pass': True,
        'label = f"torchao {row.key} native MXFP8"': False,
        'SMOKE_MIN_SQNR_DB = 20.0; t = "sm_100 (10.0)"': False,
    }
    for source, flagged in samples.items():
        tree = ast.parse(source)
        named = any(_RELEASE.search(node.value) for node in _code_strings(tree))
        compares = any(isinstance(n, ast.Compare) and any(isinstance(s, ast.Attribute) and s.attr == "key"
                                                           for s in [n.left, *n.comparators]) for n in ast.walk(tree))
        assert (named or compares) is flagged, source


_CODE_LINE = re.compile(r"\s*(from |import |\*)")  # an import of the module, or a use of its rows


def _drop_old_releases(destination: Path) -> list[str]:
    """Copy the package without the 0.13-0.15 module, deleting every import of it and use of its rows
    (what a maintainer's diff would delete); the files that touched."""
    shutil.copytree(PACKAGE, destination / "mxfp8_compat", ignore=shutil.ignore_patterns("__pycache__"))
    (destination / "mxfp8_compat" / "providers" / f"{OLD_RELEASES}.py").unlink()
    touched = []
    for path in sorted((destination / "mxfp8_compat").rglob("*.py")):
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if OLD_RELEASES not in line or not _CODE_LINE.match(line)]
        if kept != lines:
            path.write_text("".join(kept))
            touched.append(path.relative_to(destination / "mxfp8_compat").as_posix())
    return touched


_REMAINING_RELEASE_TESTS = [
    "tests/test_generations_fake.py",
    "-k", "0.18.0 or 0.17.0 or 0.16.0 or newer_than or nightly or smoke_run_rejects or sm120 or flag_false "
          "or entry_missing or renamed_parameter",
    "tests/test_resolve_api.py",
]


def test_dropping_the_old_releases_is_one_module_and_one_line(tmp_path):
    """Without providers/torchao_013_015.py (and the one line of the table that names it) the package
    imports, its table holds the remaining releases, and their tests pass."""
    touched = _drop_old_releases(tmp_path)
    assert touched == ["providers/table.py"], touched
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT / "tools")]))
    check = (
        "import mxfp8_compat, sys; from mxfp8_compat import GENERATIONS, resolve\n"
        f"assert mxfp8_compat.__file__.startswith({str(tmp_path)!r}), mxfp8_compat.__file__\n"
        "print(' '.join(row.key for row in GENERATIONS))\n"
        "print(resolve('emulated', device='cpu').emulation, resolve('auto', device='cpu').backend)\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    keys, resolved = done.stdout.strip().splitlines()[-2:]
    assert keys.split() == [row.key for row in GENERATIONS if row.bind.__module__.rpartition(".")[2] != OLD_RELEASES]
    assert resolved.split()[1] == "bf16"
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_REMAINING_RELEASE_TESTS],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=900,
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and " failed" not in tests.stdout, tests.stdout[-1000:]


def test_old_release_code_lives_only_in_its_module():
    """What exists only for 0.13-0.15 (their binder, the positional-only rule, the apply-alias reader)
    is defined in their module; no row of the table outside it uses them."""
    from mxfp8_compat.providers import torchao_013_015 as old

    for row in GENERATIONS:
        owned = {row.bind.__module__, row.params.__module__, row.fingerprint_rule.__module__}
        if row in old.ROWS:
            assert row.bind is old.bind_scaling_type
        else:
            assert old.__name__ not in owned, row


# --- nothing test-only in the wheel ----------------------------------------------------------------

_TEST_ONLY = ("matrix", "matrix_totals", "agreement", "fakes", "sm100_standins", "tiny_moe", "conftest")


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> list[str]:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "src" / "mxfp8_compat", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    (wheel,) = out.glob("mxfp8_compat-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_holds_the_package_and_nothing_test_only(wheel_files):
    modules = [name for name in wheel_files if name.endswith(".py")]
    assert all(name.startswith("mxfp8_compat/") for name in modules), modules
    stems = {Path(name).stem for name in modules}
    assert not stems & set(_TEST_ONLY), sorted(stems & set(_TEST_ONLY))
    shipped = {name[: -len(".py")].replace("/", ".").removesuffix(".__init__") for name in modules}
    assert shipped == set(MODULES), sorted(shipped ^ set(MODULES))
    assert "mxfp8_compat/py.typed" in wheel_files


def test_dev_tooling_runs_from_the_checkout():
    """tox's commands_post and the matrix env call the dev package that tools/ holds (not shipped)."""
    done = subprocess.run([sys.executable, "-m", "mxfp8_compat_dev.matrix", "--help"], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tools"), *sys.path])),
                          timeout=300)
    assert done.returncode == 0 and "record" in done.stdout, done.stderr
    assert mxfp8_compat.__file__.startswith(str(PACKAGE)) or "site-packages" in mxfp8_compat.__file__
