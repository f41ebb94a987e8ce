"""The headless-Chromium check used on every report test must itself catch a broken page."""

import plotly.graph_objects as go
import pytest

from alternas.diagnostics.figures import write_html
from tests.browser import assert_report_renders, chromium, render


def test_browser_check_sees_rendered_figures_and_catches_errors(tmp_path) -> None:
    chromium()  # skips outside CI when there is no browser
    figures = [go.Figure(go.Scatter(y=[1, 3, 2])), go.Figure(go.Parcoords(dimensions=[{"values": [1, 2]},
                                                                                     {"values": [3, 1]}]))]
    good = write_html(tmp_path / "good.html", "good", figures)
    shown = assert_report_renders(good, min_figures=2)
    assert [f["traces"] for f in shown.figures] == [1, 1]

    broken = tmp_path / "broken.html"
    # a script error and an external plotly.js that the closed network cannot serve: nothing may render
    page = good.read_text().replace("<body>", "<body><script>undefinedCall()</script>", 1)
    start = page.index("<script>/**")  # the inlined plotly.js
    end = page.index("</script>", start) + len("</script>")
    broken.write_text(page[:start] + '<script src="https://cdn.plot.ly/plotly-2.35.2.min.js"></script>' + page[end:])
    shown = render(broken)
    assert any("undefinedCall is not defined" in line for line in shown.console)
    assert all(f["traces"] == 0 for f in shown.figures)
    with pytest.raises(AssertionError):
        assert_report_renders(broken, min_figures=2)
