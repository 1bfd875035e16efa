"""Code dependencies of a stage, derived from its imports (never listed by hand).

A stage depends on its own module and on every project module its code imports, transitively,
wherever the import statement stands (module level, inside functions, under ``TYPE_CHECKING``):
a module named in an import statement is conservatively a dependency. Importing ``a.b.c`` also
runs ``a/__init__.py`` and ``a/b/__init__.py``, so those count too. Only modules inside the
repository's own packages count; third-party libraries are pinned by the environment, not
hashed by DVC.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PROJECT_PACKAGES = ("salve", "tasks", "flows")
REPO = Path(__file__).resolve().parents[1]


def module_path(name: str, root: Path = REPO) -> Path | None:
    """The file defining project module ``name`` (a package's ``__init__.py``), or None."""
    parts = name.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _package_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts[:-1])


def imported_names(path: Path, root: Path = REPO) -> set[str]:
    """Dotted names of every module an import statement in ``path`` may load."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = _package_of(path, root).split(".")
                base = package[: len(package) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names.add(stem)
            # `from pkg import sub` may import the submodule pkg.sub
            names.update(f"{stem}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def package_data(path: Path, root: Path = REPO) -> list[Path]:
    """Files or folders a module reads from beside itself, declared as a module-level
    ``PACKAGE_DATA = ("templates", ...)`` (e.g. Jinja2 templates): dependencies like code."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "PACKAGE_DATA" for t in node.targets)
            and isinstance(node.value, ast.Tuple | ast.List)
        ):
            return [
                path.parent / elt.value for elt in node.value.elts if isinstance(elt, ast.Constant)
            ]
    return []


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@cache
def _closure(start: str, root: Path) -> frozenset[Path]:
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        for candidate in _with_parents(name):
            if candidate in seen:
                continue
            seen.add(candidate)
            path = module_path(candidate, root)
            if path is None:
                continue
            files.add(path)
            files.update(package_data(path, root))
            todo.extend(imported_names(path, root))
    return frozenset(files)


def code_deps(stage: str, root: Path = REPO) -> list[str]:
    """Repository-relative paths of every project module stage ``stage`` may run, sorted."""
    files = _closure(f"tasks.{stage}", Path(root).resolve())
    if module_path(f"tasks.{stage}", Path(root).resolve()) not in files:
        raise ValueError(f"no stage module tasks/{stage}.py under {root}")
    return sorted(str(p.relative_to(Path(root).resolve())) for p in files)
