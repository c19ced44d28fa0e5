"""Render a report page in headless Chromium and read back what it drew: the one check
that a page's plots really display (decoded, laid out), shared by the report tests."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

_CHECK_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img.plot'));
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var out = document.createElement('pre');
  out.id = 'plot-check';
  out.textContent = JSON.stringify({total: imgs.length, rendered: ok.length,
    widths: imgs.map(function (i) { return i.naturalWidth; }),
    shown: imgs.map(function (i) { return i.getBoundingClientRect().width; }),
    page: document.documentElement.scrollWidth, viewport: window.innerWidth});
  document.body.appendChild(out);
});
</script>
"""


def render_in_chromium(page: Path, workdir: Path, *, width: int = 1200) -> dict[str, Any]:
    """Load `page` (a copy with a probe script) in a `width`-pixel-wide window; returns the
    plots' count, how many decoded, their natural and shown widths, and the page width."""
    assert CHROMIUM is not None, "needs chromium: apt-get install -y chromium"
    probe = workdir / f"probe-{width}.html"
    probe.write_text(page.read_text().replace("</body>", _CHECK_SCRIPT + "</body>"))
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--window-size={width},900",
            f"--user-data-dir={workdir / 'chromium-profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    start = out.stdout.find('<pre id="plot-check">')
    assert start >= 0, out.stderr[-2000:]
    return json.loads(
        out.stdout[start:].split(">", 1)[1].split("</pre>", 1)[0].replace("&quot;", '"')
    )
