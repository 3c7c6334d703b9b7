"Selective scan: the chunked PyTorch path against the plain sequential recurrence, bad input, backend choice."
import pytest
import torch
from unifuse.ssm import MambaBlock, selective_scan, selective_scan_ref


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(b=2, d=8, n=5, L=45, groups=None, const_B=False, seed=0, decay=3.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    bc = (lambda: r(b, groups, n, L)) if groups else (lambda: r(b, n, L))
    return dict(u=r(b, d, L), delta=r(b, d, L).abs(), A=-decay * torch.rand(d, n, generator=g),  # Δ + bias >= 0: decay
                B=r(d, n) if const_B else bc(), C=bc(), D=r(d), z=r(b, d, L), delta_bias=r(d).abs())


def run(fn, x, grad_of, **kw):
    "y, last state and the gradients of a random functional of both w.r.t. the tensors named in grad_of."
    x = {k: (v.clone().requires_grad_(k in grad_of) if v is not None else None) for k, v in x.items()}
    y, h = fn(**x, return_last_state=True, **kw)
    g = torch.Generator().manual_seed(1)
    gy, gh = torch.randn(y.shape, generator=g), torch.randn(h.shape, generator=g)
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), [x[k] for k in grad_of])
    return y, h, dict(zip(grad_of, grads))


@pytest.mark.parametrize("groups", [None, 1, 2])
@pytest.mark.parametrize("extras", ["none", "all", "D", "z", "bias"])
@pytest.mark.parametrize("softplus", [False, True])
def test_matches_sequential(groups, extras, softplus):
    x = make(groups=groups)
    keep = dict(none=(), all=("D", "z", "delta_bias"), D=("D",), z=("z",), bias=("delta_bias",))[extras]
    for k in ("D", "z", "delta_bias"):
        if k not in keep: x[k] = None
    names = [k for k, v in x.items() if v is not None]
    ref = run(selective_scan_ref, x, names, delta_softplus=softplus)
    for chunk in (4, 16, None):  # several blocks, an uneven last block, one block
        got = run(selective_scan, x, names, delta_softplus=softplus, backend="torch", chunk_size=chunk)
        assert rel(got[0], ref[0]) < 1e-4
        assert rel(got[1], ref[1]) < 1e-4
        for k in names: assert rel(got[2][k], ref[2][k]) < 1e-4, (k, chunk)


def test_constant_B_and_grads_through_last_state_only():
    x = make(const_B=True)
    names = ["u", "delta", "A", "B", "C", "delta_bias"]
    ref = run(selective_scan_ref, x, names, delta_softplus=True)
    got = run(selective_scan, x, names, delta_softplus=True, chunk_size=8)
    for a, b in zip(got[:2], ref[:2]): assert rel(a, b) < 1e-4
    for k in names: assert rel(got[2][k], ref[2][k]) < 1e-4, k
    # the last state alone must carry gradients (DAPL learns through it)
    xs = {k: v.clone().requires_grad_(k in ("u", "delta", "A", "B")) for k, v in make().items()}
    _, h = selective_scan(**xs, delta_softplus=True, return_last_state=True, chunk_size=8)
    h.square().sum().backward()
    for k in ("u", "delta", "A", "B"): assert xs[k].grad is not None and xs[k].grad.abs().sum() > 0, k


def test_long_sequence_strong_decay_is_finite():
    x = make(b=1, d=4, n=4, L=3000, decay=400.0)  # exp(ΔA) down to ~e^-1000 per step
    x["delta"] = x["delta"].abs() * 2
    names = ["u", "delta", "A", "B", "C"]
    got = run(selective_scan, x, names, delta_softplus=True, chunk_size=256)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    assert all(torch.isfinite(g).all() for g in got[2].values())
    ref = run(selective_scan_ref, x, names, delta_softplus=True)
    assert rel(got[0], ref[0]) < 1e-4 and rel(got[1], ref[1]) < 1e-4
    for k in names: assert rel(got[2][k], ref[2][k]) < 1e-4, k


def test_dtypes_and_shapes():
    x = make(L=1)  # a single step
    y, h = selective_scan(**x, return_last_state=True)
    assert y.shape == x["u"].shape and h.shape == (2, 8, 5)
    xb = dict(x, u=x["u"].bfloat16(), delta=x["delta"].bfloat16())
    y16 = selective_scan(**xb)
    assert y16.dtype == torch.bfloat16 and y16.shape == x["u"].shape


def bad(**over):
    x = make(); x.update(over)
    return x


@pytest.mark.parametrize("over, exc, words", [
    (dict(u=torch.randn(2, 8)), ValueError, ["`u`", "(batch, dim, seqlen)"]),
    (dict(delta=torch.randn(2, 8, 44)), ValueError, ["`delta`", "(2, 8, 45)"]),
    (dict(A=torch.randn(7, 5)), ValueError, ["`A`", "(8, N)"]),
    (dict(B=torch.randn(2, 5, 44)), ValueError, ["`B`", "(2, 5, 45)"]),
    (dict(C=torch.randn(2, 3, 5, 45)), ValueError, ["`C`", "groups dividing dim = 8"]),
    (dict(B=torch.randn(2, 2, 5, 45), C=torch.randn(2, 4, 5, 45)), ValueError, ["`C`", "grouped like B"]),
    (dict(D=torch.randn(7)), ValueError, ["`D`", "(8,)"]),
    (dict(z=torch.randn(2, 8, 5)), ValueError, ["`z`"]),
    (dict(delta_bias=torch.randn(8, 1)), ValueError, ["`delta_bias`"]),
    (dict(u=torch.randint(0, 3, (2, 8, 45))), TypeError, ["`u`", "floating-point"]),
    (dict(A=torch.randn(8, 5, dtype=torch.complex64)), TypeError, ["`A`", "real floating-point"]),
    (dict(B=[1, 2]), TypeError, ["`B`", "torch.Tensor"]),
    (dict(C=None), TypeError, ["`C`"]),
    (dict(u=torch.randn(2, 8, 0), delta=torch.randn(2, 8, 0)), ValueError, ["`u`", "at least one step"]),
])
def test_bad_input(over, exc, words):
    with pytest.raises(exc) as e: selective_scan(**bad(**over))
    for w in words: assert w in str(e.value), (w, str(e.value))


def test_bad_device():
    x = make(); x["D"] = x["D"].to("meta")
    with pytest.raises(ValueError, match="`D`.*same device as `u`"): selective_scan(**x)


def test_backend_choice(monkeypatch):
    x = make(L=10)
    monkeypatch.setenv("UNIFUSE_SSM_BACKEND", "torch")
    y = selective_scan(**x)
    assert rel(y, selective_scan_ref(**x)) < 1e-4
    monkeypatch.setenv("UNIFUSE_SSM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="UNIFUSE_SSM_BACKEND"): selective_scan(**x)
    with pytest.raises(ValueError, match="`backend`|backend should"): selective_scan(**x, backend="gpu")
    monkeypatch.delenv("UNIFUSE_SSM_BACKEND")
    if not torch.cuda.is_available():  # forcing the kernel without CUDA says why and what to do
        with pytest.raises((RuntimeError, ValueError), match="backend='torch'"): selective_scan(**x, backend="cuda")
        monkeypatch.setenv("UNIFUSE_SSM_BACKEND", "cuda")
        with pytest.raises((RuntimeError, ValueError), match="backend='torch'"): selective_scan(**x)


def test_mamba_block():
    torch.manual_seed(0)
    blk = MambaBlock(16, d_state=4)
    assert (blk.d_inner, blk.d_state, blk.dt_rank) == (32, 4, 1)
    A = -torch.exp(blk.A_log)
    assert torch.allclose(A[0], -torch.arange(1, 5.0)) and torch.allclose(A[7], A[0])
    dt = torch.nn.functional.softplus(blk.dt_proj.bias)
    assert dt.min() >= 1e-4 * 0.99 and dt.max() <= 0.1 * 1.01
    x = torch.randn(2, 20, 16)
    y, h = blk(x)
    assert y.shape == (2, 20, 16) and h.shape == (2, 32, 4)
    # causal: the output at step t does not depend on later tokens
    x2 = x.clone(); x2[:, 10:] += 1
    y2, _ = blk(x2)
    assert torch.allclose(y[:, :10], y2[:, :10], atol=1e-6) and not torch.allclose(y[:, 10:], y2[:, 10:])
    # the last state carries gradients into every parameter of the path that feeds it
    h.square().sum().backward()
    for name in ("in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.bias", "A_log"):
        assert blk.get_parameter(name).grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="`x`.*d_model=16"): blk(torch.randn(2, 20, 8))
    with pytest.raises(ValueError, match="`d_state`"): MambaBlock(16, d_state=0)


def test_kernel_path_last_state_gradient_with_stand_in_kernel():
    "The CUDA path's logic on CPU: a stand-in kernel that, like mamba-ssm's, returns h_L without gradient."
    from unifuse.ssm import _selective_scan_cuda

    def kernel_like(*args):
        y, h = selective_scan_ref(*args)
        return y, h.detach()

    x = make(groups=2)
    names = list(x)
    ref = run(selective_scan_ref, x, names, delta_softplus=True)
    got = run(lambda **a: _selective_scan_cuda(**a, kernel=kernel_like), x, names, delta_softplus=True)
    for a, b in zip(got[:2], ref[:2]): assert rel(a, b) < 1e-4
    for k in names: assert rel(got[2][k], ref[2][k]) < 1e-4, k
    # without the closed form, the gradient through h_L would be missing: check that the test would notice
    bare = run(lambda **a: kernel_like(*[a[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")],
                                       a["delta_softplus"], a["return_last_state"]), x, names, delta_softplus=True)
    assert rel(bare[2]["B"], ref[2]["B"]) > 1e-3


def test_meta_device_shapes():
    "No value is read on the torch path: the scan and both kinds of MambaBlock run on `meta` (FLOP counting)."
    m = lambda *s: torch.empty(*s, device="meta", requires_grad=True)
    y, h = selective_scan(m(2, 8, 45), m(2, 8, 45), m(8, 5), m(2, 5, 45), m(2, 5, 45), m(8), z=m(2, 8, 45),
                          delta_bias=m(8), delta_softplus=True, return_last_state=True, backend="torch")
    assert y.shape == (2, 8, 45) and h.shape == (2, 8, 5) and y.device.type == h.device.type == "meta"
    (y.sum() + h.sum()).backward()  # the backward pass too
    for state_only in (False, True):
        blk = MambaBlock(16, d_state=4, state_only=state_only).to("meta")
        y, h = blk(torch.empty(2, 20, 16, device="meta"))
        assert h.shape == (2, 32, 4) and h.device.type == "meta"
        assert (y is None) if state_only else (y.shape == (2, 20, 16) and y.device.type == "meta")


def test_state_only_block():
    "state_only keeps exactly what the last state depends on: same h as the full block, every parameter trained."
    torch.manual_seed(0)
    full, part = MambaBlock(16, d_state=4), MambaBlock(16, d_state=4, state_only=True)
    assert not hasattr(part, "out_proj") and not hasattr(part, "D")
    with torch.no_grad():  # copy the shared parameters: the x half of in_proj, the Δ and B rows of x_proj
        for name in ("conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias", "A_log"):
            part.get_parameter(name).copy_(full.get_parameter(name))
        part.in_proj.weight.copy_(full.in_proj.weight[:full.d_inner])
        part.x_proj.weight.copy_(full.x_proj.weight[:full.dt_rank + full.d_state])
    x = torch.randn(2, 20, 16)
    _, h_full = full(x)
    y, h = part(x)
    assert y is None and torch.allclose(h, h_full, atol=1e-6)
    h.square().sum().backward()
    for name, p in part.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert sum(p.numel() for p in part.parameters()) < sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("bshape", ["grouped", "shared", "constant"])
@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_last_state_alone_matches_sequential(bshape, chunk):
    "selective_scan_last_state = the recurrence's h_L, and its gradients w.r.t. u, Δ, A, B and the bias (relative 1e-5)."
    from unifuse.ssm import selective_scan_last_state
    x = make(groups=2 if bshape == "grouped" else None, const_B=bshape == "constant", L=50)
    x["C"] = x["B"]
    names = ["u", "delta", "A", "B", "delta_bias"]
    xs = {k: x[k].clone().requires_grad_() for k in names}
    _, h_ref = selective_scan_ref(**xs, C=xs["B"], delta_softplus=True, return_last_state=True)
    gh = torch.randn(h_ref.shape, generator=torch.Generator().manual_seed(3))
    g_ref = torch.autograd.grad((h_ref * gh).sum(), list(xs.values()))
    xs = {k: x[k].clone().requires_grad_() for k in names}
    h = selective_scan_last_state(**xs, delta_softplus=True, chunk_size=chunk)
    g = torch.autograd.grad((h * gh).sum(), list(xs.values()))
    assert h.shape == h_ref.shape and rel(h, h_ref) < 1e-5
    for k, a, b in zip(names, g, g_ref): assert rel(a, b) < 1e-5, k


def test_last_state_alone_bad_input_and_meta():
    from unifuse.ssm import selective_scan_last_state
    x = make()
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_last_state(x["u"], x["delta"], x["A"], x["B"], chunk_size=0)
    with pytest.raises(ValueError, match="`B`"):
        selective_scan_last_state(x["u"], x["delta"], x["A"], x["B"][:, :, :-1])
    m = lambda *s: torch.empty(*s, device="meta")
    assert selective_scan_last_state(m(2, 8, 40), m(2, 8, 40), m(8, 5), m(2, 5, 40)).shape == (2, 8, 5)


def test_state_only_block_uses_the_closed_form_on_the_torch_path():
    "A state-only MambaBlock returns the same h (and parameter gradients) as the full scan of its inputs would."
    import torch.nn.functional as F
    from einops import rearrange
    torch.manual_seed(0)
    blk = MambaBlock(16, d_state=8, state_only=True)
    x = torch.randn(2, 40, 16)
    _, h = blk(x)
    # the same last state through the chunked scan, from the block's own projections
    xz = rearrange(blk.in_proj(x), "b l e -> b e l")
    xs = F.silu(blk.conv1d(xz)[..., :40])
    dt, Bm = blk.x_proj(rearrange(xs, "b d l -> b l d")).split([blk.dt_rank, blk.d_state], -1)
    dt = rearrange(dt @ blk.dt_proj.weight.t(), "b l d -> b d l")
    A = -torch.exp(blk.A_log)
    _, h_scan = selective_scan(xs, dt, A, rearrange(Bm, "b l n -> b n l"), A.new_zeros(A.shape), delta_bias=blk.dt_proj.bias,
                               delta_softplus=True, return_last_state=True, backend="torch", chunk_size=8)
    assert rel(h, h_scan) < 1e-5
    gh = torch.randn(h.shape, generator=torch.Generator().manual_seed(1))
    ga = torch.autograd.grad((h * gh).sum(), list(blk.parameters()))
    gb = torch.autograd.grad((h_scan * gh).sum(), list(blk.parameters()))
    for a, b in zip(ga, gb): assert rel(a, b) < 1e-4
