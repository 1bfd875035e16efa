"""Drift checks of the hand-written docs (README.md, docs/*.md): text in, problems out
("LINE: message"); flows/docs.py's `salve docs --check` runs them."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from flows.docs_format import README

FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
# `metrics/rank.json`, `sae.json`: file names, not parameters.
FILE_EXTENSIONS = {
    "json", "py", "md", "yaml", "yml", "html", "csv", "safetensors", "lock", "toml", "txt",
    "png", "log", "pt", "pth", "tgz", "gz", "zip", "sh", "cfg", "ini", "db", "dvc",
}  # fmt: skip


def schema_keys() -> dict[str, set[str]]:
    """Every parameter section and its keys, from salve/config.py's schema."""
    from salve.config import section_fields, sections

    return {name: set(section_fields(cls)) for name, cls in sections().items()}


def blank_code(text: str, *, fenced: bool = True, inline: bool = True) -> str:
    """``text`` with fenced blocks and/or inline code spans blanked (line numbers kept)."""
    if fenced:
        out, inside = [], None
        for line in text.split("\n"):
            m = FENCE.match(line)
            if inside is None and m:
                inside = m.group(2)[0]
                out.append("")
            elif inside is not None:
                if m and m.group(2)[0] == inside and not m.group(3):
                    inside = None
                out.append("")
            else:
                out.append(line)
        text = "\n".join(out)
    if inline:
        text = re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), text)
    return text


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def wrong_keys(text: str, schema: Mapping[str, set[str]]) -> list[str]:
    """``section.key`` mentions (prose, code spans and code blocks) the schema does not have.

    A mention is a section name followed by ``.key`` that is not part of a longer dotted name or
    path (``cfg.sae.width``, ``metrics/rank.json``) nor a file name; ``edit.checkpoint_*`` is a
    prefix and matches when some key starts with it."""
    sections = "|".join(sorted(map(re.escape, schema), key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./$-])({sections})\.([A-Za-z_][A-Za-z0-9_]*)(\*?)")
    problems = []
    for m in pattern.finditer(text):
        section, key, star = m.groups()
        if key in FILE_EXTENSIONS:
            continue
        keys = schema[section]
        ok = any(k.startswith(key) for k in keys) if star else key in keys
        if not ok:
            problems.append(
                f"{_line_of(text, m.start())}: `{section}.{key}{star}` is not a parameter "
                f"(the `{section}` section has: {', '.join(sorted(keys))})"
            )
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as '-'."""
    text = re.sub(r"<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors a Markdown page defines: its headings' slugs (``-1``, ``-2`` for repeats) and
    explicit ``<a id=...>`` / ``<a name=...>``."""
    seen: dict[str, int] = {}
    out = set()
    for line in blank_code(markdown, inline=False).split("\n"):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    out.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", markdown))
    return out


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def broken_links(
    text: str,
    doc: Path,
    root: Path,
    *,
    ignored: Callable[[Path], bool] = lambda p: False,
) -> list[str]:
    """Relative links of ``text`` (the page at ``doc``) that do not resolve inside ``root``:
    the file is missing, outside the repository or ignored by git; for a Markdown target, an
    ``#anchor`` that none of its headings defines."""
    root = root.resolve()
    problems = []
    for m in re.finditer(r"`(\.\./[^`\s]*)`", blank_code(text, inline=False)):
        # a path in a code span that climbs out of the page's folder: it must stay inside too
        if not (doc.parent / m.group(1)).resolve().is_relative_to(root):
            line = _line_of(text, m.start())
            problems.append(f"{line}: `{m.group(1)}` names a path outside the repository")
    prose = blank_code(text)
    for m in LINK.finditer(prose):
        target = m.group(1)
        line = _line_of(prose, m.start())
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path_part = re.sub(r"%20", " ", path_part)
        if path_part.startswith("/"):
            problems.append(f"{line}: link `{target}` is absolute: make it relative to the page")
            continue
        dest = (doc.parent / path_part).resolve() if path_part else doc.resolve()
        if not dest.is_relative_to(root):
            problems.append(f"{line}: link `{target}` points outside the repository")
            continue
        rel = dest.relative_to(root)
        if not dest.exists():
            problems.append(f"{line}: link `{target}`: {rel} does not exist")
            continue
        if ignored(dest):
            problems.append(
                f"{line}: link `{target}`: {rel} is ignored by git (generated; a fresh clone "
                "does not have it): name it as `code` instead"
            )
            continue
        if anchor and dest.suffix == ".md" and dest.is_file():
            page = text if dest == doc.resolve() else dest.read_text(encoding="utf-8")
            if anchor not in anchors(page):
                problems.append(f"{line}: link `{target}`: {rel} has no heading #{anchor}")
    return sorted(problems, key=lambda p: int(p.split(":", 1)[0]))


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """Each logical line of the fenced shell blocks (``bash``, ``sh``, ...), with its line
    number; backslash continuations are joined."""
    out: list[tuple[int, str]] = []
    inside, lang, pending, first = None, "", "", 0
    for n, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if inside is None:
            if m:
                inside, lang = m.group(2)[0], m.group(3).lower()
            continue
        if m and m.group(2)[0] == inside and not m.group(3):
            inside = None
            continue
        if lang not in SHELL_LANGS:
            continue
        if not pending:
            first = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    return out


SEPARATORS = {"&&", "||", "|", ";", "&", "(", ")", ";;", "|&"}
REDIRECTS = {">", ">>", "<", ">&", "&>", "<&", "&>>", ">|"}


def simple_commands(line: str) -> list[list[str]]:
    """A shell line split into simple commands (on ``&&``, ``||``, ``|``, ``;``, ``&`` and
    parentheses), redirections and leading ``VAR=value`` assignments left out, a ``$ `` prompt
    dropped. Raises ValueError when the line does not tokenise (an unclosed quote)."""
    line = re.sub(r"^\s*\$\s+", "", line)
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    tokens = list(lex)
    commands: list[list[str]] = [[]]
    skip_next = False
    for tok in tokens:
        if skip_next:
            skip_next = False
            continue
        if tok in SEPARATORS:
            commands.append([])
        elif tok in REDIRECTS:
            if commands[-1] and commands[-1][-1].isdigit():
                commands[-1].pop()  # 2>&1: the descriptor is not an argument
            skip_next = True
        else:
            commands[-1].append(tok)
    out = []
    for cmd in commands:
        while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
            cmd = cmd[1:]
        if cmd:
            out.append(cmd)
    return out


def makefile_targets(makefile: str) -> set[str]:
    """The targets a Makefile defines, ``$(VAR)`` expanded from its ``VAR :=`` lines."""
    variables = dict(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:?=\s*(.*?)\s*$", makefile, re.M))

    def expand(s: str, depth: int = 0) -> str:
        if depth > 10:
            return s
        new = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), ""), s)
        return new if new == s else expand(new, depth + 1)

    targets = set()
    for m in re.finditer(r"^([^\s:#=][^:=]*?)\s*:(?!=)", makefile, re.M):
        for name in m.group(1).split():
            name = expand(name)
            if not name.startswith(".") or "/" in name:  # .venv/.installed, not .PHONY
                targets.add(name)
    return targets


def _parse_salve(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """None when `salve ARGS` parses, else argparse's complaint."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            lines = [x for x in err.getvalue().strip().split("\n") if x.strip()]
            return lines[-1] if lines else f"exit {exc.code}"
    return None


def wrong_commands(
    text: str,
    parser: argparse.ArgumentParser,
    make_targets: set[str],
    root: Path | None = None,
) -> list[str]:
    """Commands of the fenced shell blocks that would fail at once: `salve` with a subcommand or
    flag its parser rejects, `make` with a target the Makefile lacks, `python SCRIPT.py` whose
    script is not in ``root``."""
    problems = []
    for n, line in shell_blocks(text):
        try:
            commands = simple_commands(line)
        except ValueError as exc:
            problems.append(f"{n}: cannot read `{line.strip()}` as a shell line ({exc})")
            continue
        for cmd in commands:
            prog, args = Path(cmd[0]).name, cmd[1:]
            shown = " ".join(cmd)
            if prog == "salve":
                complaint = _parse_salve(parser, args)
                if complaint:
                    problems.append(f"{n}: `{shown}`: {complaint}")
            elif prog == "make":
                names = [a for a in args if not a.startswith("-") and "=" not in a]
                for t in names:
                    if t not in make_targets:
                        problems.append(f"{n}: `{shown}`: the Makefile has no target `{t}`")
            elif re.fullmatch(r"python(3(\.\d+)?)?", prog) and root is not None:
                script = next((a for a in args if not a.startswith("-")), None)
                if args and args[0] in ("-m", "-c"):
                    continue
                if script and script.endswith(".py") and not (root / script).is_file():
                    problems.append(f"{n}: `{shown}`: no script {script} in the repository")
    return problems


def hand_written_pages(root: Path) -> list[Path]:
    """The pages the drift checks read: README.md and docs/*.md."""
    return [root / README, *sorted((root / "docs").glob("*.md"))]


def git_ignored(root: Path) -> Callable[[Path], bool]:
    """Whether git ignores a path (False for every path outside a git work tree)."""

    def check(path: Path) -> bool:
        try:
            out = subprocess.run(
                ["git", "check-ignore", "-q", str(path)],
                cwd=root,
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return out.returncode == 0

    return check


def drift(root: Path, pages: Sequence[Path] | None = None) -> list[str]:
    """Every drift problem of the hand-written pages, as ``PAGE:LINE: message``."""
    from flows.cli import build_parser

    root = root.resolve()
    schema = schema_keys()
    parser = build_parser()
    makefile = root / "Makefile"
    targets = makefile_targets(makefile.read_text()) if makefile.is_file() else set()
    ignored = git_ignored(root)
    problems = []
    for page in pages if pages is not None else hand_written_pages(root):
        text = page.read_text(encoding="utf-8")
        rel = page.resolve().relative_to(root)
        found = (
            wrong_keys(text, schema)
            + broken_links(text, page, root, ignored=ignored)
            + wrong_commands(text, parser, targets, root)
        )
        problems += [f"{rel}:{p}" for p in sorted(found, key=lambda p: int(p.split(":", 1)[0]))]
    return problems
