"""Selective-scan benchmark.

On CPU: the plain sequential recurrence (`selective_scan_ref`, one Python step per time step) against the
chunked pure-PyTorch path. Both wall-clock and process CPU time are reported: on a shared machine the CPU
time is the steadier measure (use --threads 1 there: multi-threaded ops wait for descheduled workers).
On CUDA: the pure-PyTorch path against mamba-ssm's fused kernel (when it imports), plus their agreement.
Forward (no grad) and forward + backward (gradients of y and of the last state) are timed separately;
repeats are interleaved and medians reported. The last printed line is one JSON object.

    python bench/ssm.py                                  # B=2, D=256, N=16, L=4096 on CPU
    python bench/ssm.py --device cuda --repeats 20
    python bench/ssm.py --last-state --batch 3 --dim 96 --length 13824   # DAPL's state-only block at 96³

With --last-state, only the last state h_L is asked for (DAPL's second block): `selective_scan_last_state` (its
closed form, block by block) against the chunked scan (and the sequential loop), gradients through h_L only.
"""
import argparse, json, math, os, platform, resource, statistics, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import torch.nn.functional as F
from unifuse.ssm import selective_scan, selective_scan_last_state, selective_scan_ref, _mamba_kernel


def make_inputs(b, d, n, L, device, seed=0):
    "Mamba-like inputs: softplus(Δ + bias) between about 1e-3 and 0.3, A = -(1..N), random B, C, gate z."
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(d, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    x = dict(u=torch.randn(b, d, L, generator=g), delta=0.5 * torch.randn(b, d, L, generator=g),
             A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
             B=torch.randn(b, n, L, generator=g), C=torch.randn(b, n, L, generator=g),
             D=torch.ones(d), z=torch.randn(b, d, L, generator=g),
             delta_bias=dt + torch.log(-torch.expm1(-dt)))
    return {k: v.to(device) for k, v in x.items()}


def run(fn, inputs, backward, seed=1):
    "One call; with `backward`, also the gradients of <y, gy> + <h, gh> w.r.t. every input."
    xs = {k: v.detach().requires_grad_(backward) for k, v in inputs.items()}
    with torch.set_grad_enabled(backward):
        y, h = fn(**xs, delta_softplus=True, return_last_state=True)
        if not backward: return y, h, None
        g = torch.Generator(device=y.device).manual_seed(seed)
        gy = torch.randn(y.shape, generator=g, device=y.device)
        gh = torch.randn(h.shape, generator=g, device=y.device)
        grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), list(xs.values()))
    return y.detach(), h.detach(), dict(zip(xs, grads))


def run_last_state(fn, inputs, backward, seed=1):
    "h_L alone; with `backward`, also the gradients of <h, gh> w.r.t. u, Δ, A, B and the bias."
    keys = ("u", "delta", "A", "B", "delta_bias")
    xs = {k: inputs[k].detach().requires_grad_(backward) for k in keys}
    with torch.set_grad_enabled(backward):
        h = fn(**xs)
        if not backward: return h.new_zeros(1), h, None
        gh = torch.randn(h.shape, generator=torch.Generator(device=h.device).manual_seed(seed), device=h.device)
        grads = torch.autograd.grad((h * gh).sum(), list(xs.values()))
    return h.new_zeros(1), h.detach(), dict(zip(keys, grads))


def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def agreement(ra, rb):
    "Relative L2 differences of y, last state and every gradient between two runs."
    out = dict(y=rel(ra[0], rb[0]), last_state=rel(ra[1], rb[1]))
    if ra[2] is not None: out.update({f"grad_{k}": rel(ra[2][k], rb[2][k]) for k in ra[2]})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=256, help="channels D (d_inner of a MambaBlock)")
    p.add_argument("--state", type=int, default=16, help="state size N")
    p.add_argument("--length", type=int, default=4096, help="sequence length L")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per method (after one warm-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--chunk", type=int, default=None, help="block length of the torch path (default: sized to the cache)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    p.add_argument("--no-sequential", action="store_true", help="CPU: skip the slow sequential reference")
    p.add_argument("--last-state", action="store_true", help="time the last state alone (selective_scan_last_state vs the scan)")
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available(): p.error("--device cuda but torch sees no CUDA device")
    inputs = make_inputs(a.batch, a.dim, a.state, a.length, dev)

    def torch_path(**kw): return selective_scan(**kw, backend="torch", chunk_size=a.chunk)
    methods = {"torch": torch_path}
    if cuda:
        if _mamba_kernel() is not None: methods["kernel"] = lambda **kw: selective_scan(**kw, backend="cuda")
    elif not a.no_sequential:
        methods["sequential"] = selective_scan_ref
    runner = run
    if a.last_state:                                                         # h_L only: C = 0, no D, no gate
        zero_C = lambda kw: kw["A"].new_zeros(kw["A"].shape)
        def scan_h(fn, **kw): return fn(**kw, C=zero_C(kw), delta_softplus=True, return_last_state=True)[1]
        methods = {"torch": lambda **kw: selective_scan_last_state(**kw, delta_softplus=True, chunk_size=a.chunk),
                   "scan": lambda **kw: scan_h(selective_scan, backend="torch", **kw)}
        if not cuda and not a.no_sequential: methods["sequential"] = lambda **kw: scan_h(selective_scan_ref, **kw)
        runner = lambda fn, inputs, backward: run_last_state(fn, inputs, backward)

    def sync():
        if cuda: torch.cuda.synchronize()
    modes = ["forward"] + ([] if a.no_backward else ["forward_backward"])
    times = {m: {k: [] for k in methods} for m in modes}
    cpu = {m: {k: [] for k in methods} for m in modes}  # process CPU time: less sensitive to other jobs on the machine
    peak, results = {}, {}
    for mode in modes:
        for k, fn in methods.items():  # warm-up; keep a result for the agreement check
            if cuda: torch.cuda.reset_peak_memory_stats()
            results[(mode, k)] = runner(fn, inputs, mode == "forward_backward")
            sync()
            peak[f"{mode}/{k}"] = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        for _ in range(a.repeats):  # interleaved, so that background load hits every method alike
            for k, fn in methods.items():
                sync(); t0, c0 = time.perf_counter(), time.process_time()
                runner(fn, inputs, mode == "forward_backward")
                sync(); times[mode][k].append(time.perf_counter() - t0); cpu[mode][k].append(time.process_time() - c0)

    base = "kernel" if "kernel" in methods else "sequential" if "sequential" in methods else "scan"
    report = dict(bench="ssm", device=str(dev),
                  device_name=torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine(),
                  torch=torch.__version__, threads=torch.get_num_threads(),
                  loadavg_1min=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                  batch=a.batch, dim=a.dim, state=a.state, length=a.length, repeats=a.repeats,
                  chunk=a.chunk, last_state_only=a.last_state, elements=a.batch * a.dim * a.length * a.state,
                  flops_elementwise_est=9 * a.batch * a.dim * a.length * a.state,  # exp, ΔA, ΔBu, update, C·h per element
                  kernel_available=("kernel" in methods) if cuda else None)
    for mode in modes:
        for k in methods:
            ts = times[mode][k]
            report[f"{mode}_ms_median/{k}"] = round(1e3 * statistics.median(ts), 3)
            report[f"{mode}_ms_min/{k}"] = round(1e3 * min(ts), 3)
            if not cuda: report[f"{mode}_cpu_ms_median/{k}"] = round(1e3 * statistics.median(cpu[mode][k]), 3)
        if base in methods:
            for k in methods:
                if k != base:
                    report[f"{mode}_speedup_vs_{base}/{k}"] = round(statistics.median(times[mode][base]) / statistics.median(times[mode][k]), 2)
                    if not cuda:
                        report[f"{mode}_cpu_time_speedup_vs_{base}/{k}"] = round(statistics.median(cpu[mode][base]) / statistics.median(cpu[mode][k]), 2)
            agree = agreement(results[(mode, "torch")], results[(mode, base)])
            report[f"{mode}_max_rel_diff_torch_vs_{base}"] = max(agree.values())
            report[f"{mode}_rel_diff_torch_vs_{base}"] = {k: float(f"{v:.2e}") for k, v in agree.items()}
    report["peak_mb" if cuda else "peak_rss_mb_cumulative"] = {k: round(v, 1) for k, v in peak.items()}
    for k, v in report.items():
        if not isinstance(v, dict): print(f"{k:48s} {v}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
