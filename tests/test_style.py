"""The code has no unused imports or variables, undefined names or syntax errors (pyflakes rules)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pyflakes_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F,E9", "--output-format", "concise",
                             "flaxlora", "experiments", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_pickle_anywhere():
    """Nothing is ever unpickled: weights are safetensors or GGUF, checkpoints orbax (tensorstore +
    JSON), the token cache npz read with allow_pickle=False, everything else JSON."""
    import re

    banned = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib|shelve|marshal)\b"
                        r"|torch\.load\(|allow_pickle\s*=\s*True|pd\.read_pickle|\.load\(.*\bpickle\b")
    np_load = re.compile(r"\bnp\.load\(")
    offenders = []
    for path in sorted((ROOT / "flaxlora").rglob("*.py")) + sorted((ROOT / "experiments").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if banned.search(line) or (np_load.search(line) and "allow_pickle=False" not in line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


def _import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports at module level}`` within flaxlora, each import's packages
    included (importing ``a.b.c`` runs ``a.b``'s ``__init__``), the root package left out."""
    import ast

    modules = {}
    for path in (ROOT / "flaxlora").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flaxlora"):
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                targets = subs + ([node.module] if len(subs) < len(node.names) else [])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("flaxlora")]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for k in range(2, len(parts) + 1):
                    package = ".".join(parts[:k])
                    if package in modules and package != name and not name.startswith(package + "."):
                        graph[name].add(package)
    return graph


def test_no_import_circles_and_the_lora_core_imports_no_model():
    graph = _import_graph()
    done, on_path = set(), []

    def visit(module):
        if module in on_path:
            raise AssertionError("import circle: " + " -> ".join(on_path[on_path.index(module):] + [module]))
        if module in done:
            return
        on_path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        on_path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert not {(m, t) for m, ts in graph.items() for t in ts
                if m.startswith("flaxlora.lora") and t.startswith("flaxlora.models")}
    assert "flaxlora.qqp.ensemble" in graph["flaxlora.qqp.run"] and "flaxlora.qqp.run" not in graph["flaxlora.qqp.ensemble"]
