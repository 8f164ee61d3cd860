"""The Streamlit dashboard: every page with AppTest, then a real browser (headless Chromium)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("streamlit", reason="the 'app' extra is not installed")
from streamlit.testing.v1 import AppTest  # noqa: E402

from tests.conftest import ROOT  # noqa: E402

APP = str(ROOT / "app" / "dashboard.py")
ARTIFACTS = ROOT / "artifacts" / "screenshots"


def _app(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _every_figure_passes_plotlys_full_check(at: AppTest) -> None:
    """Figures built without plotly's per-property checks (report.quick_figure) must still be valid figures."""
    import json

    import plotly.graph_objects as go

    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        go.Figure(spec)  # raises on any property plotly does not know


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_plan_is_the_landing_page_and_compares_hardware_options():
    at = AppTest.from_file(APP, default_timeout=300).run()
    assert not at.exception and at.sidebar.radio(key="page").value == "Plan"
    assert len(at.dataframe) == 2 and len(at.get("plotly_chart")) >= 4  # comparison, rows; front, details
    compare = at.dataframe[0].value
    assert len(compare) == 2 and {"tpu-v5p 4x4x4", "dgx-h100 8"} == set(compare["hardware"])
    assert {b.label for b in at.get("download_button")} == {"Download MaxText config", "Download Megatron arguments"}
    _every_figure_passes_plotlys_full_check(at)
    first = [m.value for m in at.metric]
    pick = at.radio(key="plan_pick")
    other = next(i for i, label in enumerate(pick.options) if "dgx-h100" in label)
    pick.set_value(other).run()
    assert not at.exception and [m.value for m in at.metric] != first
    at.selectbox(key="plan_hw1").set_value("dgx-b200").run()
    assert not at.exception and "dgx-b200 8" in set(at.dataframe[0].value["hardware"])
    at.radio(key="plan_budget_kind").set_value("dollars").run()  # a money budget: both families are priced
    assert not at.exception and not at.warning


def test_plan_offers_only_sizes_that_load_and_takes_an_uploaded_model():
    import yaml

    at = AppTest.from_file(APP, default_timeout=300).run()
    for i, family in ((0, "tpu-v6e"), (1, "gb200-nvl72")):
        at.selectbox(key=f"plan_hw{i}").set_value(family).run()
        sizes = at.selectbox(key=f"plan_size{i}_{family}").options
        for size in sizes:
            import moeplan as mp

            topo = mp.load_topology(family, **({"shape": size} if "x" in size else {"nodes": int(size)}))
            assert topo.num_devices >= 1
        assert not at.exception
    model = yaml.safe_load((ROOT / "models" / "mixtral-8x7b.yaml").read_text())
    at.file_uploader(key="plan_up").set_value(("m.yaml", yaml.safe_dump({**model, "n_layers": 8}).encode(),
                                                "text/yaml")).run()
    assert not at.exception and not at.error and at.dataframe
    at.file_uploader(key="plan_up").set_value(("m.yaml", b"d_model: [1", "text/yaml")).run()
    assert at.error and "Invalid model" in at.error[0].value and not at.exception


def test_topology_page_changes_with_family_and_size():
    at = _app("Topology")
    assert _metric(at, "Devices") == "8"
    at.text_input(key="topo_size_dgx-h100").set_value("4").run()
    assert _metric(at, "Devices") == "32" and not at.error
    at.selectbox(key="topo_family").set_value("tpu-v5p").run()
    assert _metric(at, "Devices") == "64"
    at.text_input(key="topo_size_tpu-v5p").set_value("3x4x4").run()
    assert at.error and "not offered" in at.error[0].value and not at.exception


def test_estimate_page_defaults_fit_and_its_layout_follows_the_device_count():
    at = _app("Estimate")
    assert not at.warning and not at.error  # the default layout fits
    first = _metric(at, "Step time")
    at.number_input(key="est_batch").set_value(16 * 4096).run()
    assert _metric(at, "Step time") != first
    at.selectbox(key="est_mode").set_value("decode").run()
    assert not at.exception
    at.selectbox(key="est_mode").set_value("train").run()
    at.selectbox(key="est_family").set_value("tpu-v5p").run()  # 64 chips: every choice a divisor of 64
    assert not at.exception and not at.error and not at.warning
    widget = {s.key.split("_")[1]: s for s in at.selectbox if s.key.startswith(("est_tensor_", "est_pipeline_"))}
    assert widget["tensor"].options == ["1", "2", "4", "8", "16", "32", "64"]
    recompute = next(s for s in at.selectbox if s.key.startswith("est_recompute_"))
    assert "offload_projections" in recompute.options  # TPU v5p has a host link
    recompute.set_value("offload_projections").run()
    at.selectbox(key="est_framework").set_value("maxtext").run()
    assert not at.exception and any("offloaded activations" in c.value for c in at.caption)
    widget["tensor"].set_value(64).run()
    next(s for s in at.selectbox if s.key.startswith("est_pipeline_")).set_value(2).run()
    assert at.error and "does not divide the 64 devices" in at.error[0].value and not at.exception
    at.selectbox(key="est_family").set_value("tpu-v3").run()  # no host link: no offload offered
    assert "offload" not in next(s for s in at.selectbox if s.key.startswith("est_recompute_")).options


def test_search_page_ranks_and_reports_bad_lists():
    at = _app("Search")
    assert len(at.get("plotly_chart")) >= 2 and at.dataframe
    rows = len(at.dataframe[0].value)
    at.text_input(key="srch_experts").set_value("8").run()
    assert len(at.dataframe[0].value) != rows or not at.exception
    at.text_input(key="srch_experts").set_value("eight").run()
    assert at.error and not at.exception


def test_calibration_page_shows_the_profile_and_rejects_garbage():
    at = _app("Calibration")
    assert "%" in _metric(at, "Held-out error after fit")
    assert len(at.get("plotly_chart")) == 1


def test_calibration_page_shows_an_uploaded_validation_run_and_rejects_garbage():
    import json

    from moeplan.calibrate.validate import summarize  # numpy/scipy only

    records = [{"key": f"c{i}", "model": f"m{i}", "measured": {"attention": 0.01 * (i + 1), "experts": 0.02},
                "predicted": {"attention": 0.012 * (i + 1), "experts": 0.018}, "measured_step_s": 0.1 * (i + 1),
                "predicted_step_s": 0.11 * (i + 1)} for i in range(3)]
    summary = summarize(records)
    at = _app("Calibration")
    at.file_uploader(key="val_up").set_value(("results.json", json.dumps(summary).encode(), "application/json")).run()
    assert not at.exception and not at.error
    assert _metric(at, "Step-time order, Kendall tau") == "1.00" and _metric(at, "Candidates") == "3"
    assert len(at.get("plotly_chart")) == 2 and at.dataframe
    for bad in (b"{not json", json.dumps({"rows": [{"part": "x"}]}).encode()):
        at.file_uploader(key="val_up").set_value(("results.json", bad, "application/json")).run()
        assert at.error and "Invalid results" in at.error[0].value and not at.exception


def test_calibration_page_validates_the_last_search_on_this_machine():
    pytest.importorskip("jax", reason="the 'jax' extra is not installed")
    at = _app("Calibration")  # the landing Plan page ran first: its candidates are offered
    assert any("(the plan)" in c.value for c in at.caption) and at.button(key="valh_run")
    at.sidebar.radio(key="page").set_value("Search").run()
    at.text_input(key="srch_experts").set_value("4,16").run()
    at.text_input(key="srch_cf").set_value("1.25").run()  # candidates that differ in experts, top-k or every
    at.sidebar.radio(key="page").set_value("Calibration").run()
    assert any("on dgx-h100 1" in c.value and "(the plan)" not in c.value for c in at.caption)  # the search's
    at.number_input(key="valh_count").set_value(2).run()
    at.button(key="valh_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception or at.error]
    assert _metric(at, "Candidates") == "2" and _metric(at, "Step-time order, Kendall tau") != "n/a"
    shown = at.dataframe[-1].value  # the candidates, scaling rule and step times
    assert len(shown) == 2 and (shown["measured ms"] > 0).all() and (shown["predicted ms"] > 0).all()
    assert all("E=" in rule for rule in shown["scaled to"])
    assert len(list((ROOT / "artifacts" / "dashboard-validate").glob("*/results.json"))) >= 1


def test_an_uploaded_profile_cannot_make_the_server_read_a_path(tmp_path, monkeypatch):
    import yaml

    import moeplan.schema as schema

    secret = tmp_path / "secret.yaml"  # a valid family file: read, it would load
    secret.write_text((ROOT / "topologies" / "cpu-host.yaml").read_text())
    opened: list[str] = []
    real = schema.read_bounded
    monkeypatch.setattr(schema, "read_bounded", lambda path, *a, **k: opened.append(str(path)) or real(path, *a, **k))
    doc = yaml.safe_load((ROOT / "profiles" / "cpu-host.yaml").read_text())
    at = _app("Calibration")

    def upload(profile: dict) -> None:
        at.file_uploader(key="cal_up").set_value(("p.yaml", yaml.safe_dump(profile).encode(), "text/yaml")).run()

    for topology in (str(secret), "/etc/passwd.yaml", "/etc/passwd"):
        upload({**doc, "topology": topology})
        assert at.error and "expected a bundled family" in at.error[0].value and not at.exception
        assert not at.get("plotly_chart")
    assert not [p for p in opened if "secret" in p or "passwd" in p]
    assert any(p.endswith("cpu-host.yaml") for p in opened)  # the spy sees the reads that do happen
    broken = {**doc, "measurements": [{"kind": "matmul", "time_s": 0.001}]}  # no m, n, k
    upload(broken)
    assert at.error and "cannot plot" in at.error[0].value and not at.exception
    upload(doc)
    assert not at.error and not at.exception and len(at.get("plotly_chart")) == 1


# ------------------------------------------------------------------ a real browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", APP, "--server.port", str(port),
                             "--server.headless", "true", "--server.address", "127.0.0.1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def _figure_text(page) -> str:
    return page.eval_on_selector_all(".js-plotly-plot", "els => els.map(e => JSON.stringify(e.data || [])).join('|')")


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Chromium is not installed and could not be (see .ci/run)")
def test_every_page_in_headless_chromium(server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server, wait_until="networkidle")
        page.wait_for_selector(".js-plotly-plot", timeout=120_000)  # the landing page: Plan
        for name, change in [("Topology", ("Nodes", "4")), ("Estimate", ("Global batch (tokens; decode: sequences)",
                                                                          "65536")),
                             ("Search", ("Experts to try", "8,16")), ("Calibration", None)]:
            page.get_by_text(name, exact=True).first.click()
            page.wait_for_selector(".js-plotly-plot", timeout=90_000)
            page.wait_for_timeout(1500)
            before = _figure_text(page)
            assert "Traceback" not in page.content()
            if change:
                box = page.get_by_label(change[0]).first
                box.fill(change[1])
                box.press("Enter")
                page.wait_for_timeout(4000)
                page.wait_for_selector(".js-plotly-plot", timeout=90_000)
                assert _figure_text(page) != before, f"{name}: the figure did not change"
            page.screenshot(path=str(ARTIFACTS / f"{name.lower()}.png"), full_page=True)
        browser.close()


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Chromium is not installed and could not be (see .ci/run)")
def test_plan_page_end_to_end_in_headless_chromium(server, tmp_path):
    """A new user's path: the Plan page, a second hardware option changed, a closer look at another row, its
    breakdown, and both exports downloaded and read back."""
    import re

    import yaml
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1400}, accept_downloads=True)
        page.goto(server, wait_until="networkidle")
        page.wait_for_selector(".js-plotly-plot", timeout=120_000)
        page.get_by_label("Hardware 2", exact=True).click()
        page.get_by_role("option", name="dgx-b200", exact=True).click()
        page.get_by_role("radio", name=re.compile(r"^\d+\. dgx-b200 ")).first.wait_for(timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "plan.png"), full_page=True)
        metrics = page.locator('[data-testid="stMetric"]')
        before = metrics.all_inner_texts()
        page.get_by_role("radio", name=re.compile(r"^\d+\. dgx-b200 ")).first.click(force=True)
        page.wait_for_timeout(3000)
        assert "Traceback" not in page.content()
        assert page.locator(".js-plotly-plot").count() >= 4  # front, breakdown, memory, timeline
        assert metrics.all_inner_texts() != before
        page.screenshot(path=str(ARTIFACTS / "plan_selected.png"), full_page=True)
        texts = {}
        for label in ("Download MaxText config", "Download Megatron arguments"):
            with page.expect_download(timeout=60_000) as info:
                page.get_by_role("button", name=label).click()
            target = tmp_path / info.value.suggested_filename
            info.value.save_as(target)
            texts[label] = target.read_text()
        browser.close()
    config = yaml.safe_load(texts["Download MaxText config"])
    assert {"ici_fsdp_parallelism", "num_experts", "num_experts_per_tok", "remat_policy"} <= set(config)
    megatron = texts["Download Megatron arguments"].split()
    assert "--tensor-model-parallel-size" in megatron and "--expert-model-parallel-size" in megatron
