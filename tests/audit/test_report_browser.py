"""The audit report in a real browser: Debian's headless chromium driven by Selenium.

Skipped where chromium, chromedriver or selenium is missing (`.ci/run` installs chromium and
chromium-driver with apt; selenium is in the dev extra). What only a browser can tell: the page
runs without console errors under its Content-Security-Policy, never scrolls sideways at 1280 px,
a header click sorts the table, and a concept link opens the collapsed section it points into.
"""

from __future__ import annotations

import shutil

import pytest

from lightning_anatomy.audit import audit_features
from lightning_anatomy.audit.report import anchor, render_report
from lightning_anatomy.data.rows import PreferenceRow
from tests.helpers.audit_synthetic import HOOK, make_span_features

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

WIDTH, HEIGHT = 1280, 800


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    features, _ = make_span_features(n_pairs=160, planted=(7, 42), local=(60, 61), seed=5)
    # dataset text that would run if it were not escaped (a console error / CSP violation otherwise)
    rows = [PreferenceRow(f"Q{i}? <script>alert(1)</script>", f"chosen {i}", f"rejected {i} <img src=x>",
                          row_id=int(rid)) for i, rid in enumerate(features.row_ids)]
    contexts = [{"hook": HOOK, "feature": 42, "source": "row 1000 chosen", "token": " sorry", "activation": 2.0,
                 "text": "I am «sorry»(2.00), I cannot"}]
    result = audit_features(features, rows=rows, labels={(HOOK, 7): "marker"}, contexts=contexts, n_bootstrap=50,
                            n_data_clusters=2, min_cluster_pairs=20, top_k_trace=4, trace_pairs=3)
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(render_report(result), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def driver():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WIDTH},{HEIGHT}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(60)
    yield browser
    browser.quit()


@pytest.mark.slow
def test_report_in_headless_chromium(driver, report_file):
    driver.get(report_file.as_uri())
    js = driver.execute_script
    # no console error: the CSP admits our script, nothing fails to load or run
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    assert js("return document.documentElement.clientWidth") <= WIDTH
    assert js("return document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    # only the ranked concepts are open until asked: the page is a few screens tall
    assert js("return document.documentElement.scrollHeight") < 4 * HEIGHT

    # a header click sorts the ranked concepts (by their numeric data-v, NaN last)
    table = driver.find_element(By.CSS_SELECTOR, "#concepts table.sortable")
    header = next(th for th in table.find_elements(By.CSS_SELECTOR, "thead th") if th.text.strip() == "feature")
    column = [th.text.strip() for th in table.find_elements(By.CSS_SELECTOR, "thead th")].index("feature")

    def features_shown():
        return [int(v) for v in js("return Array.from(arguments[0].tBodies[0].rows, r => r.cells[arguments[1]]"
                                   ".getAttribute('data-v'))", table, column)]

    before = features_shown()
    header.click()
    assert header.get_attribute("aria-sort") == "ascending" and features_shown() == sorted(before)
    header.click()
    assert header.get_attribute("aria-sort") == "descending" and features_shown() == sorted(before, reverse=True)

    # a concept link in the summary opens the collapsed details and reaches the concept's section
    sid = anchor("concept", HOOK, 42)
    details = driver.find_element(By.ID, "concept-details")
    assert details.get_attribute("open") is None
    target = driver.find_element(By.ID, sid)
    assert not target.is_displayed()
    driver.find_element(By.CSS_SELECTOR, f'#learn a[href="#{sid}"]').click()
    assert details.get_attribute("open") is not None and target.is_displayed()
    assert js("return location.hash") == f"#{sid}"
    top = js("return arguments[0].getBoundingClientRect().top", target)
    assert 0 <= top < HEIGHT / 2  # scrolled to it
    # and its link back reaches its row in the table
    target.find_element(By.CSS_SELECTOR, f'a[href="#row-{sid}"]').click()
    row = driver.find_element(By.ID, f"row-{sid}")
    assert row.is_displayed() and js("return location.hash") == f"#row-{sid}"
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
