"""The web dashboard, served by the real API; the browser test drives Debian's headless Chromium."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Service, stop_process
from tests.support.data import chat_lines, jsonl
from tests.support.service import TERMINAL

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def test_dashboard_page_and_assets_are_served_without_a_build_step(service: Service) -> None:
    with httpx.Client(base_url=service.base_url) as client:
        assert client.get("/dashboard").headers["location"] == "/dashboard/"
        page = client.get("/dashboard/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script src="/dashboard/app.js"' in page.text and "http" not in page.text.split("<body>")[0]
        script = client.get("/dashboard/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "/events/stream" in script.text
        assert client.get("/dashboard/style.css").headers["content-type"].startswith("text/css")
        assert client.get("/dashboard/..%2Fcli.py").status_code == 404
        assert client.get("/dashboard/index.js").status_code == 404
        # The page holds the user's API key: its own script only, this service only, in no other site's frame.
        for served in (page, script):
            policy = served.headers["content-security-policy"]
            assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
            assert served.headers["x-content-type-options"] == "nosniff"


@pytest.fixture
def browser(request: pytest.FixtureRequest) -> Iterator[Any]:
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        pytest.skip("needs Debian's chromium and chromium-driver packages")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_dashboard_form_starts_a_job_whose_charts_draw_live(service: Service, browser: Any, tmp_path: Path) -> None:
    inference = service.start_inference("dashboard")  # for the Try it panel; gone again after this test
    try:
        drive_a_job_through_the_dashboard(service, browser, tmp_path)
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)  # what the browser showed, for the CI artifacts
        browser.save_screenshot(str(ARTIFACTS / "dashboard-failure.png"))
        (ARTIFACTS / "dashboard-failure.txt").write_text(browser.execute_script("return document.body.innerText"))
        raise
    finally:
        stop_process(inference, grace=20)


def drive_a_job_through_the_dashboard(service: Service, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    dataset = tmp_path / "colours.jsonl"
    dataset.write_bytes(jsonl(chat_lines(12)))
    browser.get(f"{service.base_url}/dashboard/")
    browser.find_element(By.ID, "api-key").send_keys(service.api_key)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    browser.get(f"{service.base_url}/dashboard/#/new")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option[value='tiny-llama']"))
    browser.find_element(By.ID, "file").send_keys(str(dataset))
    validation = tmp_path / "held-out.jsonl"
    validation.write_bytes(jsonl(chat_lines(10, offset=100)))
    browser.find_element(By.ID, "validation").send_keys(str(validation))
    browser.find_element(By.ID, "eval_steps").send_keys("2")
    browser.find_element(By.ID, "n_epochs").send_keys("2")
    browser.find_element(By.ID, "batch_size").send_keys("4")
    browser.find_element(By.ID, "learning_rate").send_keys("0.002")
    browser.find_element(By.CSS_SELECTOR, "#new-job button[type=submit]").click()
    wait.until(lambda d: "#/jobs/ftjob-" in d.current_url)
    job_id = browser.current_url.rsplit("/", 1)[-1]

    # 12 examples, batch 4, 2 epochs: 6 steps, each a point on the training-loss line, drawn as they come.
    # The page re-renders as frames arrive, so read it with one script call (no stale element handles).
    status = "return document.querySelector('#job-status .status')?.dataset.status"
    WebDriverWait(browser, 240, poll_frequency=0.5).until(
        lambda d: d.execute_script(status) in TERMINAL)
    assert browser.execute_script(status) == "succeeded"
    points = ("return [...document.querySelectorAll(`${arguments[0]} circle.point[data-series=${arguments[1]}]`)]"
              ".map((c) => Number(c.dataset.step))")
    wait.until(lambda d: len(d.execute_script(points, "#loss-chart", "train")) == 6)
    assert browser.execute_script(points, "#loss-chart", "train") == [1, 2, 3, 4, 5, 6]
    # Evaluated every 2 steps on the validation file: the validation line has its own points.
    assert browser.execute_script(points, "#loss-chart", "validation") == [2, 4, 6]
    assert browser.execute_script(points, "#accuracy-chart", "validation") == [2, 4, 6]
    assert browser.find_elements(By.CSS_SELECTOR, "#loss-chart polyline")
    assert browser.execute_script(points, "#accuracy-chart", "train") == [1, 2, 3, 4, 5, 6]
    assert "The job has successfully completed." in browser.find_element(By.ID, "events").text
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#artifacts a[href$='/artifacts/adapter']"))
    assert browser.find_elements(By.CSS_SELECTOR, "#checkpoints tr")
    # The answer report (a validation file, so on by default): both models' answers side by side, filterable.
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#eval-samples tr[data-worse]"))
    rows = "return [...document.querySelectorAll('#eval-samples tr[data-worse]')].filter((r) => !r.hidden).length"
    assert browser.execute_script(rows) == 10  # the 10 held-out conversations
    summary = browser.find_elements(By.CSS_SELECTOR, "#eval-summary tr[data-model]")
    assert [r.get_attribute("data-model") for r in summary] == ["base", "tuned"]
    with service.client() as client:
        worse = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["evaluation"]["tuned_worse_than_base"]
    browser.find_element(By.ID, "eval-worse").click()
    assert browser.execute_script(rows) == worse
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard-job.png"))

    # Try it: the fine-tuned model's answer streams in beside the base model's, as the API gives them.
    model = browser.execute_script("return document.getElementById('job-detail').textContent")
    browser.find_element(By.ID, "try-prompt").send_keys("code 4")
    browser.find_element(By.ID, "try-max-tokens").clear()
    browser.find_element(By.ID, "try-max-tokens").send_keys("6")
    browser.find_element(By.ID, "try-send").click()
    state = ("return [document.getElementById('try-tuned').dataset.state, "
             "document.getElementById('try-base').dataset.state]")
    WebDriverWait(browser, 120, poll_frequency=0.5).until(lambda d: d.execute_script(state) == ["done", "done"])
    shown = browser.execute_script("return [document.getElementById('try-tuned').textContent, "
                                   "document.getElementById('try-base').textContent]")
    ask = {"messages": [{"role": "user", "content": "code 4"}], "max_tokens": 6, "temperature": 0}
    with service.client() as client:
        expected = [client.post("/v1/chat/completions", json={"model": m, **ask}).json()["choices"][0]["message"]
                    ["content"] for m in (model, "tiny-llama")]
    assert shown == expected and all(shown)
    browser.save_screenshot(str(ARTIFACTS / "dashboard-try-it.png"))

    browser.get(f"{service.base_url}/dashboard/#/")
    row = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#jobs tr[data-job='{job_id}']"))[0]
    assert "succeeded" in row.text and "6/6" in row.text
    browser.save_screenshot(str(ARTIFACTS / "dashboard-jobs.png"))

    # An address whose job id would lead the page's requests elsewhere in the API is no job's (found by an audit).
    browser.get(f"{service.base_url}/dashboard/#/jobs/..%2F..%2Fwebhooks")
    wait.until(lambda d: "No such job" in d.execute_script("return document.body.innerText"))
