"""Checkpoints: config + item map + weights in one file, written atomically, read with
``torch.load(..., weights_only=True)`` (only tensors and plain Python containers inside)."""
from __future__ import annotations

import os
import stat
import tempfile

import torch

from .data import RecsysError
from .model import GRU4Rec

FORMAT = "rnnrec_fast.recsys.GRU4Rec"
VERSION = 1


def save_checkpoint(model: GRU4Rec, path: str, extra: dict | None = None) -> None:
    """Save ``model`` to ``path`` atomically (temporary file in the same folder + os.replace)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config(),
        "item_ids": list(model.item_ids),
        "state_dict": state,
        "extra": dict(extra or {}),
    }
    folder = check_save_path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        # mkstemp's file is owner-only (0600): give it the mode a plain open() would (a checkpoint
        # replaced keeps its own), so that a serving account can read what a training one saved
        os.fchmod(fd, _file_mode(path))
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _file_mode(path: str) -> int:
    """The permission bits of the file at ``path``, or for a new file 0o666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mask = os.umask(0o022)  # (read by setting it: there is no other call)
        os.umask(mask)
        return 0o666 & ~mask


def check_save_path(path: str) -> str:
    """RecsysError unless :func:`save_checkpoint` can write ``path`` (a file in an existing,
    writable folder; callers check before hours of training). Returns the folder."""
    if os.path.isdir(path):
        raise RecsysError(f"cannot save the model: {path} is a folder (give a file name in it)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise RecsysError(f"cannot save the model: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RecsysError(f"cannot save the model: folder {folder} is not writable")
    return folder


def check_device(device, what: str = "device") -> None:
    """RecsysError unless ``device`` is the CPU or a CUDA device with CUDA available (``what``: how
    the caller names the option in the message)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise RecsysError(f"bad {what} {device!r}: use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecsysError(f"{what} cuda requested but CUDA is not available")


def load_checkpoint(path: str, device="cpu") -> GRU4Rec:
    """Load a model saved by :func:`save_checkpoint`; returned on ``device`` in eval mode."""
    check_device(device)
    if not os.path.isfile(path):
        raise RecsysError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other file: unpickling fails in many ways (KeyError, ...)
        raise RecsysError(f"{path}: not a readable rnnrec_fast checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RecsysError(f"{path}: not an rnnrec_fast.recsys GRU4Rec checkpoint")
    if payload.get("version", 0) > VERSION:
        raise RecsysError(f"{path}: checkpoint version {payload['version']} is newer than this code")
    missing = [key for key in ("config", "item_ids", "state_dict") if key not in payload]
    if missing:
        raise RecsysError(f"{path}: incomplete checkpoint (no {', '.join(missing)})")
    cfg = dict(payload["config"])
    model = GRU4Rec(cfg.pop("n_items"), item_ids=payload["item_ids"], **cfg)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise RecsysError(f"{path}: weights do not match the config ({exc})") from None
    model.checkpoint_extra = payload.get("extra", {})
    return model.to(device).eval()
