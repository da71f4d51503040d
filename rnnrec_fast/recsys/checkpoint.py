"""Checkpoints: config + item map + weights in one file, written atomically, read with
``torch.load(..., weights_only=True)`` (only tensors and plain Python containers inside)."""
from __future__ import annotations

import io
import os
import re
import stat
import tempfile
import warnings
import zipfile

import numpy as np
import torch

from .data import RecsysError
from .model import GRU4Rec

FORMAT = "rnnrec_fast.recsys.GRU4Rec"
VERSION = 1


def save_checkpoint(model: GRU4Rec, path: str, extra: dict | None = None, *, train_state: bool = True) -> None:
    """Save ``model`` to ``path`` atomically (temporary file in the same folder + os.replace).
    ``extra``: a dict of what :func:`load_checkpoint` may read back (``model.checkpoint_extra``):
    tensors and plain Python values and containers; NumPy scalars are stored as Python numbers.
    Anything else (a NumPy array, a datetime, an object) is a RecsysError here, before the file is
    written, where torch.load's weights-only reader would refuse the file that held it.
    ``train_state``: also save the model's training state (``model.train_state``, which
    :func:`train` leaves on the models it returns: the optimiser's state, about twice the weights'
    size with AdagradM, and where the random streams stand), so that training the loaded model goes
    on as one longer run would; False saves the weights alone (a smaller file to serve)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config(),
        "item_ids": list(model.item_ids),
        "state_dict": state,
        "extra": _loadable_extra(extra),
    }
    ts = getattr(model, "train_state", None) if train_state else None
    if ts is not None:
        from .train import check_train_state

        check_train_state(ts)
        payload["train_state"] = _to_cpu(ts)
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


def _to_cpu(value):
    """``value`` with its tensors copied to the CPU, through dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _python_scalars(value):
    """``value`` with its NumPy scalars (an np.float64 metric) as Python numbers, through dicts,
    lists and tuples."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {_python_scalars(k): _python_scalars(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_python_scalars(v) for v in value)
    return value


def _loadable_extra(extra) -> dict:
    """``extra`` as save_checkpoint stores it, after checking that torch.load(weights_only=True)
    reads it back (the loader's own check: a checkpoint it would refuse is never written)."""
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise RecsysError(f"cannot save the model: extra must be a dict, got {type(extra).__name__}")
    extra = _python_scalars(dict(extra))
    buf = io.BytesIO()
    try:
        torch.save(extra, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickling and the weights-only reader fail in many ways
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        why = f"{found.group(1)} is not one" if found else f"{type(exc).__name__}: {exc}"
        raise RecsysError(f"cannot save the model: extra holds a value a checkpoint cannot load back "
                          f"(tensors and plain Python values only; {why})") from None
    return extra


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
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise RecsysError(f"cannot save the model: no file name given ({path!r})")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise RecsysError(f"cannot save the model: {path} is a folder (give a file name in it)")
    if path.endswith(os.sep):
        raise RecsysError(f"cannot save the model: {path} names a folder (give a file name in it)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise RecsysError(f"cannot save the model: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RecsysError(f"cannot save the model: folder {folder} is not writable")
    try:  # (and a trial file: os.access says yes to root, or on a read-only mount it does not see)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    except OSError as exc:
        raise RecsysError(f"cannot save the model: cannot write in folder {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)
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


def _check_crcs(f, path) -> None:
    """RecsysError unless every member of the zip archive ``f`` (what torch.save writes) matches the
    CRC-32 stored with it and is a plain file. torch.load does not check the CRCs: damage inside the
    weights' bytes (a flipped bit, a bad sector, a partial copy overwritten in place) loaded as
    other, still finite, weights, silently. Nor does it refuse a member its zip reader (miniz) takes
    for a folder, as a set MS-DOS folder bit (0x10 of the external attributes) makes it, where
    Python's zipfile looks only for a name ending in '/': it reads no bytes for it, and the weights
    held whatever memory the tensor got. torch.save writes neither folders nor encrypted members.
    A file that is not a zip archive is left to torch.load (its own error)."""
    try:
        if not zipfile.is_zipfile(f):
            return
        f.seek(0)
        with zipfile.ZipFile(f) as z:
            for info in z.infolist():
                if info.is_dir() or info.external_attr & 0x10:
                    raise RecsysError(f"{path}: damaged checkpoint ({info.filename} is marked as a folder)")
                if info.flag_bits & 0x1:
                    raise RecsysError(f"{path}: damaged checkpoint ({info.filename} is marked as encrypted)")
            bad = z.testzip()
    except RecsysError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails in many ways (zlib.error, RuntimeError, ...)
        raise RecsysError(f"{path}: not a readable rnnrec_fast checkpoint, truncated or another file "
                          f"({type(exc).__name__}: {exc})") from None
    finally:
        f.seek(0)
    if bad is not None:
        raise RecsysError(f"{path}: damaged checkpoint ({bad} does not match its CRC-32 checksum)")


def _load_failure(exc) -> str:
    """torch.load's error, without its weights-only reader's advice (re-run with weights_only=False,
    which would run whatever code the file holds, and file an issue): the reader's own reason."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(exc), re.S)
    if found is None:
        return f"{type(exc).__name__}: {exc}"
    return f"{found.group(1)}: not what torch.save writes for tensors and plain Python values"


def _is_exported_program(path) -> bool:
    """Whether ``path`` is a zip archive as torch.export.save writes one (its exported program)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(path: str, device="cpu", *, train_state: bool = True) -> GRU4Rec:
    """Load a model saved by :func:`save_checkpoint`; returned on ``device`` in eval mode, in its
    weights' dtype, with the training state the file holds as ``model.train_state`` (checked, kept
    on the CPU; None where it holds none, or with ``train_state=False``, which serving and
    evaluation use: the state is then not read)."""
    check_device(device)
    if os.path.isdir(path):
        raise RecsysError(f"{path} is a folder, not a model file")
    if not os.path.isfile(path):
        if os.path.exists(path):  # (/dev/null, a FIFO: "not found" misled)
            raise RecsysError(f"{path} is not a regular file, not a model file")
        raise RecsysError(f"model file not found: {path}")
    with open(path, "rb") as f:  # (the OS's own errors, a permission refused, as they are)
        _check_crcs(f, path)
        try:
            with warnings.catch_warnings():  # (another file's pickle protocol: its error below says enough)
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                payload = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - unpickling / unzipping fail in many ways (KeyError, OSError, ...)
            if _is_exported_program(path):
                raise RecsysError(f"{path}: a torch.export program (serving.export.export_step's), not a "
                                  "checkpoint: give the file save_checkpoint wrote (recsys train --save)") from None
            raise RecsysError(f"{path}: not a readable rnnrec_fast checkpoint, truncated or another file "
                              f"({_load_failure(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RecsysError(f"{path}: not an rnnrec_fast.recsys GRU4Rec checkpoint")
    version = payload.get("version", 0)
    if type(version) is not int:
        raise RecsysError(f"{path}: malformed checkpoint (version {version!r})")
    if version > VERSION:
        raise RecsysError(f"{path}: checkpoint version {version} is newer than this code")
    missing = [key for key in ("config", "item_ids", "state_dict") if key not in payload]
    if missing:
        raise RecsysError(f"{path}: incomplete checkpoint (no {', '.join(missing)})")
    cfg, item_ids, state = payload["config"], payload["item_ids"], payload["state_dict"]
    if not isinstance(cfg, dict) or "n_items" not in cfg or not set(cfg) <= set(GRU4Rec.CONFIG_KEYS):
        got = sorted(map(str, cfg)) if isinstance(cfg, dict) else type(cfg).__name__
        raise RecsysError(f"{path}: malformed checkpoint (config {got}; its keys are n_items and some of "
                          f"{list(GRU4Rec.CONFIG_KEYS[1:])})")
    if not isinstance(item_ids, list) or not isinstance(state, dict):
        raise RecsysError(f"{path}: malformed checkpoint (item_ids must be a list, state_dict a dict)")
    cfg = dict(cfg)
    if not isinstance(cfg.get("reset_after", True), bool):  # (its truth value would pick a GRU form)
        raise RecsysError(f"{path}: malformed checkpoint config (reset_after {cfg['reset_after']!r}: "
                          f"must be true or false)")
    try:
        model = GRU4Rec(cfg.pop("n_items"), item_ids=item_ids, **cfg)
    except (TypeError, ValueError, RecsysError) as exc:
        raise RecsysError(f"{path}: malformed checkpoint config ({exc})") from None
    # the weights' own floating dtype (a float64 model came back float32, and training it on cast
    # its float64 optimizer state down: not the run it resumed)
    dtypes = {t.dtype for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float64, torch.float16, torch.bfloat16):
        model.to(next(iter(dtypes)))
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        raise RecsysError(f"{path}: weights do not match the config ({exc})") from None
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RecsysError(f"{path}: the weights {name} hold NaN or infinite values (a diverged training?)")
    ts = payload.get("train_state") if train_state else None  # (not read where it is dropped: a newer
    # format's state does not keep serving or evaluation from the weights)
    if ts is not None:
        from .train import check_train_state

        try:
            check_train_state(ts)
        except RecsysError as exc:
            raise RecsysError(f"{path}: {exc}") from None
    model.checkpoint_extra = payload.get("extra", {})
    model = model.to(device).eval()
    model.train_state = ts
    return model
