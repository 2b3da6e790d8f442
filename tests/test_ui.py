"""The Prefect UI in headless Chromium, on the stack the deployment tests share: the run form
of dice-run, a Custom run of dice-round started from its page (run id and round typed in)
that runs on the worker, and a finished round's artifacts. The screenshots in
docs/screenshots/ come from these tests: `DICE_UPDATE_SCREENSHOTS=1` writes them there; without
it they go to the test's temporary folder, and the checkout is left as it was."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from prefect_stack import PROJECT_ROOT, PrefectStack, finished, launch_runs, shared_stack

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SCREENSHOTS = PROJECT_ROOT / "docs" / "screenshots"
# Debian's Chromium, headless, quiet: no sandbox (root), no GPU, nothing that calls out.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="/usr/bin/chromium is missing: `make setup-ui` installs chromium and playwright",
    ),
]


@pytest.fixture(scope="session")
def stack(tmp_path_factory, sft_model_dir) -> PrefectStack:
    with shared_stack(tmp_path_factory.mktemp("prefect")) as running:
        launch_runs(running, sft_model_dir)
        yield running


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    if os.environ.get("DICE_UPDATE_SCREENSHOTS") == "1":
        return DOCS_SCREENSHOTS
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900},
        )
        browser.set_default_timeout(60_000)
        yield browser.new_page()
        browser.close()


def parameter(page, name: str):
    """The run form's block for one parameter, found by its label."""
    label = page.locator(".schema-form-property__label", has_text=re.compile(rf"^{name}\b"))
    return page.locator(".schema-form-property").filter(has=label).first


def open_deployment(page, stack: PrefectStack, name: str) -> None:
    page.goto(f"{stack.url}/deployments")
    page.get_by_role("link", name=name, exact=True).first.click()
    page.get_by_role("button", name="Run", exact=True).wait_for()


def open_custom_run(page) -> None:
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("link", name="Custom run").click()
    page.get_by_role("button", name="Submit").wait_for()


def dice_round_runs(stack: PrefectStack) -> list[dict]:
    deployment_id = stack.deployments()["dice-round"]["id"]
    return stack.flow_runs(deployment_id={"any_": [deployment_id]})


def new_run(stack: PrefectStack, before: set[str], page, timeout: float = 60) -> str:
    """The id of the one dice-round run the form's Submit created (the UI's notice of it
    is not waited for: it comes and goes with an animation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        created = {r["id"] for r in dice_round_runs(stack)} - before
        if created:
            (flow_run_id,) = created
            return flow_run_id
        time.sleep(1)
    shot = stack.root / "submit-failed.png"
    page.screenshot(path=shot, full_page=True)
    shown = page.locator("body").inner_text()[-1500:]
    raise AssertionError(f"no dice-round run {timeout:.0f} s after Submit ({shot}); page:\n{shown}")


def test_dice_run_form_lists_the_recipes(stack, page, shots):
    open_deployment(page, stack, "dice-run")
    open_custom_run(page)
    recipe = parameter(page, "recipe")
    recipe.get_by_role("button", name="shipped recipe").wait_for()
    recipe.get_by_role("button", name="recipe file").wait_for()
    assert "cpu-smollm2" in recipe.inner_text()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=shots / "dice-run-form.png", full_page=True)


def test_custom_run_from_the_ui_resumes_a_round(stack, page, shots):
    """The dice-round deployment started from its page with run_id and round typed into the
    Custom run form: round 1 of the run the API test made. Its stages are complete, so the
    run recomputes nothing and publishes the round's report and overview again."""
    api_run = finished(stack, "api-run")
    assert api_run["state_type"] == "COMPLETED", stack.log_tail(api_run["id"])
    record = stack.store / "runs/api-run/round-1/training/_COMPLETE.json"
    trained_at = json.loads(record.read_text())["finished_at"]

    open_deployment(page, stack, "dice-round")
    page.get_by_text("At 02:00 AM every day").wait_for()  # the paused nightly schedule
    page.wait_for_load_state("networkidle")
    page.screenshot(path=shots / "deployment-dice-round.png")

    open_custom_run(page)
    parameter(page, "run_id").locator("textarea").fill("api-run")
    round_ = parameter(page, "round")
    round_.get_by_role("button", name="int", exact=True).click()
    round_.locator("input").fill("1")
    # Leave the field and let the form settle: on a busy machine a Submit sent before the
    # form has taken the typed value is refused by its own validation.
    round_.locator("input").press("Tab")
    page.wait_for_load_state("networkidle")
    page.screenshot(path=shots / "dice-round-custom-run.png", full_page=True)
    before = {r["id"] for r in dice_round_runs(stack)}
    page.get_by_role("button", name="Submit").click()
    flow_run_id = new_run(stack, before, page)

    run = stack.wait(flow_run_id, timeout=600)
    assert run["state_type"] == "COMPLETED", stack.log_tail(flow_run_id)
    assert run["parameters"] == {"run_id": "api-run", "round": 1, "store": None}
    assert run["name"] == "api-run · round 1"
    assert json.loads(record.read_text())["finished_at"] == trained_at
    assert "api-run-round-1-overview" in stack.artifacts(flow_run_id)
    print(f"\ndice-round from the UI: {run['total_run_time']:.0f} s of run time")


def test_a_finished_round_shows_its_artifacts(stack, page, shots):
    """Round 1 of the API test's run, as the UI shows it: every stage's artifact, and the
    round's overview."""
    api_run = finished(stack, "api-run")
    (round1,) = stack.subflow_runs(api_run["id"])

    # The run page scrolls inside itself: a tall window shows the graph and every card.
    page.set_viewport_size({"width": 1400, "height": 1700})
    page.goto(f"{stack.url}/runs/flow-run/{round1['id']}")
    page.get_by_text("api-run · round 1").first.wait_for()
    page.locator("li.p-tab", has_text="Artifacts").click()
    overview = page.locator(".artifact-card__title", has_text="api-run-round-1-overview")
    overview.wait_for()
    page.locator(".artifact-card__title", has_text="api-run-round-1-pairs-table").wait_for()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=shots / "round-artifacts.png")

    overview.click()
    page.get_by_text("Chosen and rejected, first pairs").wait_for()
    page.set_viewport_size({"width": 1400, "height": 2400})
    page.wait_for_load_state("networkidle")
    page.screenshot(path=shots / "round-overview.png", full_page=True)
