#!/usr/bin/env python
"""Time and memory to fuse one pair, UniFuse beside MONAI's VoxelMorph on the same pair, in one process.

For a built-in MRI pair (T1 reference, T2 moved and motion-degraded by `make_batch`) of `--size`³ voxels:

* UniFuse forward: `model(ref, deg)` without gradients, the paper preset `UniFuse(UniFuseConfig())` with
  random weights (the architecture decides the cost), or `--checkpoint` (a file, or `shipped` for the
  weights in the package);
* MONAI `VoxelMorph()` with its defaults: forward `vm(moving, fixed)` on the same pair, same device;
* the whole command path, `unifuse.fuse.fuse_files`: NIfTI in (written once to a temporary folder),
  normalisation, resampling, the forward pass, NIfTI out.

Medians over `--repeats` timed runs after one untimed run, which counts the FLOPs with
`torch.utils.flop_counter.FlopCounterMode` (a multiply-add is 2 FLOPs; it does not see `grid_sample`,
the selective scan's elementwise work or other non-matmul operations) and the peak memory of the
forward pass: on CUDA `torch.cuda.max_memory_allocated` above what was allocated before; on a CPU the
peak of tensor storage alive at once (counted op by op, so that the C allocator's habit of keeping freed
memory does not blur one measurement into the next; kernels' scratch buffers are not tensors and are not
counted). The whole command also runs once in a fresh process, which reports its peak resident memory
(imports, model, volumes and outputs included): what a machine needs to fuse a pair of this size.

    python bench/fuse.py                          # 96³ on the CPU (a few minutes at most on 2 cores)
    python bench/fuse.py --size 160               # the issue's 160³ figure
    python bench/fuse.py --size 160 --device cuda --repeats 20

The last line printed is one JSON object with everything measured.
"""
from __future__ import annotations
import argparse, json, os, platform, statistics, subprocess, sys, tempfile, time, warnings, weakref
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

try: import unifuse                                                         # installed, or run from the repo root
except ImportError: sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unifuse.model import UniFuse, UniFuseConfig
from unifuse.data import builtin_pair
from unifuse.nifti import save_nifti
from unifuse.degrade import make_batch
from unifuse.fuse import fuse_files


class LiveTensorPeak(TorchDispatchMode):
    "Peak bytes of tensor storage alive at once, counting only storage created inside the block (any device)."
    def __enter__(self):
        self.live, self.now, self.peak = {}, 0, 0
        return super().__enter__()
    def _free(self, key):
        self.now -= self.live.pop(key, 0)
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key in self.live or st.nbytes() == 0: continue               # a view, or an in-place result
                self.live[key] = st.nbytes(); self.now += st.nbytes(); self.peak = max(self.peak, self.now)
                weakref.finalize(st, self._free, key)                          # storages outlive their views
        return out


def measure(fn, device: torch.device, repeats: int) -> dict:
    "One untimed run (FLOPs, peak tensor memory), then `repeats` timed runs: median ms and every run."
    if device.type == "cuda": torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    with torch.no_grad(), FlopCounterMode(display=False) as fc, LiveTensorPeak() as lt: fn()
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else lt.peak
    times = []
    for _ in range(repeats):
        with torch.no_grad():
            t0 = time.perf_counter(); fn()
            if device.type == "cuda": torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return dict(ms=round(1e3 * statistics.median(times), 1), ms_runs=[round(1e3 * t, 1) for t in times],
                flops_G=round(fc.get_total_flops() / 1e9, 2), peak_MiB=round(peak / 2 ** 20, 1))


CHILD = """
import json, resource, sys, time, warnings
import torch
from unifuse.fuse import main
warnings.simplefilter("ignore")
t0 = time.perf_counter()
rc = main(sys.argv[1:])
out = dict(rc=rc, s=round(time.perf_counter() - t0, 2), peak_rss_MiB=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
if torch.cuda.is_available(): out["peak_cuda_MiB"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
print(json.dumps(out))
"""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96, help="voxels per side of the pair (default 96; the issue's figure: 160)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--checkpoint", default=None, help="a UniFuse checkpoint, or 'shipped' (default: the paper preset, random weights)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (default 3; medians are reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--no-files", action="store_true", help="skip the fuse_files measurement (NIfTI in and out)")
    a = ap.parse_args(argv)
    if a.size < 16: ap.error("--size must be at least 16")
    if a.repeats < 1: ap.error("--repeats must be at least 1")
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available(): ap.error("--device cuda: CUDA is not available here")
    if a.threads: torch.set_num_threads(a.threads)
    try: from monai.networks.nets import VoxelMorph
    except ImportError: ap.error('MONAI is needed for the VoxelMorph side: pip install "unifuse[eval]"')

    torch.manual_seed(0)
    if a.checkpoint is None: model, name = UniFuse(UniFuseConfig()), "paper preset (random weights)"
    elif a.checkpoint == "shipped": model, name = UniFuse.pretrained(), "shipped weights"
    else: model, name = UniFuse.load(a.checkpoint), a.checkpoint
    model = model.to(dev).eval()
    vm = VoxelMorph().to(dev).eval()

    t0 = time.perf_counter()
    p = builtin_pair("mri", seed=1, size=a.size)
    b = make_batch(p["ref"][None].to(dev), p["other"][None].to(dev), "mri", generator=torch.Generator(dev).manual_seed(0))
    ref, deg = b["ref"], b["deg"]                                           # (1, 1, S, S, S) in [0, 1]
    print(f"pair: built-in mri, {a.size}³ voxels, made in {time.perf_counter() - t0:.1f} s; device {dev}; "
          f"threads {torch.get_num_threads()}; UniFuse: {name}", flush=True)

    uf = measure(lambda: model(ref, deg), dev, a.repeats)
    print(f"UniFuse forward     {uf['ms']:9.1f} ms  peak tensors {uf['peak_MiB']:8.1f} MiB  {uf['flops_G']:8.1f} GFLOPs", flush=True)
    vmr = measure(lambda: vm(deg, ref), dev, a.repeats)
    print(f"VoxelMorph forward  {vmr['ms']:9.1f} ms  peak tensors {vmr['peak_MiB']:8.1f} MiB  {vmr['flops_G']:8.1f} GFLOPs", flush=True)
    ratio = round(uf["ms"] / vmr["ms"], 3)
    print(f"ratio UniFuse / VoxelMorph: time {ratio:.2f}, FLOPs {uf['flops_G'] / vmr['flops_G']:.2f}, "
          f"peak memory {uf['peak_MiB'] / max(vmr['peak_MiB'], 1e-3):.2f}", flush=True)

    files = None
    if not a.no_files:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            save_nifti(tmp / "ref.nii.gz", ref[0, 0].cpu() * 1000, p["affine"])
            save_nifti(tmp / "deg.nii.gz", deg[0, 0].cpu() * 800, p["affine"])
            run = lambda: fuse_files(tmp / "ref.nii.gz", tmp / "deg.nii.gz", tmp / "fused.nii.gz", "mri", model=model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")                             # random weights: the class warnings are expected
                s = run()
                times = []
                for _ in range(a.repeats):
                    t1 = time.perf_counter(); run(); times.append(time.perf_counter() - t1)
            # the whole command in a fresh process: its peak resident memory (imports, model, volumes, outputs)
            model.save(tmp / "model.pt")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
            child = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "ref.nii.gz"), str(tmp / "deg.nii.gz"), "-o",
                                    str(tmp / "cmd.nii.gz"), "--task", "mri", "--checkpoint", str(tmp / "model.pt"),
                                    "--device", str(dev), "--quiet"], capture_output=True, text=True, env=env)
            try: cmd = json.loads(child.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError): cmd = dict(error=(child.stderr or child.stdout).strip()[-300:])
        files = dict(s=round(statistics.median(times), 2), s_runs=[round(t, 2) for t in times], windows=s["windows"],
                     command=cmd)
        print(f"fuse_files (NIfTI in and out, {s['windows']} window(s)): {files['s']:.2f} s; the command in a fresh process: "
              f"{cmd.get('s', '?')} s, peak resident memory {cmd.get('peak_rss_MiB', '?')} MiB"
              + (f", peak CUDA {cmd['peak_cuda_MiB']} MiB" if "peak_cuda_MiB" in cmd else ""), flush=True)

    out = dict(bench="fuse", size=a.size, device=str(dev), device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
               threads=torch.get_num_threads(), torch=torch.__version__,
               unifuse=dict(model=name, params=sum(q.numel() for q in model.parameters()), forward_ms=uf["ms"],
                            forward_ms_runs=uf["ms_runs"], flops_G=uf["flops_G"], peak_MiB=uf["peak_MiB"],
                            fuse_files=files),
               voxelmorph=dict(model="monai.networks.nets.VoxelMorph()", params=sum(q.numel() for q in vm.parameters()),
                               forward_ms=vmr["ms"], forward_ms_runs=vmr["ms_runs"], flops_G=vmr["flops_G"], peak_MiB=vmr["peak_MiB"]),
               ratio_time=ratio, ratio_flops=round(uf["flops_G"] / vmr["flops_G"], 3),
               ratio_peak_memory=round(uf["peak_MiB"] / max(vmr["peak_MiB"], 1e-3), 3))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
