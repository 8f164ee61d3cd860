"""Interaction time of the dashboard for estimate-sized changes. Target: under 300 ms per change.

* Plan page, in headless Chromium against a local server: a closer look at another recommended
  configuration (its estimate, figures and exports), from the click until the page shows the new
  figures; the part of the page that changes is a fragment, so only it reruns, as a user sees it.
* Estimate page, with Streamlit's AppTest (the script's full rerun, without a browser): the batch size
  changed to values not seen before, so every estimate is computed, not served from the cache.

Prints the median and the slowest of each.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app" / "dashboard.py")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _report(what: str, times: list[float]) -> None:
    print(f"{what}: median {statistics.median(times) * 1e3:.0f} ms, max {max(times) * 1e3:.0f} ms over "
          f"{len(times)} changes")


def estimate_page() -> list[float]:
    at = AppTest.from_file(APP, default_timeout=300).run()
    at.sidebar.radio(key="page").set_value("Estimate").run()
    times = []
    for i in range(10):
        at.number_input(key="est_batch").set_value((65 + i) * 4096)
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
        assert not at.exception
    return times


def _server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", APP, "--server.port", str(port),
                             "--server.headless", "true", "--server.address", "127.0.0.1"], cwd=ROOT,
                            env={**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("streamlit did not start")


# Click the i-th recommended row's radio and resolve, in ms, once the fragment's heading names that row and the
# four figures are on the page (a MutationObserver: no polling delay of the test driver in the measurement).
_PICK_AND_WAIT = """async (i) => {
  const radios = [...document.querySelectorAll('label')].filter(l => /^\\d+\\. /.test(l.innerText));
  const done = () => [...document.querySelectorAll('h3')].some(h => h.innerText.startsWith(`Row ${i + 1}:`))
      && document.querySelectorAll('.js-plotly-plot').length >= 4;
  const start = performance.now();
  await new Promise(resolve => {
    const observer = new MutationObserver(() => { if (done()) { observer.disconnect(); resolve(); } });
    observer.observe(document.body, {childList: true, subtree: true, characterData: true});
    radios[i].click();
  });
  return performance.now() - start;
}"""


def plan_page_in_a_browser() -> list[float]:
    from playwright.sync_api import sync_playwright

    proc, url = _server()
    times = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.goto(url, wait_until="networkidle")
            page.wait_for_selector(".js-plotly-plot", timeout=120_000)
            count = page.get_by_role("radio", name=re.compile(r"^\d+\. ")).count()
            for i in range(1, min(count, 11)):  # timed inside the page: the click to the new heading and figures
                times.append(page.evaluate(_PICK_AND_WAIT, i) / 1e3)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return times


def main() -> None:
    if os.path.exists(CHROMIUM):
        _report("Plan page in Chromium, a closer look at another configuration", plan_page_in_a_browser())
    else:
        print("Plan page: Chromium is not installed; skipped")
    _report("Estimate page re-render after a change (AppTest)", estimate_page())


if __name__ == "__main__":
    main()
