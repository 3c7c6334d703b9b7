#!/usr/bin/env python
"""Budgets of the UniFuse network.

* FLOPs of one input pair (default 256³, the paper's Q_f = 395 G) counted with
  `torch.utils.flop_counter.FlopCounterMode` (a multiply-add is 2 FLOPs), per module, next to the
  multiply-add count (the unit many papers call FLOPs). By default the count is exact: the public
  forward runs at 256³ on the `meta` device (shapes only, no memory, a few seconds).
  `--flops-device cpu --flops-count-size 64` counts on real tensors at 64³ and scales by voxels.
* Parameters: total and per part beside the paper's (UFR&F 0.948 M; 2.986 M with multi-experts).
* CPU: forward time and peak memory at `--cpu-size` (default 128³), the time of what the counter cannot
  see (selective scans, spatial SSMs and warps, measured by wrapping them), and the profiler's top operations;
  with `--cpu-plain`, the same forward with the CPU fast path switched off (`unifuse.cpu.switch.use_kernels(False)`:
  plain PyTorch, channels-first), interleaved, medians of process CPU time, and the ratio.
* CUDA (only where a GPU exists): batch `--cuda-batch` × `--cuda-size`³ (default 3 × 160³) with bf16
  autocast: forward, forward + backward of the total loss, a full AdamW step, peak memory, and the time
  of the data pipeline (`make_batch`) on the GPU.

    python bench/model.py                          # the defaults above
    python bench/model.py --config tiny --flops-size 64 --cpu-size 32
    python bench/model.py --cpu-size 96 --cpu-plain --threads 1   # fast path against plain PyTorch at 96³

The last line printed is one JSON object with everything measured.
"""
from __future__ import annotations
import argparse, json, os, platform, resource, sys, time
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

try: import unifuse                                                         # installed, or run from the repo root
except ImportError: sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import unifuse.ssm as ssm_mod
import unifuse.oufr as oufr_mod
import unifuse.model as model_mod
from unifuse.cpu.switch import use_kernels
from unifuse.model import UniFuse, UniFuseConfig


def make_config(name: str, **over) -> UniFuseConfig:
    cfg = UniFuseConfig() if name == "paper" else UniFuseConfig.tiny()
    return cfg.replace(**over) if over else cfg


# ---------------------------------------------------------------------------------------------- FLOPs
def count_flops(cfg: UniFuseConfig, size: int, device: str = "meta") -> dict:
    "FLOPs of `model._run` on one (size³) pair; per-module sums from FlopCounterMode's module tree."
    with torch.device(device):
        model = UniFuse(cfg).eval()
        m = model.multiple
        s = -(-size // m) * m                                               # padded size, as model() would
        ref = torch.rand(1, 1, s, s, s)
        deg = torch.rand(1, 1, s, s, s)
        with torch.no_grad(), use_kernels(False), FlopCounterMode(display=False, depth=None) as fc:
            model(ref, deg)                                                 # the public forward (value checks skip meta);
                                                                            # plain path: the network's FLOPs, not a CPU route's
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    total = fc.get_total_flops()
    # FlopCounterMode names modules by attribute path below the root: UniFuse.dapl, UniFuse.dapl.encoder, …
    table = {"dapl.encoder": counts.get("UniFuse.dapl.encoder", 0)}
    table["dapl (rest)"] = counts.get("UniFuse.dapl", 0) - table["dapl.encoder"]
    for k in ("oufr", "fa", "ufrf"): table[k] = counts.get(f"UniFuse.{k}", 0)
    table["outside the four parts"] = total - sum(table.values())
    detail = {k[len("UniFuse."):]: v for k, v in counts.items() if k.count(".") in (2, 3) and v > 0.005 * total}
    by_op = defaultdict(int)
    for op, v in fc.get_flop_counts().get("Global", {}).items(): by_op[str(op)] += v
    return dict(total=total, size=s, table=table, detail=detail, by_op=dict(by_op))


# ---------------------------------------------------------------------------------------------- CPU
class _Timer:
    "Wraps a function and sums its wall time (the counter cannot see inside it)."
    def __init__(self, fn):
        self.fn, self.t, self.n = fn, 0.0, 0
    def __call__(self, *a, **k):
        t0 = time.perf_counter(); out = self.fn(*a, **k)
        self.t += time.perf_counter() - t0; self.n += 1
        return out


def cpu_forward(cfg: UniFuseConfig, size: int, reps: int = 2, threads: int | None = None) -> dict:
    if threads: torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = UniFuse(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 1, size, size, size, generator=g)
    deg = torch.rand(1, 1, size, size, size, generator=g)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024       # MiB
    with torch.no_grad(): model(ref, deg)                                   # warm-up
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # wrap what the FLOP counter cannot see: the selective scans (full and last-state only), the spatial SSMs, the warps
    scan, last, spatial, warp = (_Timer(ssm_mod.selective_scan), _Timer(ssm_mod.selective_scan_last_state),
                                 _Timer(oufr_mod.spatial_ssm), _Timer(model_mod.warp))
    ssm_mod.selective_scan, ssm_mod.selective_scan_last_state, oufr_mod.spatial_ssm, model_mod.warp = scan, last, spatial, warp
    parts = {k: 0.0 for k in ("dapl", "oufr", "fa", "ufrf")}
    hooks, t0s = [], {}
    for k in parts:
        mod = getattr(model, k)
        hooks.append(mod.register_forward_pre_hook(lambda m, a, k=k: t0s.__setitem__(k, time.perf_counter())))
        hooks.append(mod.register_forward_hook(lambda m, a, o, k=k: parts.__setitem__(k, parts[k] + time.perf_counter() - t0s[k])))
    times = []
    try:
        with torch.no_grad():
            for _ in range(reps):
                t0 = time.perf_counter(); model(ref, deg); times.append(time.perf_counter() - t0)
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(ref, deg)
    finally:
        ssm_mod.selective_scan, ssm_mod.selective_scan_last_state, oufr_mod.spatial_ssm, model_mod.warp = scan.fn, last.fn, spatial.fn, warp.fn
        for h in hooks: h.remove()
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    top = {e.key: round(e.self_cpu_time_total / 1e3, 1) for e in ev}     # ms, self time
    n = reps + 1                                                            # profiled run also timed
    return dict(size=size, forward_ms=round(1e3 * min(times), 1), forward_ms_runs=[round(1e3 * t, 1) for t in times],
                peak_rss_mib=round(rss1, 1), peak_rss_increase_mib=round(rss1 - rss0, 1),
                part_ms={k: round(1e3 * v / n, 1) for k, v in parts.items()},
                scan_ms=round(1e3 * (scan.t + last.t) / n, 1), scan_calls=(scan.n + last.n) // n,
                spatial_ssm_ms=round(1e3 * spatial.t / n, 1), spatial_ssm_calls=spatial.n // n,
                warp_ms=round(1e3 * warp.t / n, 1), warp_calls=warp.n // n,
                profiler_top_self_ms=top, threads=torch.get_num_threads())


def cpu_fast_vs_plain(cfg: UniFuseConfig, size: int, reps: int = 3, threads: int | None = None) -> dict:
    "Forward at size³ with the CPU fast path on and off, interleaved: medians of process CPU time and wall time."
    if threads: torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = UniFuse(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ref, deg = torch.rand(1, 1, size, size, size, generator=g), torch.rand(1, 1, size, size, size, generator=g)
    out, cpu, wall = {}, {True: [], False: []}, {True: [], False: []}
    with torch.no_grad():
        for i in range(2 * reps + 2):
            fast = bool(i % 2)
            with use_kernels(fast):
                t0, c0 = time.perf_counter(), time.process_time()
                o = model(ref, deg)
                if i >= 2: wall[fast].append(time.perf_counter() - t0); cpu[fast].append(time.process_time() - c0)
            out[fast] = o["fused"]
    med = lambda v: sorted(v)[len(v) // 2]
    return dict(size=size, threads=torch.get_num_threads(), reps=reps,
                plain_cpu_ms=round(1e3 * med(cpu[False]), 1), fast_cpu_ms=round(1e3 * med(cpu[True]), 1),
                plain_wall_ms=round(1e3 * med(wall[False]), 1), fast_wall_ms=round(1e3 * med(wall[True]), 1),
                ratio_cpu=round(med(cpu[True]) / med(cpu[False]), 3), ratio_wall=round(med(wall[True]) / med(wall[False]), 3),
                max_abs_diff_fused=float((out[True] - out[False]).abs().max()))


# ---------------------------------------------------------------------------------------------- CUDA
def cuda_step(cfg: UniFuseConfig, batch: int, size: int, iters: int = 5) -> dict:
    from unifuse.data import builtin_pair
    from unifuse.degrade import make_batch
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = UniFuse(cfg).to(dev)
    tasks = (["mri", "ct", "pet"] * batch)[:batch]
    pairs = [builtin_pair(t, seed=i, size=size) for i, t in enumerate(tasks)]
    ref = torch.stack([p["ref"] for p in pairs]).to(dev)                   # (B, 1, S, S, S)
    other = torch.stack([p["other"] for p in pairs]).to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def timed(fn, n=iters):
        for _ in range(2): fn()                                             # warm-up (cuDNN autotune, caches)
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n): fn()
        b.record(); torch.cuda.synchronize()
        return a.elapsed_time(b) / n, torch.cuda.max_memory_allocated() / 2**30

    bt = make_batch(ref, other, tasks, generator=gen)
    data_ms, _ = timed(lambda: make_batch(ref, other, tasks, generator=gen))
    ac = lambda: torch.autocast("cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad(), ac(): model(bt["ref"], bt["deg"])
    def fwd_bwd():
        with ac(): L = model.loss(bt)
        L["total"].backward()
        model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    def step():
        b = make_batch(ref, other, tasks, generator=gen)
        with ac(): L = model.loss(b)
        opt.zero_grad(set_to_none=True)
        L["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    fwd_ms, fwd_gb = timed(fwd)
    fb_ms, fb_gb = timed(fwd_bwd)
    st_ms, st_gb = timed(step)
    return dict(batch=batch, size=size, dtype="bf16 autocast", device=torch.cuda.get_device_name(dev),
                forward_ms=round(fwd_ms, 1), forward_peak_gib=round(fwd_gb, 2),
                fwd_bwd_ms=round(fb_ms, 1), fwd_bwd_peak_gib=round(fb_gb, 2),
                train_step_ms=round(st_ms, 1), train_step_peak_gib=round(st_gb, 2),
                make_batch_ms=round(data_ms, 1))


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["paper", "tiny"], default="paper", help="UniFuseConfig() or .tiny()")
    ap.add_argument("--n-regblk", type=int, default=None, help="override J")
    ap.add_argument("--alsn", choices=["lora", "none", "experts"], default=None, help="override the ALSN switch")
    ap.add_argument("--flops-size", type=int, default=256, help="side of the cubic pair whose FLOPs are counted")
    ap.add_argument("--flops-count-size", type=int, default=256,
                    help="size actually counted; the count is scaled by voxels to --flops-size (equal sizes: exact)")
    ap.add_argument("--flops-device", choices=["meta", "cpu"], default="meta",
                    help="where the counting runs (meta: no memory, needs value-free code paths)")
    ap.add_argument("--cpu-size", type=int, default=128, help="side of the CPU forward timing (0: skip)")
    ap.add_argument("--cpu-reps", type=int, default=1, help="timed forwards after one warm-up (plus one profiled)")
    ap.add_argument("--cpu-plain", action="store_true", help="also time the CPU forward with the fast path off (plain PyTorch)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--cuda-batch", type=int, default=3)
    ap.add_argument("--cuda-size", type=int, default=160)
    ap.add_argument("--no-cuda", action="store_true", help="skip the GPU measurements even if a GPU exists")
    args = ap.parse_args(argv)
    over = {k: v for k, v in (("n_regblk", args.n_regblk), ("alsn", args.alsn)) if v is not None}
    cfg = make_config(args.config, **over)
    res = dict(config=args.config, overrides=over, torch=torch.__version__, python=platform.python_version(),
               cpu_count=os.cpu_count())

    model = UniFuse(cfg)
    res["params"] = model.num_params()
    experts = UniFuse(cfg.replace(alsn="experts")).num_params()["ufrf"] if cfg.alsn != "experts" else res["params"]["ufrf"]
    res["params_ufrf_experts"] = experts

    t0 = time.perf_counter()
    fl = count_flops(cfg, min(args.flops_count_size, args.flops_size), args.flops_device)
    scale = (args.flops_size / fl["size"]) ** 3
    how = f"FlopCounterMode on the {args.flops_device} device at {fl['size']}³"
    if scale != 1: how += f", scaled ×{scale:g} by voxel count to {args.flops_size}³"
    G = lambda x: round(x * scale / 1e9, 2)
    P = res["params"]
    part = {"DAPL": ("dapl.encoder", "dapl (rest)"), "OUFR": ("oufr",), "FA": ("fa",), "UFR&F": ("ufrf",)}
    pkey = {"DAPL": "dapl", "OUFR": "oufr", "FA": "fa", "UFR&F": "ufrf"}
    paper = {"UFR&F": "0.948 M (2.986 M with multi-experts)", "total": "395 G FLOPs at 256³"}
    print(f"\nOne {args.flops_size}³ pair, {args.config} preset ({how}; a multiply-add counts 2 FLOPs, "
          f"as FlopCounterMode does;\nmany papers in this field report multiply-adds under the name FLOPs, "
          f"so the multiply-add column is given beside it)")
    print(f"  {'part':8s} {'parameters':>12s} {'GFLOPs':>9s} {'G mult-adds':>12s}   paper")
    for k, keys in part.items():
        f = sum(fl["table"][x] for x in keys)
        print(f"  {k:8s} {P[pkey[k]]:12,d} {G(f):9.2f} {G(f) / 2:12.2f}   {paper.get(k, '—')}")
    print(f"  {'total':8s} {P['total']:12,d} {G(fl['total']):9.2f} {G(fl['total']) / 2:12.2f}   {paper['total']}")
    print(f"  UFR&F with multi-expert BaseNets: {experts:,} parameters; ALSN saves {100 * (1 - P['ufrf'] / experts):.2f}% "
          f"(paper: 68.22%)")
    print("  detail:")
    for k, v in sorted(fl["detail"].items()): print(f"    {k:45s} {G(v):9.2f} G")
    res["flops"] = dict(size=args.flops_size, method=how, total_G=G(fl["total"]),
                        per_module_G={k: G(v) for k, v in fl["table"].items()},
                        detail_G={k: G(v) for k, v in fl["detail"].items()},
                        by_op_G={k: G(v) for k, v in fl["by_op"].items()}, budget_G=395,
                        count_seconds=round(time.perf_counter() - t0, 1))

    if args.cpu_size:
        c = cpu_forward(cfg, args.cpu_size, args.cpu_reps, args.threads)
        print(f"\nCPU forward at {c['size']}³ (batch 1, no grad, {c['threads']} threads): {c['forward_ms']} ms "
              f"(runs {c['forward_ms_runs']}), peak RSS {c['peak_rss_mib']} MiB (+{c['peak_rss_increase_mib']} MiB in the first forward)")
        print(f"  per part (ms): {c['part_ms']}")
        print(f"  not counted by FlopCounterMode: selective scans {c['scan_ms']} ms ({c['scan_calls']} calls), "
              f"spatial SSMs {c['spatial_ssm_ms']} ms ({c['spatial_ssm_calls']} calls), warps {c['warp_ms']} ms ({c['warp_calls']} calls)")
        print(f"  profiler, top self CPU time (ms): {c['profiler_top_self_ms']}")
        res["cpu"] = c
        if args.cpu_plain:
            fp = cpu_fast_vs_plain(cfg, args.cpu_size, max(args.cpu_reps, 3), args.threads)
            print(f"  fast path against plain PyTorch (interleaved, {fp['reps']} each, medians): process CPU "
                  f"{fp['fast_cpu_ms']} ms vs {fp['plain_cpu_ms']} ms = {fp['ratio_cpu']}×; wall {fp['fast_wall_ms']} ms vs "
                  f"{fp['plain_wall_ms']} ms = {fp['ratio_wall']}×; fused outputs differ by at most {fp['max_abs_diff_fused']:.1e}")
            res["cpu_fast_vs_plain"] = fp

    if torch.cuda.is_available() and not args.no_cuda:
        g = cuda_step(cfg, args.cuda_batch, args.cuda_size)
        print(f"\nCUDA {g['device']}, batch {g['batch']} × {g['size']}³, bf16 autocast: forward {g['forward_ms']} ms "
              f"({g['forward_peak_gib']} GiB), fwd+bwd {g['fwd_bwd_ms']} ms ({g['fwd_bwd_peak_gib']} GiB), "
              f"AdamW step {g['train_step_ms']} ms ({g['train_step_peak_gib']} GiB), make_batch {g['make_batch_ms']} ms")
        res["cuda"] = g
    else:
        res["cuda"] = None
        print("\nCUDA: no GPU here (or --no-cuda): the batch-3 × 160³ bf16 training-step measurement was skipped")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
