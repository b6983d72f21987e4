"""The new-task form in a real browser: headless Chromium fills in the Prefect UI's custom-run form.

A real Prefect server (UI included) on 127.0.0.1 and `xbar serve` run a tiny copy of
the project (tests/prefect_stack.py). Chromium (Debian's `chromium`, driven by
Playwright) opens the `new-task/add-task` deployment's custom-run form, types a
task name, picks "Image folder" and types a directory of the project, and submits.
The task must then be learned (params.yaml, MLflow: gate passed); a second
submission naming a missing directory must fail with that one line and leave
params.yaml as it was. Screenshots of the filled forms (and of the refused run)
are kept under test-artifacts/browser/ (git-ignored) for a person to look at.

Selectors: the Prefect UI gives each form field a `.schema-form-property` with
its name in `.schema-form-property__label`; the dataset's kinds are buttons
titled as in flows/add_task.py ("Built-in", "Image folder", "torchvision dataset").
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect_stack import DEPLOYMENT, deployment, learned_task, running_stack, settings, tails, wait_final, wait_for
from project import ROOT, TinyProject, image_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
LEARN_S = 600  # the backbone stages and one task on 2 cores


def _shapes(project: TinyProject) -> None:
    """data/shapes: grey 16x16 images, bright top half (class `top`) or bright bottom half (`bottom`)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, name in enumerate(("top", "bottom")):
        folder = project.root / "data" / "shapes" / name
        folder.mkdir(parents=True)
        for i in range(40):
            image = rng.integers(0, 60, (16, 16), dtype=np.uint8)
            image[label * 8:(label + 1) * 8] += 180
            Image.fromarray(image, "L").save(folder / f"{i}.png")
    image_folder(project.root / "data" / "unused", ["a", "b"])  # not learned: the form must name data/shapes


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        message = "Chromium is missing: apt-get install chromium (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[dict[str, Any]]:
    with running_stack(tmp_path_factory.mktemp("browser"), prepare=_shapes) as s:
        yield s


def field(page: Any, label: str) -> Any:
    """The innermost form field whose label reads `label` (a nested field sits inside its parent's)."""
    name = page.locator(".schema-form-property__label", has_text=re.compile(f"^{re.escape(label)}$"))
    return name.locator("xpath=ancestor::div[contains(concat(' ', normalize-space(@class), ' '), "
                        "' schema-form-property ')][1]")


def submit_image_folder_form(browser: Any, stack: dict[str, Any], name: str, root: str, shot: str) -> Any:
    """Fill in and submit the custom-run form; returns the flow run it created (found through the API)."""
    with settings(stack["env"]):
        dep = deployment(DEPLOYMENT)
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    try:
        page.goto(f"{stack['url']}/deployments/deployment/{dep.id}/run")
        field(page, "name").locator("textarea").fill(name)
        field(page, "dataset").get_by_role("button", name="Image folder", exact=True).click()
        field(page, "Root").locator("textarea").fill(root)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / shot, full_page=True)
        print(f"screenshot of the filled form: {ARTIFACTS / shot}")
        page.get_by_role("button", name="Submit", exact=True).click()
        page.wait_for_url(lambda url: not url.rstrip("/").endswith("/run"), timeout=60_000)  # left the form
    finally:
        page.close()
    with settings(stack["env"]):
        return wait_for(f"the run of {name!r}", lambda: _run_of(dep.id, name), 60, stack["logs"])


def _run_of(deployment_id: Any, name: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return next((r for r in runs if r.parameters.get("name") == name), None)


def test_a_task_on_an_image_folder_added_from_the_browser_form_is_learned(browser: Any, stack: dict[str, Any]):
    project: TinyProject = stack["project"]
    run = submit_image_folder_form(browser, stack, "shapes", "data/shapes", "new-task-form.png")
    assert run.parameters["dataset"]["root"] == "data/shapes"  # what was typed reached the flow
    state = wait_final(stack, run.id, LEARN_S)
    assert state.is_completed(), f"{state.message}\n{tails(stack['logs'])}"

    from xbar.params import load_params

    spec = load_params(project.params).tasks["shapes"]
    assert (spec.after, spec.dataset.source, spec.dataset.root) == ("backbone", "imagefolder", "data/shapes")
    child, parent = learned_task(project, "shapes")
    assert parent.data.tags["prefect.flow_run_id"] == str(run.id)


@pytest.fixture
def mlflow_ui(stack: dict[str, Any]) -> Iterator[str]:
    """`mlflow server` on the stack project's store (127.0.0.1, a free port): the UI a user opens; stopped after
    its test (the Prefect UI's tests need the cores)."""
    from prefect_stack import free_port, start, stop

    project: TinyProject = stack["project"]
    url = f"http://127.0.0.1:{free_port()}"
    log = project.root.parent / "mlflow-ui.log"
    proc = start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", project.mlflow_uri, "--host",
                  "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"], project.root, project.env, log)
    try:
        import urllib.request

        wait_for("the MLflow UI", lambda: urllib.request.urlopen(f"{url}/health", timeout=5).status == 200 or None,
                 180, [log], procs=[proc])
        yield url
    finally:
        stop(proc)


def test_the_mlflow_ui_shows_a_learned_tasks_model_and_its_metrics(browser: Any, stack: dict[str, Any],
                                                                   mlflow_ui: str):
    """After the form's task (the first test) is learned: its logged model, with its accuracy, in MLflow 3's
    UI of a model-training experiment."""
    from mlflow import MlflowClient

    project: TinyProject = stack["project"]
    client = MlflowClient(project.mlflow_uri)
    exp = client.get_experiment_by_name("xbar")
    model = next(m for m in client.search_logged_models([exp.experiment_id]) if m.name == "shapes")
    at_learn = next(m.value for m in model.metrics if m.key == "accuracy_at_learn")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{mlflow_ui}/#/experiments/{exp.experiment_id}/models")  # the experiment's models tab
        page.get_by_text("shapes", exact=True).first.wait_for(timeout=60_000)
        page.goto(f"{mlflow_ui}/#/experiments/{exp.experiment_id}/models/{model.model_id}")
        page.get_by_text("accuracy_at_learn").first.wait_for(timeout=60_000)
        shown = {repr(at_learn).removesuffix(".0"), f"{at_learn:.2f}"}  # its value as JavaScript prints it, or rounded
        page.get_by_text(re.compile("^(" + "|".join(map(re.escape, shown)) + ")$")).first.wait_for(timeout=30_000)
        page.get_by_text("xbar-chip").first.wait_for(timeout=30_000)  # registered: a version of the chip's model
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / "mlflow-model.png", full_page=True)
    finally:
        page.close()


def test_a_missing_directory_from_the_browser_form_fails_with_one_line(browser: Any, stack: dict[str, Any]):
    project: TinyProject = stack["project"]
    before = project.params.read_bytes()
    run = submit_image_folder_form(browser, stack, "nodata", "data/nothing_here", "new-task-form-refused.png")
    state = wait_final(stack, run.id, 300)
    assert state.is_failed() and "data/nothing_here is not a directory" in (state.message or "")
    assert "\n" not in state.message
    assert project.params.read_bytes() == before

    page = browser.new_page(viewport={"width": 1280, "height": 900})  # what the user sees on the run's page
    try:
        page.goto(f"{stack['url']}/runs/flow-run/{run.id}")
        page.get_by_text("is not a directory").first.wait_for(timeout=60_000)
        page.screenshot(path=ARTIFACTS / "refused-run.png", full_page=True)
    finally:
        page.close()
