"""The reports' HTML: Jinja2 templates (autoescaped) that share one layout and one
table macro, and the one way values are formatted in a cell."""

from __future__ import annotations

import math
from datetime import datetime
from functools import cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup


def fmt(value: Any) -> Any:
    """A table cell's text: `-` for nothing, 4 significant digits, minutes for times.
    Markup (a verdict span, a `<code>` expression) passes through as it is."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    return str(value)


@cache
def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("tasks.reports", "templates"),
        autoescape=True,
        undefined=StrictUndefined,  # a misspelt field fails the render, not a blank cell
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    return env


def render(template: str, **context: Any) -> str:
    return _environment().get_template(template).render(**context)
