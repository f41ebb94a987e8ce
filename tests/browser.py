"""Open a report in real headless Chromium and say what rendered and what the console printed.

Chromium runs with no network (every host resolves to nothing), so a page that is not self-contained fails.
A probe script, appended to a copy of the page, records per plotly figure what was drawn once the page has
loaded; ``--dump-dom`` hands the resulting DOM back, and ``--enable-logging=stderr`` every console message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000",
]

# Counts what plotly drew per figure: SVG traces, heatmap images, parallel-coordinates WebGL canvases.
PROBE = """
<script>
window.addEventListener('load', () => setTimeout(() => {
  const figures = [...document.querySelectorAll('.plotly-graph-div')].map(gd => ({
    id: gd.id,
    traces: (gd._fullData || []).length,
    marks: gd.querySelectorAll('g.trace, g.hm, image, .gl-canvas').length,
    height: gd.getBoundingClientRect().height,
  }));
  const notes = [...document.querySelectorAll('.notifier-note')].map(n => n.textContent);
  const out = document.createElement('pre');
  out.id = 'render-probe';
  out.textContent = JSON.stringify({figures, notes});
  document.body.appendChild(out);
}, 1000));
</script>
"""


@dataclass
class Rendered:
    figures: list[dict]
    notes: list[str]  # plotly's on-page error notifiers (e.g. "WebGL is not supported")
    console: list[str]  # every console message of the page, errors included (not the GL driver's notes)


MISSING = "no chromium on PATH: apt-get install chromium to open the reports in a browser"


def find_chromium() -> str | None:
    """The Chromium binary; CI must have one (``.ci/run`` installs Debian's)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found and os.environ.get("CI"):
        pytest.fail("CI must provide chromium (.ci/run installs Debian's chromium package)")
    return found


def chromium() -> str:
    """The Chromium binary, or skip the (browser-only) test that asks for it."""
    return find_chromium() or pytest.skip(MISSING)


def render(page: Path) -> Rendered:
    with tempfile.TemporaryDirectory() as tmp:
        probed = Path(tmp) / page.name
        probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
        res = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile", "--dump-dom",
                              probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    found = re.search(r'<pre id="render-probe">(.*?)</pre>', res.stdout, re.S)
    assert found, "the probe never ran: the page did not finish loading"
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                       .replace("&amp;", "&"))
    console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line and not _driver_note(line)]
    return Rendered(probe["figures"], probe["notes"], console)


def _driver_note(line: str) -> bool:
    """SwiftShader's WebGL performance notes ("GPU stall due to ReadPixels") are the browser's, not the page's."""
    return "GL Driver Message (OpenGL, Performance" in line


def assert_report_renders(page: Path, min_figures: int) -> Rendered | None:
    """Every figure drew its traces, plotly raised no notifier, and the console stayed silent. Without chromium
    (outside CI) only this check is left out, with a warning, not the rest of the test that calls it."""
    if not find_chromium():
        warnings.warn(MISSING, stacklevel=2)
        return None
    shown = render(page)
    assert len(shown.figures) >= min_figures, shown.figures
    blank = [f for f in shown.figures if f["traces"] == 0 or f["marks"] == 0 or f["height"] < 50]
    assert not blank, f"figures that did not render: {blank}"
    assert not shown.notes, shown.notes
    assert not shown.console, shown.console
    return shown
