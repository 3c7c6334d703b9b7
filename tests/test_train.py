"""Tests of unifuse.train: the recipe's settings, the data plan and crops, the run folder and checkpoints, resume after
SIGKILL, non-finite steps, two processes under DDP, and the command line (good and bad input).

Sizes are tiny (a pool at 7 mm is 32³, crops of 16³, validation crops of 20³) so that the file runs in a few minutes."""
import contextlib, csv, io, json, math, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from unifuse import train as T
from unifuse import pool as P, recipe as R
from unifuse.model import UniFuse

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(crop=16, val_crop=20, spacing_mm=7.0, pool_size=3, val_subjects=1, workers=0, lr=2e-3, lr_min=2e-4,
             log_every=1)
SMALL_ARGS = ["--crop", "16", "--val-crop", "20", "--spacing-mm", "7", "--pool-size", "3", "--val-subjects", "1",
              "--workers", "0", "--lr", "0.002", "--lr-min", "0.0002", "--log-every", "1", "--quiet"]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    "One pool for every run of this file (3 training subjects and 1 validation subject at 7 mm)."
    d = tmp_path_factory.mktemp("pool")
    T.warm_cache([T.BuiltinSubjects(range(3), 7.0, d), T.BuiltinSubjects([T.VAL_SEED0], 7.0, d)], workers=0)
    return d


@contextlib.contextmanager
def threads(n):
    "Run with n torch threads (bitwise-reproducible CPU arithmetic needs the same count), then restore."
    old = torch.get_num_threads(); torch.set_num_threads(n)
    try: yield
    finally: torch.set_num_threads(old)


def env1():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}


def cli(argv, capsys):
    "Run unifuse-train in this process: (exit code, stderr)."
    code = T.main([str(a) for a in argv])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ settings
def test_presets_follow_the_paper_and_errors_name_the_flag():
    p = T.TrainConfig.preset("paper")
    assert (p.batch, p.crop, p.lr, p.lr_min, p.clip, p.amp) == (3, 160, 1e-4, 1e-6, 1.0, "auto")
    assert p.steps == 500 * 123 and p.model_config() == T.UniFuseConfig()
    t = T.TrainConfig.preset("tiny", steps=40)
    assert t.model_config() == T.UniFuseConfig.tiny() and t.steps == 40 and t.val_interval == 10
    assert T.TrainConfig.from_dict(json.loads(json.dumps(p.to_dict()))) == p        # plain JSON and back
    for kw, text in ((dict(crop=4), "--crop"), (dict(val_crop=12), "--val-crop"), (dict(batch=3, accum=2), "accum"),
                     (dict(lr_min=1.0), "--lr-min"), (dict(tasks=("mri", "xray")), "--tasks"),
                     (dict(dataset="brats2020"), "--root"), (dict(ranges={"translation": 0.1}), "mm and degrees"),
                     (dict(best_metric="dice"), "--best-metric"), (dict(model={"dapl": "Z"}), "dapl")):
        with pytest.raises(ValueError, match=text): T.TrainConfig.preset("tiny", **kw)
    with pytest.raises(ValueError, match="unknown preset"): T.TrainConfig.preset("huge")


def test_cosine_schedule_ends_at_lr_min_on_the_last_step():
    c = T.TrainConfig.preset("tiny", steps=11, lr=1e-3, lr_min=1e-5, warmup=0.0)
    lrs = [R.lr_at(c, k) for k in range(c.steps)]
    assert math.isclose(lrs[0], 1e-3) and math.isclose(lrs[-1], 1e-5) and all(a > b for a, b in zip(lrs, lrs[1:]))
    w = c.replace(warmup=0.3)                                            # 0.3 × 11 steps: 3 warm-up steps
    assert [round(R.lr_at(w, k) / 1e-3, 6) for k in range(3)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0]


def test_misalignment_in_mm_becomes_fractions_of_the_crop():
    c = T.TrainConfig.preset("tiny", translation_mm=6.0, deformation_mm=3.0, motion_translation_mm=(1.0, 4.5))
    r = T.physical_ranges(c, 1.5, 40)                                     # a 60 mm crop
    assert math.isclose(r.translation, 0.1) and math.isclose(r.deformation, 0.05) and r.ct_fov_mm == 60.0
    assert r.motion_translation == pytest.approx((1 / 60, 4.5 / 60)) and r.rotation_deg == 7.5


# ------------------------------------------------------------------------------------------------ data
def test_tasks_are_balanced_and_the_plan_is_a_function_of_the_step(pool_dir):
    tasks = ("mri", "ct", "pet")
    for s in range(20):                                                   # batch 3: one pair per task every step
        assert sorted(P.task_of(3 * s + i, tasks) for i in range(3)) == sorted(tasks)
    first = [tuple(P.task_of(3 * s + i, tasks) for i in range(3)) for s in range(20)]
    assert len(set(first)) > 2                                            # in a shuffled order
    for B in (1, 2, 4, 5):
        seen = [P.task_of(n, tasks) for n in range(B * 12)]
        assert [seen.count(t) for t in tasks] == [4 * B] * 3
    cfg = T.TrainConfig.preset("tiny", **{**SMALL, "batch": 4})
    e = T.load_entry(T.BuiltinSubjects([0], 7.0, pool_dir)[0])
    slots = [(e["tasks"], True, e["box"], e["brain_box"])] * 3
    plan = T.batch_plan(cfg, 5, slots)
    assert plan == T.batch_plan(cfg, 5, slots) and plan != T.batch_plan(cfg, 6, slots)
    assert plan != T.batch_plan(cfg.replace(seed=1), 5, slots)
    halves = [T.shard(plan, k, 2) for k in range(2)]
    assert halves[0] + halves[1] == plan and halves[0] != halves[1]      # two processes draw different data


def test_crop_centres_lie_inside_the_box_ellipsoid():
    box = [[10, 50], [20, 40], [0, 30]]                                  # a head's bounding box, voxels
    slots = [(("mri", "ct", "pet"), False, box, None)]
    inside = lambda c: sum(((x - (lo + hi - 1) / 2) / ((hi - lo - 1) / 2)) ** 2 for x, (lo, hi) in zip(c, box)) <= 1 + 1e-9
    for rule, want in (("ellipsoid", True), ("box", False)):
        cfg = T.TrainConfig.preset("tiny", **{**SMALL, "batch": 6, "centres": rule})
        centres = [q["centre"] for s in range(40) for q in T.batch_plan(cfg, s, slots)]
        assert all(lo <= x <= hi - 1 for c in centres for x, (lo, hi) in zip(c, box))
        assert all(map(inside, centres)) == want                          # the box rule lands in the corners too
    with pytest.raises(ValueError, match="centres"): T.TrainConfig.preset("tiny", centres="corner")


def test_cut_crops_zooms_pads_and_skull_strips(pool_dir):
    e = T.load_entry(T.BuiltinSubjects([0], 7.0, pool_dir)[0])
    vol, lab = e["vol"], e["labels"]
    assert vol.shape == (4, 32, 32, 32) and vol.dtype == torch.float16
    x, _ = P.cut(vol, [9.5, 15.5, 20.5], 10)
    assert torch.allclose(x, vol[:, 5:15, 11:21, 16:26].float(), atol=1e-4)    # zoom 1: an exact block
    y, _ = P.cut(vol, [15.5] * 3, 48)                                     # larger than the grid: zeros around
    assert y.shape == (4, 48, 48, 48) and float(y[:, :7].abs().max()) == 0 and torch.allclose(y[:, 8:40, 8:40, 8:40], vol.float(), atol=1e-4)
    z, _ = P.cut(vol, [15.5] * 3, 16, scale=2.0)                         # zoomed out: the whole head in 16³
    assert z.shape == (4, 16, 16, 16) and float(z.sum()) > 0
    full, lf = P.cut(vol, [15.5] * 3, 32, labels=lab)
    strip, ls = P.cut(vol, [15.5] * 3, 32, labels=lab, strip=True)
    assert 4 in lf.unique() and set(ls.unique().tolist()) <= {0, *P.BRAIN_LABELS}
    brain = torch.isin(lf, torch.tensor(P.BRAIN_LABELS))
    assert torch.equal(strip, full * brain) and float(strip[:, ~brain].abs().max()) == 0
    with pytest.raises(ValueError, match="labels"): P.cut(vol, [15.5] * 3, 8, strip=True)


def test_streaming_buffer_rebuilds_the_same_window_on_resume(pool_dir):
    pool = T.BuiltinSubjects(range(3), 7.0, pool_dir)
    buf = T.SubjectBuffer(pool, capacity=2, refresh=2, seed=0, device="cpu", workers=0)
    ids = []
    for s in range(10): buf.advance(s); ids.append([e["id"] for e in buf.entries])
    late = T.SubjectBuffer(pool, capacity=2, refresh=2, seed=0, device="cpu", workers=0, step=7)
    late.advance(7)
    assert [e["id"] for e in late.entries] == ids[7] and len({tuple(i) for i in ids}) > 1


# ------------------------------------------------------------------------------------------------ a run
def test_a_run_writes_its_folder_and_checkpoints_that_load(tmp_path, pool_dir):
    out = tmp_path / "run"
    t = T.train(T.TrainConfig.preset("tiny", **SMALL, steps=4, val_every=2), out, pool_dir=pool_dir, progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint.pt", "best.pt", "train.log", "metrics.csv", "progress.png", "config.json", "previews", "tb"} <= names
    with open(out / "metrics.csv") as f: rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(float(rows[i]["loss_total"])) for i in range(1, 5)) and rows[0]["loss_total"] == ""
    assert [r["step"] for r in rows if r["val_Q_ssim"]] == ["0", "2", "4"]
    ck = torch.load(out / "checkpoint.pt", weights_only=True)             # tensors and plain Python only
    assert ck["format"] == "unifuse-model" and ck["train"]["step"] == 4
    assert ck["meta"]["spacing_mm"] == pytest.approx(7.0) and ck["meta"]["preset"] == "tiny"
    assert ck["meta"]["steps"] == 4 and ck["meta"]["tasks"] == ["mri", "ct", "pet"]
    assert ck["train"]["lr"] == pytest.approx(2e-4) and T.TrainConfig.from_dict(ck["train"]["config"]) == t.cfg
    m = UniFuse.load(out / "checkpoint.pt")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), t.model.state_dict().values()))
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["train"]["best"]["step"] in (0, 2, 4) and best["train"]["best"]["metric"] == "total"
    assert (out / "progress.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step_000000.png", "step_000002.png", "step_000004.png"]
    assert any((out / "tb").iterdir()) and "validation at step 4" in (out / "train.log").read_text()
    assert json.loads((out / "config.json").read_text())["steps"] == 4
    assert not list(out.glob(".*.tmp*"))                                 # no temporary files left over


def test_a_used_folder_is_refused_and_overwrite_keeps_the_pool(tmp_path, pool_dir):
    out = tmp_path / "run"; (out / "pool").mkdir(parents=True)
    assert T.check_out(out) == "new"                                      # only a pool: not used
    (out / "train.log").write_text("earlier run\n")
    with pytest.raises(ValueError, match="--resume.*--overwrite"): T.check_out(out)
    with pytest.raises(ValueError, match="no checkpoint.pt"): T.check_out(out, resume=True)
    assert T.check_out(out, overwrite=True) == "overwrite"
    T._clear_run(out)
    assert sorted(p.name for p in out.iterdir()) == ["pool"]
    (out / "notes.txt").write_text("mine"); (out / "train.log").write_text("x")
    with pytest.raises(ValueError, match="did not write"): T.check_out(out, overwrite=True)
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is a file"): T.check_out(tmp_path / "f")


def test_init_starts_from_the_weights_of_a_checkpoint(tmp_path, pool_dir):
    torch.manual_seed(5)
    src = UniFuse(T.UniFuseConfig.tiny()).save(tmp_path / "w.pt", meta={"spacing_mm": 1.0})
    t = T.Trainer(T.TrainConfig.preset("tiny", **SMALL, steps=2), None, pool_dir=pool_dir, init=src, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(), UniFuse.load(src).state_dict().values()))
    assert t.state()["meta"]["init"] == str(src)
    t.close()


@pytest.mark.filterwarnings("ignore:UniFuse. intensities span")                # the overflowing batch, on purpose
def test_a_nan_batch_is_skipped_and_a_run_of_them_stops(tmp_path, pool_dir, capsys):
    def poison(step, b):
        if step == 1: b["deg_fine"][0, 0, 3, 3, 3] = float("nan")        # NaN in a batch
        if step == 2: b["ref"].mul_(1e38)                                 # a batch whose loss overflows
    t = T.train(T.TrainConfig.preset("tiny", **SMALL, steps=4, val_every=4), tmp_path / "a", pool_dir=pool_dir,
                progress=False, on_batch=poison)
    err = capsys.readouterr().err
    assert "step 2: NaN or Inf in the batch" in err and "step skipped (1 in a row" in err
    assert "step 3: non-finite" in err and "total=" in err
    assert t.step == 4 and [r["skipped"] for r in t.history[1:]] == [0, 1, 1, 0]
    assert all(bool(torch.isfinite(p).all()) for p in t.model.state_dict().values())   # weights and BatchNorm statistics
    assert torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["train"]["step"] == 4

    def ruin(step, b):
        if step >= 3: b["deg"][:, :, 0] = float("inf")
    cfg = T.TrainConfig.preset("tiny", **SMALL, steps=10, ckpt_every=2, val_every=10, max_bad_steps=3)
    with pytest.raises(T.TrainingStopped, match="stopped at step 6: 3 non-finite steps in a row.*checkpoint.pt \\(step 2\\)"):
        T.train(cfg, tmp_path / "b", pool_dir=pool_dir, progress=False, on_batch=ruin)
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ck["train"]["step"] == 2 and all(bool(torch.isfinite(v).all()) for v in ck["state_dict"].values())


def _state(path):
    ck = torch.load(path, weights_only=True)
    return ck, ck["state_dict"]


@pytest.mark.slow
def test_resume_after_sigkill_continues_on_the_same_schedule(tmp_path, pool_dir):
    """A run killed (SIGKILL) after its first checkpoint and resumed ends where an uninterrupted run ends.

    Tolerance: none. The data of step s is a function of (seed, s), the checkpoint restores the weights, AdamW's
    moments, the schedule and the RNG states exactly, and on one CPU thread the same operations on the same values
    give the same bits; any difference would be a bug, not rounding."""
    steps = 12
    args = ["-m", "unifuse.train", "--preset", "tiny", *SMALL_ARGS, "--steps", str(steps), "--ckpt-every", "3",
            "--val-every", "6", "--pool-dir", str(pool_dir)]
    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, *args, "--out", str(killed)], env=env1(), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while not (killed / "checkpoint.pt").exists():
        assert p.poll() is None, p.communicate()[1].decode()[-2000:]
        assert time.time() - t0 < 120, "no checkpoint after 2 minutes"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL
    at = torch.load(killed / "checkpoint.pt", weights_only=True)["train"]["step"]
    assert 3 <= at < steps
    again = args[:args.index("--pool-dir")] + args[args.index("--pool-dir") + 2:]   # --resume alone: the saved --pool-dir
    r = subprocess.run([sys.executable, *again, "--out", str(killed), "--resume"], env=env1(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (killed / "pool").exists() and f"in {pool_dir}" in (killed / "train.log").read_text()   # no new pool in OUT
    with threads(1):                                                      # the uninterrupted run, in this process
        T.train(T.TrainConfig.preset("tiny", **SMALL, steps=steps, ckpt_every=3, val_every=6), tmp_path / "whole",
                pool_dir=pool_dir, progress=False)
    a, wa = _state(killed / "checkpoint.pt")
    b, wb = _state(tmp_path / "whole" / "checkpoint.pt")
    assert a["train"]["step"] == b["train"]["step"] == steps
    assert a["train"]["lr"] == b["train"]["lr"] == pytest.approx(2e-4)
    assert a["train"]["scheduler"]["last_epoch"] == b["train"]["scheduler"]["last_epoch"] == steps
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), \
        max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    with open(killed / "metrics.csv") as f: logged = [int(r["step"]) for r in csv.DictReader(f)]
    assert logged == list(range(steps + 1))                              # each step once, across the kill
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    raw = [e for f in sorted((killed / "tb").iterdir()) for e in EventFileLoader(str(f)).Load()]   # every event of every file
    tb_steps = sorted(e.step for e in raw for v in e.summary.value if v.tag == "train/total")
    assert tb_steps == list(range(1, steps + 1))                          # each step once in the files themselves
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith("tb")) == ["tb"]   # no rebuild leftovers


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path, pool_dir):
    """torchrun, 2 CPU processes (gloo), global batch 4 = 2 pairs per process, against one process with batch 4: each
    process draws its own half of the step's plan and DDP averages the two halves' gradients.

    The network is per-sample (its read-out's running statistics are those of the global batch, summed over the
    processes) and every loss term is a mean over equal halves, so both runs compute the same mathematics; only
    L_moda's K random negatives are drawn per shard, so this test sets K >= N - 1 (every other token position is a
    negative: 4³ = 64 tokens at 16³). What remains is the order of floating-point sums (gloo's all-reduce, means of
    halves against one mean), ~1e-7 relative. Hence the tolerances:
    * the first step's loss (same weights, same data) agrees to 1e-5 relative;
    * the weights after 3 steps: AdamW's early updates are sign-like (m / sqrt(v) = ±1 where |g| >> eps), so a
      gradient component at the level of the rounding noise can move +lr in one run and -lr in the other. Such
      components are a fraction of a percent: we require 90 % of the weights to agree to 1e-5 and the difference of
      the two runs' updates to be under 5 % of the update's norm (a wrong split of the batch fails all three)."""
    steps, out = 3, tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "unifuse.train",
           "--preset", "tiny", *SMALL_ARGS, "--batch", "4", "--steps", str(steps), "--val-every", "3",
           "--cfg", "moda_negatives=64", "--pool-dir", str(pool_dir), "--out", str(out), "--device", "cpu"]
    r = subprocess.run(cmd, env=env1(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck, w2 = _state(out / "checkpoint.pt")
    assert ck["train"]["world_size"] == 2 and ck["train"]["step"] == steps
    with open(out / "metrics.csv") as f: rows2 = list(csv.DictReader(f))
    assert [int(x["step"]) for x in rows2] == [0, 1, 2, 3]                 # rank 0 alone wrote
    cfg = T.TrainConfig.preset("tiny", **SMALL, batch=4, steps=steps, val_every=3)
    cfg = cfg.replace(model={**cfg.model, "moda_negatives": 64})
    with threads(1): one = T.train(cfg, tmp_path / "one", pool_dir=pool_dir, progress=False)
    loss1, loss2 = [float(r["loss_total"]) for r in one.history[1:]], [float(r["loss_total"]) for r in rows2[1:]]
    assert abs(loss2[0] - loss1[0]) < 1e-5 * abs(loss1[0]), (loss1, loss2)
    assert all(abs(a - b) < 1e-2 * abs(a) for a, b in zip(loss1, loss2)), (loss1, loss2)
    w1 = one.model.state_dict()
    torch.manual_seed(0); w0 = UniFuse(cfg.model_config()).state_dict()
    names = [k for k, _ in one.model.named_parameters()]
    d1 = torch.cat([(w1[k] - w0[k]).flatten() for k in names]); d2 = torch.cat([(w2[k] - w0[k]).flatten() for k in names])
    agree = float(((d2 - d1).abs() <= 1e-5).float().mean())
    rel = float((d2 - d1).norm() / d1.norm())
    assert agree > 0.9 and rel < 0.05 and float(d1.abs().max()) > 2e-3, (agree, rel)


def test_a_reader_trains_on_its_training_split(tmp_path):
    from fakes import fake_tree
    root = fake_tree(tmp_path / "brats", "brats2020", n=3, size=24)
    t = T.train(T.TrainConfig.preset("tiny", **{**SMALL, "val_subjects": 0}, dataset="brats2020", root=str(root),
                                     tasks=("mri",), steps=2, batch=2), None, pool_dir=tmp_path / "pool", progress=False)
    assert t.step == 2 and t.spacing_mm == 7.0
    files = sorted(p.name for p in (tmp_path / "pool").iterdir())
    assert files and all(f.startswith("brats2020_7mm_") for f in files)
    assert {e["tasks"] for e in t.buffer.entries} == {("mri",)}


# ------------------------------------------------------------------------------------------------ command line
def test_cli_good_run_and_help(tmp_path, pool_dir, capsys):
    assert T.main(["--help"]) == 0 and "--resume" in capsys.readouterr().out   # every command returns its status
    out = tmp_path / "run"
    code, err = cli(["--preset", "tiny", *SMALL_ARGS, "--steps", "2", "--pool-dir", pool_dir, "--out", out,
                     "--cfg", "lora_rank=3", "--range", "pet_dose=(0.5, 0.05)"], capsys)
    assert code == 0, err
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["config"]["lora_rank"] == 3 and ck["train"]["config"]["ranges"] == {"pet_dose": [0.5, 0.05]}
    code, err = cli(["--out", out, "--resume", "--workers", "0", "--quiet"], capsys)     # finished: nothing left to do
    assert code == 0 and torch.load(out / "checkpoint.pt", weights_only=True)["train"]["step"] == 2


def test_cli_fields_and_epochs_become_the_config():
    a = T._parser().parse_args(["--out", "x", "--preset", "tiny", "--pool-size", "3", "--tasks", "mri", "ct",
                                "--scale", "0.9", "1.1", "--epochs", "2", "--no-compile", "--cfg", "ufrf_channels=(8, 24)"])
    c = T.config_from_args(a)
    assert c.tasks == ("mri", "ct") and c.scale == (0.9, 1.1) and c.compile is False
    assert c.steps == 2 * 2 and c.model["ufrf_channels"] == [8, 24]      # 3 subjects × 2 tasks = 6 pairs: 2 steps of 3
    saved = c.to_dict()
    same = T._parser().parse_args(["--out", "x", "--preset", "tiny", "--pool-size", "3", "--workers", "1", "--resume"])
    assert T.config_from_args(same, saved).workers == 1                  # repeating the command with --resume is fine


def test_the_probe_finds_parameters_without_gradient_for_ddp(pool_dir):
    "DDP must be told about parameters a configuration leaves unused; the probe finds them and leaves no trace."
    cfg = T.TrainConfig.preset("tiny", **{**SMALL, "val_subjects": 0}, steps=1)
    c = T.Trainer(cfg.replace(model={**cfg.model, "dapl": "C"}), None, pool_dir=pool_dir, progress=False)
    assert c._unused_parameters() == []                                  # every ablation setting uses all it builds
    c.close()
    t = T.Trainer(cfg, None, pool_dir=pool_dir, progress=False)
    t.model.spare = torch.nn.Parameter(torch.zeros(3))                   # a parameter the loss never reaches
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert t._unused_parameters() == ["spare"]
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())   # running statistics included
    assert all(p.grad is None for p in t.model.parameters()) and not bool(t.model.dapl.reader.norm.initialised)
    t.close()


def test_cli_mistakes_end_with_one_line_and_status_2(tmp_path, pool_dir, capsys):
    used = tmp_path / "used"; used.mkdir(); (used / "train.log").write_text("x\n")
    bad_ck = tmp_path / "corrupt"; bad_ck.mkdir(); (bad_ck / "train.log").write_text("x\n")
    (bad_ck / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    plain = tmp_path / "plain"; plain.mkdir()
    UniFuse(T.UniFuseConfig.tiny()).save(plain / "checkpoint.pt")
    new = tmp_path / "new"
    cases = [
        (["--preset", "huge", "--out", new], "invalid choice: 'huge'"),
        (["--dataset", "mnist", "--out", new], "invalid choice: 'mnist'"),
        (["--dataset", "brats2020", "--root", tmp_path / "nowhere", "--out", new], "--root"),
        (["--dataset", "brats2020", "--out", new], "root (--root) must be a folder"),
        (["--out", used], "holds an earlier run"),
        (["--out", new, "--resume"], "no checkpoint.pt"),
        (["--out", bad_ck, "--resume"], "not a readable checkpoint"),
        (["--out", plain, "--resume"], "not a training checkpoint"),
        (["--out", new, "--resume", "--overwrite"], "contradict"),
        (["--out", new, "--cfg", "dapl=Z"], "dapl"),
        (["--out", new, "--cfg", "widht=3"], "--cfg widht: not a UniFuseConfig field"),
        (["--out", new, "--crop", "4"], "--crop"),
        (["--out", new, "--steps", "0"], "--steps"),
        (["--out", new, "--init", tmp_path / "missing.pt"], "--init"),
        (["--out", new, "--epochs", "2", "--steps", "5"], "contradict"),
        (["--out", new, "--lr", "abc"], "--lr"),
    ]
    if not torch.cuda.is_available(): cases.append((["--out", new, "--device", "cuda"], "no CUDA"))
    for argv, text in cases:
        code, err = cli(argv, capsys)
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("unifuse-train: error:") and text in err, (argv, err)
        assert "Traceback" not in err
        assert not new.exists(), argv                                     # nothing left behind
    # --resume cannot change the schedule
    run = tmp_path / "run"
    assert cli(["--preset", "tiny", *SMALL_ARGS, "--steps", "1", "--val-subjects", "0", "--pool-dir", pool_dir,
                "--out", run], capsys)[0] == 0
    code, err = cli(["--out", run, "--resume", "--lr", "0.1"], capsys)
    assert code == 2 and "cannot change --lr" in err and "--init" in err and err.count("\n") == 1
    code, err = cli(["--out", run, "--resume", "--init", run / "checkpoint.pt"], capsys)
    assert code == 2 and "give one" in err and err.count("\n") == 1


def test_cli_in_a_real_process_prints_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "unifuse.train", "--preset", "huge", "--out", str(tmp_path / "x")],
                       env=env1(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "huge" in r.stderr and r.stdout == ""
    assert not (tmp_path / "x").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_run_of_the_paper_network(tmp_path, pool_dir):
    "The CUDA path: the paper network, bf16 autocast, fused AdamW, crops and degradations on the GPU."
    cfg = T.TrainConfig.preset("paper", **{**SMALL, "crop": 32, "val_crop": 32}, steps=3, val_every=3)
    t = T.train(cfg, tmp_path / "run", pool_dir=pool_dir, device="cuda", progress=False)
    assert t.amp == "bf16" and t.device.type == "cuda" and t.step == 3
    assert all(not r.get("skipped") for r in t.history[1:])
    assert all(math.isfinite(float(t.history[-1][f"val_{k}"])) for k in ("total", "Q_ssim", "epe_mm"))
    m = UniFuse.load(tmp_path / "run" / "checkpoint.pt")                   # CUDA tensors saved, read on the CPU
    assert m.meta["steps"] == 3 and all(bool(torch.isfinite(v).all()) for v in m.state_dict().values())

