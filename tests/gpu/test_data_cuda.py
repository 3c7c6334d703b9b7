"""unifuse.data on a CUDA device: the built-in volumes are made on the GPU and agree with the CPU ones."""
import pytest
import torch

from unifuse import data as D

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("task", ["mri", "ct", "pet"])
def test_builtin_pair_on_cuda_matches_cpu(task):
    cpu = D.builtin_pair(task, seed=3, size=32, lesion=True)
    gpu = D.builtin_pair(task, seed=3, size=32, lesion=True, device="cuda")
    for k in ("ref", "other", "labels"):
        assert gpu[k].device.type == "cuda" and gpu[k].shape == cpu[k].shape
    for k in ("ref", "other"):
        assert (gpu[k].cpu() - cpu[k]).abs().max() < 1e-3
    assert (gpu["labels"].cpu() != cpu["labels"]).float().mean() < 1e-3


def test_builtin_subject_cuda_160_is_fast():
    import time
    D.builtin_subject(0, 160, device="cuda"); torch.cuda.synchronize()
    t = time.perf_counter()
    for s in range(3): D.builtin_subject(s + 1, 160, device="cuda")
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / 3 * 1e3
    print(f"builtin_subject at 160^3 on {torch.cuda.get_device_name()}: {ms:.1f} ms")
    assert ms < 1000
