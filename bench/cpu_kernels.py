#!/usr/bin/env python
"""Each CPU kernel of `unifuse.cpu` against its reference and the public routes that could replace it.

    python bench/cpu_kernels.py                       # 2 volumes of 48³, 16 channels; every op; about a minute
    python bench/cpu_kernels.py --size 96 --threads 1 --compile   # also torch.compile of the reference

For each op, forward + backward (gradients of every input; forward only for the block matching) on float32 CPU tensors, routes interleaved, medians of
`--reps` runs after one warm-up each:

- pointwise convolution (C → 2C) and dense 3×3×3 'same' convolution: `F.conv3d` on channels-first input (the
  reference), on channels-last input (what `unifuse.cpu.conv.conv3d` runs), and for pointwise `F.linear` on the
  channels-last view (voxels × channels); no kernel of ours (none won: see nbs/04a_cpu_conv.ipynb);
- depthwise 3×3×3 convolution: `F.conv3d` channels-first, channels-last, and `unifuse::depthwise_conv`;
- a pointwise convolution of a concatenation of two C-channel volumes: `conv(cat)` on channels-last input and
  `conv3d_cat`'s kernel (one product per part, summed in place);
- BaseNet's channel attention (Eq. 9): the reference of `unifuse.ufrf.channel_attention` and `unifuse::channel_attention`;
- OUFR's spatial scan (Eq. 3): the reference of `unifuse.oufr.spatial_ssm` (with its activation checkpointing) and
  `unifuse::spatial_scan`, on the token grid of the volumes (size/4)³, two grids;
- FA's block matching (forward only, no gradient): the reference of `unifuse.fa.cost_volume` and
  `unifuse::cost_volume`, 96-long MIND token vectors on the (size/4)³ grid, radius 2.

With `--compile`, `torch.compile` of each reference joins (compile time not counted). The last line is one JSON
object: the machine (CPU model, instruction set, threads), per op the milliseconds of every route, the fastest,
the kernel's speed-up over the best public route, its FLOPs (the reference's count) and parameters, and the peak
resident memory of the process.
"""
from __future__ import annotations
import argparse, json, os, resource, statistics, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from machine import cpu_isa, cpu_model
from unifuse.cpu.switch import CL
from unifuse.cpu.conv import Conv3d, conv3d_cat, depthwise_conv
from unifuse.cpu.fused import block_tokens, channel_attention_cl, spatial_scan
from unifuse.fa import cost_volume
from unifuse.ufrf import channel_attention
from unifuse.oufr import spatial_ssm


def _cl(x): return x.contiguous(memory_format=CL)


def _linear_pw(x, w, b):
    "A pointwise convolution as `F.linear` on the channels-last view: (voxels, C_in) × W^T."
    y = F.linear(_cl(x).permute(0, 2, 3, 4, 1), w.flatten(1), b)          # (B, D, H, W, C_out), contiguous
    return y.permute(0, 4, 1, 2, 3)                                        # channels-last (B, C_out, D, H, W)


def cases(B, C, S, heads):
    "Per op: the inputs (tensors that get gradients, then constants) and its routes."
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    x = r(B, C, S, S, S)
    pw_w, pw_b = r(2 * C, C, 1, 1, 1) * C ** -0.5, r(2 * C)
    dw_w, dw_b = r(C, 1, 3, 3, 3) / 5, r(C)
    dn_w, dn_b = r(C, C, 3, 3, 3) / (5 * C ** 0.5), r(C)
    e = C // heads
    m, tau = 1 + 0.1 * r(B, heads, e, e), torch.ones(heads, 1, 1)
    Lg, d, n = (S // 4) ** 3, C, 8
    cat_conv = Conv3d(2 * C, C, 1).requires_grad_(False)
    mind_a, mind_b = r(B, 96, S // 4, S // 4, S // 4), r(B, 96, S // 4, S // 4, S // 4)
    A = -torch.exp(torch.log(torch.arange(1, n + 1.0)).repeat(d, 1))
    sx, sd, sB, sC, sH = r(B, 2 * Lg, d), F.softplus(r(B, 2 * Lg, d)), r(B, 2 * Lg, n), r(B, 2 * Lg, n), r(B, d, n)
    return {
        "pointwise_conv": dict(inputs=[x, pw_w, pw_b], params=pw_w.numel() + pw_b.numel(), routes={
            "reference (channels-first F.conv3d)": lambda x, w, b: F.conv3d(x, w, b),
            "channels-last F.conv3d": lambda x, w, b: F.conv3d(_cl(x), w, b),
            "channels-last F.linear": _linear_pw}),
        "depthwise_conv 3x3x3": dict(inputs=[x, dw_w, dw_b], params=dw_w.numel() + dw_b.numel(), routes={
            "reference (channels-first F.conv3d)": lambda x, w, b: F.conv3d(x, w, b, padding=1, groups=C),
            "channels-last F.conv3d": lambda x, w, b: F.conv3d(_cl(x), w, b, padding=1, groups=C),
            "kernel unifuse::depthwise_conv": lambda x, w, b: depthwise_conv(_cl(x), w, b)}),
        "dense_conv 3x3x3": dict(inputs=[x, dn_w, dn_b], params=dn_w.numel() + dn_b.numel(), routes={
            "reference (channels-first F.conv3d)": lambda x, w, b: F.conv3d(x, w, b, padding=1),
            "channels-last F.conv3d": lambda x, w, b: F.conv3d(_cl(x), w, b, padding=1)}),
        "conv3d_cat (pointwise)": dict(inputs=[_cl(x), _cl(r(B, C, S, S, S))], params=cat_conv.weight.numel() + C, routes={
            "reference (cat, then the convolution)": lambda a, b: F.conv3d(torch.cat([a, b], 1), cat_conv.weight, cat_conv.bias),
            "kernel conv3d_cat": lambda a, b: conv3d_cat.kernel([a, b], cat_conv)}),
        "channel_attention (Eq. 9)": dict(inputs=[_cl(x), _cl(r(B, C, S, S, S)), _cl(r(B, C, S, S, S))], params=0, routes={
            "reference": lambda q, k, v: channel_attention.reference(q, k, v, m, tau, heads),
            "kernel unifuse::channel_attention": lambda q, k, v: channel_attention_cl(q, k, v, m, tau, heads)}),
        "spatial_scan (Eq. 3)": dict(inputs=[sx, sd, sB, sC, sH], params=0, routes={
            "reference": lambda x, dl, Bm, Cm, H: spatial_ssm.reference(x, dl, A, Bm, Cm, H),
            "kernel unifuse::spatial_scan": lambda x, dl, Bm, Cm, H: spatial_scan(x, dl, A, Bm, Cm, H, block_tokens(x, A))}),
        "cost_volume (FA's prior, forward only)": dict(inputs=[mind_a, mind_b], params=0, grad=False, routes={
            "reference": lambda a, b: cost_volume.reference(a, b, 2),
            "kernel unifuse::cost_volume": lambda a, b: cost_volume.kernel(a, b, 2)}),
    }


def step(fn, inputs, grad=True):
    if not grad:
        with torch.no_grad(): return fn(*inputs)
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*xs)
    y.backward(torch.ones_like(y))
    return y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=48, help="volume side in voxels (a multiple of 4; default 48)")
    ap.add_argument("--batch", type=int, default=2, help="volumes per call (default 2)")
    ap.add_argument("--channels", type=int, default=16, help="channels C (default 16)")
    ap.add_argument("--heads", type=int, default=2, help="attention heads (default 2)")
    ap.add_argument("--reps", type=int, default=7, help="timed runs per route (default 7)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile each reference (needs a C++ compiler)")
    ap.add_argument("--only", nargs="*", default=None, help="only the ops whose names start with these")
    a = ap.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    report = dict(device="cpu", cpu=cpu_model(), isa=cpu_isa(), threads=torch.get_num_threads(), torch=torch.__version__,
                  size=a.size, batch=a.batch, channels=a.channels, reps=a.reps,
                  loadavg_1min=os.getloadavg()[0] if hasattr(os, "getloadavg") else None, ops={})
    print(f"{report['cpu']} ({report['isa']}), {report['threads']} threads, {a.batch} × {a.channels} ch × {a.size}³, "
          f"forward + backward, medians of {a.reps}")
    for op, c in cases(a.batch, a.channels, a.size, a.heads).items():
        if a.only and not any(op.startswith(o) for o in a.only): continue
        routes = dict(c["routes"])
        if a.compile:
            ref = next(v for k, v in routes.items() if k.startswith("reference"))
            routes["torch.compile(reference)"] = torch.compile(ref, dynamic=False)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            next(v for k, v in routes.items() if k.startswith("reference"))(*c["inputs"])
        ys, ts = {}, {k: [] for k in routes}
        for k, fn in routes.items(): ys[k] = step(fn, c["inputs"], c.get("grad", True)).detach()   # warm-up (and compile)
        base = next(iter(ys.values()))
        err = {k: float((y - base).norm() / base.norm()) for k, y in ys.items()}
        for _ in range(a.reps):
            for k, fn in routes.items():
                t0 = time.perf_counter(); step(fn, c["inputs"], c.get("grad", True)); ts[k].append(time.perf_counter() - t0)
        ms = {k: round(1e3 * statistics.median(v), 2) for k, v in ts.items()}
        kern = next((k for k in ms if k.startswith("kernel")), None)
        public = {k: v for k, v in ms.items() if not k.startswith("kernel")}
        best_public = min(public, key=public.get)
        rep = dict(ms=ms, fastest=min(ms, key=ms.get), best_public=best_public,
                   kernel_speedup_over_best_public=round(public[best_public] / ms[kern], 2) if kern else None, flops_forward=int(fc.get_total_flops()), params=c["params"],
                   max_rel_diff_vs_reference=float(f"{max(err.values()):.1e}"))
        report["ops"][op] = rep
        print(f"\n{op}  (forward {rep['flops_forward'] / 1e9:.2f} GFLOPs, largest relative difference {rep['max_rel_diff_vs_reference']:.0e})")
        for k, v in ms.items(): print(f"  {k:40s} {v:9.2f} ms" + ("   ← fastest" if k == rep["fastest"] else ""))
        if kern: print(f"  kernel against the best public route ({best_public}): ×{rep['kernel_speedup_over_best_public']}")
        else: print(f"  no kernel of ours: unifuse.cpu runs the channels-last F.conv3d route")
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
