#!/usr/bin/env python
"""Training speed of UniFuse, with MONAI's VoxelMorph trained beside it in the same process.

* UniFuse: the trainer's own step (`unifuse.train.Trainer.train_step`: the step's plan, crops cut from the
  pool on the device, `make_batch` on the device, Eq. 15 forward and backward, clipping, AdamW) for a
  preset at a crop size and batch: ms per step, samples/s, the data pipeline's share of the step (crops +
  degradations + misalignment, measured inside the step), peak memory, parameters, FLOPs of one training
  step (forward + backward, `FlopCounterMode`, a multiply-add = 2).
* VoxelMorph: MONAI's `VoxelMorph()` with its defaults, trained on the same pairs (moving = I'_D, fixed =
  I_R) at the same size and batch with MSE + smoothness (`DiffusionLoss`) and AdamW; bf16 autocast on CUDA
  as for UniFuse.

Both run with `unifuse-train`'s allocator settings (`unifuse.launch.keep_freed_memory`: freed memory kept for the next
step; `UNIFUSE_MALLOC=system` for glibc's defaults); the JSON's `malloc` says which. Times are medians over `--steps`
steps after `--warmup` steps. `ratio` compares the model steps (UniFuse's
step without its data pipeline, against VoxelMorph's step, which has none); `ratio_full_step` includes it.
Peak memory: CUDA `max_memory_allocated`, or on the CPU the resident set size sampled every 2 ms during
each model's phase (the increase over the phase's start is printed too; freed memory is returned to the
system between the phases).

    python bench/train.py                                            # tiny, 48³, batch 3, CPU (about 2–4 minutes)
    python bench/train.py --preset paper --size 160 --device cuda    # the paper's 3 × 160³ on a GPU

The last line printed is one JSON object with everything measured.
"""
from __future__ import annotations
from machine import cpu_model, cpu_isa
import argparse, ctypes, gc, json, os, statistics, sys, tempfile, threading, time

import torch

try: import unifuse                                                         # installed, or run from the repo root
except ImportError: sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unifuse.train import PRESETS, TrainConfig, Trainer
from unifuse.launch import keep_freed_memory
MALLOC = "keep" if keep_freed_memory() else "system"                        # as unifuse-train runs (UNIFUSE_MALLOC=system: glibc's defaults)


class PeakRSS:
    "Peak resident set size (MiB) of this process while the block runs, sampled by a thread."
    def __init__(self, every:float=0.002): self.every, self.peak, self.start = every, 0.0, 0.0
    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now()); time.sleep(self.every)
    def __enter__(self):
        self.start = self.peak = self.now(); self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True); self._t.start(); return self
    def __exit__(self, *a):
        self._stop.set(); self._t.join(); self.peak = max(self.peak, self.now())


def _release():
    "Give freed memory back to the system (glibc), so the next phase's RSS starts low."
    gc.collect()
    try: ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception: pass
    if torch.cuda.is_available(): torch.cuda.empty_cache()


def _mem(dev, rss:PeakRSS|None) -> dict:
    if dev.type == "cuda": return dict(peak_mem_mib=round(torch.cuda.max_memory_allocated(dev) / 2 ** 20, 1))
    return dict(peak_mem_mib=round(rss.peak, 1), peak_mem_increase_mib=round(rss.peak - rss.start, 1))


def step_flops(fn) -> int:
    "FLOPs (multiply-add = 2) of one call of `fn` (a forward and backward)."
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc: fn()
    return int(fc.get_total_flops())


def bench_unifuse(t:Trainer, steps:int, warmup:int) -> dict:
    dev = t.device
    for _ in range(warmup): t.train_step()
    if dev.type == "cuda": torch.cuda.reset_peak_memory_stats(dev)
    _release()
    out = []
    with PeakRSS() as rss:
        for _ in range(steps): out.append(t.train_step())
    ms = statistics.median(1e3 * o["step_s"] for o in out)
    data = statistics.median(1e3 * o["data_s"] for o in out)
    b = t.batch(t.step, 0)
    def fb():
        L = t.model.loss(b, generator=torch.Generator(dev).manual_seed(0)); L["total"].backward()
    with t._autocast(): flops = step_flops(fb)
    t.opt.zero_grad(set_to_none=True)
    return dict(ms_per_step=round(ms, 1), model_ms=round(ms - data, 1), data_ms=round(data, 1),
                data_share=round(data / ms, 3), samples_per_s=round(t.cfg.batch / (ms / 1e3), 3),
                skipped=sum(o["skipped"] for o in out), params=t.model.num_params()["total"],
                step_gflops=round(flops / 1e9, 2), **_mem(dev, rss))


def bench_voxelmorph(batches:list, steps:int, warmup:int, dev, amp:str) -> dict:
    import warnings
    warnings.filterwarnings("ignore", message=".*(native grid_sample|non-tuple sequence for multidimensional indexing).*")
    from monai.networks.nets import VoxelMorph
    from monai.losses import DiffusionLoss
    torch.manual_seed(0)
    net = VoxelMorph().to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    smooth = DiffusionLoss()
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp == "bf16" else (lambda: torch.autocast("cpu", enabled=False))
    def loss_of(b):
        with ctx():
            moved, ddf = net(b["deg"], b["ref"])                              # moving = I'_D, fixed = I_R
            return torch.nn.functional.mse_loss(moved.float(), b["ref"]) + smooth(ddf.float())
    def step(b):
        opt.zero_grad(set_to_none=True); loss_of(b).backward(); opt.step()
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for i in range(warmup): step(batches[i % len(batches)])
    sync()
    if dev.type == "cuda": torch.cuda.reset_peak_memory_stats(dev)
    _release()
    times = []
    with PeakRSS() as rss:
        for i in range(steps):
            t0 = time.perf_counter(); step(batches[i % len(batches)]); sync(); times.append(time.perf_counter() - t0)
    b = batches[0]
    flops = step_flops(lambda: loss_of(b).backward())
    opt.zero_grad(set_to_none=True)
    ms = 1e3 * statistics.median(times)
    return dict(ms_per_step=round(ms, 1), samples_per_s=round(b["ref"].shape[0] / (ms / 1e3), 3),
                params=sum(p.numel() for p in net.parameters()), step_gflops=round(flops / 1e9, 2), **_mem(dev, rss))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS), help="training preset (default tiny)")
    ap.add_argument("--size", type=int, default=48, help="crop side in voxels (default 48)")
    ap.add_argument("--batch", type=int, default=3, help="pairs per step (default 3)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each model (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    ap.add_argument("--pool", type=int, default=2, help="built-in subjects in the pool (default 2)")
    ap.add_argument("--spacing", type=float, default=None, help="voxel spacing, mm (default: the preset's)")
    ap.add_argument("--pool-dir", default=None, help="pool cache to reuse (default: a temporary folder)")
    ap.add_argument("--no-voxelmorph", action="store_true", help="time UniFuse only")
    a = ap.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    over = dict(crop=a.size, batch=a.batch, pool_size=a.pool, val_subjects=0, workers=min(2, a.pool))
    if a.spacing: over["spacing_mm"] = a.spacing
    cfg = TrainConfig.preset(a.preset, **over)
    tmp = None if a.pool_dir else tempfile.TemporaryDirectory(prefix="unifuse-bench-pool-")
    t0 = time.time()
    t = Trainer(cfg, None, device=a.device, pool_dir=a.pool_dir or tmp.name, progress=False)
    setup_s = time.time() - t0
    dev = t.device
    print(f"UniFuse {a.preset}: {a.batch} × {a.size}³ at {t.spacing_mm:.3f} mm on {dev} ({torch.get_num_threads()} threads), "
          f"amp {t.amp}, malloc {MALLOC}; pool of {a.pool} made/loaded in {setup_s:.0f} s", flush=True)
    uni = bench_unifuse(t, a.steps, a.warmup)
    print(f"  UniFuse     {uni['ms_per_step']:8.1f} ms/step (model {uni['model_ms']:.1f} ms, data {uni['data_ms']:.1f} ms = "
          f"{100 * uni['data_share']:.0f} %), {uni['samples_per_s']:.2f} samples/s, peak {uni['peak_mem_mib']:.0f} MiB, "
          f"{uni['params']:,} parameters, {uni['step_gflops']:.1f} GFLOPs/step", flush=True)
    res = dict(bench="train", preset=a.preset, size=a.size, batch=a.batch, device=str(dev), threads=torch.get_num_threads(),
               amp=t.amp, spacing_mm=round(t.spacing_mm, 4), torch=str(torch.__version__), cpu=cpu_model(), isa=cpu_isa(), malloc=MALLOC,
               steps=a.steps, warmup=a.warmup, unifuse=uni)
    if not a.no_voxelmorph:
        batches = [t.batch(s, 0) for s in range(2)]
        batches = [{k: b[k] for k in ("ref", "deg")} for b in batches]
        t.close(); del t; _release()
        vm = bench_voxelmorph(batches, a.steps, a.warmup, dev, "bf16" if dev.type == "cuda" else "none")
        print(f"  VoxelMorph  {vm['ms_per_step']:8.1f} ms/step, {vm['samples_per_s']:.2f} samples/s, peak {vm['peak_mem_mib']:.0f} MiB, "
              f"{vm['params']:,} parameters, {vm['step_gflops']:.1f} GFLOPs/step")
        res["voxelmorph"] = vm
        res["ratio"] = round(uni["model_ms"] / vm["ms_per_step"], 3)
        res["ratio_full_step"] = round(uni["ms_per_step"] / vm["ms_per_step"], 3)
        res["ratio_flops"] = round(uni["step_gflops"] / max(vm["step_gflops"], 1e-9), 3)
        uni["gflop_per_s"] = round(uni["step_gflops"] / (uni["model_ms"] / 1e3), 2)         # achieved: FLOPs of a step / its time
        vm["gflop_per_s"] = round(vm["step_gflops"] / (vm["ms_per_step"] / 1e3), 2)
        res["ratio_flop_rate"] = round(uni["gflop_per_s"] / max(vm["gflop_per_s"], 1e-9), 3)
        print(f"  UniFuse / VoxelMorph: {res['ratio']:.2f} (model step), {res['ratio_full_step']:.2f} (with UniFuse's data "
              f"pipeline), FLOPs {res['ratio_flops']:.2f}")
        print(f"  achieved: UniFuse {uni['gflop_per_s']:.1f} GFLOP/s, VoxelMorph {vm['gflop_per_s']:.1f} GFLOP/s "
              f"({100 * res['ratio_flop_rate']:.0f} %) on {res['cpu'] if dev.type == 'cpu' else dev} ({res['isa']})")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
