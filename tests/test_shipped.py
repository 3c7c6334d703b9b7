"""The weights that ship inside the package: present, loadable from a plain (non-editable) install, and unchanged.

The fingerprint below was recorded when the weights were trained (see `unifuse/weights/MODEL_CARD.md`): the
fused output of one fixed built-in pair. A later change to the network, the data or the preprocessing that
changes what the shipped model computes fails here instead of changing users' results without a word.
"""
import json, pathlib, subprocess, sys, zipfile
import pytest
import torch
from unifuse.model import UniFuse

ROOT = pathlib.Path(__file__).resolve().parents[1]
FINGERPRINT = ROOT / "tests" / "shipped_fingerprint.json"


def _fingerprint(model) -> dict:
    "Statistics of the fused output, the flow and p on a fixed built-in MRI pair at 32³ (deterministic)."
    from unifuse.data import builtin_pair
    from unifuse.degrade import make_batch
    p = builtin_pair("mri", seed=424242, size=32)
    b = make_batch(p["ref"][None], p["other"][None], "mri", generator=torch.Generator().manual_seed(7))
    with torch.no_grad(): o = model.eval()(b["ref"], b["deg"])
    f, fl = o["fused"][0, 0].double(), o["flow"][0].double()
    return {"fused_mean": float(f.mean()), "fused_std": float(f.std()), "fused_centre": f[8:24, 8:24, 16].flatten()[::17].tolist(),
            "flow_mean_abs": float(fl.abs().mean()), "probs": o["probs"][0].double().tolist()}


def test_weights_ship_and_load():
    names = UniFuse.shipped()
    assert "tiny" in names, f"no shipped weights in unifuse/weights (found {names})"
    model = UniFuse.pretrained()
    assert model.meta.get("spacing_mm"), "the checkpoint must say the spacing it was trained at"
    assert (pathlib.Path(__import__("unifuse").__file__).parent / "weights" / "unifuse-tiny.pt").stat().st_size < 5e6


def test_fused_output_matches_the_recorded_fingerprint():
    got = _fingerprint(UniFuse.pretrained())
    want = json.loads(FINGERPRINT.read_text())
    for k in ("fused_mean", "fused_std", "flow_mean_abs"):
        assert abs(got[k] - want[k]) < 1e-4 + 1e-3 * abs(want[k]), (k, got[k], want[k])
    assert torch.allclose(torch.tensor(got["fused_centre"]), torch.tensor(want["fused_centre"]), atol=2e-4)
    assert torch.allclose(torch.tensor(got["probs"]), torch.tensor(want["probs"]), atol=1e-4)


def test_a_plain_install_carries_the_weights(tmp_path):
    "`pip install .` (a wheel, not the editable checkout) puts the weights inside the installed package."
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True)
    wheel = next(tmp_path.glob("unifuse-*.whl"))
    assert "unifuse/weights/unifuse-tiny.pt" in zipfile.ZipFile(wheel).namelist()
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True)
    code = ("import unifuse, sys; from unifuse.model import UniFuse; "
            "assert unifuse.__file__.startswith(sys.argv[1]), unifuse.__file__; "
            "m = UniFuse.pretrained(); print(sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) == sum(p.numel() for p in UniFuse.pretrained().parameters())
