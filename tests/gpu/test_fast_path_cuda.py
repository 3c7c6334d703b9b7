"On CUDA the CPU kernels are off (plain PyTorch and cuDNN); the model there computes what the CPU kernels compute."
import copy
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from unifuse.cpu.switch import applies  # noqa: E402
from unifuse.model import UniFuse, UniFuseConfig  # noqa: E402
from unifuse.degrade import make_batch  # noqa: E402
from unifuse.data import builtin_pair  # noqa: E402


@pytest.fixture(autouse=True)
def no_tf32():
    "Full float32 on the GPU, so that the comparison measures the code, not TF32's 10-bit mantissa."
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_cuda_matches_cpu_fast_path(preset):
    assert not applies(torch.zeros(1, device="cuda"))
    torch.manual_seed(0)
    cpu = UniFuse(UniFuseConfig.tiny() if preset == "tiny" else UniFuseConfig())
    with torch.no_grad():
        for p in cpu.parameters():
            if p.abs().sum() == 0: p.normal_(0, 0.05)
    gpu = copy.deepcopy(cpu).cuda()
    tasks = ["mri", "ct"] if preset == "tiny" else ["pet"]
    ps = [builtin_pair(t, seed=0, size=32) for t in tasks]
    b = make_batch(torch.stack([p["ref"] for p in ps]), torch.stack([p["other"] for p in ps]), tasks,
                   generator=torch.Generator().manual_seed(0))
    bg = {k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}
    Lc = cpu.loss(b, generator=torch.Generator().manual_seed(0))
    Lg = gpu.loss(bg, generator=torch.Generator("cuda").manual_seed(0))
    for k in ("ce", "reg", "ssim", "inten", "grad", "crcb"):                # L_moda draws its negatives per device
        assert abs(Lc[k].item() - Lg[k].item()) <= 1e-3 * max(abs(Lc[k].item()), 1e-2), k
    with torch.no_grad():
        oc, og = cpu(b["ref"], b["deg"]), gpu(bg["ref"], bg["deg"])
    for k in oc: assert (oc[k] - og[k].cpu()).abs().max() < 1e-3, k
