"""The import graph keeps the layers apart: the method (salve/) imports neither presentation
(salve/present/) nor orchestration (tasks/, flows/), and it does not need psutil.

Read from the source with ``ast`` (every import statement, inside functions too), so an import
hidden behind a function call still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PRESENT = REPO / "salve" / "present"
MAX_LINES = 600


def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """Absolute dotted names of every module an import statement in ``path`` names."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                stem = f"{base}.{node.module}" if node.module else base
            else:
                stem = node.module or ""
            names.add(stem)
            names.update(f"{stem}.{alias.name}" for alias in node.names)
    return names


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def method_modules() -> list[Path]:
    return sorted(p for p in (REPO / "salve").rglob("*.py") if not p.is_relative_to(PRESENT))


def _offenders(paths: list[Path], *prefixes: str) -> dict[str, list[str]]:
    out = {}
    for path in paths:
        bad = sorted(n for n in imported_modules(path) if _under(n, *prefixes))
        if bad:
            out[str(path.relative_to(REPO))] = bad
    return out


def test_the_method_imports_no_presentation_module():
    offenders = _offenders(method_modules(), "salve.present")
    assert offenders == {}, offenders


def test_nothing_in_salve_imports_tasks_or_flows():
    paths = sorted((REPO / "salve").rglob("*.py"))
    assert _offenders(paths, "tasks", "flows") == {}


def test_the_method_does_not_need_psutil():
    assert _offenders(method_modules(), "psutil") == {}


def test_presentation_package_exists_with_its_templates():
    """The check above is vacuous if the package moves: it must be where the test looks."""
    assert (PRESENT / "__init__.py").is_file()
    assert (PRESENT / "templates" / "report.html").is_file()
    assert not (REPO / "salve" / "templates").exists()


def test_the_checker_sees_relative_and_function_level_imports(tmp_path: Path):
    (tmp_path / "salve").mkdir()
    probe = tmp_path / "salve" / "probe.py"
    probe.write_text("def f():\n    from .present import kit\n    import tasks.report\n")
    names = imported_modules(probe, tmp_path)
    assert _under("salve.present.kit", "salve.present") and "salve.present.kit" in names
    assert "tasks.report" in names


def test_no_module_is_over_600_lines():
    long = {
        str(p.relative_to(REPO)): n
        for package in ("salve", "tasks", "flows")
        for p in (REPO / package).rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}
