"""params.yaml as a file: read (one-line errors with line and column for bad YAML, duplicated
keys, an empty file, a non-mapping top level), `--set` overrides written back in place, and
missing keys added with their defaults. The schema and its checks are salve/config.py."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, YAMLError

from salve.config import Config, ConfigError, from_dict, load


def read_params(p: Path) -> dict:
    """params.yaml parsed, refused in one line unless it is a mapping of sections.

    An empty file is refused rather than read as "all defaults": a truncated or wiped
    params.yaml would otherwise run the digits defaults without a word.
    """
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{p}: not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8"
        ) from None
    raw = _safe_load(text, str(p), file=True)
    if raw is None:
        raise ConfigError(
            f"{p} is empty (no section, only comments or blank lines), so every stage would "
            f"silently run the defaults; restore it with `git checkout {p.name}`, or start from "
            f"the defaults by naming one section in it (`echo 'data:' > {p.name}`): salve run "
            "then writes every key with its default"
        )
    if not isinstance(raw, dict):
        content = (i for i, x in enumerate(text.splitlines(), 1) if x.strip()[:1] not in ("", "#"))
        line = next(content, 1)  # the first line that is not blank or a comment
        kind = "a list" if isinstance(raw, list) else f"the single value {str(raw)[:40]!r}"
        raise ConfigError(
            f"{p}:{line}:1: expected a mapping of sections (`sae:` with its keys indented "
            f"below), got {kind}; restore it with `git checkout {p.name}`"
        )
    return raw


def yaml_load(text: str) -> Any:
    """YAML as DVC reads it (ruamel, YAML 1.2, safe types): the project's one YAML parser."""
    return YAML(typ="safe", pure=True).load(text)


def yaml_dump(data: Any, *, width: int = 100) -> str:
    """Block-style YAML of plain data, keys in insertion order (dvc.yaml, test fixtures)."""
    import io

    yaml = YAML()  # round-trip dumper: keeps insertion order (the safe one sorts keys)
    yaml.width = width
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def _safe_load(text: str, where: str, *, file: bool = False) -> Any:
    """Parse YAML as DVC does (ruamel, YAML 1.2): `1e-3` is a float, duplicate keys are errors.

    PyYAML (YAML 1.1) reads `1e-3` as the string '1e-3', so a value DVC sees as a float (and that
    ruamel writes back, e.g. `1e-10`) would be rejected here. A parse error is one line
    (`where:LINE:COL: problem; fix` for a file) instead of ruamel's 8-12 lines.
    """
    try:
        return yaml_load(text)
    except YAMLError as exc:
        raise ConfigError(_yaml_error(exc, text, where, file=file)) from None


def _yaml_error(exc: YAMLError, text: str, where: str, *, file: bool) -> str:
    """ruamel's multi-line report as one line: the place (1-based), the problem, the fix."""
    problem = " ".join(str(getattr(exc, "problem", None) or "").split())
    context = " ".join(str(getattr(exc, "context", None) or "").split())
    mark = getattr(exc, "problem_mark", None)
    if mark is None and hasattr(exc, "position"):  # ReaderError: a character YAML refuses
        problem = " ".join(str(exc).split('in "')[0].split())
        pos = exc.position
        line, col = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
    elif mark is None:
        problem, line, col = " ".join(str(exc).split()), 0, 0
    else:
        ended = "stream end" in problem or "end of stream" in problem
        if ended and context and getattr(exc, "context_mark", None):
            mark = exc.context_mark  # the file ended inside a bracket or quote: where it opened
            problem = f"what opens here is not closed before the file ends ({problem})"
            context = ""
        line, col = mark.line + 1, mark.column + 1
    fix = f"correct the YAML there (`git diff {Path(where).name}` shows recent edits)"
    dup = re.match(r'found duplicate key "(.*?)"', problem)
    if dup:
        key, first = dup[1], _first_line_of(text, dup[1], exc)
        seen = f" (first at line {first})" if first else ""
        if col == 1:
            problem, fix = f"section {key!r} appears twice{seen}", "merge the two into one"
        else:
            problem, fix = f"key {key!r} appears twice in its section{seen}", "keep one of them"
    elif "'\\t'" in problem:
        problem, fix = "a tab character; YAML indents with spaces only", "replace it with spaces"
    elif "another document" in problem:
        problem, fix = "a second YAML document starts here", "keep one: remove this `---` line"
    elif context:
        problem = f"{problem} ({context})"
    if problem.startswith("mapping values are not allowed here"):
        fix = "check the indentation, and quote a value that holds ': '"
    elif problem.startswith("expected <block end>"):
        fix = "check the indentation: the keys of a section line up under each other"
    if not file:
        return f"{where}: not valid YAML: {problem}; write the value as YAML, e.g. quoted"
    place = f"{where}:{line}:{col}" if line else where
    return f"{place}: not valid YAML: {problem}; {fix}"


def _first_line_of(text: str, key: str, exc: YAMLError) -> int | None:
    """1-based line of `key`'s first occurrence in the mapping a DuplicateKeyError names."""
    start, dup = getattr(exc, "context_mark", None), exc.problem_mark
    lines = text.splitlines()[start.line if start else 0 : dup.line]
    pattern = re.compile(rf"^ {{{dup.column}}}([\"']?){re.escape(key)}\1\s*:")
    offset = start.line if start else 0
    return next((offset + i + 1 for i, x in enumerate(lines) if pattern.match(x)), None)


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, typed value), YAML-typed like `dvc exp run -S`."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. sae.width=128")
    dotted, value_text = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    value = _safe_load(value_text, f"--set {text!r}") if value_text.strip() else ""
    return section, key, value


def _write_keys(p: Path, items: list[tuple[str, str, Any]]) -> None:
    """Set section.key = value in params.yaml, keeping its comments and key order; atomic."""
    from salve.io import atomic_path

    rt = YAML()
    rt.preserve_quotes = True
    doc = (rt.load(p.read_text(encoding="utf-8")) if p.exists() else None) or {}
    for section, key, value in items:
        if doc.get(section) is None:
            doc[section] = {}
        doc[section][key] = value
    with atomic_path(p) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        rt.dump(doc, fh)


def apply_overrides(
    path: str | Path, overrides: list[str], check: Callable[[Config], object] | None = None
) -> Config:
    """Validate overrides, then write them into params.yaml (comments kept), as `dvc exp run -S`.

    Writing them to the file keeps DVC's record true: the values a stage ran with are the values
    in params.yaml, which DVC records in dvc.lock. Nothing is written unless the whole resulting
    configuration validates, including ``check`` (e.g. that the data folder exists), which may
    raise.
    """
    p = Path(path)
    plain = read_params(p) if p.exists() else {}
    parsed = [parse_override(text) for text in overrides]
    for section, key, value in parsed:
        if plain.get(section) is None:
            plain[section] = {}
        if not isinstance(plain[section], dict):
            raise ConfigError(f"{p}: section {section!r} must be a mapping of keys")
        plain[section][key] = value
    cfg = from_dict(plain, f"{p} with --set")
    if check is not None:
        check(cfg)
    if parsed:
        _write_keys(p, parsed)
    return cfg


def fill_missing(path: str | Path) -> list[str]:
    """Write every key params.yaml leaves out, with its default, and return their names.

    DVC reads parameter values from the file, so the file must hold every key a stage declares;
    a value left to a default would otherwise be invisible to DVC's record.
    """
    p = Path(path)
    load(p)  # validate first: nothing is written for an invalid file
    plain = read_params(p)
    missing = [
        (section, key, value)
        for section, values in Config().to_dict().items()
        for key, value in values.items()
        if key not in (plain.get(section) or {})
    ]
    if missing:
        _write_keys(p, missing)
    return [f"{section}.{key}" for section, key, _ in missing]
