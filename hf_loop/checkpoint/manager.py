"""A run's checkpoints: which stateful object goes into which file, when to save, and what to resume from.

A checkpoint is a step folder (see ``store.py``) holding

- ``model.pt``, ``optimizer.pt``: the model's and optimizer's state dicts, keyed by parameter name (written by
  rank 0; DDP replicas are identical), or, for a model sharded with FSDP2, ``dcp/``: their torch Distributed
  Checkpoint (one shard file per rank, loadable on any world size, or into a plain model),
- ``train.pt``: the train state, scheduler, GradScaler and the settings that shape the trajectory,
- ``rank-00000.pt``, ``rank-00001.pt``, ...: each rank's loader position and RNG states,

and a manifest with every file's size and sha256. Every object saves itself (``state_dict``) and loads itself
(``load_state_dict``); the :class:`Checkpointer` only decides files, timing and checks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hf_loop.checkpoint import store
from hf_loop.checkpoint.identity import check_identity
from hf_loop.checkpoint.layout import Manifest, step_folder
from hf_loop.checkpoint.lock import OutDirLock
from hf_loop.dist import DistEnv
from hf_loop.errors import CheckpointError
from hf_loop.fsdp import (
    background_group,
    is_sharded,
    load_sharded,
    load_state_dicts,
    save_sharded,
    save_sharded_async,
    sharded_files,
    state_dicts,
)

logger = logging.getLogger("hf_loop")

WEIGHTS = {"model": "model.pt", "optimizer": "optimizer.pt"}  # a plain or DDP model's state (rank 0 writes)
SHARDED = "dcp"  # a sharded model's and optimizer's Distributed Checkpoint (every rank writes its shards)
TRAIN_FILE = "train.pt"
TRAIN_KEYS = ("train_state", "scheduler", "scaler")
PER_RANK = ("loader", "rng")


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


class Checkpointer:
    """Saves a run's stateful objects every ``checkpoint_every`` steps (or when forced) and restores them.

    Args:
        config: the run's ``TrainConfig`` (``out_dir``, ``checkpoint_every``, ``keep_last``, ``resume_allow``).
        env: the process's place in the job: rank 0 writes shared files, every rank its own.
        states: name -> object with ``state_dict``/``load_state_dict`` (``model``, ``optimizer``, ``scheduler``,
            ``scaler``, ``loader``, ``train_state``, ``rng``); None values are skipped. The loop may add one later
            (the scheduler, once the run length is known).
        identity: what this run's checkpoints record and a resume must match (``identity.run_identity``).
        finite: called (on every rank) before each save; False refuses to persist a diverged model.

    Example:
        >>> from hf_loop.checkpoint import run_identity
        >>> from hf_loop.feed import Feed
        >>> from hf_loop.state import RandomState, TrainState
        >>> config = hl.TrainConfig(out_dir="runs/a", checkpoint_every=100)
        >>> states = {"model": model, "optimizer": optimizer, "loader": Feed(loader, env, grad_accum=1),
        ...           "train_state": TrainState(), "rng": RandomState()}
        >>> checkpoints = Checkpointer(config, env, states, identity=run_identity(model, loader, optimizer),
        ...                            finite=lambda: True)
        >>> checkpoints.restore() is None           # the newest checkpoint that verifies: none yet
        True
        >>> checkpoints.save(step=100)              # due: a step folder under out_dir/checkpoints
        PosixPath('runs/a/checkpoints/step-00000100')
        >>> sorted(checkpoints.restore())           # the saved states, applied with checkpoints.apply(...)
        ['config', 'loader', 'model', 'optimizer', 'rng', 'scaler', 'scheduler', 'train_state']
    """

    def __init__(self, config: Any, env: DistEnv, states: dict[str, Any], *, identity: Mapping[str, Any],
                 finite: Callable[[], bool]) -> None:  # fmt: skip
        self.config, self.env, self.states = config, env, states
        self.identity = dict(identity)
        self.finite = finite
        self.path: Path | None = None  # the newest checkpoint of this run (written or resumed from)
        self.fresh_optimizer = False
        self._writing: tuple[store.Begun, Any] | None = None  # a checkpoint written in the background
        self._group: Any = None  # the gloo group background writes coordinate over
        self.resumed_from: Path | None = None
        self.saved_step = -1

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``out_dir`` for this run (rank 0): a second live run on it is refused."""
        if self.config.out_dir is None or not self.env.is_main:
            yield
            return
        Path(self.config.out_dir).mkdir(parents=True, exist_ok=True)
        with OutDirLock(self.config.out_dir):
            yield

    # -- resume --------------------------------------------------------------------------------------------

    def restore(self) -> dict[str, Any] | None:
        """Read and verify the newest usable checkpoint (a damaged one is skipped with a warning).

        Returns the saved states by name (this rank's loader and RNG), without applying them: the loop applies
        the position first (``apply``), builds what depends on the run length, then applies the rest.

        Raises:
            CheckpointError: the checkpoint belongs to another model, dataset or optimizer, or a stream's
                positions would have to move to another world size.
        """
        if self.config.out_dir is None:
            return None
        found = store.load_newest(self.config.out_dir, self.env, self._read)
        if found is None:
            return None
        self.path, manifest, loaded = found
        self.resumed_from = self.path
        check_identity(manifest.identity, self.identity, self.path, allow=self.config.resume_allow)
        saved_world = manifest.world_size
        if saved_world != self.env.world_size and loaded["loader"].get("kind") == "stream":
            raise CheckpointError(
                f"checkpoint {self.path} was written by {saved_world} processes and this run has "
                f"{self.env.world_size}; a stream's shard positions cannot be redistributed. Resume with "
                f"--nproc_per_node={saved_world} (the same world size), or use another out_dir."
            )
        self.fresh_optimizer = manifest.identity["optimizer"] != self.identity["optimizer"]
        if self.fresh_optimizer:  # allowed by resume_allow: a new optimizer class starts fresh
            loaded.pop("optimizer", None)
            logger.warning("resuming %s with a fresh %s (its optimizer state is not loaded)", self.path,
                           self.identity["optimizer"]["class"])  # fmt: skip
        self.saved_step = loaded["train_state"]["step"]
        return loaded

    def _read(self, folder: Path, manifest: Manifest) -> dict[str, Any]:
        own = manifest.world_size == self.env.world_size
        sharded = sorted(name for name in manifest.files if name.startswith(f"{SHARDED}/"))
        if sharded:  # read by Distributed Checkpoint when applied; the ranks share the checks out
            mine = sharded[self.env.rank :: self.env.world_size]
            if mine:
                store.verify(folder, mine, manifest=manifest)
            loaded: dict[str, Any] = {"sharded": folder / SHARDED}
        else:
            loaded = {name: store.read(folder, file, manifest=manifest) for name, file in WEIGHTS.items()}
        loaded.update(store.read(folder, TRAIN_FILE, manifest=manifest))
        loaded.update(store.read(folder, rank_file(self.env.rank if own else 0), manifest=manifest))
        return loaded

    def apply(self, loaded: Mapping[str, Any], names: tuple[str, ...] | None = None) -> None:
        """Load saved states into this run's objects (all of them, or ``names``)."""
        for name in names if names is not None else list(self.states):
            target = self.states.get(name)
            if name in WEIGHTS or target is None or loaded.get(name) is None:
                continue
            target.load_state_dict(loaded[name])
        if names is None:
            self._load_weights(loaded)
        if names is None:
            now = self.config.fingerprint()
            changed = {k: (v, now.get(k)) for k, v in loaded["config"].items() if now.get(k) != v}
            if changed and self.env.is_main:
                logger.warning("resuming %s with changed settings (saved -> now): %s", self.path, changed)

    def folder(self, step: int | None) -> Path | None:
        """The folder of the checkpoint at ``step`` (None without ``out_dir`` or step)."""
        if self.config.out_dir is None or step is None:
            return None
        return step_folder(self.config.out_dir, step)

    # -- save ----------------------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        every = self.config.checkpoint_every
        return self.config.out_dir is not None and bool(every) and step % every == 0

    def save(self, step: int, *, force: bool = False) -> Path | None:
        """Write a checkpoint at ``step`` when it is due (or ``force``) and not written yet; all ranks call it.

        Raises:
            FloatingPointError: the model diverged (a non-finite loss or parameter): no checkpoint is written,
                so the newest one on disk stays finite.
        """
        if self.config.out_dir is None or step == self.saved_step or not (force or self.due(step)):
            return None
        if not self.finite():
            raise FloatingPointError(
                f"training diverged by step {step} (a non-finite loss or parameter); no checkpoint was written, "
                f"so the newest one ({self.path}) stays usable. Lower the learning rate, or set "
                "TrainConfig(max_bad_steps=N) to skip such steps"
            )
        self.wait()  # a checkpoint still being written in the background completes first
        train_state = self.states["train_state"]
        train_state.position = self.states["loader"].position()
        begun = store.begin(self.config.out_dir, step, self.env, identity=self.identity,
                            extra={"train_state": train_state.state_dict()})  # fmt: skip
        failure, background = begun.problem, None
        if failure is None:
            try:
                background = self._fill(begun.pending)
            except (
                BaseException
            ) as exc:  # every rank must reach publish's agreement, or the others would hang
                failure = exc
        self.saved_step = step
        if background is not None:
            self._writing = (begun, background)
            return begun.final
        return self._publish(begun, failure)

    def wait(self) -> None:
        """Complete the checkpoint being written in the background, if any (every rank calls it)."""
        if self._writing is None:
            return
        (begun, background), self._writing = self._writing, None
        failure = None
        try:
            background.result()
            self._register_sharded(begun.pending)
        except BaseException as exc:
            failure = exc
        self._publish(begun, failure)

    def _publish(self, begun: store.Begun, failure: BaseException | None) -> Path:
        self.path = store.publish(begun, self.env, failure)
        if self.env.is_main:
            best = self.states["train_state"].best_step
            keep = [step_folder(self.config.out_dir, best)] if best is not None else []
            store.prune(self.config.out_dir, self.config.keep_last, keep=keep)
        return self.path

    def _fill(self, pending: Any) -> Any:
        """Write this rank's files; returns the future of a background write, or None."""
        states = self.states
        background = self._save_weights(pending)
        if self.env.is_main:
            train = {k: states[k].state_dict() if states.get(k) is not None else None for k in TRAIN_KEYS}
            pending.save(TRAIN_FILE, {**train, "config": self.config.fingerprint()})
        pending.save(rank_file(self.env.rank), {k: states[k].state_dict() for k in PER_RANK})
        return background

    # -- model and optimizer: one state-dict format for plain, DDP and sharded models ------------------------

    def _save_weights(self, pending: Any) -> Any:
        model, optimizer = self.states["model"], self.states["optimizer"]
        if not is_sharded(model):
            if self.env.is_main:
                model_state, optim_state = state_dicts(model, optimizer, full=False)
                pending.save(WEIGHTS["model"], model_state)
                pending.save(WEIGHTS["optimizer"], optim_state)
            return None
        model_state, optim_state = state_dicts(model, optimizer, full=False)
        state, folder = {"model": model_state, "optimizer": optim_state}, pending.folder / SHARDED
        if self.config.async_checkpoint:
            if self._group is None:
                self._group = background_group()
            return save_sharded_async(state, folder, self._group)
        save_sharded(state, folder)
        self._register_sharded(pending)
        return None

    def _register_sharded(self, pending: Any) -> None:
        for path in sharded_files(pending.folder / SHARDED, self.env.rank):  # each rank hashes what it wrote
            pending.add(f"{SHARDED}/{path.name}")

    def _load_weights(self, loaded: Mapping[str, Any]) -> None:
        model, optimizer = self.states["model"], self.states["optimizer"]
        with_optimizer = "optimizer" in loaded or "sharded" in loaded and not self.fresh_optimizer
        if "sharded" not in loaded:  # full state dicts: a sharded model takes its shards of them
            load_state_dicts(model, optimizer if "optimizer" in loaded else None, loaded["model"],
                             loaded.get("optimizer"), full=is_sharded(model))  # fmt: skip
            return
        model_state, optim_state = state_dicts(model, optimizer, full=False)  # templates: shapes and shards
        state = {"model": model_state, "optimizer": optim_state} if with_optimizer else {"model": model_state}
        load_sharded(state, loaded["sharded"])
        load_state_dicts(model, optimizer if with_optimizer else None, state["model"], state.get("optimizer"),
                         full=False)  # fmt: skip
