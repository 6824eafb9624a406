"""The coordinator's live status page (GET /) in a real browser, during a real federation.

Headless Chromium (Debian's `chromium` and `chromium-driver`, installed by
`scripts/setup --test-tools`) loads the page while SDK participants train slowly enough to be
watched; the test sees the round number advance, the chart gain points and the history say why
each round closed, and saves a screenshot (in the test's temporary directory; set
RONDO_STATUS_SCREENSHOT to a path to keep it, e.g. to refresh docs/status-page.png):

    RONDO_STATUS_SCREENSHOT=docs/status-page.png \
        .venv/bin/python -m pytest tests/e2e/test_status_page.py
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from test_rounds import N_ELEMENTS, run_in_thread

import rondo

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

ROUNDS = 6
TRAIN_SECS = 0.7
# Markup in a participant's name must show as text: names come from outside.
HOSTILE_NAME = '<img src=x id="injected">bob'


class SlowLearner(rondo.Participant):
    """Takes `TRAIN_SECS` per round, so that the page can be watched between rounds; its loss
    falls with the round, and it scores each model a little worse than it trained."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.stop = None

    def initial_weights(self) -> rondo.Weights:
        return {"layer/w": np.zeros(N_ELEMENTS, np.float32)}

    def train_round(self, weights: rondo.Weights, round: int):
        time.sleep(TRAIN_SECS)
        loss = 1.0 / (round + 1) + 0.01 * self.n
        return {k: v + np.float32(1) for k, v in weights.items()}, self.n, {"loss": loss}

    def evaluate(self, weights: rondo.Weights, round: int):
        return 1.2 / (round + 1), self.n, {"accuracy": 1.0 - 0.5 / (round + 1)}


def _find(name: str) -> str | None:
    for candidate in (name, f"/usr/bin/{name}", f"/usr/lib/chromium/{name}"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator:
    chromium, driver = _find("chromium"), _find("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromium-driver are not installed (scripts/setup --test-tools)")
    options = Options()
    options.binary_location = chromium
    # Without the background-networking flags Chromium floods the closed network with
    # connection attempts (update checks, sync, field trials); a fresh profile per run.
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1500",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]:
        options.add_argument(flag)
    # An explicit driver path: Selenium would otherwise try to download one.
    service = Service(executable_path=driver, log_output=str(tmp_path / "chromedriver.log"))
    try:
        session = webdriver.Chrome(service=service, options=options)
    except WebDriverException as err:
        pytest.fail(f"headless Chromium did not start: {err}")
    try:
        yield session
    finally:
        session.quit()


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


# What the page shows, read in one synchronous script: the page redraws every second, so
# elements found one call earlier may already be replaced.
SNAPSHOT_JS = """
const text = (id) => document.getElementById(id).textContent;
const all = (selector) => [...document.querySelectorAll(selector)];
const rounds = (kind) => all(`#chart circle.point.${kind}`).map((c) => Number(c.dataset.round));
return {
  round: text("round"), rounds: text("rounds"), phase: text("phase"),
  connection: text("connection"), aggregator: text("aggregator-state"),
  model_round: text("aggregator-model"), participants: text("participants-total"),
  train: rounds("train").sort((a, b) => a - b), eval: rounds("eval").sort((a, b) => a - b),
  reasons: all("#history tbody tr td.reason").map((td) => td.textContent),
  names: all("#participants tbody td:first-child").map((td) => td.textContent),
  injected: document.querySelectorAll("#injected").length,
};
"""


def _shown(page) -> dict:
    return page.execute_script(SNAPSHOT_JS)


def _round(page) -> int | None:
    text = _shown(page)["round"]
    return int(text) if text.isdigit() else None


def _points(page) -> int:
    shown = _shown(page)
    return len(shown["train"]) + len(shown["eval"])


def test_the_status_page_follows_a_running_federation(start_federation, browser, tmp_path):
    federation = start_federation(
        coordinator={
            "federation.rounds": ROUNDS,
            "federation.min_clients": 3,
            "federation.evaluate_every": 1,
            "federation.heartbeat_timeout_secs": 10,
        }
    )
    page_answer = requests.get(f"{federation.coordinator_url}/", timeout=5)
    assert page_answer.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page_answer.headers["content-security-policy"]

    browser.get(f"{federation.coordinator_url}/")
    assert browser.title == "Rondo federation"
    # Before anyone joined: the page is live and shows the federation's plan.
    _wait(lambda: _shown(browser)["connection"] == "live", 15, "the first poll")
    assert _shown(browser)["rounds"] == str(ROUNDS)

    participants = {
        "alice": SlowLearner(10),
        HOSTILE_NAME: SlowLearner(20),
        "carol": SlowLearner(30),
    }
    results: dict = {}
    threads = [
        run_in_thread(p, federation.coordinator_url, name, results)
        for name, p in participants.items()
    ]

    # The round number advances and the chart gains points while rounds run.
    _wait(lambda: (_round(browser) or 0) >= 1, 30, "round 1")
    seen_round, seen_points = _round(browser), _points(browser)
    _wait(
        lambda: (_round(browser) or 0) >= seen_round + 2 and _points(browser) > seen_points,
        60,
        f"the page to move past round {seen_round} with more than {seen_points} points",
    )
    shown = _shown(browser)
    assert shown["aggregator"] == "connected"
    assert shown["participants"] == "3"
    assert HOSTILE_NAME in shown["names"], shown["names"]
    assert shown["injected"] == 0

    for thread in threads:
        thread.join(timeout=90)
    assert all(results[name].final_action == "finish" for name in participants), results
    status = federation.wait_for(lambda s: s["phase"] == "finished", what="the end")
    history = requests.get(f"{federation.coordinator_url}/v1/history", timeout=5).json()["rounds"]
    trained = [
        r["round"] for r in history if r["outcome"] == "aggregated" and r["training_metrics"]
    ]
    evaluated = [r["round"] for r in history if r["outcome"] == "aggregated" and r["evaluation"]]
    assert trained == list(range(1, ROUNDS + 1))  # round 0 (the initial weights) has no loss
    assert evaluated, history

    # Every aggregated round that reported a loss is a point where the history says; the table
    # says why each round closed, newest first.
    shown = _wait(
        lambda: (s := _shown(browser))["phase"] == "finished" and s["eval"] == evaluated and s,
        15,
        "the page to show the finished federation",
    )
    assert shown["train"] == trained
    assert shown["reasons"] == [r["reason"] for r in reversed(history)]
    assert all(shown["reasons"]), shown["reasons"]
    # The aggregator's health comes through the coordinator (the aggregator sends no CORS
    # headers), and it names the model the aggregator holds.
    assert status["aggregator"]["connected"] is True
    assert status["aggregator"]["model_round"] == federation.aggregator_status()["model"]["round"]
    assert shown["model_round"] == str(ROUNDS)

    # Another metric from the selector redraws the chart with its own points: accuracy is an
    # evaluation metric only.
    browser.find_element(By.CSS_SELECTOR, "#metric option[value='accuracy']").click()
    _wait(lambda: (s := _shown(browser))["eval"] == evaluated and s["train"] == [], 5, "accuracy")
    browser.find_element(By.CSS_SELECTOR, "#metric option[value='loss']").click()
    _wait(lambda: _shown(browser)["train"] == trained, 5, "the loss chart again")

    shot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("RONDO_STATUS_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)

    # The coordinator gone: the page says so instead of showing stale numbers as live.
    federation.coordinator.stop()
    _wait(
        lambda: "unreachable" in _shown(browser)["connection"],
        10,
        "the page to notice the coordinator is gone",
    )
