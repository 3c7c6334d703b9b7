"The package as other code uses it: cheap to import, every notebook exported, entry points that resolve."
import importlib, json, pathlib, subprocess, sys, tomllib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NETWORK = ["unifuse.config", "unifuse.ssm", "unifuse.spatial", "unifuse.degrade", "unifuse.dapl",
           "unifuse.oufr", "unifuse.fa", "unifuse.ufrf", "unifuse.model", "unifuse.metrics"]
HEAVY = ["SimpleITK", "nilearn", "monai", "skimage", "torchio", "pandas", "scipy", "ipywidgets",
         "ipyniivue", "itkwidgets", "mamba_ssm", "pytorch_msssim", "sklearn"]


def _default_exp(nb_path):
    for cell in json.loads(nb_path.read_text())["cells"]:
        for line in "".join(cell["source"]).splitlines():
            if line.strip().startswith("#| default_exp"): return line.split()[-1]


def test_network_imports_stay_light():
    "Importing the network side pulls in none of the heavy optional libraries (they load lazily)."
    mods = [m for m in NETWORK if (ROOT / (m.replace(".", "/") + ".py")).exists()]
    assert "unifuse.config" in mods
    code = (f"import sys\nfor m in {mods!r}: __import__(m)\n"
            f"print([h for h in {HEAVY!r} if h in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"imported at top level by {mods}: {out.stdout.strip()}"


# Notebooks that export nothing, on purpose: each with the reason. Every other notebook exports a module.
NO_EXPORT = {
    "70_viz.ipynb": "gallery of unifuse.viz (the module itself is 03_viz)",
    "index.ipynb": "the landing page (README)",
    "paper_vs_code.ipynb": "the table of what the paper says against what this code does",
}


@pytest.mark.parametrize("nb", sorted((ROOT / "nbs").glob("*.ipynb")), ids=lambda p: p.name)
def test_every_notebook_exports_a_module(nb):
    mod = _default_exp(nb)
    if nb.name in NO_EXPORT:
        assert not mod, f"{nb.name} is listed in NO_EXPORT ({NO_EXPORT[nb.name]}) but exports unifuse/{mod}.py"
        return
    assert mod, f"{nb.name} has no '#| default_exp' line (add one, or list it in NO_EXPORT with the reason)"
    path = ROOT / "unifuse" / (mod.replace(".", "/") + ".py")                  # cpu.conv: unifuse/cpu/conv.py
    assert path.exists(), f"{nb.name} exports {path.relative_to(ROOT)}, which is missing"


def test_no_two_notebooks_export_one_module():
    mods = {}
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        m = _default_exp(nb)
        if m: mods.setdefault(m, []).append(nb.name)
    assert not {m: n for m, n in mods.items() if len(n) > 1}, f"modules exported by several notebooks: {mods}"


def test_no_export_list_names_real_notebooks():
    missing = [n for n in NO_EXPORT if n not in ("index.ipynb",) and not (ROOT / "nbs" / n).exists()]
    assert not missing, f"NO_EXPORT names notebooks that do not exist: {missing}"


def test_console_scripts_resolve():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {})
    for name, target in scripts.items():
        mod, fn = target.split(":")
        assert callable(getattr(importlib.import_module(mod), fn)), f"{name} -> {target} is not callable"


def test_version():
    import unifuse
    assert unifuse.__version__.count(".") == 2
