"On CUDA: mamba-ssm's kernel and the chunked PyTorch path agree, for y and for gradients through the last state."
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from unifuse.ssm import MambaBlock, _mamba_kernel, selective_scan  # noqa: E402

needs_kernel = pytest.mark.skipif(torch.cuda.is_available() and _mamba_kernel() is None,
                                  reason="mamba-ssm's CUDA kernel does not import")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make(b=2, d=64, n=16, L=777, groups=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    bc = (lambda: r(b, groups, n, L)) if groups else (lambda: r(b, n, L))
    x = dict(u=r(b, d, L), delta=0.5 * r(b, d, L), A=-torch.arange(1, n + 1.0).repeat(d, 1),
             B=bc(), C=bc(), D=r(d), z=r(b, d, L), delta_bias=r(d) - 3)
    return {k: v.cuda() for k, v in x.items()}


def run(x, backend, only_last_state=False):
    xs = {k: v.clone().requires_grad_() for k, v in x.items()}
    y, h = selective_scan(**xs, delta_softplus=True, return_last_state=True, backend=backend)
    g = torch.Generator(device="cuda").manual_seed(1)
    gh = torch.randn(h.shape, generator=g, device="cuda")
    loss = (h * gh).sum() if only_last_state else (y * torch.randn(y.shape, generator=g, device="cuda")).sum() + (h * gh).sum()
    grads = torch.autograd.grad(loss, list(xs.values()), allow_unused=True)
    return y, h, {k: gr for k, gr in zip(xs, grads) if gr is not None}


@needs_kernel
@pytest.mark.parametrize("groups", [None, 2])
def test_kernel_matches_torch_path(groups):
    x = make(groups=groups)
    k, t = run(x, "cuda"), run(x, "torch")
    assert rel(k[0], t[0]) < 1e-4 and rel(k[1], t[1]) < 1e-4
    for name in t[2]: assert rel(k[2][name], t[2][name]) < 1e-3, name


@needs_kernel
def test_last_state_gradients_on_kernel_path():
    x = make()
    k, t = run(x, "cuda", only_last_state=True), run(x, "torch", only_last_state=True)
    for name in ("u", "delta", "A", "B", "delta_bias"):
        assert k[2][name].abs().sum() > 0, name  # the kernel alone would give no gradient here
        assert rel(k[2][name], t[2][name]) < 1e-3, name


@needs_kernel
def test_auto_backend_and_mamba_block_on_cuda():
    x = make(L=64)
    y_auto = selective_scan(**x, delta_softplus=True)
    y_torch = selective_scan(**x, delta_softplus=True, backend="torch")
    assert rel(y_auto, y_torch) < 1e-4
    blk = MambaBlock(32).cuda()
    y, h = blk(torch.randn(2, 100, 32, device="cuda"))
    h.sum().backward()
    assert y.shape == (2, 100, 32) and h.shape == (2, 64, 16) and blk.A_log.grad.abs().sum() > 0


def test_torch_path_on_cuda_matches_cpu():
    x = make(L=300)
    yc, hc = selective_scan(**x, delta_softplus=True, return_last_state=True, backend="torch")
    yh, hh = selective_scan(**{k: v.cpu() for k, v in x.items()}, delta_softplus=True, return_last_state=True, backend="torch")
    assert rel(yc.cpu(), yh) < 1e-4 and rel(hc.cpu(), hh) < 1e-4


def test_cuda_backend_rejects_cpu_tensors():
    x = {k: v.cpu() for k, v in make(L=8).items()}
    with pytest.raises((ValueError, RuntimeError), match="backend='torch'"):
        selective_scan(**x, backend="cuda")
