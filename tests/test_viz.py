"Tests of unifuse.viz: static figures, the slice browser, the 3D view and the explorer (no front end needed)."
import gzip, subprocess, sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from unifuse.viz import (as_volume, as_flow, show_slices, show_montage, show_flow, show_error_maps, SliceBrowser,
                         view3d, to_nifti_bytes, flow_magnitude, fig_to_png, Explorer, _plane, _grid_segments,
                         _jacobian_det, _rotation_flow)


def _vol(shape=(12, 10, 8), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_import_is_light():
    "import unifuse.viz pulls in neither widgets nor viewers."
    code = ("import sys, unifuse.viz; heavy = [m for m in ('ipywidgets', 'ipyniivue', 'itkwidgets', 'unifuse.degrade', "
            "'unifuse.data', 'scipy', 'SimpleITK') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_as_volume_shapes_and_errors():
    assert as_volume(torch.zeros(3, 1, 4, 5, 6)).shape == (4, 5, 6)
    assert as_volume(np.ones((1, 4, 5, 6), np.int16)).dtype == np.float32
    x = torch.rand(4, 5, 6, requires_grad=True)
    np.testing.assert_allclose(as_volume(x * 2), 2 * x.detach().numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="fused"): as_volume(torch.zeros(1, 2, 4, 5, 6), name="fused")
    with pytest.raises(ValueError, match=r"\(D, H, W\)"): as_volume(torch.zeros(4, 5))
    with pytest.raises(TypeError, match="numpy array"): as_volume([1, 2, 3])
    with pytest.raises(TypeError, match="numbers"): as_volume(np.array([["a"]]))
    assert as_flow(torch.zeros(2, 3, 4, 5, 6)).shape == (3, 4, 5, 6)
    with pytest.raises(ValueError, match="displacement"): as_flow(torch.zeros(1, 4, 4, 4))


def test_planes_follow_ras_order():
    "axial cuts W, coronal H, sagittal D; rows are the higher axis, columns the lower one."
    v = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    np.testing.assert_array_equal(_plane(v, "axial", 3), v[:, :, 3].T)
    np.testing.assert_array_equal(_plane(v, "coronal", 2), v[:, 2, :].T)
    np.testing.assert_array_equal(_plane(v, "sagittal", 1), v[1].T)


def test_show_slices_draws_each_volume_and_plane():
    a, b = _vol(seed=1), _vol(seed=2)
    fig = show_slices(a, b[None, None], titles=["a", "b"], cmap=["gray", "hot"], idx=(3, 4, 5))
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    axs = np.array(fig.axes).reshape(3, 2)
    np.testing.assert_allclose(axs[0, 0].images[0].get_array(), a[:, :, 5].numpy().T)      # axial at w = 5
    np.testing.assert_allclose(axs[1, 1].images[0].get_array(), b[:, 4, :].numpy().T)      # coronal at h = 4
    np.testing.assert_allclose(axs[2, 0].images[0].get_array(), a[3].numpy().T)            # sagittal at d = 3
    assert axs[0, 1].images[0].get_cmap().name == "hot"
    assert axs[0, 0].get_title() == "a"
    assert axs[0, 0].images[0].get_clim() == (0.0, 1.0)                                     # [0, 1] volumes on [0, 1]


def test_show_slices_overlay_ranges_and_errors():
    a = _vol()
    mask = (a > 0.5).float()
    fig = show_slices(a, a - 0.5, overlay=[mask, None], planes="axial")
    assert len(fig.axes[0].images) == 2 and len(fig.axes[1].images) == 1
    lo, hi = fig.axes[1].images[0].get_clim()
    assert lo == -hi and hi > 0                                                             # signed: symmetric
    with pytest.raises(ValueError, match="titles"): show_slices(a, a, titles=["one"])
    with pytest.raises(ValueError, match="overlay"): show_slices(a, overlay=torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="planes"): show_slices(a, planes="transverse")
    with pytest.raises(ValueError, match="idx"): show_slices(a, idx=(99, 0, 0))
    with pytest.raises(ValueError, match="at least one"): show_slices()
    assert fig_to_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_montage_spaces_slices():
    a = torch.arange(20.).view(1, 1, 1, 20).expand(1, 1, 4, 5, 20).contiguous() / 20       # value = w index / 20
    fig = show_montage(a, a, n=5, start=0.0, stop=1.0)
    assert len(fig.axes) == 10
    firsts = [round(float(ax.images[0].get_array()[0, 0]) * 20) for ax in fig.axes[:5]]
    assert firsts == [0, 5, 10, 14, 19]                                                     # round(linspace(0, 19, 5))
    with pytest.raises(ValueError, match="`n`"): show_montage(a, n=0)


def test_flow_grid_and_jacobian():
    segs = _grid_segments(np.zeros((2, 6, 4), np.float32), step=2)
    assert len(segs) == 3 + 2
    np.testing.assert_array_equal(segs[1], np.stack([np.full(4, 2.0), np.arange(4.0)], -1))
    shift = np.zeros((2, 6, 4), np.float32); shift[0] = 1.5
    np.testing.assert_allclose(_grid_segments(shift, 2)[0][:, 0], 1.5)                     # p + φ(p)
    np.testing.assert_allclose(_jacobian_det(np.zeros((3, 5, 5, 5), np.float32)), 1.0)
    np.testing.assert_allclose(_jacobian_det(_rotation_flow((16, 16, 3), 20.0))[3:-3, 3:-3], 1.0, atol=1e-3)
    squash = np.zeros((3, 8, 8, 8), np.float32); squash[0] = -0.5 * np.arange(8)[:, None, None]
    np.testing.assert_allclose(_jacobian_det(squash)[1:-1], 0.5, atol=1e-5)


def test_show_flow_figure():
    f = torch.from_numpy(_rotation_flow((16, 16, 16), 10.0))[None]
    fig = show_flow(f, background=_vol((16, 16, 16)))
    assert len(fig.axes) == 9 + 2
    assert "folding 0.00%" in fig._suptitle.get_text()
    np.testing.assert_allclose(flow_magnitude(f), np.sqrt((f[0].numpy() ** 2).sum(0)), rtol=1e-6)
    assert len(show_flow(f, details=False, planes=("axial", "coronal")).axes) == 2
    with pytest.raises(ValueError, match="background"): show_flow(f, background=_vol((8, 8, 8)))


def test_error_maps_are_aligned_minus_label():
    lab, mov = [_vol((8, 8, 8), s) for s in (1, 2)], [_vol((8, 8, 8), s) for s in (3, 4)]
    fig = show_error_maps(lab, mov, {"none": mov, "perfect": lab}, cases=["x", "y"])
    axs = np.array(fig.axes[:-1]).reshape(4, 2)                                             # last axes: colour bar
    np.testing.assert_allclose(axs[2, 1].images[0].get_array(), (mov[1] - lab[1])[:, :, 4].numpy().T, atol=1e-6)
    np.testing.assert_allclose(axs[3, 0].images[0].get_array(), 0.0)
    assert axs[0, 0].get_title() == "x" and axs[2, 0].get_ylabel() == "none"
    assert axs[3, 0].texts[0].get_text() == "MAE 0.000"
    with pytest.raises(ValueError, match="one per case"): show_error_maps(lab, mov[:1], {"a": mov})
    with pytest.raises(TypeError, match="dict"): show_error_maps(lab, mov, mov)


def test_slice_browser_sliders_change_the_picture():
    a, b = _vol((10, 12, 14), 1), _vol((10, 12, 14), 2)
    f = torch.from_numpy(_rotation_flow((10, 12, 14), 15.0))
    br = SliceBrowser(a, b, titles=["a", "b"], cmap=["gray", "hot"], diff=(0, 1), flow=f)
    assert br.idx == (5, 6, 7) and len(br.fig.axes) == 3 * 3 + 1           # 3 planes × 3 columns + the difference's colour bar
    assert br.image.value == br.render()
    first = br.image.value
    br.sliders[2].value = 3                                                                 # the axial slider
    assert br.idx == (5, 6, 3) and br.image.value != first
    np.testing.assert_allclose(br._im[0, 0].get_array(), a[:, :, 3].numpy().T)
    np.testing.assert_allclose(br._im[0, 2].get_array(), (a - b)[:, :, 3].numpy().T, atol=1e-6)   # diff column
    with_grid = br.image.value
    br.show_grid.value = False
    assert br.image.value != with_grid and len(br._grid[0, 0].get_segments()) == 0
    br.set_index(d=0, h=11)
    assert br.idx == (0, 11, 3)
    assert "application/vnd.jupyter.widget-view+json" in br._repr_mimebundle_()


def test_slice_browser_errors():
    with pytest.raises(ValueError, match="vols\\[1\\]"): SliceBrowser(_vol(), _vol((4, 4, 4)))
    with pytest.raises(ValueError, match="diff"): SliceBrowser(_vol(), diff=(0, 1))
    with pytest.raises(ValueError, match="flow"): SliceBrowser(_vol(), flow=torch.zeros(3, 4, 4, 4))
    with pytest.raises(ValueError, match="at least one"): SliceBrowser()


def test_view3d_niivue(tmp_path):
    import nibabel as nib
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    nv = view3d(_vol(), _vol(seed=3), cmap=["gray", "hot"], affine=aff, vmin=[0, 0.2], vmax=[1, 0.9])
    assert [v.colormap for v in nv.volumes] == ["gray", "hot"]
    assert [v.opacity for v in nv.volumes] == [1.0, 0.5]
    assert nv.volumes[1].cal_min == pytest.approx(0.2) and nv.volumes[1].cal_max == pytest.approx(0.9)
    img = nib.Nifti1Image.from_bytes(gzip.decompress(nv.volumes[0].data))
    np.testing.assert_allclose(img.affine, aff); np.testing.assert_allclose(img.get_fdata(), _vol().numpy(), rtol=1e-6)
    p = tmp_path / "x.nii.gz"; p.write_bytes(to_nifti_bytes(_vol()))
    assert view3d(p).volumes[0].name == "x.nii.gz"
    side = view3d(_vol(), _vol(seed=3), side_by_side=True)
    assert len(side.children) == 2 and all(len(c.volumes) == 1 for c in side.children)
    with pytest.raises(ValueError, match="backend"): view3d(_vol(), backend="vtk")
    with pytest.raises(FileNotFoundError, match="no such NIfTI"): view3d(tmp_path / "missing.nii.gz")
    with pytest.raises(ValueError, match="affine"): to_nifti_bytes(_vol(), affine=np.eye(3))


def test_view3d_itkwidgets_is_opt_in():
    pytest.importorskip("ipywidgets")
    try:
        import itkwidgets  # noqa: F401
        pytest.skip("itkwidgets is installed: the opt-in backend is not exercised offline")
    except ImportError:
        with pytest.raises(ImportError, match="niivue"): view3d(_vol(), backend="itkwidgets")


def _standin(ref, deg):
    "identity alignment, average fusion"
    return dict(fused=(ref + deg) / 2, flow=torch.zeros(ref.shape[0], 3, *ref.shape[2:]), warped=deg)


def test_explorer_sliders_drive_degradation_and_misalignment():
    seen = []
    def model(ref, deg):
        seen.append(deg.clone()); return _standin(ref, deg)
    ex = Explorer(model, task="mri", size=16, strength=0.0, misalign=0.0)
    o = ex.out
    assert o["deg"].shape == (1, 1, 16, 16, 16) and len(seen) == 1
    torch.testing.assert_close(o["deg"], o["label"], atol=1e-5, rtol=0)                     # no misalignment
    assert float(o["phi"].abs().max()) < 1e-5
    ex.misalign.value = 2.0                                                                 # moves the input
    assert len(seen) == 2 and float(ex.out["phi"].abs().max()) > 0.5
    assert float((ex.out["deg"] - ex.out["label"]).abs().mean()) > 1e-3
    png = ex.image.value
    ex.task.value = "pet"; ex.strength.value = 1.0
    assert ex.out["task"] == "pet" and ex.image.value != png
    clean = ex._pair("pet", 0)["other"][None]
    assert float((ex.out["label"] - clean).abs().mean()) > 1e-3                             # degraded
    with pytest.raises(TypeError, match="callable"): Explorer(None)
    with pytest.raises(ValueError, match="task"): Explorer(_standin, task="xray", size=16)
    with pytest.raises(ValueError, match="warped"): Explorer(lambda r, d: dict(fused=r), size=16)


# --- widgets leave a picture: every widget's display carries a PNG of its state beside the live view
import base64

from unifuse.viz import Interactive, with_picture, modality_display, CT_DISPLAY

_VIEW = "application/vnd.jupyter.widget-view+json"


def _data(bundle):
    return bundle[0] if isinstance(bundle, tuple) else bundle


def test_slice_browser_display_has_widget_and_png():
    br = SliceBrowser(_vol(), _vol(seed=3), planes="axial")
    d = _data(br._repr_mimebundle_())
    assert _VIEW in d and "text/plain" in d
    assert base64.b64decode(d["image/png"]) == br.image.value
    assert len(d["text/plain"]) < 200                                        # not the widget repr with its PNG bytes


def test_slice_browser_labels_column_and_legend():
    lab = torch.zeros(12, 10, 8); lab[3:6] = 2; lab[7:] = 4
    br = SliceBrowser(_vol(), labels=lab, label_names=["background", "a", "b", "c", "d"], planes="axial")
    assert br.titles[-1] == "labels" and len(br.vols) == 2
    assert [n for n, _ in br.legend] == ["background", "b", "d"]              # only the values present
    assert br.legend[0][1] == (0.0, 0.0, 0.0)                                 # background black
    with pytest.raises(ValueError, match="label_names"): SliceBrowser(_vol(), labels=lab, label_names=["x"])
    with pytest.raises(ValueError, match="labels"): SliceBrowser(_vol(), labels=torch.zeros(2, 2, 2))


def test_interactive_redraws_and_displays_png():
    calls = []
    def draw(s, plane):
        calls.append((s, plane))
        return show_slices(_vol() * s, planes=plane)
    it = Interactive(draw, s=(0.0, 1.0, 0.5), plane=["axial", "coronal"])
    assert calls == [(0.5, "axial")]
    first = it.image.value
    it.set(s=1.0, plane="coronal")
    assert calls[-1] == (1.0, "coronal") and len(calls) == 2                 # one redraw for both values
    assert it.image.value != first
    it.controls["s"].value = 0.0                                              # moving a control redraws
    assert calls[-1] == (0.0, "coronal")
    d = _data(it._repr_mimebundle_())
    assert _VIEW in d and base64.b64decode(d["image/png"]) == it.image.value
    with pytest.raises(ValueError, match="at least one control"): Interactive(draw)
    with pytest.raises(TypeError, match="callable"): Interactive(None, s=(0, 1))
    with pytest.raises(KeyError, match="no control named"): it.set(t=1)


def test_with_picture_and_view3d_picture():
    import ipywidgets as W
    lbl = W.Label("x")
    d = _data(with_picture(lbl, lambda: show_slices(_vol(), planes="axial"))._repr_mimebundle_())
    assert d[_VIEW]["model_id"] == lbl.model_id and base64.b64decode(d["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TypeError, match="picture"): with_picture(lbl, 3).png()
    nv = view3d(_vol(), _vol(seed=4), cmap=["gray", "hot"])
    d = _data(nv._repr_mimebundle_())
    assert _VIEW in d and base64.b64decode(d["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    pair = view3d(_vol(), _vol(seed=4), side_by_side=True)
    assert "image/png" in _data(pair._repr_mimebundle_())


def test_modality_display():
    assert modality_display("CT") == dict(cmap="gray", vmin=CT_DISPLAY[0], vmax=CT_DISPLAY[1])
    assert modality_display("pet")["cmap"] == "hot" and modality_display("MRI-T1")["vmax"] == 1.0
    lo, hi = CT_DISPLAY                                                       # brain (20-45 HU) inside the range shown
    hu = lambda v: -100 + 1000 * v
    assert hu(lo) < 20 and hu(hi) > 45 and hu(hi) < 300
