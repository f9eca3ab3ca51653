"""The package's shape: imports flow one way (no cycles, lower layers know nothing of higher ones), and only the
installed package is importable (a Python started next to the clone does not pick the repository up as a namespace
package)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import glm5

PKG = Path(glm5.__file__).resolve().parent
ROOT = PKG.parent.parent

# Who may not import whom: the model knows nothing of engine, training, RL or serving; the engine nothing of the
# server, training or RL; training nothing of the engine or the server.
FORBIDDEN = {
    "glm5.model": ("glm5.engine", "glm5.train", "glm5.rl", "glm5.server", "glm5.speedrun", "glm5.eval"),
    "glm5.engine": ("glm5.server", "glm5.train", "glm5.rl", "glm5.speedrun", "glm5.eval"),
    "glm5.quant": ("glm5.engine", "glm5.server", "glm5.train", "glm5.rl", "glm5.speedrun", "glm5.eval"),
    "glm5.train": ("glm5.server", "glm5.engine", "glm5.speedrun"),
    "glm5.server": ("glm5.train", "glm5.rl", "glm5.speedrun", "glm5.eval"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def glm5_imports(path: Path) -> set[str]:
    """Every glm5 module this file imports, at any depth of the file (function-level imports count too)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "glm5"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "glm5":
                continue
            out.add(target)
            for a in node.names:  # `from . import x` may name a submodule
                if (PKG.parent / (target + "." + a.name).replace(".", "/")).with_suffix(".py").exists():
                    out.add(f"{target}.{a.name}")
    return out


def graph() -> dict[str, set[str]]:
    g = {module_name(p): glm5_imports(p) for p in PKG.rglob("*.py")}
    known = set(g)
    return {m: {t for t in deps if t in known and t != m} for m, deps in g.items()}


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(g[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    # a package's __init__ importing its own submodules (and they their package) is how packages work, not a cycle
    return [c for c in cycles if not any(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(c, c[1:]))]


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "b": set()}) == [["a.x", "a.y", "a.z", "a.x"]]
    assert find_cycles({"a": {"a.x"}, "a.x": {"a"}}) == []  # a package and its own module
    assert find_cycles({"p.a": {"p.b"}, "p.b": set()}) == []


def test_layers_import_one_way():
    bad = [f"{m} imports {t}" for m, deps in graph().items() for low, banned in FORBIDDEN.items()
           if m == low or m.startswith(low + ".") for t in deps if t.startswith(banned)]
    assert not bad, "\n".join(sorted(bad))


def test_python_started_next_to_the_clone_imports_the_installed_package(tmp_path):
    (tmp_path / "glm5").symlink_to(ROOT, target_is_directory=True)  # a clone named glm5, as `git clone` makes it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", "import glm5; print(glm5.__file__); glm5.load_model"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == PKG / "__init__.py"


def test_setup_says_what_it_installs_once_then_is_silent(tmp_path):
    """scripts/setup.sh on a stand-in Python that records its calls: the first run says what it installs, the second
    prints nothing and installs nothing."""
    (tmp_path / "scripts").mkdir()
    for f in ("scripts/setup.sh", "pyproject.toml"):
        (tmp_path / f).write_text((ROOT / f).read_text())
    log = tmp_path / "calls.log"
    fake = tmp_path / "fake-python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; fi
if [ "$1 $2 $3" = "-m pip install" ]; then echo "Collecting something-from-pip"; fi
""")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake)}
    env.pop("GLM5_TORCH", None)
    first = subprocess.run(["bash", "scripts/setup.sh", "test"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert "creating .venv" in first.stdout and "installing torch==2.13.0" in first.stdout, first.stdout
    assert "Collecting something-from-pip" in first.stdout and "test extra" in first.stdout
    calls = log.read_text()
    assert "-m venv .venv" in calls and 'install --progress-bar off torch==2.13.0' in calls and "-e .[test]" in calls
    log.unlink()
    again = subprocess.run(["bash", "scripts/setup.sh", "test"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and again.stdout == "" and again.stderr == "" and not log.exists()


def test_no_two_classes_share_a_name():
    """A name means one thing across the package (a reader who meets `Run` knows which one)."""
    where: dict[str, list[str]] = {}
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef):
                where.setdefault(node.name, []).append(module_name(p))
    dup = {k: v for k, v in where.items() if len(v) > 1}
    assert not dup, dup
