"""Time each fusion metric (and all of them together) on one case of a given size.

    python bench/metrics.py                 # one 160³ case on the CPU
    python bench/metrics.py --size 96 --device cuda --repeat 3

The last printed line is one JSON object with the timings (seconds), the size and the device.
"""
import argparse, json, platform, resource, time

import torch

from unifuse import metrics as M


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=160, help="voxels per side of the case (default 160)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per metric; the best is kept (default 1)")
    p.add_argument("--slicewise", action="store_true", help="2D slice-wise SSIM/VIF/VIFF instead of 3D")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available(): p.error("--device cuda but no CUDA device is available")
    g = torch.Generator().manual_seed(0)
    n = a.size
    # a smooth pair and a fused volume with some noise, in [0, 1]
    x = torch.rand(2, 1, n // 4, n // 4, n // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(n, n, n), mode="trilinear", align_corners=False)   # (2, 1, n, n, n)
    ref, other = x[0, 0], x[1, 0] ** 2
    fused = ((ref + other) / 2 + 0.02 * torch.randn(n, n, n, generator=g)).clamp(0, 1)
    ref, other, fused = ref.to(dev), other.to(dev), fused.to(dev)

    def timed(fn):
        best, val = float("inf"), None
        for _ in range(a.repeat):
            if dev.type == "cuda": torch.cuda.synchronize()
            t0 = time.perf_counter(); val = fn()
            if dev.type == "cuda": torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best, val

    out = {"bench": "metrics", "size": [n, n, n], "device": str(dev), "threads": torch.get_num_threads(),
           "slicewise": a.slicewise, "repeat": a.repeat, "seconds": {}, "values": {}}
    if dev.type == "cuda": torch.cuda.reset_peak_memory_stats()
    for name, (fn, _) in M.METRICS.items():
        kw = {"slicewise": a.slicewise} if name in ("Q_vif", "Q_ssim", "Q_viff") else {}
        t, v = timed(lambda: fn(ref, other, fused, **kw))
        out["seconds"][name], out["values"][name] = round(t, 4), round(float(v), 6)
        print(f"{name:8s} {t:8.3f} s   value {float(v):.4f}")
    t, _ = timed(lambda: M.fusion_metrics(ref, other, fused, slicewise=a.slicewise))
    out["seconds"]["fusion_metrics (all, shared VIF statistics)"] = round(t, 4)
    out["seconds"]["six of the paper (sum)"] = round(sum(out["seconds"][k] for k in ("Q_mse", "Q_cc", "Q_psnr", "Q_scd", "Q_vif", "Q_ssim")), 4)
    print(f"all      {t:8.3f} s   (fusion_metrics)")
    out["peak_cpu_rss_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if dev.type == "cuda":
        out["peak_gpu_MB"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        out["gpu"] = torch.cuda.get_device_name()
    out["cpu"] = platform.processor() or platform.machine()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
