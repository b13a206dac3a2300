"""JupyterLab in a real browser: a headless JupyterLab on 127.0.0.1 driven by Debian's Chromium through
Playwright (never a downloaded browser). The widgets must render and react in the front end, not only in
their Python state.

Skipped when /usr/bin/chromium or the playwright package is missing (`.ci/run` installs both). Set
CPTLAB_SCREENSHOT_DIR to also save the screenshots there (docs/launcher.png is taken that way)."""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing (pip install playwright)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a copy of the notebooks (the browser's runs and autosaves stay out of the
    repository); yields its base URL and token; stopped by its own process id."""
    tmp = tmp_path_factory.mktemp("lab")
    notebooks = tmp / "notebooks"
    notebooks.mkdir()
    shutil.copy(ROOT / "notebooks" / "01_schedules.ipynb", notebooks)
    config = tmp / "config"
    # no news prompt; every cell in the DOM (no virtual scrolling) so that locators find them
    _write_json(config / "labconfig" / "page_config.json",
                {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    _write_json(config / "lab" / "user-settings" / "@jupyterlab" / "notebook-extension" /
                "tracker.jupyterlab-settings", {"windowingMode": "none"})
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(config), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.open_browser=False",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={notebooks}",
           "--LabApp.expose_app_in_browser=True",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.getuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(cmd, cwd=notebooks, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"jupyter lab exited: {(tmp / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("jupyter lab did not answer within 120 s")
            time.sleep(0.5)
        yield {"url": url, "token": token, "notebooks": notebooks}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _open_and_run_all(browser, lab, notebook: str, height: int = 1000):
    """Open ``notebook`` alone (a fresh workspace, no side bar) and run all its cells."""
    page = browser.new_page(viewport={"width": 1280, "height": height})
    page.set_default_timeout(120_000)
    page.goto(f"{lab['url']}/lab/workspaces/{notebook.split('.')[0]}/tree/{notebook}?reset&token={lab['token']}")
    page.wait_for_function("name => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                           " return w && w.context && w.context.path === name && w.sessionContext.isReady; }",
                           arg=notebook)
    page.evaluate("if (!window.jupyterapp.shell.leftCollapsed)"
                  " window.jupyterapp.commands.execute('application:toggle-left-area')")
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    return page


def _save(page_or_locator, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page_or_locator.screenshot(path=str(path))
    if os.environ.get("CPTLAB_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["CPTLAB_SCREENSHOT_DIR"]) / name)
    return path


def _slider(page, label: str):
    name = page.locator(".widget-label", has_text=re.compile(f"^{re.escape(label)}$"))
    return page.locator(".widget-hslider", has=name)


def _wait(page, locator, tmp_path: Path, timeout: float = 120_000) -> None:
    """Wait for ``locator``; on a timeout, fail with the notebook's outputs and a screenshot."""
    try:
        locator.wait_for(timeout=timeout)
    except sync_api.TimeoutError:
        page.screenshot(path=str(tmp_path / "timeout.png"))
        outputs = "\n".join(page.locator(".jp-OutputArea").all_inner_texts())[-3000:]
        pytest.fail(f"timed out waiting for {locator}; screenshot {tmp_path / 'timeout.png'}; "
                    f"outputs:\n{outputs}")


def test_schedule_explorer_renders_and_reacts(browser, lab, tmp_path):
    page = _open_and_run_all(browser, lab, "01_schedules.ipynb")
    stages = _slider(page, "stages")
    _wait(page, stages, tmp_path)
    for label in ("max LR", "min LR", "warmup %", "const LR", "cooldown %", "alpha", "tokens / stage"):
        assert _slider(page, label).count() == 1, label
    image = page.locator(".widget-image").last
    page.wait_for_function("img => img.src && img.naturalWidth > 0", arg=image.element_handle())
    before_src, before_png = image.get_attribute("src"), image.screenshot()
    stages.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")  # 3 -> 4 stages: the kernel redraws and sends a new image
    page.wait_for_function("([img, old]) => img.src !== old", arg=[image.element_handle(), before_src])
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    assert stages.locator(".widget-readout").inner_text().strip() == "4"
    # the kernel's values are the paper's, not the slider grid's (10**-4.52 = 3.02e-05)
    status = "4 stages of 1e+11 tokens; infinite_cosine ends at lr 3e-05"
    assert page.locator(".widget-html", has_text=status).count() == 1
    assert image.screenshot() != before_png
    assert _save(page, tmp_path, "schedule_explorer.png").stat().st_size > 0
    page.close()


def _write_notebook(path, code: str) -> None:
    """A notebook of one code cell on the python3 kernel."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_schedule_explorer_draws_a_predicted_loss_in_the_browser(browser, lab, tmp_path):
    code = ("from cptlab.analysis.laws import ScheduleLaw\nfrom cptlab.ui import ScheduleExplorer\n\n"
            "law = ScheduleLaw(L0=3.0, A=2.0, alpha=0.5, C=0.002, lam=0.99, lr_ref=2e-3,\n"
            "                  loss_set='en-docs', runs=('infinite/sched-cosine', 'infinite/sched-wsd'),\n"
            "                  tokens_per_step=4096, n_points=50, rmse=0.03)\n"
            "ScheduleExplorer(kind='wsd', compare=('cosine',), tokens_per_stage=1e6, law=law)")
    _write_notebook(lab["notebooks"] / "predict.ipynb", code)
    page = _open_and_run_all(browser, lab, "predict.ipynb", height=1300)
    label = page.locator(".widget-html", has_text="fitted on infinite/sched-cosine, infinite/sched-wsd")
    _wait(page, label, tmp_path)
    assert "predicted en-docs loss (from scratch)" in label.inner_text()
    image = page.locator(".widget-image").last
    page.wait_for_function("img => img.src && img.naturalWidth > 0", arg=image.element_handle())
    assert image.evaluate("img => img.naturalHeight / img.naturalWidth") > 0.6  # LR above, loss below
    before = image.get_attribute("src")
    _slider(page, "stages").locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")  # 3 -> 4 stages: the kernel predicts again and sends a new image
    page.wait_for_function("([img, old]) => img.src !== old", arg=[image.element_handle(), before])
    assert label.count() == 1
    assert _save(page, tmp_path, "schedule_prediction.png").stat().st_size > 0
    page.close()


def test_run_launcher_trains_in_the_browser(browser, lab, tmp_path):
    code = ("from cptlab.ui import RunLauncher\n\n"
            "launcher = RunLauncher(scale=\"smoke\", shift=\"strong\", replay=0.05)\nlauncher")
    _write_notebook(lab["notebooks"] / "launcher.ipynb", code)
    page = _open_and_run_all(browser, lab, "launcher.ipynb", height=1900)
    train = page.locator("button.widget-button", has_text="Train")
    _wait(page, train, tmp_path)
    live = page.locator(".widget-image").last
    page.wait_for_function("img => img.src && img.naturalWidth > 0", arg=live.element_handle())
    before = live.get_attribute("src")
    page.locator("button.widget-button", has_text="suggest").click()  # the planner, or why there is none
    _wait(page, page.locator(".widget-html", has_text=re.compile(r"^(suggested|no suggestion)")), tmp_path)
    train.click()
    _wait(page, page.locator(".widget-html", has_text=re.compile(r"^(done|.*already trained)")), tmp_path,
          timeout=600_000)
    assert live.get_attribute("src") != before
    assert "tokens/s" in page.locator(".widget-html", has_text="tokens/s").first.inner_text()
    assert page.locator("button.widget-button", has_text="Stop").is_disabled()
    cell = page.locator(".jp-Cell").last
    assert _save(cell, tmp_path, "launcher.png").stat().st_size > 0
    page.close()
