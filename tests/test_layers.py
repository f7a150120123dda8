"""The package's layers import only downwards (issue 16): runtime <- ops <- models <- data /
accelerate <- the jobs (pretrain, finetune, explain: never each other) <- demo, bench, info <-
cli; the runtime imports nothing of the package; no module imports another package's private
module or name. Lazy imports inside functions count: they are edges too."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "usfmae_fast"
LAYER = {"runtime": 0, "ops": 1, "models": 2, "data": 3, "_accelerate": 3, "pretrain": 4,
         "finetune": 4, "explain": 4, "demo": 5, "bench": 5, "info": 5, "cli": 6}
JOBS = {"pretrain", "finetune", "explain"}


def _part(module: str) -> str:
    """usfmae_fast.<part>...: the top-level part of a module name inside the package."""
    return module.split(".")[1]


def _edges():
    """(importing module, imported module, imported names) for every import in the package."""
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield module, alias.name, []
                continue
            else:
                continue
            if not node.module:  # from . import a, b: each name is a module of the package
                for name in names:
                    yield module, f"{target}.{name}", []
            else:
                yield module, target, names


def _inside(module: str) -> bool:
    return module.startswith("usfmae_fast.")


def test_layers_import_only_downwards_and_jobs_never_each_other():
    wrong = []
    for source, target, _ in _edges():
        if not (_inside(source) and _inside(target)):
            continue
        a, b = _part(source), _part(target)
        if a == b or a not in LAYER or b not in LAYER:
            continue
        if LAYER[b] > LAYER[a] or (a in JOBS and b in JOBS):
            wrong.append(f"{source} imports {target}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_no_private_name_crosses_a_package():
    crossing = []
    for source, target, names in _edges():
        if not (_inside(source) and _inside(target)) or _part(source) == _part(target):
            continue
        private = [n for n in target.split(".")[2:] + names if n.startswith("_")]
        if private and target != "usfmae_fast._accelerate":
            crossing.append(f"{source} imports {target} {names}")
    assert not crossing, "\n".join(sorted(set(crossing)))
