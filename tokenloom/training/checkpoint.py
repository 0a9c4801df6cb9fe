"""Atomic training checkpoints on top of ``accelerator.save_state``, and ``--resume latest``.

Layout under a run's checkpoint folder::

    checkpoints/checkpoint-00000200/   # accelerate's files (model, optimiser, RNG per rank, registered objects)
                                       # + run.json: the step and the run's fingerprint (config it was made with)
    checkpoints/.tmp-checkpoint-00000400/   # being written: never read

Every rank writes into the temporary folder (``save_state`` puts RNG states per rank there; several machines
need a shared file system), then the main process fsyncs every file and the folder and renames it to its final
name. ``rename`` is atomic on POSIX, so a folder named ``checkpoint-N`` is always complete: a run killed while
saving leaves only a ``.tmp-`` folder, which :func:`latest_checkpoint` ignores and the next save removes.

accelerate's own ``automatic_checkpoint_naming`` writes in place (a crash mid-save leaves a half-written
``checkpoint_N`` that a resume would pick up); that is why this module exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil

PATTERN = re.compile(r"^checkpoint-(\d+)$")
RUN_FILE = "run.json"


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``folder`` as ``(step, path)``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, n)) for n in os.listdir(folder) if (m := PATTERN.match(n))]
    return sorted(found)


def latest_checkpoint(folder: str) -> str | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, folder: str) -> str | None:
    """``None`` → None; ``"latest"`` → the newest complete checkpoint in ``folder`` (None if there is none yet:
    a fresh start); anything else must be an existing checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(folder)
    if not os.path.isfile(os.path.join(resume, RUN_FILE)):
        raise ValueError(f"resume={resume!r} is neither 'latest' nor a checkpoint folder (no {RUN_FILE} inside)")
    return resume


def save_checkpoint(accelerator, folder: str, step: int, run_info: dict, keep: int | None = 2) -> str:
    """``accelerator.save_state`` into ``folder/checkpoint-<step>``, atomically (see the module docstring).

    Must be called on every rank. ``keep``: how many complete checkpoints to keep (None = all).
    """
    name = f"checkpoint-{step:08d}"
    final, tmp = os.path.join(folder, name), os.path.join(folder, f".tmp-{name}")
    if accelerator.is_main_process:
        os.makedirs(folder, exist_ok=True)
        for stale in os.listdir(folder):
            if stale.startswith(".tmp-"):
                shutil.rmtree(os.path.join(folder, stale), ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, RUN_FILE), "w") as f:
            json.dump({"step": step, **run_info}, f, indent=1, sort_keys=True)
        _fsync_tree(tmp)
        if os.path.exists(final):  # the same step saved again (e.g. a resumed run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(folder)
        if keep is not None:
            for _, old in list_checkpoints(folder)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_run_info(path: str) -> dict:
    with open(os.path.join(path, RUN_FILE)) as f:
        return json.load(f)


def check_fingerprint(saved: dict, current: dict, path: str, allowed: tuple[str, ...] = ()) -> None:
    """Raise when the run being resumed was made with a different configuration (keys in ``allowed`` may
    differ). Both are flat ``{"section.key": value}`` dicts."""
    keys = sorted((set(saved) | set(current)) - set(allowed))
    diff = [k for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]
    if diff:
        lines = [f"  {k}: checkpoint {saved.get(k, '<absent>')!r} vs now {current.get(k, '<absent>')!r}"
                 for k in diff[:10]]
        raise ValueError(f"cannot resume from {path}: the configuration differs from the one it was saved with\n"
                         + "\n".join(lines) + "\n(start a new output folder, or resume with the original config)")


def flatten(cfg: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists/tuples become lists, so JSON round trips compare equal)."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return json.loads(json.dumps(out, default=str))


__all__ = ["check_fingerprint", "flatten", "latest_checkpoint", "list_checkpoints", "read_run_info",
           "resolve_resume", "save_checkpoint"]
