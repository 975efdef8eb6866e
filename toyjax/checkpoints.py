"""Orbax checkpoints of a run: params and optimizer state as separate items, so plain orbax reads the params.

    WORKDIR/checkpoints/<step>/params      <- ocp.StandardCheckpointer().restore(this) gives the param dict
    WORKDIR/checkpoints/<step>/opt_state
    WORKDIR/checkpoints/<step>/meta        <- JSON: step and the config that wrote it

Arrays split over a device mesh are saved in pieces and restored into whatever shardings the caller's `params_like`
asks for (one device when it gives none), so the device count may change between saving and restoring.
Orbax writes each step into a temporary folder and renames it when complete, so a step is never half written.
A step that is present but unreadable (corrupted on disk) is named in a warning and the previous one restores.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

absl_logging.set_verbosity(absl_logging.ERROR)  # orbax logs every save and read-only open at WARNING


class CheckpointError(RuntimeError):
    """No checkpoint in a folder could be restored."""


# What reading a damaged step raises (found by garbling, truncating and deleting a step's files): tensorstore's
# errors arrive as ValueError with a status (DATA_LOSS, OUT_OF_RANGE, NOT_FOUND), a garbled JSON file as
# json.JSONDecodeError (a ValueError), a deleted file as FileNotFoundError, a deleted item folder as KeyError.
# Anything else (TypeError, AttributeError, ...) is a bug and surfaces.
DAMAGED_STEP_ERRORS = (ValueError, OSError, KeyError)


class Checkpoints:
    def __init__(self, directory: str | Path, *, keep: int = 3, read_only: bool = False):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=False)
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        args = ocp.args.Composite(params=ocp.args.StandardSave(params),
                                  opt_state=ocp.args.StandardSave(opt_state),
                                  meta=ocp.args.JsonSave({"step": int(step), **meta}))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def _restore_step(self, step: int, params_like, opt_state_like):
        items = {"params": ocp.args.StandardRestore(_abstract(params_like)) if params_like is not None
                 else ocp.args.StandardRestore(),
                 "meta": ocp.args.JsonRestore()}
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["params"], restored.get("opt_state") if opt_state_like is not None else None, restored["meta"]

    def restore(self, step: int | None = None, *, params_like=None, opt_state_like=None):
        """Returns (step, params, opt_state, meta) from `step`, else the newest step that restores cleanly.

        params_like / opt_state_like: pytrees with the expected structure and shapes (None: params as saved,
        optimizer state skipped). A shape or structure mismatch is an error naming the checkpoint; an unreadable
        step is named in a warning and the previous step is tried.
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        if not candidates:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        failures = []
        for candidate in candidates:
            path = self.directory / str(candidate)
            try:
                stored = self.manager.item_metadata(candidate)["params"]
                stored = getattr(stored, "tree", stored)
                if not jax.tree.leaves(stored):
                    raise ValueError("its parameter metadata is missing or empty")
            except DAMAGED_STEP_ERRORS as err:
                failure = _describe(err)
            else:
                if params_like is not None:
                    _check_same_shapes(path, stored, params_like)
                try:
                    params, opt_state, meta = self._restore_step(candidate, params_like, opt_state_like)
                    return candidate, params, opt_state, meta
                except DAMAGED_STEP_ERRORS as err:
                    failure = _describe(err)
            failures.append(f"{path}: {failure}")
            warnings.warn(f"checkpoint {path} is corrupted or unreadable ({failure}); trying the previous step",
                          stacklevel=2)
        raise CheckpointError("no checkpoint could be restored:\n  " + "\n  ".join(failures))


def _check_same_shapes(path: Path, stored, expected) -> None:
    """Raises CheckpointError listing parameters whose names or shapes differ from the saved ones."""
    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(k): tuple(getattr(v, "shape", ())) for k, v in leaves}

    saved, wanted = shapes(stored), shapes(expected)
    problems = [f"{name}: saved {saved[name]}, model wants {wanted[name]}"
                for name in sorted(saved.keys() & wanted.keys()) if saved[name] != wanted[name]]
    problems += [f"{name}: missing from the checkpoint" for name in sorted(wanted.keys() - saved.keys())]
    problems += [f"{name}: in the checkpoint but not in the model" for name in sorted(saved.keys() - wanted.keys())]
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match this model:\n  " + "\n  ".join(problems[:10]))


def _abstract(tree):
    """Returns the restore target: shapes, dtypes and where each array goes (this process's first device if unsaid).

    The sharding comes from the target, never from the checkpoint, so a run saved on 8 devices restores on 1 or 2.
    """
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(leaf):
        leaf = ocp.utils.to_shape_dtype_struct(leaf)
        return leaf if leaf.sharding is not None else jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=here)

    return jax.tree.map(target, tree)


def _describe(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]

