"""The CPU kernels (unifuse.cpu: the switch, the convolutions, the fused forms of Eq. 3 and Eq. 9) computes what the
plain PyTorch path computes.

Tolerances (float32 rounding, different summation orders): outputs and loss terms to 1e-5 (relative for losses);
every parameter's gradient to 1e-4 in relative L2 norm, or, for gradients that nearly cancel (a softmax temperature's
can be 1e-7 where others are 1e-2), to 1e-6 of the largest parameter gradient; single layers to 1e-5."""
import warnings
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from unifuse.cpu.switch import CL, accelerated, applies, set_kernels, to_cl, use_kernels
from unifuse.cpu.conv import Conv3d, conv3d, gram
from unifuse.model import UniFuse, UniFuseConfig
from unifuse.degrade import make_batch
from unifuse.data import builtin_pair

pytestmark = pytest.mark.skipif(not applies(torch.zeros(1)), reason="no oneDNN in this torch build: no fast path")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def both_paths(fn):
    "fn() run off and on the fast path: (reference, fast)."
    out = []
    for fast in (False, True):
        with use_kernels(fast): out.append(fn())
    return out


CONVS = {
    "pointwise": lambda: Conv3d(8, 24, 1),
    "pointwise_no_bias": lambda: Conv3d(24, 8, 1, bias=False),
    "depthwise": lambda: Conv3d(8, 8, 3, padding=1, groups=8),
    "depthwise_5": lambda: Conv3d(6, 6, 5, padding=2, groups=6),
    "dense_same": lambda: Conv3d(8, 4, 3, padding=1),
    "one_channel_in": lambda: Conv3d(1, 4, 3, padding=1),
    "strided_patch": lambda: Conv3d(8, 16, 2, stride=2),
    "padding_string": lambda: Conv3d(8, 8, 3, padding="same"),
    "grouped": lambda: Conv3d(8, 8, 3, padding=1, groups=2),
    "replicate_depthwise": lambda: Conv3d(8, 8, 3, padding=1, groups=8, padding_mode="replicate"),
    "replicate_dense": lambda: Conv3d(1, 4, 3, padding=1, padding_mode="replicate"),
}


@pytest.mark.parametrize("kind", list(CONVS))
def test_conv3d_matches_plain(kind):
    torch.manual_seed(0)
    conv = CONVS[kind]()
    x = torch.rand(2, conv.in_channels, 9, 10, 7)                       # channels-first, as users pass them
    gy = None
    def run():
        conv.zero_grad()
        xx = x.clone().requires_grad_()
        y = conv(xx)
        nonlocal gy
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)) if gy is None else gy
        (y * gy).sum().backward()
        return [y.detach(), xx.grad] + [p.grad.clone() for p in conv.parameters()]
    ref, fast = both_paths(run)
    assert fast[0].shape == ref[0].shape
    for a, b in zip(fast, ref): assert rel(a, b) < 1e-5
    assert isinstance(conv, nn.Conv3d)                                   # same class tree, same parameters
    assert set(conv.state_dict()) == ({"weight", "bias"} if conv.bias is not None else {"weight"})


@pytest.mark.parametrize("groups", [1, 4])
def test_replicate_padding_matches_torch(groups):
    "Conv3d with padding_mode='replicate' (padded, then the fast path) computes what nn.Conv3d computes, gradients too."
    torch.manual_seed(0)
    ours, theirs = Conv3d(4, 8, 3, padding=1, groups=groups, padding_mode="replicate"), nn.Conv3d(4, 8, 3, padding=1, groups=groups, padding_mode="replicate")
    theirs.load_state_dict(ours.state_dict())
    x = torch.rand(2, 4, 9, 10, 7)
    res = []
    for conv in (ours, theirs):
        xx = x.clone().requires_grad_()
        y = conv(xx); (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        res.append((y.detach(), xx.grad, conv.weight.grad))
    for a, b in zip(*res): assert rel(a, b) < 1e-5


@pytest.mark.parametrize("k,depth", [(3, 1), (3, 2), (5, 2), (5, 3)])
def test_same_conv_on_thin_volumes(k, depth):
    "Volumes thinner than the kernel along D (no or few slice pairs inside a volume; a batch of 3)."
    for groups in (1, 4):
        torch.manual_seed(0)
        conv = Conv3d(4, 4, k, padding=k // 2, groups=groups)
        x = torch.rand(3, 4, depth, 6, 5)
        def run():
            conv.zero_grad(); xx = x.clone().requires_grad_()
            y = conv(xx); (y * torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view_as(y)).sum().backward()
            return [y.detach(), xx.grad, conv.weight.grad.clone(), conv.bias.grad.clone()]
        ref, fast = both_paths(run)
        for a, b in zip(fast, ref): assert rel(a, b) < 1e-5


def test_conv3d_layout_and_passthrough():
    x = torch.rand(2, 8, 6, 6, 6)
    y = Conv3d(8, 8, 3, padding=1, groups=8)(x)
    assert y.is_contiguous(memory_format=CL)                            # channels-last inside the model
    with use_kernels(False): assert not Conv3d(8, 8, 1)(x).is_contiguous(memory_format=CL)
    xd = x.double()                                                      # other dtypes: plain nn.Conv3d
    c = Conv3d(8, 8, 1).double()
    assert not applies(xd) and torch.allclose(c(xd), F.conv3d(xd, c.weight, c.bias))
    m = Conv3d(8, 8, 3, padding=1, groups=8, device="meta")              # meta: shapes only (FLOP counting)
    assert m(torch.empty(1, 8, 300, 300, 300, device="meta")).shape == (1, 8, 300, 300, 300)
    one = torch.rand(2, 1, 6, 6, 6)                                      # one channel: explicit channels-last strides
    assert to_cl(one).stride(1) == 1 and F.conv3d(to_cl(one), torch.rand(4, 1, 3, 3, 3)).is_contiguous(memory_format=CL)


def test_fast_path_switch_restores():
    with use_kernels(False):
        assert not applies(torch.zeros(1))
        with use_kernels(True): assert applies(torch.zeros(1))
        assert not applies(torch.zeros(1))
    assert applies(torch.zeros(1))
    with pytest.raises(RuntimeError), use_kernels(False): raise RuntimeError("inside")
    assert applies(torch.zeros(1))                                  # restored after an exception too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                  # torch's note on oneDNN TF32 when toggled
        with torch.backends.mkldnn.flags(enabled=False):                 # oneDNN off by the user: plain path
            assert not applies(torch.zeros(1))
            c = Conv3d(4, 4, 1); x = torch.rand(1, 4, 3, 3, 3)
            assert torch.allclose(c(x), F.conv3d(x, c.weight, c.bias))


@pytest.mark.parametrize("K,m,n", [(10000, 8, 24), (10000, 24, 8), (4096, 8, 8), (100, 3, 5)])
def test_gram(K, m, n):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, K, m, generator=g), torch.randn(2, K, n, generator=g)
    assert rel(gram(a, b), a.double().transpose(1, 2) @ b.double()) < 1e-5
    assert rel(gram(a[0], b[0]), a[0].double().t() @ b[0].double()) < 1e-5


def _batch(size, tasks, seed=0):
    ps = [builtin_pair(t, seed=seed, size=size) for t in tasks]
    return make_batch(torch.stack([p["ref"] for p in ps]), torch.stack([p["other"] for p in ps]), tasks,
                      generator=torch.Generator().manual_seed(seed))


def _model(cfg):
    torch.manual_seed(0)
    m = UniFuse(cfg)
    with torch.no_grad():                                                # zero-initialised heads (FA's, LoRA's A):
        for p in m.parameters():                                         # non-zero, so that every path carries signal
            if p.abs().sum() == 0: p.normal_(0, 0.05)
    return m


def _compare_model(model, batch):
    def run():
        model.zero_grad(set_to_none=True)
        L = model.loss(batch, generator=torch.Generator().manual_seed(0))
        L["total"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        with torch.no_grad(): out = model(batch["ref"], batch["deg"])
        return {k: v.item() for k, v in L.items()}, grads, out
    (L0, g0, o0), (L1, g1, o1) = both_paths(run)
    for k in L0: assert abs(L1[k] - L0[k]) <= 1e-5 * max(abs(L0[k]), 1e-3), (k, L0[k], L1[k])
    for k in o0: assert (o1[k] - o0[k]).abs().max() < 1e-5, k
    assert set(g0) == set(g1) and all(g is not None for g in g0.values())
    scale = max(g.norm().item() for g in g0.values())
    bad = {n: rel(g1[n], g0[n]) for n in g0 if rel(g1[n], g0[n]) > 1e-4 and (g1[n] - g0[n]).norm() > 1e-6 * scale}
    assert not bad, bad


def test_tiny_model_fast_path_matches_plain():
    "UniFuse(tiny) as users build it: outputs, every loss term and every parameter gradient, fast path vs plain."
    _compare_model(_model(UniFuseConfig.tiny()), _batch(24, ["mri", "ct"]))


def test_paper_model_fast_path_matches_plain():
    "The paper preset at 32³ (one pair): the same comparison."
    _compare_model(_model(UniFuseConfig()), _batch(32, ["pet"]))


def test_colour_model_fast_path_matches_plain():
    "A colour model (chroma head, L_crcb) on colour PET batches."
    cfg = UniFuseConfig.tiny(colour=True)
    p = builtin_pair("pet", seed=0, size=16)
    b = make_batch(p["ref"][None], p["other"][None], "pet", colour="hot", generator=torch.Generator().manual_seed(0))
    _compare_model(_model(cfg), b)


def test_one_sample_inference_matches_plain():
    "Batch 1 without gradients (how `unifuse-fuse` runs): the paper preset's outputs."
    model = _model(UniFuseConfig()).eval()
    b = _batch(32, ["mri"])
    with torch.no_grad(): o0, o1 = both_paths(lambda: model(b["ref"], b["deg"]))
    for k in o0: assert (o1[k] - o0[k]).abs().max() < 1e-5, k


def test_flop_count_nearly_unchanged():
    "FlopCounterMode on the fast path counts what ran: within 3 % of the plain path (elementwise SSM work is not counted)."
    from torch.utils.flop_counter import FlopCounterMode
    model = _model(UniFuseConfig.tiny()).eval()
    b = _batch(32, ["mri"])
    def count():
        with torch.no_grad(), FlopCounterMode(display=False) as fc: model(b["ref"], b["deg"])
        return fc.get_total_flops()
    f0, f1 = both_paths(count)
    assert abs(f1 / f0 - 1) < 0.03, (f0, f1)


def test_ssim_matches_pytorch_msssim():
    "ssim3d (Gaussian filter as matrix products) = pytorch_msssim.ssim, values and gradients."
    ssim_lib = pytest.importorskip("pytorch_msssim").ssim
    from unifuse.ufrf import ssim3d
    g = torch.Generator().manual_seed(0)
    for shape, w in (((2, 1, 20, 24, 28), 11), ((1, 2, 16, 16, 16), 11), ((1, 1, 7, 12, 12), 7)):
        a = torch.rand(shape, generator=g)
        b = (a + 0.2 * torch.rand(shape, generator=g)).clamp(0, 1)
        a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
        mine, lib = ssim3d(a1, b, win_size=w), ssim_lib(a2, b, data_range=1.0, win_size=w)
        assert abs(mine.item() - lib.item()) < 1e-6
        assert rel(torch.autograd.grad(mine, a1)[0], torch.autograd.grad(lib, a2)[0]) < 1e-4


def test_environment_switch_turns_the_cpu_kernels_off():
    "UNIFUSE_CPU_KERNELS=0: the whole process computes as plain PyTorch does (what a user tries first when a CPU result looks wrong)."
    import os, subprocess, sys
    code = "import torch; from unifuse.cpu.switch import applies; print(applies(torch.zeros(1)))"
    ask = lambda v: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                   env={**os.environ, "UNIFUSE_CPU_KERNELS": v}).stdout.split()[-1]
    assert ask("0") == "False" and ask("off") == "False"
    assert ask("1") == str(torch.backends.mkldnn.is_available())


OPS = {   # small float64 inputs: gradcheck perturbs every element
    "depthwise_conv": lambda d: (torch.randn(3, 4, 4, 3, 4, **d), torch.randn(4, 1, 3, 3, 3, **d), torch.randn(4, **d)),
    "depthwise_conv_no_bias": lambda d: (torch.randn(2, 3, 2, 4, 4, **d), torch.randn(3, 1, 3, 3, 3, **d), None),
    "channel_attention": lambda d: (torch.randn(2, 40, 4, **d), torch.randn(2, 40, 4, **d), torch.randn(2, 40, 4, **d),
                                    torch.randn(2, 2, 2, 2, **d), torch.rand(2, 1, 1, **d), 2),
    "spatial_scan": lambda d: (torch.randn(2, 50, 3, **d), torch.rand(2, 50, 3, **d),
                               (-torch.rand(3, 4, dtype=torch.float64) - 0.1).requires_grad_(),
                               torch.randn(2, 50, 4, **d), torch.randn(2, 50, 4, **d), torch.randn(2, 3, 4, **d), 16),
}


@pytest.mark.parametrize("name", list(OPS))
def test_custom_op_opcheck_and_gradcheck(name):
    "Each CPU kernel is a torch.library custom op: schema, fake tensor, autograd registration and AOT tracing (opcheck); float64 gradients against finite differences."
    import unifuse.cpu.fused  # noqa: F401  (registers the fused ops)
    op = getattr(torch.ops.unifuse, name.replace("_no_bias", "")).default
    torch.manual_seed(0)
    args = OPS[name](dict(dtype=torch.float64, requires_grad=True))
    torch.library.opcheck(op, args)
    assert torch.autograd.gradcheck(lambda *a: op(*a), args)


def test_accelerated_picks_by_switch_and_dtype():
    @accelerated(lambda x: x + 1)
    def f(x): return x
    assert f(torch.zeros(1)).item() == 1                                 # float32 CPU: the kernel
    assert f(torch.zeros(1, dtype=torch.float64)).item() == 0            # other dtypes: the reference
    assert f([torch.zeros(1), torch.zeros(1, dtype=torch.float64)]) is not None
    with use_kernels(False): assert f(torch.zeros(1)).item() == 0
    set_kernels(False)
    try: assert not applies(torch.zeros(1))
    finally: set_kernels(True)
    assert applies(torch.zeros(1))


def test_import_registers_only_own_flop_formulas():
    "Importing the package teaches FlopCounterMode the formulas of its own ops and nothing of torch's."
    import os, subprocess, sys
    code = ("import torch; from torch.utils import flop_counter as fc; n0 = set(fc.flop_registry); "
            "import unifuse.model, unifuse.train, unifuse.fuse; new = set(fc.flop_registry) - n0; "
            "print(sorted(str(o) for o in new))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ).stdout.strip().splitlines()[-1]
    assert "aten" not in out and "unifuse.depthwise_conv" in out and "unifuse.spatial_scan" in out, out


def test_cpu_kernels_flag(tmp_path):
    "--cpu-kernels off on the command lines switches the kernels off for the run; a wrong value is a one-line user error."
    from unifuse.cli import cpu_kernels_flag
    import argparse
    p = argparse.ArgumentParser(); cpu_kernels_flag(p)
    try:
        assert p.parse_args(["--cpu-kernels", "off"]).cpu_kernels == "off"
        with pytest.raises(SystemExit): p.parse_args(["--cpu-kernels", "maybe"])
    finally: set_kernels(True)


@pytest.mark.parametrize("radius,grid", [(1, (5, 6, 7)), (2, (12, 12, 12)), (2, (7, 9, 6))])
def test_cost_volume_kernel_matches_reference(radius, grid):
    "FA's block matching: the blocked matrix-product kernel gives the reference's cosines on any grid size, and counts the reference's FLOPs."
    from torch.utils.flop_counter import FlopCounterMode
    from unifuse.fa import cost_volume
    torch.manual_seed(0)
    a, b = torch.randn(2, 24, *grid), torch.randn(2, 24, *grid)
    with use_kernels(False), FlopCounterMode(display=False) as f0: ref = cost_volume(a, b, radius)
    with FlopCounterMode(display=False) as f1: got = cost_volume(a, b, radius)
    assert got.shape == ref.shape == (2, (2 * radius + 1) ** 3, *grid)
    assert (got - ref).abs().max() < 1e-5
    assert f0.get_total_flops() == f1.get_total_flops()


@pytest.mark.parametrize("S,N,V", [(4, 48, 180), (3, 33, 60), (2, 16, 7)])
def test_projector_kernel_matches_grid_sample(S, N, V):
    "CT/PET simulation: the cached sparse sampling matrix gives grid_sample's sums for the projection and the back-projection (values and gradients); radon itself stays bit for bit the reference."
    from unifuse.degrade import _backproj_pixels, _radon_grid, _sampled_sums, fbp, radon
    torch.manual_seed(0)
    img = torch.rand(S, N, N, requires_grad=True)
    for grid, x in ((_radon_grid(N, V, img.device, img.dtype), img),
                    (_backproj_pixels(N, V, img.device, img.dtype), torch.rand(S, V, N, requires_grad=True))):
        r0, r1 = _sampled_sums.reference(x, grid), _sampled_sums.kernel(x, grid)
        g0, = torch.autograd.grad(r0.square().sum(), x)
        g1, = torch.autograd.grad(r1.square().sum(), x)
        assert rel(r1, r0) < 1e-5 and rel(g1, g0) < 1e-5
    with use_kernels(False): s0 = radon(img.detach(), V); f0 = fbp(s0)
    s1 = radon(img.detach(), V)
    assert torch.equal(s1, s0)                                           # the projection: the reference, always
    assert rel(fbp(s1), f0) < 1e-5
