"""Load an HTML file in headless Chromium and read back what rendered.

:func:`render` copies the page with a small script inserted first in ``<head>``: it records
uncaught errors, unhandled promise rejections and ``console.error`` calls, and once the page has
loaded (and plotly has drawn) writes a JSON summary into the DOM, which ``chromium --dump-dom``
prints. Chromium comes from the Debian package ``chromium`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
SKIP_REASON = "no Chromium installed (Debian: apt-get install chromium; .ci/run installs it)"

PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) { errors.push("error: " + (e.message || e.type)); });
  window.addEventListener("unhandledrejection", function (e) { errors.push("unhandled rejection: " + e.reason); });
  var consoleError = console.error;
  console.error = function () { errors.push("console.error: " + Array.from(arguments).join(" ")); consoleError.apply(console, arguments); };
  window.addEventListener("load", function () {
    setTimeout(function () {
      var figures = Array.from(document.querySelectorAll("[data-figure]")).map(function (f) {
        return {name: f.getAttribute("data-figure"),
                svg_roots: f.querySelectorAll(".js-plotly-plot svg.main-svg").length,
                plots: f.querySelectorAll(".js-plotly-plot").length};
      });
      var out = document.createElement("pre");
      out.id = "__render_check";
      out.textContent = JSON.stringify({errors: errors, figures: figures});
      document.body.appendChild(out);
    }, 2000);
  });
})();
</script>"""


def render(page: Path, workdir: Path, timeout: float = 120) -> dict:
    """``{"errors": [...], "figures": [{"name", "svg_roots", "plots"}, ...]}`` of ``page`` rendered."""
    if CHROMIUM is None:
        raise RuntimeError(SKIP_REASON)
    text = page.read_text(encoding="utf-8")
    probed = workdir / f"probed-{page.name}"
    probed.write_text(re.sub(r"<head>", "<head>" + PROBE, text, count=1), encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={workdir / 'chromium-profile'}", "--virtual-time-budget=15000", "--dump-dom",
           probed.resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    found = re.search(r'<pre id="__render_check">(.*?)</pre>', dom, re.S)
    if found is None:
        raise AssertionError(f"the page did not finish loading in Chromium (DOM of {len(dom)} characters)")
    return json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
