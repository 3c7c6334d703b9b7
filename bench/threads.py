#!/usr/bin/env python
"""UniFuse's training step on an idle CPU and beside one busy process, under each OpenMP wait policy.

Each setting runs in a fresh Python process (the wait policy is read when PyTorch loads): the tiny preset's
model step (`UniFuse.loss` on a 3 × SIZE³ built-in batch, backward, AdamW; no data pipeline), timed idle and
then beside one single-threaded busy loop (`while True: pass` in another process, what a second job on a
2-core machine looks like). Medians of `--steps` steps after one warm-up step.

Settings: `default` (PyTorch's defaults: all cores, GNU OpenMP spins before it sleeps), `adaptive` (what
`unifuse-train` does: the thread count follows the load measured by `unifuse.launch.LoadMeter`, looked at
before every step here), `spin` (GOMP_SPINCOUNT=10000), `passive` (OMP_WAIT_POLICY=PASSIVE: sleep at once)
and `1-thread`. `ratio` is the busy step over the idle step of the same setting; `vs_default_idle` the busy
step over the default setting's idle step (what a user feels).

    python bench/threads.py                 # 48³, 3 steps each (about 2 minutes on 2 cores)
    python bench/threads.py --size 32 --steps 5

The last line printed is one JSON object: per setting the idle and busy ms per step and their ratio.
"""
from __future__ import annotations
from machine import cpu_model
import argparse, json, os, subprocess, sys

CHILD = r'''
import json, statistics, subprocess, sys, time, torch
from unifuse.model import UniFuse, UniFuseConfig
from unifuse.data import builtin_pair
from unifuse.degrade import make_batch
size, steps, threads, adapt = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
if threads: torch.set_num_threads(threads)
from unifuse.launch import LoadMeter, threads_for
meter = LoadMeter()
torch.manual_seed(0)
m = UniFuse(UniFuseConfig.tiny()).train()
opt = torch.optim.AdamW(m.parameters(), 1e-3)
ps = [builtin_pair(t, seed=i, size=size) for i, t in enumerate(["mri", "ct", "pet"])]
b = make_batch(torch.stack([p["ref"] for p in ps]), torch.stack([p["other"] for p in ps]), ["mri", "ct", "pet"], generator=0)
g = torch.Generator().manual_seed(0)
def step():
    if adapt: torch.set_num_threads(threads_for(meter.others()))            # what unifuse-train does every few steps
    L = m.loss(b, generator=g); opt.zero_grad(); L["total"].backward(); opt.step()
def timed():
    ts = []
    for _ in range(steps):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)
step()
idle = timed()
busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
try:
    time.sleep(0.5); step(); loaded = timed()
finally: busy.kill()
print(json.dumps(dict(threads=torch.get_num_threads(), idle_ms=round(idle, 1), busy_ms=round(loaded, 1), ratio=round(loaded / idle, 2))))
'''

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--size", type=int, default=48, help="crop side in voxels (default 48)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps idle and busy (default 3)")
    ap.add_argument("--settings", nargs="*", default=["default", "adaptive", "spin", "passive", "1-thread"])
    a = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    envs = {"default": ({}, 0, 0), "adaptive": ({}, 0, 1), "spin": ({"GOMP_SPINCOUNT": "10000"}, 0, 0),
            "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0, 0), "1-thread": ({}, 1, 0)}
    res = dict(bench="threads", size=a.size, batch=3, steps=a.steps, cpu=cpu_model(), cores=os.cpu_count(), settings={})
    for name in a.settings:
        extra, threads, adapt = envs[name]
        out = subprocess.run([sys.executable, "-c", CHILD, str(a.size), str(a.steps), str(threads), str(adapt)], env={**base, **extra},
                             capture_output=True, text=True)
        if out.returncode: sys.exit(f"{name}: {out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1]); r["env"] = extra
        if "default" in res["settings"]: r["vs_default_idle"] = round(r["busy_ms"] / res["settings"]["default"]["idle_ms"], 2)
        res["settings"][name] = r
        print(f"  {name:9s} {r['threads']} threads  idle {r['idle_ms']:7.1f} ms  beside a busy loop {r['busy_ms']:7.1f} ms  "
              f"({r['ratio']:.2f}×; {r.get('vs_default_idle', r['ratio']):.2f}× the default idle step)  {extra or ''}", flush=True)
    print(json.dumps(res))

if __name__ == "__main__":
    main()
