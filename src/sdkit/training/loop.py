"""The optimisation loop every stage shares, on accelerate, with exact save/resume.

A *stage* (``stages.VAEStage``, ``stages.UNetStage``) supplies the models, the batch of a given
``(step, rank)`` and the loss. This loop adds AdamW, warm-up + cosine learning rate, gradient
averaging across processes, gradient clipping, EMA, a progress bar, a JSONL loss log and
checkpoints.

Exact resume: everything random in a step (data, noise, timesteps) is drawn from generators
seeded by ``(seed, step, rank)``, so a step's batch does not depend on what ran before. A
checkpoint holds the weights, EMA, optimizer state, step and global RNG states (tensors in
safetensors, the rest in JSON: reading it cannot run code); a run resumed from it continues
bit-for-bit as an uninterrupted one.

Processes (``accelerate launch --num_processes N``) start from identical weights (same seed),
see different data (the rank is part of every seed), and average their gradients before each
step, so their weights stay identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ConfigError
from .ema import EMA
from .state import STATE_JSON, CheckpointError, load_state, save_state

CHECKPOINT = "checkpoint"
LEGACY_STATE_FILE = "training_state.pt"  # checkpoints before safetensors + JSON: read with weights_only=True
LOG_FILE = "log.jsonl"


def seed_for(*parts: int) -> int:
    """One 63-bit seed from integers such as (seed, step, rank): independent streams per tuple."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to lr * min_lr_ratio.

    Warm-up: lr * (step + 1) / warmup_steps; after it, half a cosine (Loshchilov & Hutter 2017).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _rng_states() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:])}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def save_checkpoint(out_dir, step, modules, optimizer, emas, config) -> str:
    """Write the whole training state to ``out_dir/checkpoint`` atomically (temp folder, then rename)."""
    final = os.path.join(out_dir, CHECKPOINT)
    tmp = os.path.join(out_dir, f".{CHECKPOINT}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {
        "step": step,
        "models": {name: m.state_dict() for name, m in modules.items()},
        "ema": {name: e.state_dict() for name, e in emas.items()},
        "optimizer": optimizer.state_dict(),
        "rng": _rng_states(),
        "config": dataclasses.asdict(config),
    }
    try:
        save_state(tmp, state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out_dir) -> dict | None:
    """The state saved by ``save_checkpoint`` in ``out_dir``, or None when there is none.

    Nothing in it is unpickled: the state is safetensors + JSON, and an older ``training_state.pt``
    is read with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
    values. A checkpoint that cannot be read is a CheckpointError naming it.
    """
    folder = os.path.join(out_dir, CHECKPOINT)
    if os.path.isfile(os.path.join(folder, STATE_JSON)):
        return load_state(folder)
    legacy = os.path.join(folder, LEGACY_STATE_FILE)
    if not os.path.isfile(legacy):
        return None
    try:
        return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as e:  # the safe unpickler raises UnpicklingError, RuntimeError, EOFError, ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "unsupported" in line.lower()), lines[0]).split(". ")[0]
        raise CheckpointError(f"cannot resume from {legacy}: torch.load(weights_only=True) refused it ({reason}); "
                              f"the file is damaged or holds objects that could run code. Delete it or pass "
                              f"--no-resume to start over") from None


def _resume(state, modules, emas, optimizer, folder) -> int:
    """Put a loaded checkpoint into the run; returns its step. A state that does not fit is a CheckpointError."""
    try:
        for name, m in modules.items():
            m.load_state_dict(state["models"][name])
        for name, e in emas.items():
            e.load_state_dict(state["ema"][name])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_states(state["rng"])
        step = state["step"]
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"cannot resume from {folder}: it does not fit this run ({type(e).__name__}: "
                              f"{reason}); delete it or pass --no-resume to start over") from None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"cannot resume from {folder}: its step {step!r} is not a whole number >= 0; "
                              f"delete it or pass --no-resume to start over")
    return step


def weights_digest(modules) -> list[int]:
    """First 8 bytes of the SHA-256 of every weight, in a fixed order: equal digests, equal weights."""
    h = hashlib.sha256()
    for name in sorted(modules):
        for key, value in sorted(modules[name].state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return list(h.digest()[:8])


def _truncate_log(path, step) -> None:
    """Drop log lines written after the checkpoint (a run killed between checkpoints logged them)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(lines)


def _average_gradients(params, accelerator) -> None:
    """Mean of every gradient over the processes (one flat all-reduce)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def make_accelerator():
    """An Accelerator that also spans CPU-only processes started by torchrun.

    ``accelerate launch --cpu --num_processes N`` starts N processes only through mpirun
    (accelerate issue #2741); ``accelerate launch --multi_gpu --num_processes N`` or
    ``torchrun --nproc_per_node N`` start them on any machine, and without a GPU they join here
    on the CPU ("gloo") backend.
    """
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ
    if (not launched and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
            and "MASTER_ADDR" in os.environ):  # what `accelerate launch --cpu --num_processes N>1` leaves
        warnings.warn("accelerate started one CPU process, not the --num_processes asked for (it needs "
                      "mpirun for that, accelerate issue #2741); training runs single-process. For N "
                      "processes use `accelerate launch --multi_gpu --num_processes N` or `torchrun "
                      "--nproc_per_node N`, which work without a GPU.", stacklevel=2)
    return Accelerator(cpu=launched and not torch.cuda.is_available())


def train(stage, config, out_dir, accelerator=None, resume=True, callback=None):
    """Run ``stage`` for ``config.steps`` optimizer steps (or until ``config.stop_at``).

    Resumes from ``out_dir/checkpoint`` when present (and ``resume``). When the last step is
    reached, calls ``stage.finish(out_dir)`` with the EMA weights in place. ``callback(step, logs)``
    runs after each step on every process; returning False stops the run (checkpoint written).
    Returns the dict of trained modules (holding the EMA weights once the run is finished).
    """
    accelerator = accelerator or make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    device = accelerator.device
    if config.batch_size % world:
        raise ConfigError(f"batch_size {config.batch_size} does not split evenly over {world} processes; "
                         f"use a multiple of {world}.")
    per_process = config.batch_size // world
    if hasattr(stage, "check_batch"):  # before anything is written
        stage.check_batch(per_process)
    os.makedirs(out_dir, exist_ok=True)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)

    with accelerator.main_process_first():
        stage.setup(out_dir, accelerator)
    torch.manual_seed(config.seed)  # identical initial weights on every process
    modules = {name: m.to(device).train() for name, m in stage.build_models().items()}
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, config.adam_beta2),
                                  weight_decay=config.weight_decay)
    emas = {name: EMA(m, config.ema_decay) for name, m in modules.items()} if config.ema_decay else {}

    step = 0
    state = load_checkpoint(out_dir) if resume else None
    if state is not None:
        step = _resume(state, modules, emas, optimizer, os.path.join(out_dir, CHECKPOINT))
        if main:
            _truncate_log(os.path.join(out_dir, LOG_FILE), step)
            tqdm.write(f"resumed {out_dir} at step {step}")

    end = config.steps if config.stop_at is None else min(config.stop_at, config.steps)
    log_path = os.path.join(out_dir, LOG_FILE)
    bar = tqdm(total=config.steps, initial=step, desc=stage.name, disable=not main, mininterval=5)
    started, stopped = time.time(), False
    while step < end:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.lr, config.warmup_steps, config.steps, config.min_lr_ratio)
        batch = stage.batch(step, rank, world, per_process, device)
        loss, logs = stage.loss(modules, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(params, accelerator)
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                     if config.max_grad_norm is not None else None)
        optimizer.step()
        step += 1
        for name, e in emas.items():
            e.update(modules[name], step)

        if step % config.log_every == 0 or step == end:
            mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
            record = {"step": step, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                      "grad_norm": None if grad_norm is None else float(grad_norm),
                      "seconds": round(time.time() - started, 2),
                      **{k: float(v) for k, v in logs.items()}}
            if config.log_indices:
                indices = accelerator.gather(batch["indices"].to(device).reshape(1, -1))
                record["indices"] = indices.tolist()  # one row per process
            if main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{mean_loss:.4f}")
        bar.update(1)
        if callback is not None and callback(step, {"loss": loss.detach()}) is False:
            stopped = True
        if step % config.save_every == 0 or step == end or stopped:
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(out_dir, step, modules, optimizer, emas, config)
            accelerator.wait_for_everyone()
        if stopped:
            break
    bar.close()
    if world > 1:  # the processes must agree on the weights; log each one's digest to show it
        digests = accelerator.gather(torch.tensor([weights_digest(modules)], device=device)).tolist()
        if main:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "weights_digest": digests}) + "\n")
        if any(d != digests[0] for d in digests):
            raise RuntimeError(f"processes ended with different weights (digests {digests}); "
                               f"the gradient averaging is broken.")

    if step >= config.steps:
        for name, e in emas.items():
            e.copy_to(modules[name])  # export the averaged weights
        for m in modules.values():
            m.eval()
        if main:
            stage.finish(modules, out_dir)
        accelerator.wait_for_everyone()
    return modules
