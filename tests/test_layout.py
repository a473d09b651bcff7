"""The package layout (DESIGN.md "Layout"): the repository's top-level folders are fspo_engine's subpackages,
`kernels/` is a PEP 420 namespace portion, nothing edits `sys.path`, and the layering holds.

Each test fails when the old layout comes back: a `kernels/__init__.py` (our folder then shadows Hugging
Face's `kernels`, which transformers >= 5.25 imports, whenever the root is on `sys.path`), a `sys.path` guard,
or data_gen importing engine.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("engine", "kernels", "data_gen", "cli", "benchmarks", "configs")

# Imports that need the package, transformers and Hugging Face's kernels to be the right ones.
OURS = "import fspo_engine.engine.model, fspo_engine.kernels.logprobs, fspo_engine.kernels.attention, fspo_engine.cli.main"
THEIRS = "from transformers import LlamaForCausalLM"
CHECK = """
import kernels, sys
assert kernels.__file__ and not kernels.__file__.startswith({kernels!r}), kernels.__file__  # Hugging Face's
from fspo_engine.kernels.logprobs import linear_logprob_sums
from fspo_engine.kernels.attention import prefix_shared_attention
assert sys.path == start, (start, sys.path)  # nothing edited sys.path
print("ok")
"""


def _run_from_root(python: str, first: str, second: str) -> subprocess.CompletedProcess:
    """`python -c` in the repository root: the root ('') is first on sys.path, as in a notebook, `python -m`
    or `python -m pytest` there."""
    code = "\n".join([
        "import sys",
        "assert sys.path[0] == '', sys.path[:2]",
        "start = list(sys.path)",
        first,
        second,
        CHECK.format(kernels=str(ROOT / "kernels")),
    ])  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([python, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_kernels_is_a_namespace_portion():
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must stay a PEP 420 namespace portion"


@pytest.mark.parametrize("order", ["transformers first", "fspo_engine first"])
def test_imports_from_the_repository_root_in_either_order(order):
    first, second = (THEIRS, OURS) if order == "transformers first" else (OURS, THEIRS)
    res = _run_from_root(sys.executable, first, second)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def _source_files(*folders: str) -> list[Path]:
    files = [p for d in folders for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts]
    assert files, folders
    return sorted(files)


def test_nothing_in_the_package_edits_sys_path():
    """Read as code (comments and docstrings may name it): no `sys.path`, no `site.addsitedir`."""
    offenders = []
    for path in _source_files(*PACKAGE_DIRS[:-1]):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        # The names `sys` and `site` are bound to (`import sys as _sys` too).
        alias = {a.asname or a.name: a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    (alias.get(node.value.id), node.attr) in (("sys", "path"), ("site", "addsitedir")):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            elif isinstance(node, ast.ImportFrom) and node.module in ("sys", "site") and \
                    any(a.name in ("path", "addsitedir") for a in node.names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"sys.path edited or read in the package: {offenders}"


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports, function-local imports included: (line, dotted name)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


@pytest.mark.parametrize("folder, forbidden", [
    ("data_gen", ("engine", "kernels", "cli", "benchmarks")),  # data_gen is standalone
    ("kernels", ("engine", "data_gen", "cli", "benchmarks")),
])  # fmt: skip
def test_layering(folder, forbidden):
    bad = [f"{p.relative_to(ROOT)}:{line}: {name}" for p in _source_files(folder) for line, name in _imported_modules(p)
           if any(name == f"fspo_engine.{f}" or name.startswith(f"fspo_engine.{f}.") for f in forbidden)]
    assert not bad, bad


def test_importing_data_gen_loads_no_engine_module():
    code = textwrap.dedent("""
        import sys
        import fspo_engine.data_gen, fspo_engine.data_gen.bayes, fspo_engine.data_gen.pipeline
        print(sorted(m for m in sys.modules if m.startswith(("fspo_engine.engine", "fspo_engine.kernels"))))
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[]", res.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: setuptools builds in the source tree (build/), and a stale build/ there would put
    # files deleted since into the wheel.
    src, out = tmp_path_factory.mktemp("src") / "fspo-engine", tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__",
                                                             "bench_out", "runs", "*.whl"))  # fmt: skip
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(out), str(src)], capture_output=True, text=True, timeout=600)  # fmt: skip
    if res.returncode != 0:
        pytest.fail(f"pip wheel failed: {res.stderr[-3000:]}")
    (whl,) = out.glob("*.whl")
    return whl


def test_the_wheel_holds_every_module_and_data_file(wheel):
    """A normal install (`pip install .`) gets every subpackage, the namespace `fspo_engine.kernels` included,
    and their data files: a package missing from pyproject's `packages` is caught here, not by a user."""
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fspo_engine/kernels/logprobs.py" in names and "fspo_engine/kernels/attention.py" in names
    assert "fspo_engine/kernels/__init__.py" not in names and "fspo_engine/__init__.py" not in names
    shipped = (".py", ".json", ".txt", ".toml", ".html", ".css", ".js")
    want = {f"fspo_engine/{p.relative_to(ROOT).as_posix()}" for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*")
            if p.is_file() and p.suffix in shipped and "__pycache__" not in p.parts}  # fmt: skip
    assert not want - names, f"missing from the wheel: {sorted(want - names)}"


def test_a_normal_install_imports_from_the_repository_root(wheel, tmp_path):
    """The wheel installed into a fresh virtual environment (the dependencies come from this one, through a .pth
    line: no registry needed), then run from the repository root in both import orders."""
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = str(env_dir / ("Scripts" if os.name == "nt" else "bin") / "python")
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    zipfile.ZipFile(wheel).extractall(purelib)
    # A path line, not a site directory: this environment's editable-install finder is not loaded there.
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for first, second in ((THEIRS, OURS), (OURS, THEIRS)):
        res = _run_from_root(python, first, second + "\nimport fspo_engine.kernels.logprobs as L\n"
                             f"assert L.__file__.startswith({str(purelib)!r}), L.__file__")  # fmt: skip
        assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_engine_has_no_import_cycles():
    """Counting function-local imports too: then none of them can be there to dodge a cycle."""
    modules = {p.stem for p in (ROOT / "engine").glob("*.py")} - {"__init__"}
    graph = {m: {name.split(".")[2] for _, name in _imported_modules(ROOT / "engine" / f"{m}.py")
                 if name.startswith("fspo_engine.engine.") and name.split(".")[2] in modules} - {m}
             for m in modules}  # fmt: skip
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError(f"import cycle: {' -> '.join([*path[path.index(m):], m])}")
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(modules):
        visit(m)


# Writes that are not temp file + rename, each with its reason; every other write in engine/, cli/ and
# benchmarks/ goes through data_gen/atomic.py (DESIGN.md: "Every file the engine writes is written atomically").
NOT_ATOMIC = {
    ("engine/checkpoint.py", "finish_checkpoint"): "renames a whole, sealed checkpoint directory into place",
    ("engine/checkpoint.py", "publish"): "renames a whole, sealed final model directory into place",
    ("engine/rundir.py", "append_metrics"): "metrics.jsonl is append-only; a resume drops torn lines",
    ("engine/tokenizer.py", "train_tokenizer"): "edits a file in its TemporaryDirectory before the atomic moves",
    ("benchmarks/bench_checkpoint.py", "worker"): "torch.save into scratch files is the operation timed",
    ("benchmarks/bench_compile_report.py", "ptxas_usage"): "ptxas input in a TemporaryDirectory",
    ("benchmarks/bench_quickstart.py", "run_seed"): "streams a seed's console log while it runs (a log, not a result)",
    ("benchmarks/bench_gen_data.py", "plot"): "not yet moved to the helper (bench gen-data is being reworked)",
    ("benchmarks/bench_gen_data.py", "main"): "not yet moved to the helper (bench gen-data is being reworked)",
}


def _raw_writes(path: Path) -> list[tuple[str, int]]:
    """(enclosing function, line) of each write call in `path` that is not inside `with atomic_path(...)` or
    `with atomic_dir(...)`: Path.write_text/write_bytes, open(.., "w"/"a"/"x"), savefig, torch.save, os.replace."""
    found = []

    def visit(node, func, atomic):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name
        if isinstance(node, ast.With) and any(
                isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") in ("atomic_path",
                                                                                                    "atomic_dir")
                for i in node.items):  # fmt: skip
            atomic = True
        if isinstance(node, ast.Call) and not atomic:
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", None) if isinstance(f, ast.Attribute) else None
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                None)  # fmt: skip
            if name in ("write_text", "write_bytes", "savefig") or (owner, name) in (("torch", "save"), ("os", "replace")) \
                    or name == "open" and isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax"):
                found.append((func, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, func, atomic)

    visit(ast.parse(path.read_text(encoding="utf-8")), "<module>", False)
    return found


def test_every_write_goes_through_the_atomic_helper():
    bad = [f"{p.relative_to(ROOT)}:{line} ({func})" for p in _source_files("engine", "cli", "benchmarks")
           for func, line in _raw_writes(p) if (p.relative_to(ROOT).as_posix(), func) not in NOT_ATOMIC]
    assert not bad, f"write these through fspo_engine.data_gen.atomic (or add a reason to NOT_ATOMIC): {bad}"
