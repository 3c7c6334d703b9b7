"""The widgets of `unifuse.viz` as a person sees them: JupyterLab in headless Chromium.

Starts JupyterLab on localhost (free port, random token, no browser), opens a small notebook written to a
temporary folder, runs it from the Run menu in Debian's Chromium driven by Playwright (never a downloaded
browser), and checks that the slice browser drew images, that moving a slider changes them, and that the
NiiVue 3D view drew a non-blank WebGL canvas. Screenshots go to `$UNIFUSE_SCREENSHOTS` (default: a fresh
temporary folder); the path is printed.

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
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": c}
                    for c in CELLS],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    (tmp / "viz_check.ipynb").write_text(json.dumps(nb))
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
        # start the notebook's kernel up front, so the page opens on a running session
        req = urllib.request.Request(f"{url}/api/sessions?token={token}", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"path": "viz_check.ipynb", "name": "viz_check.ipynb",
                                                      "type": "notebook", "kernel": {"name": "python3"}}).encode())
        urllib.request.urlopen(req, timeout=60)
        yield dict(url=url, token=token, tmp=tmp)
    finally:
        srv.terminate()
        try: srv.wait(30)
        except subprocess.TimeoutExpired: srv.kill(); srv.wait(10)
        log.close()


@pytest.mark.slow
def test_widgets_in_jupyterlab(lab, capsys):
    from playwright.sync_api import sync_playwright
    shots = _shots_dir()
    (shots / "failure.png").unlink(missing_ok=True)
    with capsys.disabled(): print(f"\n[test_browser] screenshots in {shots}")
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(f"{lab['url']}/lab/tree/viz_check.ipynb?token={lab['token']}", timeout=120_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            t0 = time.time()                      # should a kernel dialog still come, accept the kernel it offers
            while time.time() - t0 < 8:
                dlg = page.locator(".jp-Dialog button.jp-mod-accept")
                if dlg.count(): dlg.first.click(); break
                time.sleep(0.5)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
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
