"""Both HTML reports come from one autoescaped layout and one table macro: text from the
database (a user program's name, a load test's threshold) cannot inject markup, and the
pages share their frame (viewport for phones, print rules)."""

from __future__ import annotations

from datetime import UTC, datetime

from markupsafe import Markup

from tasks.reports.render import _environment, fmt
from tasks.reports.results import ReportData, RunPoint, render_html

HOSTILE = '<img src=x onerror="alert(1)">'


def _run(**fields) -> RunPoint:  # type: ignore[no-untyped-def]
    base = dict(
        id="r1",
        created_at=datetime(2026, 12, 6, 12, 0, tzinfo=UTC),
        state="succeeded",
        task="intent",
        optimizer="mipro",
        lm="sim",
        simulated=True,
        baseline_score=0.2,
        best_score=0.3,
        duration_s=12.5,
        lm_calls=40,
        tokens=1000,
    )
    return RunPoint(**{**base, **fields})


def test_text_from_the_database_is_escaped_in_the_results_page() -> None:
    data = ReportData(
        generated_at=datetime(2026, 12, 6, tzinfo=UTC),
        database=f"sqlite:///{HOSTILE}",
        runs=[_run(task=HOSTILE)],
    )
    page = render_html(data)
    assert HOSTILE not in page
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page
    assert "1 run(s) used the simulated LM" in page
    assert "<td>0.3</td>" in page and "<td>12.5</td>" in page


def test_an_empty_results_page_has_the_shared_frame() -> None:
    page = render_html(ReportData(generated_at=datetime(2026, 12, 6, tzinfo=UTC), database="x"))
    assert '<meta name="viewport"' in page and "@media print" in page
    # The plot macro's empty state, per figure: scores, durations, trends, load-test
    # windows and percentiles (run histories, tradeoffs and batches have no section).
    assert page.count("no data yet") == 5


def test_the_table_macro_escapes_text_and_keeps_markup() -> None:
    template = _environment().from_string(
        '{% from "macros.html.j2" import table %}{{ table(["a", "b"], rows, left=1) }}'
    )
    page = template.render(rows=[[Markup("<b>kept</b>"), "<b>text</b>"]])
    assert '<td class="l"><b>kept</b></td>' in page
    assert "<td>&lt;b&gt;text&lt;/b&gt;</td>" in page


def test_cells_are_formatted_once() -> None:
    assert fmt(None) == "-"
    assert fmt(True) == "yes"
    assert fmt(float("inf")) == "inf"
    assert fmt(0.123456) == "0.1235"
    assert fmt(datetime(2026, 12, 6, 7, 8)) == "2026-12-06 07:08"
    span = Markup('<span class="pass">pass</span>')
    assert fmt(span) is span
