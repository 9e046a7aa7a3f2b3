"""THE training loop: single worker, each Ray Train worker, and the distillation all run this ``fit``.

It knows nothing about flows: ``model(batch)`` returns the loss. ``model`` may be a DDP wrapper; the raw
module (``getattr(model, "module", model)``) is what is saved. Optional hooks on the raw module:
``meta() -> dict`` (identity checked on resume), ``save(path)`` (writes ``best.pt``; default: a dict with
its state_dict) and ``select(batch) -> batch`` (the rows the loss is taken over; their count weighs the batch in the
epoch's mean).

Exact resume: ``checkpoint.pt`` holds model, optimiser, scheduler, epoch, step within the epoch, global
step, best validation loss and every rank's RNG states. The train loader must replay an epoch identically
given ``set_epoch(epoch)`` (the ShardedLoader does: shuffling is seeded by (seed, epoch)); on resume the first
``step`` batches of the epoch are skipped. Validation draws its preprocessing noise from a fixed seed inside
``torch.random.fork_rng``, so the validation loss is comparable between epochs and the training RNG stream is
untouched by it.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hpc_calo import rundir
from hpc_calo.atomic import atomic_path
from hpc_calo.cpus import governed_threads
from hpc_calo.errors import Stopped, UserError
from hpc_calo.train.checkpoint import check_meta, load_checkpoint, rng_state, save_checkpoint, seed_all, set_rng_state
from hpc_calo.train.config import TrainConfig

TIMING_STEPS = 20  # steps whose speed turns a time budget into a step budget


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(cfg.device)


def _derived_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Move a loader batch; floating tensors take the training dtype, integer ones keep theirs."""
    return {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, non_blocking=True)
        for k, v in batch.items()
    }


def _selector(module: nn.Module) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    select = getattr(module, "select", None)
    return select if callable(select) else (lambda b: b)


def _rank_weight(rows: int, world_size: int, device: torch.device) -> float | torch.Tensor:
    """DDP averages the ranks' gradients of their own mean losses. Where ``select`` leaves the ranks different numbers
    of rows, this weight makes that average the gradient of the mean over every rank's rows, as one worker on the
    union batch has. A tensor on the device: no host synchronisation."""
    if world_size == 1 or not _distributed():
        return 1.0
    total = torch.tensor(float(rows), device=device, dtype=torch.float64)
    dist.all_reduce(total)
    return rows * world_size / total.clamp_min(1.0)


def _rows(batch: Mapping[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_mean(total: float, count: float, device: torch.device) -> tuple[float, float]:
    """Sum (total, count) over ranks when running distributed."""
    if _distributed():
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = float(t[0]), float(t[1])
    return total, count


def save_best(module: nn.Module, path: Path) -> None:
    saver = getattr(module, "save", None)
    if callable(saver):
        saver(path)
        return
    with atomic_path(path) as tmp:
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}, tmp)


@torch.no_grad()
def evaluate(module: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]] | None, device: torch.device,
             dtype: torch.dtype, seed: int) -> tuple[float, float]:
    """(summed loss x rows, rows) over the loader, with a fixed noise seed; the caller reduces over ranks."""
    if loader is None:
        return 0.0, 0.0
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    fork = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        select = _selector(module)
        for batch in loader:
            b = select(to_device(batch, device, dtype))
            n = _rows(b)
            total += float(module(b)) * n
            count += n
    module.train(was_training)
    return total, float(count)


class _Progress:
    """One line per interval on rank 0: loss, learning rate, samples/s, ETA; and the metrics.jsonl log."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 steps_per_epoch: int, start_epoch: int = 0, start_in_epoch: int = 0) -> None:
        self.cfg, self.enabled, self.total, self.start_step = cfg, enabled, total_steps, start_step
        self.steps_per_epoch = steps_per_epoch
        self.start_epoch, self.start_in_epoch = start_epoch, start_in_epoch
        self.path = rundir.metrics_in(out_dir)
        self.t0 = time.perf_counter()
        self.samples = 0
        self.t_last, self.samples_last = self.t0, 0

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def epochs(self, total_steps: int) -> int:
        """Epochs the run ends in: a budget that ended mid-epoch closed that epoch, so an extended run's epochs
        count from where it resumed, not from step 0."""
        left = total_steps - self.start_step + self.start_in_epoch
        return self.start_epoch + _epochs(left, self.steps_per_epoch)

    def step(self, epoch: int, global_step: int, loss: float, lr: float, samples: int) -> None:
        self.samples += samples
        if not self.enabled or global_step % self.cfg.log_every:
            return
        now = time.perf_counter()
        rate = (self.samples - self.samples_last) / max(now - self.t_last, 1e-9)
        done = global_step - self.start_step
        eta = (now - self.t0) / max(done, 1) * (self.total - global_step)
        self.t_last, self.samples_last = now, self.samples
        self.write({"event": "step", "epoch": epoch, "step": global_step, "loss": loss, "lr": lr,
                    "samples_per_s": rate})
        print(
            f"[{self.cfg.name}] epoch {epoch + 1}/{self.epochs(self.total)} "
            f"step {global_step}/{self.total} "
            f"loss {loss:.4f} lr {lr:.2e} {rate:,.0f} samples/s ETA {_hms(eta)}",
            file=sys.stderr,
            flush=True,
        )


def _epochs(total_steps: int, steps_per_epoch: int) -> int:
    return -(-total_steps // steps_per_epoch)


def one_cycle(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, done: int
              ) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycle over ``total_steps``, already advanced by the ``done`` steps a resumed run has taken."""
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.max_lr, total_steps=max(total_steps, done + 1),
                                                pct_start=cfg.pct_start)
    with warnings.catch_warnings():  # stepping the schedule alone is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done):
            sched.step()
    return sched


def _steps_for_time(cfg: TrainConfig, step: int, since: tuple[int, float], trained_s: float,
                    device: torch.device) -> int:
    """The step count that a ``cfg.minutes`` budget allows at the speed measured since ``since``."""
    s0, t0 = since
    rate = (step - s0) / max(time.perf_counter() - t0, 1e-9)
    rate_t = torch.tensor([rate], dtype=torch.float64, device=device)
    if _distributed():  # every rank must plan the same schedule: the slowest sets it
        dist.all_reduce(rate_t, op=dist.ReduceOp.MIN)
    return max(step + 1, s0 + int(float(rate_t[0]) * (cfg.minutes * 60 - trained_s)))


class _StopSignals:
    """SIGTERM / SIGINT (what SLURM, Ray and Ctrl-C send) stop a single-process ``fit`` after the current step,
    which then writes a checkpoint and raises Stopped (the CLI exits 128 + signum).

    Only in the main thread of a one-worker run, and only where the handler is still Python's default: a
    launcher that handles the signal itself (submitit's requeue) keeps it. A second signal restores the
    default, so it stops at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.old: dict[int, Any] = {}

    def _caught(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, old in self.old.items():
            signal.signal(sig, old)
        self.old = {}

    def watch(self, fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
            world = inspect.signature(fn).bind(*args, **kwargs).arguments.get("world_size", 1)
            self.signum = None
            if world == 1 and threading.current_thread() is threading.main_thread():
                for sig in self.SIGNALS:
                    if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                        self.old[sig] = signal.signal(sig, self._caught)
            try:
                return fn(*args, **kwargs)
            finally:
                self._restore()

        return wrapper


_STOP = _StopSignals()


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _budget(cfg: TrainConfig) -> dict[str, Any]:
    return {"epochs": cfg.epochs, "steps": cfg.steps, "minutes": cfg.minutes}


def finished(cfg: TrainConfig, out_dir: Path) -> dict[str, Any] | None:
    """The summary ``fit`` would return for a run whose checkpoint already holds its whole budget (and says so
    on stderr), else None. The caller has checked that the checkpoint is this model's (``Job.prepare`` does).

    Asked before any data is loaded or worker started: re-running a finished pipeline must not preload a store,
    nor wait on a cluster for a worker group (its GPUs), only to find nothing left to do."""
    path = rundir.checkpoint_in(out_dir)
    if not path.exists():
        return None
    ck = load_checkpoint(path)
    if ck.get("budget") != _budget(cfg) or not ck.get("timed", True) or ck["global_step"] < ck["total_steps"]:
        return None
    print(f"[{cfg.name}] already trained to its budget ({cfg.budget()}, step {ck['global_step']}): nothing to do",
          file=sys.stderr)
    return {"best_val": ck["best_val"], "last_val": ck.get("last_val", math.nan), "global_step": ck["global_step"],
            "epochs": ck["epoch"], "stopped": False, "skipped_steps": 0, "train_s": 0.0}


@_STOP.watch
def fit(
    model: nn.Module,
    train_loader: Any,
    val_loader: Any,
    cfg: TrainConfig,
    out_dir: Path,
    rank: int = 0,
    world_size: int = 1,
    report: Callable[[dict], None] | None = None,
    before_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (``model(batch) -> loss``) and return a summary; resumes from ``out_dir/checkpoint.pt``.

    ``train_loader``: iterable of dict batches with ``len()`` = batches per epoch (equal on all ranks) and
    optionally ``set_epoch(e)``. A DDP-wrapped ``model`` must already sit on ``cfg.device`` in ``cfg.dtype``;
    an unwrapped one is moved here. Rank 0 writes ``checkpoint.pt`` (every ``cfg.checkpoint_every`` steps
    and at each epoch end), ``best.pt`` (lowest validation loss) and ``metrics.jsonl``. ``report(metrics)``
    runs on every rank at each epoch end; ``before_step(global_step)`` before each optimisation step. Returns
    best_val, last_val, global_step, epochs, stopped (True when ``cfg.max_steps`` cut the run short),
    skipped_steps (non-finite gradients) and train_s.
    ``cfg.amp``: tf32 runs the float32 GEMMs on TF32 tensor cores for the duration of the call (the process's
    setting is restored after: sampling in the same process stays float32); bf16 autocasts the forward pass.
    """
    previous = torch.get_float32_matmul_precision()
    if cfg.amp == "tf32":
        torch.set_float32_matmul_precision("high")
    try:
        return _fit(model, train_loader, val_loader, cfg, out_dir, rank, world_size, report, before_step)
    finally:
        torch.set_float32_matmul_precision(previous)


def _fit(model: nn.Module, train_loader: Any, val_loader: Any, cfg: TrainConfig, out_dir: Path, rank: int,
         world_size: int, report: Callable[[dict], None] | None,
         before_step: Callable[[int], None] | None) -> dict[str, Any]:
    out_dir = Path(out_dir)
    is_rank0 = rank == 0
    if is_rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
    gov = governed_threads(cfg.num_threads)
    threads = gov.threads
    device, dtype = _device(cfg), cfg.torch_dtype
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    raw: nn.Module = getattr(model, "module", model)
    if raw is model:
        model.to(device=device, dtype=dtype)
    meta = raw.meta() if callable(getattr(raw, "meta", None)) else {}
    select = _selector(raw)

    steps_per_epoch = len(train_loader)
    if steps_per_epoch < 1:
        raise UserError(f"{cfg.name}: the training set gives no batch of {cfg.batch_size} (too few examples)")
    budget = _budget(cfg)
    # A time budget is turned into steps once the speed is known; until then a provisional, long schedule runs.
    total_steps = TIMING_STEPS * 100 if cfg.minutes else (cfg.steps or cfg.epochs * steps_per_epoch)
    timed = cfg.minutes is None
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters (on a CPU ~7x faster than the default per-tensor loop; the same Adam)
    opt = torch.optim.Adam(params, lr=cfg.max_lr, fused=True)
    sched = one_cycle(opt, cfg, total_steps, 0)

    epoch, step_in_epoch, global_step, best_val, last_val, trained_s = 0, 0, 0, math.inf, math.nan, 0.0
    trained_core_s = 0.0  # seconds x torch threads x workers, over every invocation (threads may change between)
    trained_cpu_s = 0.0  # CPU seconds the training processes used: below core_s where other work shares the cores
    ckpt_path = rundir.checkpoint_in(out_dir)
    if ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        check_meta(ckpt_path, ck.get("meta", {}), meta)
        if ck["steps_per_epoch"] != steps_per_epoch:
            raise UserError(
                f"{ckpt_path}: saved run has {ck['steps_per_epoch']} steps per epoch, this one {steps_per_epoch}: "
                "the batch size or the data changed; use another --out"
            )
        raw.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        epoch, step_in_epoch, global_step = ck["epoch"], ck["step_in_epoch"], ck["global_step"]
        best_val, last_val = ck["best_val"], ck.get("last_val", math.nan)
        trained_s = float(ck.get("train_s", 0.0))
        # Older checkpoints hold no core-seconds: count their seconds at this invocation's threads.
        trained_core_s = float(ck.get("core_s", trained_s * threads * world_size))
        trained_cpu_s = float(ck.get("cpu_s", trained_core_s))
        if ck.get("budget") == budget and (ck.get("timed", True) or cfg.minutes is None):
            total_steps, timed = ck["total_steps"], True
            sched.load_state_dict(ck["scheduler"])
        else:  # a new budget extends (or shortens) the run: the schedule is re-planned over the new total
            if is_rank0 and ck.get("budget") != budget:
                print(f"[{cfg.name}] budget changed to {cfg.budget()}: continuing from step {global_step}",
                      file=sys.stderr)
            if cfg.minutes:
                total_steps = global_step + TIMING_STEPS * 100
            sched = one_cycle(opt, cfg, total_steps, global_step)
        rngs = ck["rng"]
        if len(rngs) == world_size:
            set_rng_state(rngs[rank])
        else:  # another worker count: a reproducible but different stream
            seed_all(_derived_seed(cfg.seed, rank, global_step))
        if is_rank0:
            print(f"[{cfg.name}] resuming at epoch {epoch + 1} step {global_step}/{total_steps}", file=sys.stderr)
    else:
        seed_all(_derived_seed(cfg.seed, rank))

    progress = _Progress(cfg, out_dir, is_rank0, total_steps, global_step, steps_per_epoch, epoch, step_in_epoch)
    progress.write({"event": "start", "step": global_step, "torch_threads": threads})
    t_start, cpu_start = time.perf_counter(), time.process_time()
    threads_since, core_before = t_start, 0.0  # when the thread count last changed, the core-seconds before it

    def core_s() -> float:
        return trained_core_s + (core_before + (time.perf_counter() - threads_since) * threads) * world_size
    skipped = 0
    timing_from = (global_step, t_start)

    def checkpoint(ep: int, step: int) -> None:
        states = [rng_state()]
        if _distributed() and world_size > 1:
            states = [None] * world_size
            dist.all_gather_object(states, rng_state())
        if is_rank0:
            save_checkpoint(ckpt_path, {
                "meta": meta, "config": cfg.to_dict(), "world_size": world_size,
                "model": raw.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epoch": ep, "step_in_epoch": step, "global_step": global_step,
                "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "budget": budget, "timed": timed,
                "train_s": trained_s + time.perf_counter() - t_start,
                "core_s": core_s(),
                # rank 0's process (its loader threads included) for every worker: ranks do equal work
                "cpu_s": trained_cpu_s + (time.process_time() - cpu_start) * world_size,
                "best_val": best_val, "last_val": last_val, "rng": states,
            })

    def summary(stopped: bool) -> dict[str, Any]:
        return {"best_val": best_val, "last_val": last_val, "global_step": global_step, "epochs": epoch,
                "stopped": stopped, "skipped_steps": skipped, "train_s": time.perf_counter() - t_start}

    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    while global_step < total_steps:
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        model.train()
        ep_loss, ep_rows = torch.zeros((), dtype=torch.float64, device=device), 0
        for i, batch in enumerate(train_loader):
            if i >= steps_per_epoch or global_step >= total_steps:
                break
            if i < step_in_epoch:  # resume mid-epoch: replay the epoch's order, skip what was done
                continue
            if before_step is not None:
                before_step(global_step)
            b = select(to_device(batch, device, dtype))
            rows = _rows(b)
            with autocast:
                loss = model(b)
            opt.zero_grad(set_to_none=True)
            (loss * _rank_weight(rows, world_size, device)).backward()
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            # After DDP's all-reduce the norm is the same on every rank, so all skip together.
            if torch.isfinite(norm):
                opt.step()
            else:
                skipped += 1
            sched.step()
            global_step += 1
            step_in_epoch = i + 1
            if (changed := gov.poll()) is not None:
                now = time.perf_counter()
                core_before, threads_since = core_before + (now - threads_since) * threads, now
                progress.write({"event": "threads", "step": global_step, "torch_threads": changed,
                                "other_cpus": round(gov.others, 2)})
                if is_rank0:
                    print(f"[{cfg.name}] other processes use {gov.others:.1f} of this process's CPUs: "
                          f"torch threads {threads} -> {changed}", file=sys.stderr, flush=True)
                threads = changed
            ep_loss += loss.detach().double() * rows
            ep_rows += rows
            if global_step % cfg.log_every == 0:
                progress.step(epoch, global_step, float(loss.detach()), sched.get_last_lr()[0], rows * world_size)
            else:
                progress.samples += rows * world_size
            if not timed and global_step - timing_from[0] == TIMING_STEPS:
                total_steps = _steps_for_time(cfg, global_step, timing_from, trained_s, device)
                sched, timed = one_cycle(opt, cfg, total_steps, global_step), True
                progress.total = total_steps
                if is_rank0:
                    print(f"[{cfg.name}] {cfg.budget()} budget: {total_steps} steps", file=sys.stderr, flush=True)
            if global_step % cfg.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                checkpoint(epoch, step_in_epoch)
            if cfg.max_steps is not None and global_step >= cfg.max_steps:
                return summary(stopped=True)
            if _STOP.signum is not None and world_size == 1:
                checkpoint(epoch, step_in_epoch)
                name = signal.Signals(_STOP.signum).name
                raise Stopped(_STOP.signum, f"[{cfg.name}] {name}: checkpoint written at step {global_step}; "
                                            "re-run the same command to resume")

        train_total, train_rows = _all_mean(float(ep_loss), float(ep_rows), device)
        train_loss = train_total / train_rows if train_rows else math.nan
        val_total, val_rows = _all_mean(*evaluate(raw, val_loader, device, dtype, _derived_seed(cfg.seed, rank, 7)),
                                        device)
        last_val = val_total / val_rows if val_rows else train_loss  # no validation split: track train loss
        improved = last_val < best_val
        if improved:
            best_val = last_val
            if is_rank0:
                save_best(raw, rundir.weights_in(out_dir))
        epoch += 1
        step_in_epoch = 0
        checkpoint(epoch, 0)
        metrics = {"epoch": epoch, "step": global_step, "train_loss": train_loss, "val_loss": last_val,
                   "best_val": best_val, "improved": improved, "skipped_steps": skipped,
                   "elapsed_s": time.perf_counter() - t_start}
        progress.write({"event": "epoch", **metrics})
        if is_rank0:
            print(f"[{cfg.name}] epoch {epoch}/{progress.epochs(total_steps)} train {train_loss:.4f} "
                  f"val {last_val:.4f} best {best_val:.4f}{' *' if improved else ''}", file=sys.stderr, flush=True)
        if report is not None:
            report(metrics)
    return summary(stopped=False)
