"Tests of unifuse.evaluate: baseline stages, tables, and the unifuse-eval command (with and without a checkpoint)."
import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from unifuse import evaluate as E
from unifuse.data import builtin_pair


@pytest.fixture(scope="module")
def pair():
    return builtin_pair("mri", seed=7, size=32)


def test_register_recovers_a_known_shift(pair):
    t1, t2 = pair["ref"][0], pair["other"][0]
    moved = torch.roll(t2, shifts=(2, -3), dims=(0, 1))                         # +2 along D, -3 along H
    r = E.register(t1, moved, deformable=False)
    assert r["flow"].shape == (3, 32, 32, 32) and r["aligned"].shape == (32, 32, 32)
    m = r["flow"][:, 8:-8, 8:-8, 8:-8].mean((1, 2, 3))
    assert torch.allclose(m, torch.tensor([2.0, -3.0, 0.0]), atol=0.5), m
    err = lambda x: float(((torch.as_tensor(x) - t2)[8:-8, 8:-8, 8:-8] ** 2).mean())
    assert err(r["aligned"]) < 0.2 * err(moved)


def test_fusion_rules(pair):
    a, b = pair["ref"][0], pair["other"][0]
    x = torch.rand(1, 1, 12, 16, 20, dtype=torch.float64)
    assert torch.allclose(E.collapse_pyramid(E.laplacian_pyramid(x, 3)), x, atol=1e-12)
    assert torch.allclose(E.fuse(a, b, "average"), (a.double() + b.double()) / 2)
    assert torch.equal(E.fuse(a, b, "maximum"), torch.maximum(a, b).double())
    p = E.fuse(a, b, "pyramid")
    assert p.shape == a.shape and 0 <= float(p.min()) and float(p.max()) <= 1
    assert torch.allclose(E.fuse(a, a, "pyramid"), a.double(), atol=1e-6)
    with pytest.raises(ValueError, match="rule"): E.fuse(a, b, "median")


def test_restore_keeps_range_and_refuses_unknown(pair):
    x = (pair["other"][0] + 0.05 * torch.randn(32, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for task in ("mri", "ct", "pet"):
        r = E.restore(x, task)
        assert r.shape == (32, 32, 32) and r.min() >= 0 and r.max() <= 1
    assert np.abs(E.restore(x, "pet") - pair["other"][0].numpy()).mean() < np.abs(x - pair["other"][0]).mean().item()
    with pytest.raises(ValueError, match="task"): E.restore(x, "xray")


def test_score_case_identity_and_true_flow():
    case = next(E.builtin_cases(["ct"], n=1, size=32))
    fused = (case["ref"] + case["deg_label"]) / 2
    true = E.score_case(case, fused, case["flow"])
    none = E.score_case(case, fused, None)
    assert all(isinstance(v, float) for v in true.values())
    assert true["align_ssim"] > none["align_ssim"] and true["align_dice"] > none["align_dice"]
    assert true["align_dice"] > 0.8 and true["align_folding"] == 0.0
    assert math.isclose(true["Q_mse"], none["Q_mse"])                            # fusion scores ignore the flow


def test_markdown_table_marks_best():
    rows = [{"method": "a", "case": 0, "task": "mri", "Q_mse": 0.1, "Q_ssim": 1.0, "time_s": 1.0},
            {"method": "b", "case": 0, "task": "mri", "Q_mse": 0.2, "Q_ssim": 1.2, "time_s": 2.0}]
    s = E.summarise(rows, flops={"b": 3e9})
    md = E.markdown_table(s, ("Q_mse", "Q_ssim", "flops_G", "time_s"))
    lines = md.splitlines()
    assert lines[0].startswith("| method") and len(lines) == 4
    assert "**0.1000**" in lines[2] and "**1.2000**" in lines[3] and "3.0000" in lines[3] and "—" in lines[2]


def _check_outputs(out, methods, n_cases=2):
    with open(out / "fusion.csv") as f: fus = list(csv.DictReader(f))
    assert [r["method"] for r in fus] == methods
    for col in ("Q_mse", "Q_cc", "Q_psnr", "Q_scd", "Q_vif", "Q_ssim", "time_s"):
        assert all(math.isfinite(float(r[col])) for r in fus), col
    with open(out / "cases.csv") as f: cases = list(csv.DictReader(f))
    assert len(cases) == len(methods) * n_cases                                  # per-case rows kept
    assert (out / "fusion.md").read_text().count("\n|") >= len(methods) + 1
    assert (out / "montage_mri_worst.png").stat().st_size > 1000
    assert (out / "montage_mri_best.png").exists() == (n_cases > 1)
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["methods"] == methods
    return fus


@pytest.mark.slow
def test_cli_baseline_only(tmp_path, capsys):
    assert E.main(["--tasks", "mri", "--n", "2", "--size", "32", "--fusion", "average", "pyramid",
                   "--out", str(tmp_path), "--quiet"]) == 0
    fus = _check_outputs(tmp_path, ["Inputs + Average", "TV + Rigid + Average", "TV + Rigid + Pyramid"])
    assert all(r["flops_G"] in ("", "nan") for r in fus)                       # classical stages: not countable
    assert "Q_ssim" in capsys.readouterr().out


def test_cli_help_and_errors(capsys):
    assert E.main(["--help"]) == 0 and "--checkpoint" in capsys.readouterr().out   # every command returns its status
    assert E.main(["--no-baseline"]) == 2                                     # needs a checkpoint
    assert E.main(["--tasks", "xray"]) == 2


@pytest.mark.slow
def test_cli_with_a_tiny_random_checkpoint(tmp_path):
    from unifuse.model import UniFuse, UniFuseConfig
    torch.manual_seed(0)
    ck = UniFuse(UniFuseConfig.tiny()).save(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    assert E.main(["--checkpoint", str(ck), "--no-baseline", "--tasks", "mri", "--n", "1", "--size", "32",
                   "--out", str(out), "--quiet"]) == 0
    uni = _check_outputs(out, ["UniFuse"], n_cases=1)[0]
    assert float(uni["flops_G"]) > 0 and math.isclose(float(uni["params_M"]) * 1e6, sum(p.numel() for p in UniFuse.load(ck).parameters()))


@pytest.mark.slow
def test_cli_crop_and_prealign_rows(tmp_path):
    from unifuse.model import UniFuse, UniFuseConfig
    torch.manual_seed(0)
    ck = UniFuse(UniFuseConfig.tiny()).save(tmp_path / "tiny.pt")
    cases = list(E.builtin_cases(("mri",), n=1, size=48, crop=24))
    assert cases[0]["ref"].shape[2:] == (24, 24, 24) and cases[0]["labels"].shape[-3:] == (24, 24, 24)
    out = tmp_path / "out"
    assert E.main(["--checkpoint", str(ck), "--no-baseline", "--tasks", "mri", "--n", "1", "--size", "48", "--crop", "24",
                   "--prealign", "rigid", "--out", str(out), "--quiet"]) == 0
    rows = _check_outputs(out, ["UniFuse", "Rigid + UniFuse"], n_cases=1)
    assert json.loads((out / "summary.json").read_text())["meta"]["crop"] == 24
    assert E.main(["--crop", "24", "--dataset", "csv", "--root", str(ck)]) == 2        # built-in heads only
    assert E.main(["--prealign", "rigid"]) == 2                                       # needs a checkpoint


@pytest.mark.slow
def test_cli_with_a_reader(tmp_path):
    from fakes import fake_tree
    root = fake_tree(tmp_path / "brats", "brats2020", n=4, size=24)
    out = tmp_path / "out"
    assert E.main(["--dataset", "brats2020", "--root", str(root), "--n", "1", "--size", "24", "--fusion", "average",
                   "--out", str(out), "--quiet"]) == 0
    with open(out / "cases.csv") as f: rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == {"mri"} and len(rows) == 2
    assert all(r["align_dice"] in ("", "nan") for r in rows)                    # real data: no tissue labels
    assert all(math.isfinite(float(r["Q_ssim"])) for r in rows)
    assert E.main(["--dataset", "brats2020"]) == 2                           # needs --root


# ---------------------------------------------------------------- issue 10: the summary is the mean of the cases

FAST = ["--tasks", "mri", "--size", "17", "--fusion", "average", "--quiet"]     # 17³: the smallest size scored


def _csv(path):
    with open(path) as f: return list(csv.DictReader(f))


def test_summary_rows_are_mean_and_std_of_the_case_rows(tmp_path):
    out = tmp_path / "ev"
    assert E.main(FAST + ["--n", "4", "--out", str(out)]) == 0
    cases, fus, ali = _csv(out / "cases.csv"), _csv(out / "fusion.csv"), _csv(out / "alignment.csv")
    summary = {r["method"]: r for r in fus}
    for r in ali: summary[r["method"]].update(r)
    assert set(summary) == {"Inputs + Average", "TV + Rigid + Average"}
    skewed = 0
    for method, s in summary.items():
        rows = [r for r in cases if r["method"] == method]
        assert int(s["n"]) == len(rows) == 4
        for col in E.FUSION_COLS + ("align_mse", "align_cc", "align_ssim", "align_dice", "time_s"):
            v = np.array([float(r[col]) for r in rows])
            assert math.isclose(float(s[col]), v.mean(), rel_tol=1e-9, abs_tol=1e-12), (method, col)
            assert math.isclose(float(s[col + "_std"]), v.std(), rel_tol=1e-9, abs_tol=1e-12), (method, col)
            skewed += abs(np.median(v) - v.mean()) > 1e-6 * (abs(v.mean()) + 1e-9)
    assert skewed >= 10                                                        # medians would fail these checks
    md = (out / "fusion.md").read_text()                                        # the Markdown table shows the same means
    assert f"{float(summary['TV + Rigid + Average']['Q_ssim']):.4f}" in md
    assert "1 of VIF's 4 scales" in md                                          # small volumes: said in the table


def test_summarise_is_mean_not_median():
    rows = [{"method": "m", "Q_ssim": v, "time_s": 1.0} for v in (0.1, 0.2, 0.9)]
    s = E.summarise(rows)[0]
    assert math.isclose(s["Q_ssim"], 0.4) and math.isclose(s["Q_ssim_std"], np.std([0.1, 0.2, 0.9]))


# ---------------------------------------------------------------- issue 14: outputs whole or not at all

def test_rerun_refuses_then_overwrite_replaces_whole(tmp_path, capsys):
    out = tmp_path / "ev"
    assert E.main(FAST + ["--n", "2", "--out", str(out)]) == 0
    first = json.loads((out / "summary.json").read_text())
    assert sorted(first["meta"]["files"]) == sorted(os.listdir(out)) and "montage_mri_best.png" in first["meta"]["files"]
    capsys.readouterr()
    code = E.main(FAST + ["--n", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--overwrite" in err[0] and str(out) in err[0]
    assert json.loads((out / "summary.json").read_text()) == first              # untouched
    assert E.main(FAST + ["--n", "1", "--out", str(out), "--overwrite"]) == 0
    second = json.loads((out / "summary.json").read_text())
    assert second["meta"]["cases"] == 1 and sorted(second["meta"]["files"]) == sorted(os.listdir(out))
    assert not (out / "montage_mri_best.png").exists()                          # the earlier run's montage is gone
    assert sorted(os.listdir(tmp_path)) == ["ev"]                                # no hidden folders left


def test_overwrite_never_replaces_a_folder_of_other_files(tmp_path, capsys):
    mine = tmp_path / "thesis"; mine.mkdir(); (mine / "chapter1.tex").write_text("precious")
    assert E.main(FAST + ["--n", "1", "--out", str(mine), "--overwrite"]) == 2
    assert "other files" in capsys.readouterr().err
    assert os.listdir(mine) == ["chapter1.tex"]


@pytest.mark.parametrize("rerun", [False, True])
def test_interrupt_leaves_nothing_or_the_old_evaluation(tmp_path, monkeypatch, rerun):
    out = tmp_path / "new" / "ev"
    if rerun: assert E.main(FAST + ["--n", "1", "--out", str(out)]) == 0
    before = sorted(os.listdir(out)) if rerun else None
    def interrupted(*a, **k): raise KeyboardInterrupt                          # Ctrl-C while the montages are drawn
    monkeypatch.setattr(E, "write_montages", interrupted)
    assert E.main(FAST + ["--n", "1", "--out", str(out), "--overwrite"]) == 130   # one line, status 130 (as the other tools)
    if rerun:
        assert sorted(os.listdir(out)) == before and sorted(os.listdir(out.parent)) == ["ev"]
    else: assert os.listdir(tmp_path) == []                                      # not even the parent folder


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try: assert E.main(FAST + ["--n", "1", "--out", str(tmp_path / "ev")]) == 0
    finally: os.umask(old)
    assert (tmp_path / "ev").stat().st_mode & 0o777 == 0o750
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "ev").iterdir()} == {0o640}


def test_corrupt_checkpoint_is_found_before_any_case_is_built(tmp_path, monkeypatch, capsys):
    ck = tmp_path / "model.pt"; ck.write_bytes(b"not a checkpoint")
    def built(*a, **k): raise AssertionError("cases were built before the checkpoint was checked")
    monkeypatch.setattr(E, "builtin_cases", built)
    code = E.main(["--checkpoint", str(ck), "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--checkpoint" in err[0] and "model.pt" in err[0]
    assert os.listdir(tmp_path) == ["model.pt"]


def test_colour_outputs_are_scored_on_luma():
    from unifuse.colour import colourise, luma
    case = next(E.builtin_cases(["pet"], n=1, size=24))
    grey = (case["ref"] + case["deg_label"]) / 2                                  # (1, 1, D, H, W)
    rgb = colourise(grey)                                                        # the same fusion, in colour
    r_rgb, r_y = E.score_case(case, rgb), E.score_case(case, luma(rgb.double()))
    assert r_rgb.pop("colour") is True and "colour" not in r_y
    assert r_rgb == r_y
    assert r_rgb["Q_ssim"] != E.score_case(case, grey)["Q_ssim"]                  # Y of the colour map is not the grey value
    s = E.summarise([{"method": "c", **r_rgb, "colour": True}, {"method": "g", **r_y}])
    md = E.markdown_table(s, ("Q_ssim",))
    assert "| c ᶜ |" in md and "| g |" in md and "Y channel" in md
    with pytest.raises(ValueError, match="grey .* or RGB"): E.score_case(case, torch.zeros(2, 24, 24, 24))


@pytest.mark.slow
def test_cli_colour_pet_scored_on_y(tmp_path):
    from unifuse.model import UniFuse, UniFuseConfig
    torch.manual_seed(0)
    ck = UniFuse(UniFuseConfig.tiny().replace(colour=True)).save(tmp_path / "colour.pt")
    out = tmp_path / "ev"
    assert E.main(["--checkpoint", str(ck), "--tasks", "pet", "--n", "1", "--size", "17", "--fusion", "average",
                   "--colour", "hot", "--out", str(out), "--quiet"]) == 0
    fus = {r["method"]: r for r in _csv(out / "fusion.csv")}
    assert fus["UniFuse"]["colour"] == "True" and fus["TV + Rigid + Average"]["colour"] == ""   # the baseline fuses Y
    md = (out / "fusion.md").read_text()
    assert "| UniFuse ᶜ |" in md and "Y channel (BT.601 luma)" in md
    assert json.loads((out / "summary.json").read_text())["meta"]["colour"] == "hot"
    assert all(math.isfinite(float(r["Q_ssim"])) for r in _csv(out / "cases.csv"))
