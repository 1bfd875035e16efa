"""The pages' rendering kit: number formatting, embedded images, tables, the Jinja2 environment.

Every page (run report, latent browser, compare page, study page) is built in two steps: small
functions turn the inputs into plain data (strings, numbers, data-URI images), and a template in
``salve/present/templates`` lays it out (autoescaped, so text from data is never markup;
``StrictUndefined``, so a misspelt field fails instead of rendering blank).

Jinja2 and matplotlib are imported when first needed: `fmt` alone (the compare metrics, the key
metrics declaration) stays cheap to import.
"""

from __future__ import annotations

import base64
import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2


class ReportInputError(ValueError):
    """An upstream artifact lacks something the report shows (renamed key, stale format)."""


def fmt(value: Any, digits: int = 4) -> str:
    """Short text for a number or other value: 4 significant digits, inf as ∞, None as –."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value + 0.0:.{digits}g}" if value != 0 else "0"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclass(frozen=True)
class Image:
    """A figure or picture for a template: ``src`` is a data URI, None when nothing was drawn."""

    caption: str
    src: str | None
    cls: str = "fig"
    missing: str = "not available"


@dataclass(frozen=True)
class Table:
    """Rows of already formatted cells; ``code_columns`` are shown as code."""

    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    row_classes: tuple[str, ...] = ()
    code_columns: tuple[int, ...] = ()


KV = list[tuple[str, str]]


def kv(items: Sequence[tuple[str, Any]]) -> KV:
    return [(str(k), v if isinstance(v, str) else fmt(v)) for k, v in items]


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], **kw: Any) -> Table:
    """A Table whose non-string cells are formatted with fmt."""
    cells = [tuple(v if isinstance(v, str) else fmt(v) for v in row) for row in rows]
    return Table(tuple(header), cells, **kw)


# Read by the pipeline's dependency scan (tasks/deps.py): the templates are part of this code.
PACKAGE_DATA = ("templates",)


@functools.cache
def environment() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("salve.present", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


@dataclass
class Embeds:
    """Counts what a page embeds (the report stage's summary metrics)."""

    figures: int = 0
    images: int = 0

    def figure(self, png: bytes | None, caption: str, missing: str = "not available") -> Image:
        if png is not None:
            self.figures += 1
        return Image(caption, png_data_uri(png) if png is not None else None, missing=missing)

    def image(self, png: bytes | None, caption: str, cls: str = "fig") -> Image | None:
        if png is None:
            return None
        from salve.present.figures import compact_png

        self.images += 1
        return Image(caption, png_data_uri(compact_png(png)), cls=cls)
