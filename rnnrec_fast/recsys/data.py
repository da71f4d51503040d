"""Click-log loading, item-id mapping, time-based splitting and session datasets.

A click log is held as three parallel numpy arrays (session id, item id, time), one row per click.
Item and session ids keep their original values: ``int`` when every id in the column is an integer
in canonical decimal form within int64 (``7``, ``-3``; see :func:`canonical_int`), ``str`` otherwise
(so ``007`` and ``7`` stay two ids, and unsigned 64-bit hashes above 2**63-1 stay text ids).
"""
from __future__ import annotations

import csv
import datetime as _dt
import gzip
import math
import numbers
import os
import re
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from .._checks import is_int_at_least
from . import _fastread


class RecsysError(Exception):
    """Bad input (missing file, malformed row, unknown item, bad option): a clear message, no traceback."""


# ----------------------------------------------------------------------------------------------
# data directory


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_data_dir() -> str:
    """``<repo>/../shared/data``: the shared samples beside a source checkout."""
    return os.path.join(repo_root(), "..", "shared", "data")


def choose_data_dir(data_dir: str | None = None) -> tuple[str, str]:
    """(absolute path, where it came from): ``data_dir`` ("argument"), else ``$RNNREC_FAST_DATA``
    ("environment"), else ``<repo>/../shared/data`` ("default"), whether or not it exists."""
    if data_dir is not None:
        return os.path.abspath(data_dir), "argument"
    env = os.environ.get("RNNREC_FAST_DATA") or None
    if env is not None:
        return os.path.abspath(env), "environment"
    return os.path.abspath(default_data_dir()), "default"


def resolve_data_dir(data_dir: str | None = None) -> str | None:
    """The shared data directory :func:`choose_data_dir` chooses; None where it is no existing
    directory (a folder named by the argument or the variable is never replaced by the default)."""
    path, _ = choose_data_dir(data_dir)
    return path if os.path.isdir(path) else None


YOOCHOOSE_TRAIN = "yoochoose-clicks-100k_train_full.txt"
YOOCHOOSE_TEST = "yoochoose-clicks-100k_test.txt"
DIGINETICA = "diginetica-sample_train-item-views.csv"


# ----------------------------------------------------------------------------------------------
# click logs


def _mixed_ids(a: np.ndarray) -> bool:
    """Whether an object array of ids holds anything but integers alone or strings alone."""
    kinds = {str if isinstance(v, str) else int if isinstance(v, numbers.Integral) and not isinstance(v, bool)
             else None for v in a}
    return len(kinds) > 1 or None in kinds


def _ids_ok(a: np.ndarray) -> bool:
    """Whether an array's ids are all integers or all strings (its dtype's, or each of an object array's)."""
    return a.dtype.kind in "iuOUS" and not (a.dtype == object and _mixed_ids(a))


@dataclass
class ClickLog:
    """One row per click: ``sessions[i]`` clicked ``items[i]`` at ``times[i]`` (seconds)."""

    sessions: np.ndarray  # object or int64
    items: np.ndarray  # object or int64
    times: np.ndarray  # float64

    def __post_init__(self):
        """RecsysError unless the columns are 1-D NumPy arrays of one length, the ids all integers or
        all strings, and the times finite numbers: a hand-built log with NaN times was ordered by them
        silently, and the other faults failed deep inside NumPy (the loaders' logs always pass)."""
        cols = (("sessions", self.sessions), ("items", self.items), ("times", self.times))
        for name, v in cols:
            if not isinstance(v, np.ndarray) or v.ndim != 1:
                raise RecsysError(f"ClickLog.{name} must be a 1-D NumPy array, got "
                                  f"{type(v).__name__}{'' if not isinstance(v, np.ndarray) else f' of shape {v.shape}'}")
        if not len(self.sessions) == len(self.items) == len(self.times):
            raise RecsysError(f"ClickLog columns of different lengths: {len(self.sessions)} sessions, "
                              f"{len(self.items)} items, {len(self.times)} times")
        for name, v in cols[:2]:
            if not _ids_ok(v):
                raise RecsysError(f"ClickLog.{name}: ids must be all integers or all strings (got {v.dtype}"
                                  f"{' holding ' + ', '.join(sorted({type(x).__name__ for x in v})) if v.dtype == object else ''})")
        if self.times.dtype.kind not in "fiu":
            raise RecsysError(f"ClickLog.times must be numbers (seconds), got {self.times.dtype}")
        bad = np.count_nonzero(~np.isfinite(self.times))
        if bad:
            raise RecsysError(f"ClickLog.times must be finite: {bad} NaN or infinite")

    def __len__(self):
        return len(self.items)

    @property
    def n_sessions(self) -> int:
        return len(np.unique(self.sessions))

    @property
    def n_items(self) -> int:
        return len(np.unique(self.items))

    def subset(self, mask) -> "ClickLog":
        return self._rows(mask)

    def sorted(self) -> "ClickLog":
        """Rows ordered by (session, time), stable."""
        return self._rows(np.lexsort((self.times, self.sessions)))

    def _rows(self, index) -> "ClickLog":
        """The rows ``index`` (a mask or an order) of this log, whose columns were checked when it was
        built: not again (the id check alone took ~90 ms a copy of a 1M-row log of string ids)."""
        out = object.__new__(ClickLog)
        out.sessions, out.items, out.times = self.sessions[index], self.items[index], self.times[index]
        return out


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def canonical_int(value: str) -> int | None:
    """``int(value)`` when ``value`` is an integer written in canonical decimal form, i.e.
    ``str(int(value)) == value`` (``"7"``, ``"-3"``, ``"0"``), else None (``"007"``, ``"+7"``,
    ``"1_000"``, ``" 7"``, ``"-0"``, ``"7.0"``): only then are the int and the str the same id."""
    try:
        n = int(value)
    except ValueError:
        return None
    return n if str(n) == value else None


def _typed_ids(values: list[str]) -> np.ndarray:
    """int64 array when every value is a canonical decimal integer (:func:`canonical_int`) within
    int64, else an object array of the str values as written."""
    out = []
    for v in values:
        n = canonical_int(v)
        if n is None or not _INT64_MIN <= n <= _INT64_MAX:
            return np.array(values, dtype=object)
        out.append(n)
    return np.array(out, dtype=np.int64)


def _parse_time(value: str, time_format: str | None) -> tuple[float, bool]:
    """``(seconds, whether the value was a number)``: a number (whose unit the caller decides),
    an ISO date or a ``time_format`` date."""
    if time_format:
        d = _dt.datetime.strptime(value, time_format)
        return (d if d.tzinfo is not None else d.replace(tzinfo=_dt.timezone.utc)).timestamp(), False  # (%z kept)
    if not (len(value) > 4 and value[4] == "-" and value[:4].isdigit()):  # (YYYY-: a date; a failing float() ~1 us)
        try:
            return float(value), True
        except ValueError:
            pass
    try:  # ISO dates / datetimes
        d = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"cannot parse time {value!r}") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return d.timestamp(), False


def _number(v: str) -> bool:
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False


def _looks_like_data(session: str, item: str, time: str) -> bool:
    """Whether a header's session, item and time fields read as a click: two integers and a number
    (no header names its columns so)."""
    return canonical_int(session) is not None and canonical_int(item) is not None and _number(time)


def _data_as_header(path, skipped, sep, names):
    return RecsysError(f"{path}:{skipped + 1}: the first line looks like a click, not a header "
                       f"({sep.join(names)!r}); a file without a header: header=False (--no-header), the "
                       "columns as 0-based indices")


def _sniff_sep(path: str, first_line: str) -> str:
    for sep in ("\t", ";", ","):
        if sep in first_line:
            return sep
    return "\t" if path.endswith((".txt", ".tsv")) else ","


def load_clicks(path: str, *, session_col: str | int = "SessionId", item_col: str | int = "ItemId",
                time_col: str | int | None = "Time", sep: str | None = None, header: bool = True,
                time_format: str | None = None, extra_time_col: str | int | None = None,
                time_unit: str = "auto") -> ClickLog:
    """Load any delimited click log (TSV/CSV).

    Columns are named (when the file has a header) or 0-based indices; with ``header=False`` the
    default names stand for columns 0, 1 and 2 (GRU4Rec's order). ``sep`` is sniffed from the
    first line when None (tab, ';' or ','). Times are numbers, ISO dates or ``time_format``
    (strptime); ``extra_time_col`` is added to the time in milliseconds (Diginetica's timeframe).
    Numbers are seconds (``time_unit="s"``) or milliseconds (``"ms"``; dates, and numbers with an
    ``extra_time_col``, are not scaled); ``"auto"`` takes them as milliseconds, with a warning,
    where the largest is 1e11 or more (past the year 5000 in seconds,
    1973 in milliseconds: GRU4Rec's newer preprocessing and RetailRocket write milliseconds, and a
    split by days would otherwise hold out minutes). Without a time column, the file order is the
    time order. Times must be finite. The file is UTF-8 (a byte-order mark is skipped), or gzip-
    compressed UTF-8. With ``header`` a first line whose session and item fields are integers and
    whose time field is a number is refused as data, not a header. A plain file (ASCII, rows alike,
    numbers or ISO stamps) is read by a vectorised fast path (``_fastread.py``), any other row by
    row; the two give the same log (and the same errors, which name the line).
    """
    _check_file(path)
    if time_unit not in ("auto", "s", "ms"):
        raise RecsysError(f"bad time_unit {time_unit!r}: 'auto', 's' or 'ms'")
    if sep is not None and (not isinstance(sep, str) or len(sep) != 1 or sep in "\r\n\"" or sep.isalnum()):
        raise RecsysError(f"bad separator {sep!r}: must be one character, not a letter, digit, quote or newline")
    for what, c in (("session", session_col), ("item", item_col), ("time", time_col), ("extra time", extra_time_col)):
        if ((c is None and what in ("session", "item")) or isinstance(c, bool)
                or (isinstance(c, int) and c < 0) or not isinstance(c, (str, int, type(None)))):
            raise RecsysError(f"bad {what} column {c!r}: a name or a 0-based index")
    if not header:  # the default names as GRU4Rec's column order: 0, 1, 2 (as the CLI's --no-header)
        session_col, item_col, time_col = (i if isinstance(c, str) and c == name else c for i, (c, name) in
                                           enumerate(((session_col, "SessionId"), (item_col, "ItemId"), (time_col, "Time"))))
    log, _, numeric = _load_clicks(path, session_col, item_col, time_col, sep, header, time_format, extra_time_col)
    if time_col is not None and time_unit != "s" and numeric.any():  # (the unit of the numbers alone, not of dates)
        top = float(np.abs(log.times[numeric]).max())
        if time_unit == "ms" or top >= _MS_TIMES:
            if time_unit == "auto":
                warnings.warn(f"{path}: times read as milliseconds (the largest, {top:.17g}, is past the year "
                              "5000 in seconds); pass time_unit='s' or 'ms' (--time-unit) to say which",
                              UserWarning, stacklevel=2)
            times = log.times.copy()
            times[numeric] /= 1000.0
            log = ClickLog(log.sessions, log.items, times)
    return log


_MS_TIMES = 1e11  # seconds past the year 5138; milliseconds past 1973


def _check_file(path) -> None:
    """RecsysError unless ``path`` is a regular file (a folder named as the file says so)."""
    if os.path.isdir(path):
        raise RecsysError(f"{path} is a folder, not a click-log file")
    if not os.path.isfile(path):
        if os.path.exists(path):  # (the loader reads a file twice: its first line, then the whole)
            raise RecsysError(f"{path} is not a regular file (a pipe or a device?): write the log to a file first")
        raise RecsysError(f"file not found: {path}")


def _is_gzip(path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _open(path, mode="r", **kw):
    """``open(path, mode, **kw)``, or for a gzip-compressed file (by its first two bytes, whatever
    its name) ``gzip.open`` in the same mode: its text read as the file's."""
    if _is_gzip(path):
        return gzip.open(path, mode if "b" in mode else mode + "t", **kw)
    return open(path, mode, **kw)


def _not_utf8(path):
    """Where a file is not UTF-8: ``path:line: not UTF-8 text (...)`` with the byte's offset in the
    file (the decoder's own message counts from the start of its read buffer)."""
    offset = lineno = 0
    with _open(path, "rb") as f:
        for raw in f:  # (split at \n; each piece split again at a lone \r, as the loader's reader ends lines)
            for m in re.finditer(rb"[^\r\n]*(?:\r\n|\n|\r|$)", raw):
                line = m.group()
                if not line:
                    continue
                lineno += 1
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return (f"{path}:{lineno}: not UTF-8 text (byte 0x{line[exc.start]:02x} at byte "
                            f"{offset + exc.start} of the {'decompressed text' if _is_gzip(path) else 'file'}: "
                            f"{exc.reason})")
                offset += len(line)
    return f"{path}: not UTF-8 text"


def _load_clicks(path, session_col, item_col, time_col, sep, header, time_format, extra_time_col,
                 keep_extra=False):
    """load_clicks' work: (the log, None, which times were numbers), or with keep_extra (the log of
    the time column's times alone, the extra times in seconds, ...) for a caller that combines them
    itself. A file not UTF-8 is a RecsysError naming its line and byte; a damaged gzip file one
    naming the file."""
    try:
        return _read_clicks(path, session_col, item_col, time_col, sep, header, time_format, extra_time_col,
                            keep_extra)
    except UnicodeDecodeError:
        raise RecsysError(_not_utf8(path)) from None
    except _GZIP_ERRORS as exc:
        raise _damaged_gzip(path, exc) from None


_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def _damaged_gzip(path, exc):
    return RecsysError(f"{path}: a damaged or truncated gzip file ({type(exc).__name__}: {exc})")


def _read_clicks(path, session_col, item_col, time_col, sep, header, time_format, extra_time_col, keep_extra):
    with _open(path, newline="", encoding="utf-8-sig") as f:
        skipped = 0  # blank lines before the header (or first row)
        while True:
            start = f.tell()
            first = f.readline()
            if not first or first.strip():
                break
            skipped += 1
        if not first.strip():
            raise RecsysError(f"{path}: the file is empty")
        sep = sep or _sniff_sep(path, first)
        f.seek(start)
        # a tab-separated log (GRU4Rec's format) has no quoting: a quote is part of an id; in a CSV
        # a stray one would join the lines up to the next quote into one field (refused below)
        reader = csv.reader(f, delimiter=sep, quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL)
        quote_hint = "" if sep == "\t" else "; a stray quote character?"  # (for csv.Error: only a CSV quotes)
        if header:
            try:
                names = [c.strip() for c in next(reader)]
            except csv.Error as exc:  # a stray quote's field outgrowing the csv module's limit
                raise RecsysError(f"{path}:{skipped + 1}: unreadable header ({exc}{quote_hint})") from None
            if reader.line_num != 1:
                raise RecsysError(f"{path}:{skipped + 1}: a quoted field of the header runs over "
                                  f"{reader.line_num} lines (a stray quote character?)")

        def col_index(c, what):
            if c is None:
                return None
            if isinstance(c, int) or (isinstance(c, str) and c.isdigit() and not header):
                i = int(c)
                return i
            if not header:
                raise RecsysError(f"{path}: {what} column {c!r} must be an index: the file has no header")
            if c not in names:
                if all(_number(v) for v in names):
                    raise _data_as_header(path, skipped, sep, names)
                alike = [n for n in names if n.lower().replace("_", "") == str(c).lower().replace("_", "")]
                hint = (f"; it has {alike[0]!r} (give it as the {what} column: --{what}-col)" if alike else "")
                raise RecsysError(f"{path}: no {what} column {c!r} in the header {names}{hint}")
            at = [i for i, n in enumerate(names) if n == c]
            if len(at) > 1:  # (the first was read, silently: a joined file's other Time, say)
                raise RecsysError(f"{path}: the header names {len(at)} columns {c!r} (columns {', '.join(map(str, at))}): "
                                  f"which is the {what} column is ambiguous (rename one of them)")
            return at[0]

        si, ii = col_index(session_col, "session"), col_index(item_col, "item")
        ti, xi = col_index(time_col, "time"), col_index(extra_time_col, "extra time")
        if header and ti is not None and max(si, ii, ti) < len(names) and _looks_like_data(names[si], names[ii], names[ti]):
            raise _data_as_header(path, skipped, sep, names)
        named = [(what, i) for what, i in (("session", si), ("item", ii), ("time", ti), ("extra time", xi))
                 if i is not None]
        for k, (what, i) in enumerate(named):  # one column read as two things would train on nonsense
            for other, j in named[k + 1:]:
                if i == j:
                    col = f"{i}: {names[i]!r}" if header and i < len(names) else str(i)
                    raise RecsysError(f"{path}: the {what} and {other} columns are the same column ({col})")
        need = max(i for i in (si, ii, ti, xi) if i is not None) + 1
        fast = _fast_read(path, sep, skipped + (1 if header else 0), names if header else None, si, ii, ti, xi,
                          time_format, keep_extra)
        if fast is not None:
            return ClickLog(*fast[:3]), fast[3], fast[4]
        sess, items, times, extras, numeric = [], [], [], [], []  # (numeric: the time was a number)
        # every _CHUNK rows the lists become arrays (a row's strs and floats as Python objects took
        # ~250 bytes: ~7.6 GiB for the raw YOOCHOOSE file's 33M rows; int64 ids and times 24)
        chunks = []

        def flush():
            if times:
                chunks.append((_typed_ids(sess), _typed_ids(items), np.asarray(times, dtype=np.float64),
                               np.asarray(extras, dtype=np.float64), np.asarray(numeric, dtype=bool)))
                for part in (sess, items, times, extras, numeric):
                    part.clear()
        base = 0  # rows in the chunks
        cache: dict[str, float] = {}
        lineno = skipped + (1 if header else 0)
        while True:
            if len(times) >= _CHUNK:
                base += len(times)
                flush()
            try:
                row = next(reader, None)
            except csv.Error as exc:  # e.g. a stray quote's field outgrowing the csv module's limit
                raise RecsysError(f"{path}:{lineno + 1}: unreadable row ({exc}{quote_hint})") from None
            if row is None:
                break
            lineno += 1
            spanned = skipped + reader.line_num - lineno + 1  # lines this record was read from
            if spanned != 1:
                raise RecsysError(f"{path}:{lineno}: a quoted field runs over {spanned} lines (a stray quote "
                                  f"character?)")
            if not row or (not row[0].strip() and not any(v.strip() for v in row)):  # (blank, or separators alone)
                continue
            if len(row) < need:
                raise RecsysError(f"{path}:{lineno}: malformed row (expected at least {need} fields "
                                  f"separated by {sep!r}, got {len(row)}): {sep.join(row)!r}")
            if header and len(row) > len(names) and any(v.strip() for v in row[len(names):]):
                # (empty fields after the last column, from trailing separators, are let through)
                raise RecsysError(f"{path}:{lineno}: malformed row (the header names {len(names)} fields "
                                  f"separated by {sep!r}, got {len(row)}): {sep.join(row)!r}")
            if row[0].startswith("\ufeff"):  # a file joined after another keeps its byte-order mark
                row[0] = row[0][1:]
            s, it = row[si].strip(), row[ii].strip()
            if not s or not it:
                raise RecsysError(f"{path}:{lineno}: empty session or item id")
            if header and s == names[si] and it == names[ii]:
                raise RecsysError(f"{path}:{lineno}: the header line again (files joined with their headers?)")
            sess.append(s)
            items.append(it)
            if ti is None:
                times.append(float(base + len(times)))
                numeric.append(False)
                continue
            tv = row[ti].strip()
            try:
                hit = cache.get(tv)
                if hit is None:
                    t, number = _parse_time(tv, time_format)
                    # repeated date strings (Diginetica's days) parse once; unique ISO stamps (the
                    # raw YOOCHOOSE file: 33M of them) would only fill memory: a bounded cache
                    if time_format or (len(cache) < 65536 and not number):
                        cache[tv] = (t, number)
                else:
                    t, number = hit
                if not math.isfinite(t):
                    raise ValueError(f"{tv!r} is not a finite time")
                if xi is not None:
                    xv = row[xi].strip()
                    x = float(xv) / 1000.0
                    if not math.isfinite(t + x):
                        raise ValueError(f"extra time {xv!r} (ms) is not finite")
                    if keep_extra:
                        extras.append(x)
                    else:
                        t += x
            except ValueError as exc:
                raise RecsysError(f"{path}:{lineno}: malformed time: {exc}") from None
            times.append(t)
            numeric.append(number and xi is None)  # (time_unit: a number alone, no extra column added)
        flush()
    if not chunks:
        raise RecsysError(f"{path}: no clicks in the file")
    sessions, items, times, extras, numeric = (list(part) for part in zip(*chunks))
    del chunks
    log = ClickLog(_join_ids(sessions), _join_ids(items), np.concatenate(times))
    return log, (np.concatenate(extras) if keep_extra else None), np.concatenate(numeric)


_CHUNK = 1 << 18
_FAST_READ = True  # (tests turn it off to compare the two readers)


def _fast_read(path, sep, skip_lines, names, si, ii, ti, xi, time_format, keep_extra):
    """The rows as the fast path (``recsys/_fastread.py``) reads them, or None where it does not
    handle the file and the row-by-row reader reads it. Not tried where the header's session and
    item names are integers (a row equal to them is the header again, an error the reader reports), nor
    where a column lies past the header's (every row is then the reader's malformed-row error)."""
    if not _FAST_READ or (names is not None and (max(i for i in (si, ii, ti, xi) if i is not None) >= len(names) or (
            canonical_int(names[si]) is not None and canonical_int(names[ii]) is not None))):
        return None
    try:
        with _open(path, "rb") as f:
            out = _fastread.read(f, sep, skip_lines, names, si, ii, ti, xi, time_format, keep_extra)
    except (OSError, EOFError, zlib.error):  # (a damaged gzip file: the reader names the fault)
        return None
    return None if out is None else (_join_ids(out[0]), _join_ids(out[1])) + out[2:]


def _join_ids(parts) -> np.ndarray:
    """The chunks' id arrays (:func:`_typed_ids`) as one: int64 where every chunk is, else the str
    values as written (an int64 chunk's canonical integers are written as ``str`` gives them)."""
    if all(p.dtype == np.int64 for p in parts):
        return np.concatenate(parts)
    return np.concatenate([p.astype(str).astype(object) if p.dtype == np.int64 else p for p in parts])


def load_yoochoose(path: str, time_unit: str = "auto") -> ClickLog:
    """GRU4Rec-style TSV with header ``SessionId ItemId Time`` (Unix seconds, or milliseconds: see
    :func:`load_clicks`'s ``time_unit``)."""
    return load_clicks(path, session_col="SessionId", item_col="ItemId", time_col="Time", sep="\t",
                       time_unit=time_unit)


def load_yoochoose_raw(path: str) -> ClickLog:
    """The RecSys Challenge 2015 ``yoochoose-clicks.dat`` as distributed: no header, comma-separated
    ``SessionId,Timestamp,ItemId,Category`` with ISO 8601 UTC times (``2014-04-07T10:51:09.277Z``).
    GRU4Rec's RSC15 preprocessing of it: ``time_split(log, 1.0, min_item_support=5)``."""
    return load_clicks(path, session_col=0, item_col=2, time_col=1, sep=",", header=False)


def _diginetica_columns(header: str):
    """The session, item, eventdate and timeframe column names of a Diginetica header, spelled as
    the SR-GNN sample spells them (``session_id;user_id;item_id;timeframe;eventdate``) or as the
    full CIKM Cup 2016 file does (``sessionId;userId;itemId;timeframe;eventdate``); else None."""
    try:
        fields = next(csv.reader([header], delimiter=";"), [])  # (quoted names too)
    except csv.Error:  # (a field past the csv module's limit: no Diginetica header)
        return None
    names = {n.strip().replace("_", "").lower(): n.strip() for n in fields}
    want = ("sessionid", "itemid", "eventdate", "timeframe")
    if not all(k in names for k in want):
        return None
    return tuple(names[k] for k in want)


def load_diginetica(path: str) -> ClickLog:
    """CIKM Cup 2016 ``train-item-views.csv``: ``sessionId;userId;itemId;timeframe;eventdate`` (the
    full file) or ``session_id;user_id;item_id;timeframe;eventdate`` (SR-GNN's sample).
    Time = the session's first eventdate (UTC midnight, seconds) + timeframe (ms since the session's
    first event). Each view's own eventdate would add a day to the views of a session after it
    crossed midnight (2 sessions of the sample: a 24-hour gap inside the session, and its end a day
    late for a time split)."""
    cols = _diginetica_columns(_first_line(path))
    if cols is None:
        raise RecsysError(f"{path}: not a Diginetica header (sessionId;userId;itemId;timeframe;eventdate or "
                          "session_id;user_id;item_id;timeframe;eventdate)")
    session, item, date, frame = cols
    dates, frames, _ = _load_clicks(path, session, item, date, ";", True, "%Y-%m-%d", frame, keep_extra=True)
    return _from_session_start_dates(dates, frames)


def _from_session_start_dates(dates: ClickLog, frame) -> ClickLog:
    """Diginetica's times: each view's timeframe (``frame``, seconds since the session's first
    view, any length) after the date (``dates.times``) of its session's first view (the one of
    smallest timeframe)."""
    _, inv = np.unique(dates.sessions, return_inverse=True)
    order = np.lexsort((frame, inv))  # by session, then timeframe
    first = np.ones(len(order), dtype=bool)
    first[1:] = inv[order][1:] != inv[order][:-1]
    start_day = np.empty(inv.max() + 1 if len(inv) else 0)
    start_day[inv[order][first]] = dates.times[order][first]
    return ClickLog(dates.sessions, dates.items, start_day[inv] + frame)


def _first_line(path: str) -> str:
    """The first non-blank line of ``path`` (a header, or a first row), stripped."""
    _check_file(path)
    try:
        with _open(path, encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                if line.strip():
                    return line.strip()
    except _GZIP_ERRORS as exc:
        raise _damaged_gzip(path, exc) from None
    return ""


_YOOCHOOSE_RAW_LINE = re.compile(r"\d+,\d{4}-\d\d-\d\dT[^,]*,\d+(,[^,]*)?$")  # (4 fields: not the buys file's 5)


def sniff_format(path: str) -> str:
    """The click-log format of ``path`` from its first line: ``"diginetica"`` (its header),
    ``"yoochoose-raw"`` (a headerless ``yoochoose-clicks.dat`` row) or ``"columns"`` (any delimited
    log with a header: GRU4Rec's ``SessionId ItemId Time`` TSV by default)."""
    first = _first_line(path)
    if _diginetica_columns(first) is not None:
        return "diginetica"
    if _YOOCHOOSE_RAW_LINE.match(first):
        return "yoochoose-raw"
    return "columns"


def load_any(path: str, **kw) -> ClickLog:
    """Load with the columns in ``kw`` (see :func:`load_clicks`), or else in the format that
    :func:`sniff_format` finds: Diginetica, the raw YOOCHOOSE file, or GRU4Rec's TSV."""
    if kw:
        return load_clicks(path, **kw)
    fmt = sniff_format(path)
    if fmt == "diginetica":
        return load_diginetica(path)
    if fmt == "yoochoose-raw":
        return load_yoochoose_raw(path)
    return load_clicks(path)


# ----------------------------------------------------------------------------------------------
# item map


class ItemMap:
    """Original item id <-> dense index 0..n-1."""

    def __init__(self, item_ids):
        # numpy scalars become Python ints / strs: a checkpoint stores the ids (its weights-only
        # loader takes no numpy objects) and recommendations return them
        self.item_ids = [_py(v) for v in item_ids]
        # ids are ints or strs, as the loaders give them and lookup() matches them: another type
        # (a float, None, bytes: from a damaged checkpoint) could never be looked up, and a NaN
        # id would be written into JSON responses as the invalid token NaN
        kinds = set(map(type, self.item_ids))
        if not kinds <= {int, str}:
            bad = next(v for v in self.item_ids if type(v) not in (int, str))
            raise RecsysError(f"item ids must be ints or strs, got {type(bad).__name__} {bad!r}")
        self.item_index = {x: i for i, x in enumerate(self.item_ids)}
        if len(self.item_index) != len(self.item_ids):
            raise RecsysError("duplicate item ids in the item map")
        if len(kinds) == 2 and len({_id_key(v) for v in self.item_ids}) != len(self.item_ids):
            # 7 and "7" are one id to lookup(): one of the two items could never be recommended
            # to, or clicked, by its own id
            raise RecsysError("duplicate item ids in the item map (an int and its decimal text, "
                              "such as 7 and '7', are one id)")

    @classmethod
    def from_items(cls, items) -> "ItemMap":
        """Ids in order of first appearance."""
        arr = np.asarray(items)
        if arr.ndim != 1 or not _ids_ok(arr):
            raise RecsysError(f"item ids must be a 1-D sequence of all integers or all strings (got {arr.dtype}, "
                              f"shape {arr.shape})")
        _, first = np.unique(arr, return_index=True)
        arr = arr[np.sort(first)]
        return cls(_py(v) for v in arr)

    def __len__(self):
        return len(self.item_ids)

    def __contains__(self, item):
        return self.lookup(item) is not None

    def lookup(self, item):
        """Index of ``item``, or None. The one id lookup of training, ``GRU4Rec.recommend``, the
        CLI and serving: an id matches in its int form (``int`` or numpy integer) or its str form,
        the str being the canonical decimal (:func:`canonical_int`): 7, ``np.int64(7)`` and ``"7"``
        are one id, ``"007"`` is another. Other types (bool, float, ...) match nothing."""
        if isinstance(item, str):
            i = self.item_index.get(item)
            if i is None:
                n = canonical_int(item)
                if n is not None:
                    i = self.item_index.get(n)
            return i
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            i = self.item_index.get(item)
            if i is None:
                try:  # (ids beyond int64 are kept as text)
                    i = self.item_index.get(str(int(item)))
                except ValueError:  # more digits than Python converts to text: no such id
                    return None
            return i
        return None

    def index(self, items) -> np.ndarray:
        """Indices of ``items``; raises RecsysError naming unknown items."""
        out, bad = [], []
        for x in items:
            i = self.lookup(_py(x))
            if i is None:
                bad.append(x)
            out.append(-1 if i is None else i)
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            raise RecsysError(f"unknown item id(s): {shown}")
        return np.asarray(out, dtype=np.int64)

    def known_mask(self, items) -> np.ndarray:
        return np.fromiter((self.lookup(_py(x)) is not None for x in items), dtype=bool, count=len(items))

    def to_list(self) -> list:
        return list(self.item_ids)

    def check_same(self, other: "ItemMap", what: str):
        """Raise RecsysError unless ``other`` maps the same ids to the same indices: data indexed by
        another map than the model's gives meaningless scores and metrics, silently."""
        if other is not self and other.item_ids != self.item_ids and \
                [_id_key(v) for v in other.item_ids] != [_id_key(v) for v in self.item_ids]:
            raise RecsysError(f"{what} is indexed by another item map than the model's ({len(other)} vs "
                              f"{len(self)} items); build it with SessionDataset.from_log(log, model.item_map)")


def _id_key(v):
    """An id as ItemMap.lookup matches it: 7, np.int64(7) and "7" are one id, "007" another."""
    if isinstance(v, str):
        n = canonical_int(v)
        return v if n is None else n
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v


def _py(v):
    if isinstance(v, np.integer):
        return int(v)
    return str(v) if isinstance(v, np.str_) else v


# ----------------------------------------------------------------------------------------------
# splitting and filtering


def filter_short_sessions(log: ClickLog, min_length: int = 2) -> ClickLog:
    """The clicks of the sessions with at least ``min_length`` clicks in ``log``."""
    if not is_int_at_least(min_length, 1):
        raise RecsysError(f"a minimum session length must be an integer >= 1, got {min_length!r}")
    _, inv, counts = np.unique(log.sessions, return_inverse=True, return_counts=True)
    return log.subset(counts[inv] >= min_length)


def filter_rare_items(log: ClickLog, min_support: int = 5) -> ClickLog:
    """The clicks on items clicked at least ``min_support`` times in ``log``."""
    if not is_int_at_least(min_support, 1):
        raise RecsysError(f"a minimum item support must be an integer >= 1, got {min_support!r}")
    _, inv, counts = np.unique(log.items, return_inverse=True, return_counts=True)
    return log.subset(counts[inv] >= min_support)


def time_split(log: ClickLog, test_days: float = 1.0, min_session_length: int = 2,
               min_item_support: int = 1):
    """GRU4Rec's split (its RSC15 preprocessing): first drop sessions shorter than
    ``min_session_length``; with ``min_item_support`` > 1, then clicks on items with fewer than
    ``min_item_support`` clicks, then the sessions left too short (GRU4Rec: 5; the default 1 filters
    no items, for logs already preprocessed). Then sessions ending in the last ``test_days`` days
    (counted back from the last click left) are the test set; test clicks on items unseen in
    training are dropped; sessions shorter than ``min_session_length`` are dropped from both parts.
    Returns (train, test). (A one-click session is dropped before the cut is placed: a stray late
    one would otherwise move the cut past every real session, and leave the test set empty.)"""
    if not isinstance(test_days, numbers.Real) or isinstance(test_days, bool) or not math.isfinite(test_days) \
            or test_days <= 0:
        raise RecsysError(f"test_days must be a number of days > 0, got {test_days!r}")
    for name, v in (("min_session_length", min_session_length), ("min_item_support", min_item_support)):
        if not is_int_at_least(v, 1):
            raise RecsysError(f"{name} must be an integer >= 1, got {v!r}")
    if len(log) == 0:
        raise RecsysError("cannot split an empty click log")
    bad = np.count_nonzero(~np.isfinite(log.times))
    if bad:
        raise RecsysError(f"cannot split a click log with non-finite times ({bad} NaN or infinite)")
    log = filter_short_sessions(log, min_session_length)
    if min_item_support > 1:
        log = filter_short_sessions(filter_rare_items(log, min_item_support), min_session_length)
    if len(log) == 0:
        on_items = f" on items with at least {min_item_support} clicks" if min_item_support > 1 else ""
        raise RecsysError(f"no session of at least {min_session_length} clicks{on_items} is left to split")
    uniq, inv = np.unique(log.sessions, return_inverse=True)
    end = np.full(len(uniq), -np.inf)
    np.maximum.at(end, inv, log.times)
    cut = log.times.max() - test_days * 86400.0
    in_test = end[inv] >= cut
    train = filter_short_sessions(log.subset(~in_test), min_session_length)
    test = log.subset(in_test)
    test = test.subset(np.isin(test.items, train.items))
    test = filter_short_sessions(test, min_session_length)
    if len(train) == 0:
        raise RecsysError(f"no training session of at least {min_session_length} clicks ends before the last "
                          f"{test_days:g} days of the log: nothing is left to train on")
    return train, test


# ----------------------------------------------------------------------------------------------
# session datasets (item indices, sessions contiguous and ordered by start time)


class SessionDataset:
    """Item indices of a click log with each session contiguous (clicks in time order) and the
    sessions ordered by their first click's time.  ``offsets[k]:offsets[k+1]`` is session k."""

    def __init__(self, items: np.ndarray, offsets: np.ndarray, item_map: ItemMap, session_ids=None):
        self.items = np.ascontiguousarray(items, dtype=np.int64)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.item_map = item_map
        self.session_ids = session_ids

    @classmethod
    def from_log(cls, log: ClickLog, item_map: ItemMap | None = None, *, drop_unknown: bool = True,
                 min_length: int = 2, order: str = "time") -> "SessionDataset":
        """The sessions of ``log`` with at least ``min_length`` clicks, their items as indices of
        ``item_map`` (by default the catalogue of those sessions; clicks on items it lacks dropped
        with ``drop_unknown``), ordered by their first click's time (``order="time"``) or by
        session id (``"session"``)."""
        if order not in ("time", "session"):
            raise RecsysError(f'order must be "time" or "session", got {order!r}')
        if not is_int_at_least(min_length, 1):
            raise RecsysError(f"min_length must be an integer >= 1, got {min_length!r}")
        log = log.sorted()
        if item_map is None:
            # the catalogue: the items of the sessions kept (an item clicked only in shorter ones
            # would be scored at every step and never trained: no input, target or negative sample;
            # GRU4Rec's preprocessing drops such sessions before it counts items)
            log = filter_short_sessions(log, min_length)
            item_map = ItemMap.from_items(log.items)
        elif drop_unknown:
            log = log.subset(item_map.known_mask(log.items))
        idx = item_map.index(log.items)
        if len(idx) == 0:
            return cls(idx, np.zeros(1, np.int64), item_map, np.array([]))
        change = np.flatnonzero(log.sessions[1:] != log.sessions[:-1]) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(idx)]])
        keep = (ends - starts) >= min_length
        starts, ends = starts[keep], ends[keep]
        if order == "time":
            o = np.argsort(log.times[starts], kind="stable")
            starts, ends = starts[o], ends[o]
        pieces = [idx[s:e] for s, e in zip(starts, ends)]
        items = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(ends - starts)])
        return cls(items, offsets, item_map, log.sessions[starts])

    @property
    def n_sessions(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_events(self) -> int:
        """Number of (input, next item) pairs = clicks minus sessions."""
        return len(self.items) - self.n_sessions

    def support(self) -> np.ndarray:
        return np.bincount(self.items, minlength=len(self.item_map)).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# synthetic click logs (demo / tests / benchmarks when the real data is absent)


def synthetic_clicks(n_sessions: int = 2000, n_items: int = 300, seed: int = 0,
                     mean_length: float = 5.0) -> ClickLog:
    """A click log with learnable structure: each item has a few likely successors (Zipf-popular
    items), sessions follow that Markov chain with occasional random jumps. Sessions have 2 or more
    clicks, ``mean_length`` (>= 2) on average."""
    for name, v, least in (("n_sessions", n_sessions, 0), ("n_items", n_items, 1), ("seed", seed, 0)):
        if not is_int_at_least(v, least):
            raise RecsysError(f"synthetic_clicks: {name} must be an integer >= {least}, got {v!r}")
    if not isinstance(mean_length, numbers.Real) or isinstance(mean_length, bool) or not 2 <= mean_length < math.inf:
        raise RecsysError(f"synthetic_clicks: mean_length must be a number >= 2, got {mean_length!r}")
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    pop /= pop.sum()
    succ = rng.choice(n_items, size=(n_items, 4), p=pop)
    succ_p = np.array([0.5, 0.25, 0.15, 0.1])
    sess, items, times = [], [], []
    t = 1_600_000_000.0
    for s in range(n_sessions):
        length = max(2, int(rng.geometric(1.0 / (mean_length - 1))) + 1)
        cur = int(rng.choice(n_items, p=pop))
        t += float(rng.exponential(60.0))
        tt = t
        for _ in range(length):
            sess.append(s + 1)
            items.append(cur + 1000)
            times.append(tt)
            tt += float(rng.exponential(30.0)) + 1.0
            if rng.random() < 0.15:
                cur = int(rng.choice(n_items, p=pop))
            else:
                cur = int(succ[cur, rng.choice(4, p=succ_p)])
    return ClickLog(np.array(sess, np.int64), np.array(items, np.int64), np.array(times))


def write_clicks(log: ClickLog, path: str) -> None:
    """Write a GRU4Rec-style TSV (``SessionId ItemId Time``)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("SessionId\tItemId\tTime\n")
        for s, i, t in zip(log.sessions, log.items, log.times):
            f.write(f"{s}\t{i}\t{t:.3f}\n")
