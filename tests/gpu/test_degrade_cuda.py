"""unifuse.degrade and unifuse.spatial on a CUDA device: same results as on the CPU, no host syncs, speed."""
import time

import pytest
import torch

from unifuse.degrade import CLASSES, fbp, lowdose, make_batch, metal, misalignment, motion, radon
from unifuse.spatial import integrate, warp

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

S = 32


def head(B, S=S, device="cuda"):
    g = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, S, device=device)] * 3, indexing="ij"))
    r = ((g[0] / 0.85) ** 2 + (g[1] / 0.75) ** 2 + (g[2] / 0.8) ** 2).sqrt()
    x = (0.6 * torch.sigmoid((1 - r) * 12) + 0.3 * torch.exp(-(r / 0.4) ** 2)).clamp(0, 1)
    return x[None, None].expand(B, 1, S, S, S).contiguous()


def test_projector_and_fbp_match_cpu():
    img = torch.rand(7, 40, 40)
    s_cpu, s_gpu = radon(img, 45), radon(img.cuda(), 45)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(fbp(s_gpu).cpu(), fbp(s_cpu), atol=1e-4, rtol=1e-4)


def test_degradations_run_on_cuda_with_a_cuda_generator():
    x = head(2)
    g = torch.Generator(device="cuda").manual_seed(0)
    for fn in (motion, metal, lowdose):
        y = fn(x, 0.7, g)
        assert y.device.type == "cuda" and y.shape == x.shape and torch.isfinite(y).all()
        assert (y - x).abs().mean() > 1e-3


def test_make_batch_on_cuda():
    ref, oth = head(3), head(3) * 0.8
    g = torch.Generator(device="cuda").manual_seed(1)
    b = make_batch(ref, oth, ["mri", "ct", "pet"], clean=True, generator=g)
    for k in ("ref", "deg", "deg_label", "ref_moved", "deg_fine", "flow", "label"):
        assert b[k].device.type == "cuda"
    assert b["label"].dtype == torch.long and set(b["label"].tolist()) <= set(range(len(CLASSES)))
    inner = (slice(None), slice(None)) + (slice(6, -6),) * 3
    assert (warp(b["deg_fine"], b["flow"]) - oth)[inner].abs().max() < 0.06


def test_make_batch_has_no_host_sync():
    ref, oth = head(3), head(3) * 0.8
    g = torch.Generator(device="cuda").manual_seed(2)
    make_batch(ref, oth, ["mri", "ct", "pet"], clean=True, generator=g, check=False)  # warm the caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        make_batch(ref, oth, ["mri", "ct", "pet"], clean=True, generator=g, check=False)
        misalignment(2, (S, S, S), g, device="cuda")
        integrate(torch.zeros(1, 3, S, S, S, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_make_batch_160_speed():
    ref, oth = head(3, 160), head(3, 160) * 0.8
    g = torch.Generator(device="cuda").manual_seed(3)
    with torch.no_grad():
        for _ in range(2): make_batch(ref, oth, ["mri", "ct", "pet"], generator=g, check=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5): make_batch(ref, oth, ["mri", "ct", "pet"], generator=g, check=False)
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / 5 * 1e3
    print(f"make_batch 3 x 160^3 on {torch.cuda.get_device_name()}: {ms:.1f} ms (goal on an H100: 50 ms)")
    assert ms < 1000
