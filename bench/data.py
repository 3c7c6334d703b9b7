"""Throughput of the training-data pipeline: `unifuse.degrade.make_batch` at 160³, batch 3.

    python bench/data.py                      # CPU (1 timed batch) and, when available, CUDA (20 batches)
    python bench/data.py --size 64 --iters 5  # smaller volumes
    python bench/data.py --parts              # also time each degradation and the misalignment alone

The last printed line is one JSON object. Goal on an H100: a batch of 3 at 160³ in at most 50 ms.
"""
import argparse
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from unifuse.degrade import DEFAULT_RANGES, make_batch, metal, lowdose, misalignment, motion


def volumes(B, size, device):
    """Two smooth head-like volumes per sample in [0, 1] (content does not change the cost)."""
    g = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size, device=device)] * 3, indexing="ij"))
    r = ((g[0] / 0.85) ** 2 + (g[1] / 0.75) ** 2 + (g[2] / 0.8) ** 2).sqrt()
    ref = (0.6 * torch.sigmoid((1 - r) * 20) + 0.3 * torch.exp(-(r / 0.4) ** 2)).clamp(0, 1)
    other = (0.8 * torch.sigmoid((1 - r) * 20) * (1 - 0.5 * torch.exp(-(r / 0.5) ** 2))).clamp(0, 1)
    return ref[None, None].expand(B, 1, size, size, size).contiguous(), other[None, None].expand(B, 1, size, size, size).contiguous()


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize(device)


def timed(fn, device, iters, warmup):
    for _ in range(warmup): fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters): fn()
    sync(device)
    return (time.perf_counter() - t) / iters * 1000


def run(device, args):
    tasks = [args.tasks[i % len(args.tasks)] for i in range(args.batch)]
    ref, other = volumes(args.batch, args.size, device)
    gen = torch.Generator(device=device).manual_seed(0)
    ranges = DEFAULT_RANGES.replace(pet_domain=args.pet_domain)
    cpu = device.type == "cpu"
    iters = args.iters if args.iters else (1 if cpu else 20)
    warmup = args.warmup if args.warmup is not None else (0 if cpu else 3)
    if device.type == "cuda": torch.cuda.reset_peak_memory_stats(device)
    step = lambda: make_batch(ref, other, tasks, clean=args.clean, generator=gen, ranges=ranges, check=not args.no_check)
    ms = timed(step, device, iters, warmup)
    out = dict(ms_per_batch=round(ms, 2), batches_per_s=round(1000 / ms, 3), iters=iters, warmup=warmup)
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
        out["gpu"] = torch.cuda.get_device_name(device)
    if args.parts:  # each piece alone on one sample
        x = other[:1]
        size = tuple(x.shape[2:])
        parts = {"motion": lambda: motion(x, 0.6, gen, ranges), "metal": lambda: metal(x, 0.6, gen, ranges),
                 "lowdose": lambda: lowdose(x, 0.6, gen, ranges),
                 "misalignment": lambda: misalignment(1, size, gen, ranges, device)}
        out["parts_ms_one_sample"] = {k: round(timed(f, device, iters, warmup), 2) for k, f in parts.items()}
    print(f"[{device}] {json.dumps(out)}", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=160, help="volume side (voxels)")
    p.add_argument("--batch", type=int, default=3, help="batch size")
    p.add_argument("--tasks", type=lambda s: s.split(","), default=["mri", "ct", "pet"],
                   help="tasks cycled over the batch, comma-separated")
    p.add_argument("--clean", action="store_true", help="make_batch(clean=True)")
    p.add_argument("--pet-domain", default=DEFAULT_RANGES.pet_domain, choices=["sinogram", "image"])
    p.add_argument("--iters", type=int, default=0, help="timed batches (default 1 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches first (default 0 on CPU, 3 on CUDA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CPU, and CUDA when available")
    p.add_argument("--parts", action="store_true", help="also time each degradation and the misalignment")
    p.add_argument("--no-check", action="store_true", help="make_batch(check=False): no host sync")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("auto", "cpu"): devices.append(torch.device("cpu"))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.device in ("auto", "cuda") and torch.cuda.is_available(): devices.append(torch.device("cuda"))
    results = {}
    with torch.no_grad():
        for d in devices: results[d.type] = run(d, args)
    summary = dict(bench="data", size=args.size, batch=args.batch, tasks=args.tasks, clean=args.clean,
                   pet_domain=args.pet_domain, views=DEFAULT_RANGES.ct_views, torch=torch.__version__,
                   cpu_threads=torch.get_num_threads(), host=platform.machine(),
                   cpu_peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
                   goal_ms_per_batch_h100=50, results=results)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
