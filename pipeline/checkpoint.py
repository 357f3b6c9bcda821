"""Checkpoints: what a training step leaves behind, how it is written, when, and how it is read back.

A checkpoint is one folder holding `state.pt`: the model's full weights, the step (which is also the data
position and the learning-rate schedule's state, see `pipeline.dataset.TrainRows`), the RNG state and the
model config, so that `gss eval` and the MLflow registration load a checkpoint folder on its own; and the
optimizer state, in `state.pt` too, or, for a model sharded with FSDP2 (`train.fsdp`), model and optimizer
in `shards/`, a `torch.distributed.checkpoint` folder to which every rank writes its own shard (it reloads
onto any number of workers, sharded or not). Every rank hands its folder to Ray Train (`ray.train.report`),
which copies them into one folder of the run's storage (local or gs://) and registers it only once every
rank's part is there; `load` reads with `weights_only=True`.

Verified before use: each rank that writes files lists them (size and sha256) in `contents-rank-NNNNN.json`,
written last, after its data; rank 0's list also says how many ranks' lists make the whole checkpoint. `restore`
checks the lists first (`damage`), so a checkpoint cut short by a full disk or a copy that stopped is found
before anything loads, and `Checkpointer.restore` goes back to the newest whole checkpoint that Ray Train keeps
(`train.keep_checkpoints`), or to step 0, instead of failing on it once per worker-group restart.

When: every `train.checkpoint_every` steps, every `train.checkpoint_minutes` minutes, at the last step, and at
the first step after a worker is told to go (a SIGTERM, e.g. a Spot VM's preemption, or Ray Train's own
preemption notice), so that a preempted run loses no step (`Checkpointer`).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from pipeline.storage import filesystem, join, local_free_bytes

STATE = "state.pt"
SHARDS = "shards"
CONTENTS, ALL_CONTENTS = "contents-rank-{rank:05d}.json", "contents-rank-*.json"
VERIFY_CHUNK = 2**24  # bytes hashed at a time: a checkpoint file may be larger than the memory left
ROOM_BESIDE = 2**20  # what Ray Train writes beside a checkpoint (its snapshot, the lease's heartbeat): a margin


class UnreadableCheckpoint(RuntimeError):
    """A checkpoint folder that does not hold what it says it holds (cut short, changed), or does not load."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile and DDP wrappers (an FSDP2 model is its own module)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def save(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
         model_config: dict[str, Any], rank: int) -> None:
    """Write this rank's part of the checkpoint into `folder` (every rank calls it). Rank 0 writes `state.pt`
    under a temporary name first, so a reader never sees half a file; a sharded model's ranks also write their
    shards, and gather the full weights onto rank 0's CPU for `state.pt`."""
    state = {"step": step, "rng": torch.get_rng_state(), "model_config": model_config}
    if is_sharded(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        model_state, optimizer_state = get_state_dict(unwrap(model), optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(folder, SHARDS))
        state["model"] = get_model_state_dict(unwrap(model),
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif rank == 0:
        state.update(model=unwrap(model).state_dict(), optimizer=optimizer.state_dict())
    if rank == 0:
        tmp = os.path.join(folder, STATE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(folder, STATE))
    if os.listdir(folder):
        _write_contents(folder, rank, dist.get_world_size() if is_sharded(model) else 1)


def _write_contents(folder: str, rank: int, parts: int) -> None:
    """List this rank's files in `folder` (all of them: each rank writes into a folder of its own, which Ray Train
    merges with the others' in storage), after they are written. Rank 0's list says how many lists there are."""
    files = {os.path.relpath(path, folder): _file_record(path) for path in _files(folder)}
    contents = {"files": files, **({"parts": parts} if rank == 0 else {})}
    with open(os.path.join(folder, CONTENTS.format(rank=rank)), "w") as f:
        json.dump(contents, f, indent=1)


def _files(folder: str) -> list[str]:
    """Every file under `folder`, sorted."""
    return [path for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)) if os.path.isfile(path)]


def _file_record(path: str) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(VERIFY_CHUNK):
            digest.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def damage(folder: str) -> str | None:
    """What is wrong with the checkpoint in `folder`, in a few words; None if it is whole: every rank's contents
    list is there and every file it names has its size and sha256. A folder written before the lists existed
    has none and passes (loading it is its only test)."""
    listed = glob.glob(os.path.join(folder, ALL_CONTENTS))
    if not listed:
        return None
    try:
        lists = {path: _read_json(path) for path in listed}
    except (OSError, ValueError) as e:
        return f"a contents list does not read ({e})"
    first = lists.get(os.path.join(folder, CONTENTS.format(rank=0)))
    if first is None or len(lists) != first["parts"]:
        return f"{len(lists)} of {first['parts'] if first else '?'} ranks' contents lists are there"
    for contents in lists.values():
        for name, expected in contents["files"].items():
            if problem := _file_damage(folder, name, expected):
                return problem
    return None


def _file_damage(folder: str, name: str, expected: dict[str, Any]) -> str | None:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return f"{name} is missing"
    if os.path.getsize(path) != expected["bytes"]:
        return f"{name} holds {_size(os.path.getsize(path))} of {_size(expected['bytes'])}"
    if _file_record(path)["sha256"] != expected["sha256"]:
        return f"{name} differs from what was written (sha256)"
    return None


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{n:,} bytes"


def restore(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a checkpoint folder into model and optimizer, as they are after `Backend.wrap`; returns its state.
    Shards go through `torch.distributed.checkpoint`, which reshards them for this run's workers. Raises
    UnreadableCheckpoint, before anything is loaded, for a folder that is not whole (`damage`)."""
    problem = damage(folder)
    if problem:
        raise UnreadableCheckpoint(problem)
    state = load(folder)
    shards = os.path.join(folder, SHARDS)
    if os.path.isdir(shards):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(unwrap(model), optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=shards)
        set_state_dict(unwrap(model), optimizer, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optimizer"])
    elif is_sharded(model):
        raise ValueError(f"{folder} was written without train.fsdp (one file, no shards): resume it with "
                         "train.fsdp=false, or start a new run name")
    else:
        older = older_model(state["model"], unwrap(model))
        if older:
            raise ValueError(f"{folder} was written {older}: its weights load (gss eval, generate, export), its "
                             "optimizer state does not; resume it with that code, or start a new run name")
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    return state


def older_model(weights: dict[str, Any], model: torch.nn.Module) -> str | None:
    """When `weights` are of an older version of `model`, which (models/ loads their weights, not an optimizer's
    state for other parameters); else None."""
    if any(key.endswith(".to_ssm.weight") for key in weights):
        return "before GSS's input projections became one (commit da38185 or earlier)"
    if any(key.endswith(".log_dt") and key not in weights for key in model.state_dict()):
        return "before DSS learned its step (commit 1678b3f or earlier)"
    return None


def load(folder: str) -> dict[str, Any]:
    """A local checkpoint folder's state (tensors on the CPU); UnreadableCheckpoint if the file does not load."""
    try:
        return torch.load(os.path.join(folder, STATE), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # what a cut or changed zip file gives
        raise UnreadableCheckpoint(f"{STATE} does not load ({' '.join(str(e).split())[:200]})") from None


def read(url: str) -> dict[str, Any] | None:
    """The state of a checkpoint folder anywhere fsspec reaches (local, gs://); None if it holds no checkpoint.
    Checked against rank 0's contents list where there is one (UnreadableCheckpoint)."""
    fs, path = filesystem(url)
    if not fs.exists(join(path, STATE)):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        fs.get(join(path, STATE), os.path.join(tmp, STATE))
        listed = join(path, CONTENTS.format(rank=0))
        expected = json.loads(fs.cat_file(listed))["files"][STATE] if fs.exists(listed) else None
        if expected and (problem := _file_damage(tmp, STATE, expected)):
            raise UnreadableCheckpoint(problem)
        return load(tmp)


STOP = threading.Event()
"""Set in a training worker by a SIGTERM (see `_stop_on_sigterm`): checkpoint at the next step, then stop."""

NOTICE_POLL_S = 1.0
"""How often (rank 0's clock) the workers ask Ray Train whether one of their nodes is being preempted; Ray's
own watcher looks every 5 s, and the question costs a round trip to an actor, so not every step."""


class Stopped(RuntimeError):
    """Raised on every rank right after the checkpoint a SIGTERM asked for. Ray Train counts it as a worker
    failure (against `train.max_failures`) and restarts the worker group from that checkpoint wherever it can
    place it, while the driver waits in the same `fit()`, so the run goes on in the same MLflow run."""


class Timer:
    """Rank 0's clock: whether a time-based checkpoint (every `minutes`; 0: never) or a look at Ray Train's
    preemption notice (every `NOTICE_POLL_S`) is due."""

    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic):
        self.minutes, self.clock = minutes, clock
        self.last_save = self.last_look = clock()

    def save_due(self) -> bool:
        return self.minutes > 0 and self.clock() - self.last_save >= 60 * self.minutes

    def saved(self) -> None:
        """A checkpoint was written (for whatever reason): the next time-based one is `minutes` from now."""
        self.last_save = self.clock()

    def look_due(self) -> bool:
        now = self.clock()
        if now - self.last_look < NOTICE_POLL_S:
            return False
        self.last_look = now
        return True


class Checkpointer:
    """Restores a worker from Ray Train's latest checkpoint and saves one at steps every rank agrees on.

    It saves every `every` steps, at the last step, every `minutes` minutes of rank 0's clock (0: never), and
    at the first step after any worker got a SIGTERM (then every rank stops, see `Stopped`) or Ray Train's
    preemption notice (then training goes on until the node is taken; Ray Train restarts the group itself and
    counts that against `FailureConfig.max_preemption_failures`). Every rank calls `should_save` once per step
    and `save` at the steps it says (Ray Train's report is collective). The ranks
    agree through one MAX all-reduce of three CPU ints per step over gloo: no device sync. Rank 0 writes the
    state; under FSDP2 every rank writes its shard too (see `save`).

    The SIGTERM handler only sets `STOP`: it runs on the worker process's main thread, while Ray Train runs the
    train function, and so this, in a thread of its own.
    """

    def __init__(self, every: int, last_step: int, rank: int, model_config: dict[str, Any], run_dir: str,
                 minutes: float = 0.0, validate_every: int = 0):
        import ray.train

        self.every, self.last_step, self.rank, self.model_config = every, last_step, rank, model_config
        self.run_dir = run_dir  # where Ray Train puts the checkpoints: rank 0 checks it has room for the next
        self.no_room: str | None = None  # why `save` could not write the checkpoint (a full disk), on every rank
        self.validate_every = validate_every  # every n-th step-based checkpoint and the last go to Ray's validation
        self.timer = Timer(minutes)
        self.ranks = _Ranks(ray.train.get_context().get_world_size())
        self.stopping = False  # a worker got SIGTERM: stop after this step's save
        self.noticed = False  # Ray Train's preemption notice came (and was saved for): it is not asked again
        self.skipped: list[str] = []  # `restore`'s lines on the checkpoints it could not use, for the user
        _on_main_thread(_stop_on_sigterm)

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Load the newest whole checkpoint of this run, if any, into model and optimizer; returns its step (or 0).
        Each one skipped on the way, Ray Train's latest first, is a line in `skipped` (every rank reads the same
        files, so every rank skips the same ones)."""
        saved = _saved_checkpoints()
        for checkpoint, step in saved:
            with checkpoint.as_directory() as folder:
                try:
                    state = restore(folder, model, optimizer)
                except UnreadableCheckpoint as e:
                    self.skipped.append(f"the checkpoint of step {step} ({checkpoint.path}) is unreadable ({e}): "
                                        "training goes on from the newest whole one")
                    continue
            torch.set_rng_state(state["rng"])
            return state["step"]
        if saved:
            self.skipped.append("no whole checkpoint is left: training starts again from step 0")
        return 0

    def should_save(self, step: int) -> bool:
        """Whether to save after optimizer step `step`: the same answer on every rank (call it once per step)."""
        lead = self.rank == 0
        stop, time_due, look = self.ranks.max([STOP.is_set(), lead and self.timer.save_due(),
                                               lead and self.timer.look_due()])
        notice = bool(look) and not self.noticed and _preemption_notice()  # `look` is agreed: every rank asks
        self.noticed |= notice
        self.stopping = bool(stop)
        return self.stopping or bool(time_due) or notice or step % self.every == 0 or step == self.last_step

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             metrics: dict[str, float]) -> bool:
        """Write the state of `step` and report it to Ray Train with `metrics` (every rank calls it); False, on
        every rank, if a disk had no room for it (`no_room` says which): nothing is reported and nothing
        half-written is left, and the workers stop rather than spend Ray Train's restarts on a disk still full.

        After a save that a SIGTERM asked for (and before the last step), raises `Stopped` on every rank, once
        every rank has reported: Ray Train registers a checkpoint only when all ranks have reported it.
        """
        import ray.train

        validate = self.validate_every > 0 and (step == self.last_step
                                                or step % (self.every * self.validate_every) == 0)
        with tempfile.TemporaryDirectory() as folder:
            try:
                save(folder, model, optimizer, step, self.model_config, self.rank)
                no_room = self._no_room_for(folder, is_sharded(model))
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                no_room = f"the worker's temporary folder {os.path.dirname(folder)} is full ({e.strerror})"
            if self.ranks.max([no_room is not None])[0]:
                self.no_room = no_room or "another worker's temporary folder is full"
                return False
            checkpoint = ray.train.Checkpoint.from_directory(folder) if os.listdir(folder) else None
            ray.train.report({"step": step, **metrics}, checkpoint=checkpoint, validation=validate and bool(checkpoint))
        self.timer.saved()
        if self.stopping and step < self.last_step:
            self.ranks.max([0])  # a barrier: every rank's report is queued before any rank stops
            raise Stopped(f"a worker got SIGTERM: stopped after saving the checkpoint of step {step}, "
                          "for Ray Train to restart the workers from it")
        return True

    def _no_room_for(self, folder: str, sharded: bool) -> str | None:
        """(Rank 0, a local run folder.) Why the run folder's disk cannot take the checkpoint in `folder`, or None:
        checked before Ray Train copies it there, so that a full disk leaves no half-copied checkpoint. Under
        FSDP2 every rank's part is about this size."""
        free = local_free_bytes(self.run_dir) if self.rank == 0 else None
        if free is None:
            return None
        need = sum(map(os.path.getsize, _files(folder))) * (dist.get_world_size() if sharded else 1) + ROOM_BESIDE
        if free >= need:
            return None
        return f"the disk holding {self.run_dir} has {_size(free)} free, and the checkpoint needs {_size(need)}"


def _saved_checkpoints() -> list[tuple[Any, int]]:
    """(checkpoint, step) of each checkpoint Ray Train keeps for this run: its latest first, then the others,
    newest step first."""
    import ray.train
    from ray.train import CheckpointConsistencyMode

    latest = ray.train.get_checkpoint()
    if not latest:
        return []
    reported = ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
    return sorted(((r.checkpoint, r.metrics["step"]) for r in reported),
                  key=lambda saved: (saved[0].path != latest.path, -saved[1]))


class _Ranks:
    """The training workers, for a MAX all-reduce of a few CPU ints over gloo: a network round trip or two, no
    device sync."""

    def __init__(self, world: int):
        self.group = None if world == 1 else _gloo_group()

    def max(self, values: list[int | bool]) -> list[int]:
        """The element-wise maximum of `values` over the ranks (every rank calls it)."""
        flags = torch.tensor(values, dtype=torch.int32)
        if self.group is not None:
            self.group.allreduce([flags], op=dist.ReduceOp.MAX).wait()
        return flags.tolist()


def _gloo_group() -> dist.ProcessGroup:
    """A gloo group of all workers, made once (every rank calls it): the default process group where that is
    gloo (cpu; xla, whose Ray backend sets one up beside SPMD), a new gloo group beside NCCL (cuda)."""
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _preemption_notice() -> bool:
    """Whether Ray Train knows that a node of this worker group is being preempted: its watcher saw the node
    drained (by Ray's autoscaler, or `ray drain-node --reason=DRAIN_NODE_REASON_PREEMPTION`). A barrier over
    the workers through an actor; the answer is rank 0's, so every rank gets the same."""
    import ray.train

    return ray.train.get_preemption_info() is not None


def _on_main_thread(fn: Callable[[], None]) -> None:
    """Run `fn` on this worker process's main thread, the only one that may set a signal handler. Ray Train v2
    runs the train function in a thread of its own ("TrainingThread"); the worker actor's own methods, such as
    `execute`, run on the main thread, which stays free between Ray Train's status polls."""
    import ray

    ray.get(ray.get_runtime_context().current_actor.execute.remote(fn))


def _stop_on_sigterm() -> None:
    """(On the main thread.) The first SIGTERM sets STOP and hands SIGTERM back to Ray's own handler (it ends
    the process), so that a second SIGTERM still ends a worker at once. Ray's main thread runs Python signal
    handlers within milliseconds (its task loop checks for signals every few ms)."""
    ray_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        STOP.set()
        signal.signal(signal.SIGTERM, ray_handler)

    signal.signal(signal.SIGTERM, on_sigterm)
