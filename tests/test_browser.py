"""The widgets of `unifuse.viz` as a person sees them: JupyterLab in headless Chromium.

Starts one JupyterLab server on localhost (free port, random token, no browser) over a temporary folder and
drives it with Playwright in Debian's Chromium (never a downloaded browser):

- `test_widgets_in_jupyterlab`: a small notebook runs from the Run menu; the slice browser drew images, moving a
  slider changes them, and the NiiVue 3D view drew a non-blank WebGL canvas.
- `test_last_cell_is_a_live_widget[<notebook>]`: every module notebook ENDS with a self-contained widget cell.
  Those last code cells are copied, in order, into one notebook (one kernel, started in `nbs/`) and run one at a
  time; for each, the output must be a widget view (`application/vnd.jupyter.widget-view+json`) that drew a
  non-blank picture and redraws when a slider (or, failing that, a dropdown) moves. A cell that raises fails
  its notebook's test with the traceback; a cell whose output is no widget fails with that said.

Screenshots go to `$UNIFUSE_SCREENSHOTS` (default: a fresh temporary folder); the path is printed.
Needs `chromium` (Debian: `apt-get install -y chromium`); without it the test fails. Set
`UNIFUSE_SKIP_BROWSER=1` to skip it on purpose. `UNIFUSE_CHROMIUM` overrides the browser's path.
"""
import io, json, os, pathlib, secrets, shutil, socket, subprocess, sys, tempfile, time, urllib.request

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("UNIFUSE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

CELLS = [
    # 0: volumes and a flow (no data files needed)
    "import numpy as np, torch\n"
    "from unifuse.viz import SliceBrowser, view3d\n"
    "g = np.linspace(-1, 1, 32, dtype=np.float32)\n"
    "z, y, x = np.meshgrid(g, g, g, indexing='ij')\n"
    "ball = np.clip(1 - (x**2 / 0.5 + y**2 / 0.7 + z**2), 0, 1)               # (D, H, W)\n"
    "hot = np.clip(1.5 * np.exp(-((x - 0.3)**2 + y**2 + (z + 0.2)**2) / 0.05), 0, 1) * (ball > 0)\n"
    "flow = np.zeros((3, 32, 32, 32), np.float32); flow[0] = 2 * np.sin(np.pi * y)  # (3, D, H, W)",
    # 1: the slice browser
    "browser = SliceBrowser(ball, hot, titles=['ball', 'PET-like'], cmap=['gray', 'hot'], diff=(0, 1),\n"
    "                       flow=flow, flow_on=[0])\n"
    "browser",
    # 2: the 3D view (NiiVue, offline)
    "view3d(ball, hot, cmap=['gray', 'hot'], height=300)",
]


# The module notebooks whose last code cell must be a live widget view (in the order of the package).
MODULE_NOTEBOOKS = ["00_data", "00b_nifti", "00c_readers", "02_degrade", "03_viz", "07_device", "07a_cli", "09_blocks", "10_dapl", "20_oufr",
                    "30_fa", "40_ufrf", "50_model", "85_recipe", "86_pool", "87_runlog", "90_train"]
PRELUDE = ("import os, matplotlib\n"
           f"os.chdir({str(ROOT / 'nbs')!r})   # where the notebooks run\n"
           "matplotlib.use('Agg')")
CELL_TIMEOUT_S = 150


def _last_code_cell(name: str) -> str:
    "The source of the last code cell of nbs/<name>.ipynb."
    nb = json.loads((ROOT / "nbs" / f"{name}.ipynb").read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    if not code: pytest.fail(f"nbs/{name}.ipynb has no code cell")
    return code[-1]


def _notebook(cells) -> dict:
    return {"cells": [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": c}
                      for c in cells],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shots_dir() -> pathlib.Path:
    d = os.environ.get("UNIFUSE_SCREENSHOTS")
    d = pathlib.Path(d) if d else pathlib.Path(tempfile.mkdtemp(prefix="unifuse-screenshots-"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _png_stats(png: bytes):
    "(standard deviation of the grey values, fraction of pixels away from the most common colour)."
    from PIL import Image
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float32)   # (h, w, 3)
    flat = a.reshape(-1, 3)
    vals, counts = np.unique(flat, axis=0, return_counts=True)
    bg = vals[counts.argmax()]
    return float(a.mean(-1).std()), float((np.abs(flat - bg).sum(1) > 30).mean())


def _wait_visible(page, locator, timeout_s: float):
    "Wait until `locator` is visible; fail at once with the traceback text if a cell raised meanwhile."
    errs = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if locator.count() and locator.first.is_visible(): return locator.first
        texts = [errs.nth(i).inner_text() for i in range(errs.count())]
        bad = [t for t in texts if "Error" in t or "Traceback" in t]
        if bad: pytest.fail(f"a notebook cell raised:\n{bad[0][-2000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {locator}")


def _open(page, lab, name):
    "Open notebook `name` in JupyterLab and wait for its kernel to be idle."
    ws = name.rsplit(".", 1)[0]                           # a workspace of its own: no other notebook restored beside it
    page.goto(f"{lab['url']}/lab/workspaces/{ws}/tree/{name}?reset&token={lab['token']}", timeout=120_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    t0 = time.time()                      # should a kernel dialog still come, accept the kernel it offers
    while time.time() - t0 < 8:
        dlg = page.locator(".jp-Dialog button.jp-mod-accept")
        if dlg.count(): dlg.first.click(); break
        time.sleep(0.5)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)


@pytest.fixture(scope="module")
def lab():
    "A JupyterLab server on localhost in a temporary folder holding the test notebook."
    if os.environ.get("UNIFUSE_SKIP_BROWSER") == "1":
        pytest.skip("UNIFUSE_SKIP_BROWSER=1: browser test skipped on purpose")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's package (`apt-get install -y chromium`), "
                    f"point UNIFUSE_CHROMIUM at it, or set UNIFUSE_SKIP_BROWSER=1 to skip this test on purpose.")
    try: import playwright.sync_api  # noqa: F401
    except ImportError: pytest.fail("playwright (the Python package) is missing: `pip install playwright` "
                                    "(its browser download is not needed: Debian's chromium is used).")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="unifuse-lab-"))
    (tmp / "viz_check.ipynb").write_text(json.dumps(_notebook(CELLS)))
    (tmp / "last_cells.ipynb").write_text(json.dumps(_notebook([PRELUDE] + [_last_code_cell(n) for n in MODULE_NOTEBOOKS])))
    settings = tmp / "settings" / "@jupyterlab" / "apputils-extension"      # no news / update prompts
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    tracker = tmp / "settings" / "@jupyterlab" / "notebook-extension"      # start the kernel without asking
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"autoStartDefaultKernel": True}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"), MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    log = open(tmp / "server.log", "w")
    srv = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
                            f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp}",
                            "--LabApp.extension_manager=readonly", "--LabApp.news_url=None",
                            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                           env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2); break
            except OSError:
                if srv.poll() is not None or time.time() - t0 > 120:
                    pytest.fail(f"JupyterLab did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        # start the notebooks' kernels up front, so the pages open on running sessions
        for name in ("viz_check.ipynb", "last_cells.ipynb"):
            req = urllib.request.Request(f"{url}/api/sessions?token={token}", method="POST",
                                         headers={"Content-Type": "application/json"},
                                         data=json.dumps({"path": name, "name": name, "type": "notebook",
                                                          "kernel": {"name": "python3"}}).encode())
            urllib.request.urlopen(req, timeout=60)
        yield dict(url=url, token=token, tmp=tmp)
    finally:
        srv.terminate()
        try: srv.wait(30)
        except subprocess.TimeoutExpired: srv.kill(); srv.wait(10)
        log.close()


def _launch(p, errors:list):
    "Debian's Chromium, headless, and one page whose JavaScript errors are appended to `errors`."
    browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.on("pageerror", lambda e: errors.append(str(e)))
    return browser, page


@pytest.mark.slow
def test_widgets_in_jupyterlab(lab, capsys):
    from playwright.sync_api import sync_playwright
    shots = _shots_dir()
    (shots / "failure.png").unlink(missing_ok=True)
    with capsys.disabled(): print(f"\n[test_browser] screenshots in {shots}")
    errors = []
    with sync_playwright() as p:
        browser, page = _launch(p, errors)
        try:
            _open(page, lab, "viz_check.ipynb")
            page.click("div.lm-MenuBar-itemLabel:text-is('Run')")
            page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")

            cells = page.locator(".jp-Notebook .jp-Cell")
            # --- the slice browser drew an image
            img = _wait_visible(page, cells.nth(1).locator("img.widget-image"), 180)
            page.wait_for_function("e => e.complete && e.naturalWidth > 100", arg=img.element_handle(), timeout=60_000)
            before_src = img.get_attribute("src")
            before = img.screenshot(path=str(shots / "slice_browser_before.png"))
            cells.nth(1).locator(".jp-OutputArea").screenshot(path=str(shots / "slice_browser_widget.png"))
            std, frac = _png_stats(before)
            assert std > 10 and frac > 0.05, f"slice browser image looks blank (std {std:.1f}, {frac:.1%} non-background)"

            # --- moving a slider (the axial one, by keyboard) changes the picture
            handle = cells.nth(1).locator(".widget-slider .noUi-handle").nth(2)
            handle.focus()
            for _ in range(6): handle.press("ArrowLeft")
            page.wait_for_function("([e, s]) => e.src !== s", arg=[img.element_handle(), before_src], timeout=60_000)
            time.sleep(0.5)
            after = img.screenshot(path=str(shots / "slice_browser_after.png"))
            assert after != before, "moving the slider did not change the slice browser's picture"
            readout = cells.nth(1).locator(".widget-readout").nth(2).inner_text()
            assert readout.strip() == "10", f"axial slider readout is {readout!r}, expected 10 (16 - 6)"

            # --- the 3D view drew a non-blank WebGL canvas
            canvas = _wait_visible(page, cells.nth(2).locator("canvas"), 180)
            t0, png = time.time(), b""
            while time.time() - t0 < 60:
                png = canvas.screenshot()
                std, frac = _png_stats(png)
                if std > 5 and frac > 0.02: break
                time.sleep(1.0)
            (shots / "view3d_canvas.png").write_bytes(png)
            std, frac = _png_stats(png)
            assert std > 5 and frac > 0.02, f"3D view canvas looks blank (std {std:.1f}, {frac:.1%} non-background)"
            cells.nth(2).screenshot(path=str(shots / "view3d_cell.png"))
            page.screenshot(path=str(shots / "page.png"), full_page=True)
            tracebacks = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            texts = [tracebacks.nth(i).inner_text() for i in range(tracebacks.count())]
            assert not [t for t in texts if "Error" in t], f"a cell raised: {texts}"
        except Exception:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert not errors, f"JavaScript errors on the page: {errors[:5]}"


@pytest.fixture(scope="module")
def last_cells_page(lab):
    "A Chromium page on the notebook of last cells, its prelude cell run; yields (page, JavaScript errors, shots)."
    from playwright.sync_api import sync_playwright
    shots = _shots_dir()
    errors = []
    with sync_playwright() as p:
        browser, page = _launch(p, errors)
        try:
            _open(page, lab, "last_cells.ipynb")
            _run_cell(page, 0)
            _wait_done(page, 0, 120, "the prelude")
            yield page, errors, shots
        finally:
            browser.close()


def _cell(page, i):
    return page.locator(".jp-Notebook .jp-Cell").nth(i)


def _run_cell(page, i):
    "Run cell i alone (click into its editor, Shift+Enter)."
    cell = _cell(page, i)
    cell.scroll_into_view_if_needed()
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def _errors_in(cell):
    errs = cell.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    return [t for t in (errs.nth(i).inner_text() for i in range(errs.count())) if "Error" in t or "Traceback" in t]


def _wait_done(page, i, timeout_s, what):
    "Wait until cell i ran (its prompt holds a number); fail at once with the traceback if it raised."
    cell, t0 = _cell(page, i), time.time()
    while time.time() - t0 < timeout_s:
        bad = _errors_in(cell)
        if bad: pytest.fail(f"{what} raised:\n{bad[0][-2500:]}")
        prompt = cell.locator(".jp-InputPrompt").first.inner_text().strip()
        if prompt.startswith("[") and prompt[1:-2].strip().isdigit(): return time.time() - t0
        time.sleep(0.5)
    try:                                               # interrupt it, so that the next cells do not queue behind it
        page.click("div.lm-MenuBar-itemLabel:text-is('Kernel')")
        page.click(".lm-Menu-itemLabel:text-is('Interrupt Kernel')")
    except Exception: pass
    pytest.fail(f"{what} did not finish within {timeout_s} s (kernel interrupted)")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODULE_NOTEBOOKS)
def test_last_cell_is_a_live_widget(last_cells_page, name, capsys):
    page, errors, shots = last_cells_page
    i = MODULE_NOTEBOOKS.index(name) + 1
    what = f"the last code cell of nbs/{name}.ipynb"
    cell = _cell(page, i)
    _run_cell(page, i)
    try:
        dt = _wait_done(page, i, CELL_TIMEOUT_S, what)
        # the output of a widget view (application/vnd.jupyter.widget-view+json) holds a .jupyter-widgets view
        widget = cell.locator(".jp-OutputArea-output:has(.jupyter-widgets), "
                              ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.widget-view+json']")
        t0 = time.time()
        while time.time() - t0 < 30 and not widget.count(): time.sleep(0.5)
        if not widget.count():
            pytest.fail(f"{what} is not a widget cell: its output has no application/vnd.jupyter.widget-view+json "
                        f"(a notebook should end with a self-contained widget view, e.g. SliceBrowser(...), "
                        f"Interactive(...) or view3d(...)).")
        widget = widget.first
        imgs, canvases = widget.locator("img.widget-image"), widget.locator("canvas")
        t0 = time.time()
        while time.time() - t0 < 60 and not (imgs.count() or canvases.count()): time.sleep(0.5)
        if not imgs.count():
            if not canvases.count(): pytest.fail(f"{what}: the widget drew neither an image nor a canvas")
            t0, png = time.time(), b""                          # a 3D view: its canvas must not stay blank
            while time.time() - t0 < 60:
                png = canvases.first.screenshot(); std, frac = _png_stats(png)
                if std > 5 and frac > 0.02: break
                time.sleep(1.0)
            (shots / f"{name}_canvas.png").write_bytes(png)
            std, frac = _png_stats(png)
            assert std > 5 and frac > 0.02, f"{what}: its canvas looks blank (std {std:.1f}, {frac:.1%} non-background)"
            return
        img = imgs.first
        page.wait_for_function("e => e.complete && e.naturalWidth > 50", arg=img.element_handle(), timeout=60_000)
        before_src = img.get_attribute("src")
        before = img.screenshot(path=str(shots / f"{name}_before.png"))
        std, frac = _png_stats(before)
        assert std > 10 and frac > 0.05, f"{what}: its picture looks blank (std {std:.1f}, {frac:.1%} non-background)"
        # move the first slider by keyboard (right, or left when it sits at its maximum); else change a dropdown
        handles = widget.locator(".widget-slider .noUi-handle")
        if handles.count():
            h = handles.first
            h.focus()
            at_max = h.get_attribute("aria-valuenow") == h.get_attribute("aria-valuemax")
            for _ in range(2): h.press("ArrowLeft" if at_max else "ArrowRight")
        else:
            selects = widget.locator("select")
            if not selects.count(): pytest.fail(f"{what}: the widget has neither a slider nor a dropdown to move")
            opts = selects.first.locator("option")
            cur = selects.first.input_value()
            other = next(v for v in (opts.nth(k).get_attribute("value") for k in range(opts.count())) if v != cur)
            selects.first.select_option(other)
        page.wait_for_function("([e, s]) => e.src !== s", arg=[img.element_handle(), before_src], timeout=90_000)
        time.sleep(0.5)
        after = img.screenshot(path=str(shots / f"{name}_after.png"))
        assert after != before, f"{what}: moving a control did not change the picture"
        cell.screenshot(path=str(shots / f"{name}_cell.png"))
        with capsys.disabled(): print(f"  [{name}] widget drawn in {dt:.1f} s, redrawn after a slider move")
    except BaseException:
        page.screenshot(path=str(shots / f"{name}_failure.png"), full_page=True)
        raise
    assert not errors, f"JavaScript errors on the page: {errors[:5]}"
