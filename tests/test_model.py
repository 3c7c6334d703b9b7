"Tests of unifuse.model: the assembled UniFuse, its total loss, input handling, save/load."
import pickle
import pytest
import torch
import torch.nn as nn
from unifuse.model import UniFuse, UniFuseConfig, pad_to_multiple, crop_to
from unifuse.degrade import make_batch
from unifuse.spatial import warp

LOSS_KEYS = {"ce", "moda", "reg", "ssim", "inten", "grad", "crcb", "total"}


def _volumes(B=2, size=(16, 16, 16), seed=0, c=1):
    "Smooth random volumes in [0, 1] (fast stand-ins for anatomy)."
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2 * B, c, *size, generator=g)
    x = nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = (x - x.amin()) / (x.amax() - x.amin())
    return x[:B], x[B:]


def _batch(B=2, size=(16, 16, 16), seed=0, tasks=None):
    ref, other = _volumes(B, size, seed)
    tasks = tasks or (["mri", "ct", "pet"] * B)[:B]
    return make_batch(ref, other, tasks, generator=torch.Generator().manual_seed(seed))


def test_forward_contract(tiny):
    ref, deg = _volumes()
    out = tiny(ref, deg)
    assert set(out) == {"fused", "flow", "warped", "probs"}
    assert out["fused"].shape == (2, 1, 16, 16, 16) and out["flow"].shape == (2, 3, 16, 16, 16)
    assert out["warped"].shape == deg.shape and out["probs"].shape == (2, tiny.cfg.n_classes)
    assert 0 <= out["fused"].min() and out["fused"].max() <= 1
    assert torch.allclose(out["probs"].sum(1), torch.ones(2), atol=1e-5)
    assert {"dapl", "oufr", "fa", "ufrf"} <= {n for n, _ in tiny.named_children()}


def test_zero_flow_is_identity_at_start(tiny):
    "With FA's earlier start (no prior, no direct path, zero head) φ = 0 and the input passes unwarped; by default `warped` = W(deg, φ)."
    ref, deg = _volumes()
    torch.manual_seed(0)
    plain = UniFuse(UniFuseConfig.tiny(fa_direct=False, fa_head_init=0.0, fa_prior="none")).eval()
    out = plain(ref, deg)
    assert torch.count_nonzero(out["flow"]) == 0
    assert torch.allclose(out["warped"], deg, atol=1e-5)
    from unifuse.spatial import warp
    out = tiny(ref, deg)
    assert torch.allclose(out["warped"], warp(deg, out["flow"]), atol=1e-5)


@pytest.mark.parametrize("size", [(16, 16, 16), (13, 18, 21), (8, 9, 4)])
def test_any_size_is_padded_and_cropped(tiny, size):
    ref, deg = _volumes(1, size)
    out = tiny(ref, deg)
    for k in ("fused", "warped"): assert out[k].shape == (1, 1, *size)
    assert out["flow"].shape == (1, 3, *size)


def test_padding_helpers():
    x = torch.rand(1, 2, 5, 8, 11)
    xp, size = pad_to_multiple(x, 4)
    assert xp.shape == (1, 2, 8, 8, 12) and torch.equal(crop_to(xp, size), x)
    assert torch.equal(xp[..., 5:, :, :11], x[..., 4:5, :, :].expand(-1, -1, 3, -1, -1))   # replicated border


def test_bad_inputs_are_refused(tiny):
    ref, deg = _volumes()
    with pytest.raises(ValueError, match="same batch size and grid"):
        tiny(ref, deg[..., :8])
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        tiny(ref[0, 0], deg[0, 0])
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        tiny(ref.expand(-1, 2, -1, -1, -1), deg.expand(-1, 2, -1, -1, -1))
    bad = deg.clone(); bad[0, 0, 3, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tiny(ref, bad)
    with pytest.raises(TypeError, match="floating"):
        tiny((ref * 255).to(torch.uint8), (deg * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        tiny(ref.numpy(), deg)
    with pytest.warns(UserWarning, match=r"\[0, 1\]"):
        tiny(ref * 1000, deg)
    with pytest.raises(TypeError, match="UniFuseConfig"):
        UniFuse({"patch": 4})


def test_loss_terms_and_weights():
    torch.manual_seed(0)
    cfg = UniFuseConfig.tiny(loss_weights={"reg": 0.5, "moda": 2.0})
    model = UniFuse(cfg)
    L = model.loss(_batch(), generator=torch.Generator().manual_seed(0))
    assert set(L) == LOSS_KEYS
    for k, v in L.items(): assert v.ndim == 0 and torch.isfinite(v), k
    w = cfg.loss_weights
    expect = sum(w[k] * L[k] for k in LOSS_KEYS - {"total"})
    assert torch.allclose(L["total"], expect)
    assert float(L["crcb"]) == 0.0                                  # grey volumes
    assert float(L["reg"].detach()) > 0                                      # the batch is misaligned, φ = 0 at start
    off = UniFuse(cfg.replace(loss_weights={"moda": 0.0}))
    assert float(off.loss(_batch())["moda"]) == 0.0                 # second pair skipped when unweighted


def test_loss_refuses_a_wrong_batch(tiny):
    b = _batch()
    with pytest.raises(ValueError, match="make_batch"):
        tiny.loss({k: v for k, v in b.items() if k != "deg_fine"})
    b2 = dict(b, flow=b["flow"][:, :, :8])
    with pytest.raises(ValueError, match="flow"):
        tiny.loss(b2)


def test_clean_class_needs_four_classes():
    b = _batch()
    b["label"] = torch.tensor([0, 3])                               # "clean"
    with pytest.raises(ValueError, match="n_classes=4"):
        UniFuse(UniFuseConfig.tiny()).loss(b)
    L = UniFuse(UniFuseConfig.tiny(n_classes=4)).loss(b)
    assert torch.isfinite(L["total"])


def test_gradient_reaches_every_parameter():
    "One optimiser step moves the zero-initialised layers (flow head, LoRA up-projections) off zero; then every parameter gets gradient from the total loss."
    torch.manual_seed(0)
    model = UniFuse(UniFuseConfig.tiny())
    b = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.loss(b)["total"].backward()
    opt.step(); opt.zero_grad()
    model.loss(b)["total"].backward()
    missing = {n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)}
    assert not missing, sorted(missing)


SWITCHES = [dict(dapl="A"), dict(dapl="B"), dict(dapl="C"), dict(oufr="mamba"), dict(oufr="transformer"),
            dict(oufr="none"), dict(alsn="none"), dict(alsn="experts"), *[dict(n_regblk=j) for j in range(6)],
            dict(n_classes=4), dict(colour=True), dict(loss_weights={"moda": 0.0})]


@pytest.mark.parametrize("over", SWITCHES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_switch_trains_without_unused_parameters(over):
    "Every setting of Tables 4–5: the loss is finite and every parameter gets a gradient (DDP refuses unused ones)."
    torch.manual_seed(0)
    model = UniFuse(UniFuseConfig.tiny(**over))
    ref, other = _volumes(2, (16, 16, 16))
    b = make_batch(ref, other, ["mri", "pet"], generator=0, clean=over.get("n_classes") == 4,
                   colour="hot" if over.get("colour") else None)
    L = model.loss(b)
    assert set(L) == LOSS_KEYS and torch.isfinite(L["total"])
    L["total"].backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused
    if over.get("dapl") in ("B", "C"):
        out = model(*_volumes())
        assert torch.allclose(out["probs"], torch.full_like(out["probs"], 1 / 3))


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    cfg = UniFuseConfig.tiny(n_regblk=2, alsn="experts")
    model = UniFuse(cfg)
    with torch.no_grad():
        for p in model.parameters(): p.add_(0.01 * torch.randn_like(p))   # not the fresh init
    path = model.save(tmp_path / "sub" / "m.pt")
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name != "m.pt"]   # no temp file left
    back = UniFuse.load(path)
    assert back.cfg == cfg
    ref, deg = _volumes()
    model.eval(); back.eval()
    a, b = model(ref, deg), back(ref, deg)
    for k in a: assert torch.equal(a[k], b[k]), k


def test_load_refuses_corrupt_and_foreign_files(tmp_path):
    model = UniFuse(UniFuseConfig.tiny())
    good = model.save(tmp_path / "m.pt")
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        UniFuse.load(tmp_path / "trunc.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        UniFuse.load(tmp_path / "text.pt")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a UniFuse checkpoint"):
        UniFuse.load(tmp_path / "foreign.pt")

    class Evil:
        def __reduce__(self): return (print, ("code ran",))
    torch.save({"format": "unifuse-model", "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a readable checkpoint"):   # weights_only refuses arbitrary objects
        UniFuse.load(tmp_path / "evil.pt")
    ck = torch.load(good, weights_only=True)
    ck["state_dict"].pop(next(iter(ck["state_dict"])))
    torch.save(ck, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="do not fit"):
        UniFuse.load(tmp_path / "partial.pt")
    with pytest.raises(FileNotFoundError):
        UniFuse.load(tmp_path / "missing.pt")


def test_colour_input_runs_with_crcb():
    "A colour model fuses RGB PET (through a colour map) with a grey reference; L_crcb (Eq. 13) trains its chroma."
    from unifuse.colour import rgb_to_ycbcr
    torch.manual_seed(0)
    model = UniFuse(UniFuseConfig.tiny(colour=True))
    ref, other = _volumes(3, (16, 16, 16))
    b = make_batch(ref, other, ["mri", "ct", "pet"], generator=0, colour="hot")
    assert b["deg"].shape == (3, 3, 16, 16, 16) and b["ref"].shape == (3, 1, 16, 16, 16)
    chroma = rgb_to_ycbcr(b["deg_fine"])[:, 1:]
    assert float((chroma[:2] - 0.5).abs().max()) < 1e-5 and float((chroma[2] - 0.5).abs().max()) > 0.1   # grey, grey, colour
    out = model(b["ref"], b["deg"])
    assert out["fused"].shape == (3, 3, 16, 16, 16) and out["warped"].shape == b["deg"].shape
    L = model.loss(b)
    assert float(L["crcb"].detach()) > 0 and torch.isfinite(L["total"])    # Eq. 13 is on for colour
    L["total"].backward()
    assert model.ufrf.chroma.weight.grad.abs().sum() > 0
    grey = model(b["ref"], b["deg"][:, :1])                                  # a colour model still fuses grey input
    assert grey["fused"].shape == (3, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="colour=True"):
        UniFuse(UniFuseConfig.tiny())(b["ref"], b["deg"])


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_forward_runs_on_meta_tensors(preset):
    "The public forward runs without memory on `meta` tensors (value checks skipped), so FLOPs can be counted at 256³."
    from torch.utils.flop_counter import FlopCounterMode
    cfg = UniFuseConfig.tiny() if preset == "tiny" else UniFuseConfig()
    with torch.device("meta"):
        model = UniFuse(cfg).eval()
        x = torch.empty(1, 1, 32, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = model(x, x)
    assert out["fused"].is_meta and out["fused"].shape == (1, 1, 32, 32, 32) and out["flow"].shape == (1, 3, 32, 32, 32)
    assert fc.get_total_flops() > 0
