"""The click-log loader's fast path: a plain log read block by block with NumPy.

``data._read_clicks`` reads a log row by row (the csv module, then every check a malformed file
needs, each error naming its line): the reference. This module reads the common plain file, whose
rows are all alike (ASCII; the same number of fields on every line; ids without spaces or control
characters; the times all decimal numbers or all ISO 8601 UTC stamps of ``_FORMATS``), a MiB
at a time: the structure checked with array operations, the numbers converted by NumPy's C reader
(``np.loadtxt``). At the first thing it does not handle it gives up (``read`` returns None) and
the row-by-row reader reads the whole file as before, with its errors. What it accepts, that
reader accepts too and reads to the same bits (tests/test_fastread.py compare the two on
generated and randomly edited files):

- ids: a block's column int64 where each field is as long as ``str()`` writes its value (no sign,
  zero or space more), the canonical integers ``_typed_ids`` keeps as int64; else the text of
  each, as written (no spaces or control characters: the reader's ``strip()`` leaves it so);
- numbers: NumPy's reader and ``float()`` both call CPython's ``PyOS_string_to_double`` on the
  field (NumPy's takes a subset: no underscores), so the same double; non-finite ones are left to
  the reader's error;
- stamps: microseconds since the epoch (below 2**53 in magnitude) over 10**6, the division
  ``datetime.timestamp()`` makes of the same integers.
"""
from __future__ import annotations

import csv
import io

import numpy as np

_BLOCK = 1 << 20  # bytes read at a time (a block's arrays take a few times that)
_NL, _CR, _QUOTE, _MINUS = 10, 13, 34, 45
_POW10_U64 = np.array([10 ** i for i in range(20)], dtype=np.uint64)
_EXACT = 1 << 53
_C_READER = np.lib.NumpyVersion(np.__version__) >= "1.23.0"  # (np.loadtxt's C reader; before it, Python's)

# The stamps read here, by the loader's time_format: {width: (a template, the digits of the
# fraction of a second)}; in a template 'd' is a digit, 'S' the date-time separator 'T' or a space
# (as datetime.fromisoformat reads it), any other character itself.
_ISO = {10: ("dddd-dd-dd", 0)}
for _frac in (0, 3, 6):
    for _z in ("", "Z"):
        _t = "dddd-dd-ddSdd:dd:dd" + ("." + "d" * _frac if _frac else "") + _z
        _ISO[len(_t)] = (_t, _frac)
_FORMATS = {None: _ISO, "%Y-%m-%d": {10: _ISO[10]},  # (strptime's, for these widths: the same datetimes)
            "%Y-%m-%d %H:%M:%S": {19: ("dddd-dd-dd dd:dd:dd", 0)}, "%Y-%m-%dT%H:%M:%S": {19: ("dddd-dd-ddTdd:dd:dd", 0)}}
_DAYS_IN_MONTH = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])


class _Unhandled(Exception):
    """Something the fast path does not read: the row-by-row reader reads the file instead."""


def read(f, sep: str, skip_lines: int, names: list[str] | None, si: int, ii: int, ti: int | None,
         xi: int | None, time_format: str | None, keep_extra: bool):
    """The rows of the open binary file ``f`` after its first ``skip_lines`` lines, as
    ``(session id blocks, item id blocks, times, extras or None, numeric)`` (``data._read_clicks``'
    meaning; a block's ids int64 where all are canonical integers, else their text, as
    ``data._typed_ids`` gives a chunk's), or None where the fast path does not handle the file.
    ``names``: the header's (every row must have as many fields), None without a header (every row
    as many as the first, at least the columns named)."""
    if (not _C_READER or len(sep) != 1 or not sep.isascii() or sep in "0123456789-.:TZ\"\r\n \x0b\x0c" or
            time_format not in _FORMATS):
        return None
    try:
        return _read(f, ord(sep), skip_lines, names, si, ii, ti, xi, _FORMATS[time_format], time_format is None,
                     keep_extra)
    except _Unhandled:
        return None


def _read(f, sep, skip_lines, names, si, ii, ti, xi, stamps, numbers_too, keep_extra):
    need = max(c for c in (si, ii, ti, xi) if c is not None) + 1
    if ti is None:  # (without a time column the reader reads no extra time, but counts its field in need)
        xi = None
    if keep_extra and xi is None:
        raise _Unhandled  # (no extra times to keep: the reader's empty list)
    head = f.read(_BLOCK)
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    pos = 0
    for _ in range(skip_lines):  # (blank lines and the header, which the caller has read)
        end = head.find(b"\n", pos)
        if end < 0:
            raise _Unhandled
        line = head[pos:end]
        if b"\r" in (line[:-1] if line.endswith(b"\r") else line):  # (a lone CR ends a line for the text reader)
            raise _Unhandled
        pos = end + 1
    parts = []
    limit = csv.field_size_limit()  # (a longer field, in any column, is the csv module's error to the reader)
    n_fields = None if names is None else len(names)
    carry = head[pos:]
    rows = 0
    while True:
        more = f.read(_BLOCK)
        data = carry + more if more else carry
        if more:
            cut = data.rfind(b"\n") + 1
            data, carry = data[:cut], data[cut:]
        elif data and not data.endswith(b"\n"):
            data += b"\n"  # (the last line without its newline)
        if data:
            block = _block(np.frombuffer(data, np.uint8), sep, n_fields, names, need, si, ii, ti, xi, stamps,
                           numbers_too, keep_extra, rows, limit)
            n_fields = block[-1]  # (without a header: the first row's count, for every block)
            rows += len(block[0])
            parts.append(block[:-1])
        if not more:
            break
    if rows == 0:
        raise _Unhandled  # (no rows: the reader says so)
    cols = list(zip(*parts))
    extras = np.concatenate(cols[3]) if keep_extra else None
    return list(cols[0]), list(cols[1]), np.concatenate(cols[2]), extras, np.concatenate(cols[4])


def _block(buf, sep, k, names, need, si, ii, ti, xi, stamps, numbers_too, keep_extra, base, limit):
    """One block's rows (whole lines, the last ending in a newline) as arrays, and the field count."""
    if (buf >= 128).any() or not buf.all() or (sep != 9 and (buf == _QUOTE).any()):
        raise _Unhandled  # (non-ASCII or NUL bytes, which the ASCII reader below would refuse too; a
        # quote in a CSV, where the csv module unquotes)
    cr = np.flatnonzero(buf == _CR)
    if len(cr):
        if (buf[cr + 1] != _NL).any():
            raise _Unhandled
        buf = np.delete(buf, cr)  # (CRLF line ends)
    delim = np.flatnonzero((buf == sep) | (buf == _NL))
    kinds = buf[delim]
    n = int(np.count_nonzero(kinds == _NL))
    if k is None:
        k = int(np.argmax(kinds == _NL)) + 1  # (the first row's fields)
        if k < need:
            raise _Unhandled
    if len(delim) != n * k:
        raise _Unhandled
    kinds = kinds.reshape(n, k)
    if not ((kinds[:, -1] == _NL).all() and (kinds[:, :-1] == sep).all()):
        raise _Unhandled  # (a row of another field count: blank lines among them)
    starts = np.empty_like(delim)
    starts[0] = 0
    starts[1:] = delim[:-1] + 1
    starts = starts.reshape(n, k)
    length = delim.reshape(n, k) - starts
    if int(length.max()) > limit:
        raise _Unhandled  # (the csv module's "field larger than field limit": the reader's error)
    # the time column: all stamps (read here) or all numbers (read with the ids)
    stamp = None
    if ti is not None:
        s, w = starts[:, ti], length[:, ti]
        stamp = (w >= 10) & (buf[np.minimum(s + 4, len(buf) - 1)] == _MINUS)  # (YYYY-: as _parse_time tells)
        if stamp.all():
            stamp = True
        elif not numbers_too:
            raise _Unhandled
        else:  # (a stamp among the numbers: NumPy's float reader refuses it, and the file is handed back)
            stamp = False
    text = buf.tobytes()

    def numbers(cols, dtypes):  # numpy's C reader; a field it cannot convert: ValueError
        rec = np.loadtxt(io.BytesIO(text), dtype=[(f"f{j}", t) for j, t in enumerate(dtypes)], delimiter=chr(sep),
                         comments=None, usecols=cols, ndmin=1, encoding="ascii")
        if len(rec) != n:
            raise _Unhandled
        return [np.ascontiguousarray(rec[f"f{j}"]) for j in range(len(cols))]

    def canonical(v, c):  # as long as str() writes it: no sign, zero or space more
        return bool((length[:, c] == _canonical_length(v)).all())

    timed = ([ti] if stamp is False else []) + ([xi] if xi is not None else [])
    try:  # (the common file: integer ids and numbers, one pass)
        fields = numbers([si, ii] + timed, ["i8", "i8"] + ["f8"] * len(timed))
        ids = fields[:2] if canonical(fields[0], si) and canonical(fields[1], ii) else None
    except ValueError:
        ids = None
    if ids is None:  # text ids, in one column or both: each column on its own
        try:
            fields = [None, None] + (numbers(timed, ["f8"] * len(timed)) if timed else [])
        except ValueError:
            raise _Unhandled from None
        ids = [_id_column(buf, starts[:, c], length[:, c], numbers, canonical, c) for c in (si, ii)]
        if names is not None and (_equal(ids[0], names[si]) & _equal(ids[1], names[ii])).any():
            raise _Unhandled  # (the header line again: the reader's error)
    if ti is None:
        times = np.arange(base, base + n, dtype=np.float64)
        numeric = np.zeros(n, dtype=bool)
    elif stamp:
        times, numeric = _stamps(buf, starts[:, ti], length[:, ti], stamps), np.zeros(n, dtype=bool)
    else:
        times, numeric = _finite(fields[2]), np.ones(n, dtype=bool)  # (numbers read with the ids)
    extras = None
    if xi is not None:
        extras = _finite(fields[-1]) / 1000.0
        numeric = np.zeros(n, dtype=bool)  # (a number plus the extra time: no unit to decide)
        with np.errstate(over="ignore"):
            total = times + extras
        if not np.isfinite(total).all():
            raise _Unhandled  # (a time plus its extra past the largest double: the reader's error, kept or not)
        if not keep_extra:
            times = total
    return ids[0], ids[1], times, extras, numeric, k


def _id_column(buf, s, length, numbers, canonical, c):
    """A block's ids in column c: int64 where all are canonical integers, else the text of each
    (ASCII without spaces or control characters: the reader's ``strip()`` leaves it as it is)."""
    try:
        v = numbers([c], ["i8"])[0]
        if canonical(v, c):
            return v
    except ValueError:
        pass
    width = int(length.max())
    if length.min() < 1 or width > 256:
        raise _Unhandled  # (an empty id: the reader's error)
    g = np.where(np.arange(width) < length[:, None], _field_bytes(buf, s, width), 0)
    inside = g[g != 0]
    if ((inside <= 32) | (inside == 127)).any():
        raise _Unhandled
    return np.ascontiguousarray(g).view(f"S{width}")[:, 0].astype(str).astype(object)


def _equal(ids, name):
    """Which ids are the header's name (int64 ids: the name's canonical integer)."""
    if ids.dtype == object:
        return ids == name
    from .data import canonical_int  # (data imports this module)
    n = canonical_int(name)
    return ids == n if n is not None else np.zeros(len(ids), dtype=bool)


def _field_bytes(buf, s, width):
    """The ``width`` bytes of ``buf`` from each of the offsets ``s``, (n, width) (past the end:
    zeros)."""
    padded = np.concatenate([buf, np.zeros(width, np.uint8)])
    return np.lib.stride_tricks.sliding_window_view(padded, width)[s]


def _canonical_length(v):
    """len(str(v)) of each int64 value."""
    magnitude = np.abs(v).view(np.uint64)  # (the smallest int64's abs() wraps to itself: as uint64, 2**63)
    digits = np.maximum(np.searchsorted(_POW10_U64, magnitude, side="right"), 1)
    return digits + (v < 0)


def _finite(t):
    """numpy's float reader and ``float()`` both call CPython's ``PyOS_string_to_double`` (numpy
    takes a subset: no underscores): the same double. Non-finite times are the reader's error."""
    if not np.isfinite(t).all():
        raise _Unhandled
    return t


def _stamps(buf, s, length, stamps):
    """The fields [s, s + length) of ``buf``, each of one of the ``stamps`` (a ``_FORMATS`` entry),
    UTC, as seconds since the epoch."""
    width = int(length.max())
    g = _field_bytes(buf, s, width)  # (each field's bytes and what follows)
    widths = np.unique(length)
    for w in widths:  # (each field matches its width's template)
        if int(w) not in stamps:
            raise _Unhandled
        template = np.frombuffer(stamps[int(w)][0].encode(), np.uint8)
        rows = g[:, :w] if len(widths) == 1 else g[length == w, :w]
        match = np.where(template == ord("d"), (rows - 48) < 10,
                         np.where(template == ord("S"), (rows == ord("T")) | (rows == ord(" ")), rows == template))
        if not match.all():
            raise _Unhandled

    def num(a, b):  # the digits [a, b) of each field as a number
        v = g[:, a].astype(np.int64) - 48
        for p in range(a + 1, b):
            v = v * 10 + (g[:, p].astype(np.int64) - 48)
        return v
    year, month, day = num(0, 4), num(5, 7), num(8, 10)
    if width >= 19:
        timed = length >= 19
        hour, minute, sec = (np.where(timed, num(a, a + 2), 0) for a in (11, 14, 17))
    else:
        hour = minute = sec = 0
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    month_days = _DAYS_IN_MONTH[np.clip(month, 0, 12)] + (leap & (month == 2))
    if ((year < 1) | (month < 1) | (month > 12) | (day < 1) | (day > month_days) | (hour > 23) | (minute > 59)
            | (sec > 59)).any():
        raise _Unhandled  # (the reader's error)
    us = 0
    for w in widths:
        nf = stamps[int(w)][1]
        if nf:
            us = us + np.where(length == w, num(20, 20 + nf) * 10 ** (6 - nf), 0)
    # days since 1970-01-01 of the proleptic Gregorian date (the civil-from-days inverse, in int64)
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    total = ((days * 86400 + hour * 3600 + minute * 60 + sec) * 1_000_000) + us
    if np.abs(total).max() >= _EXACT:
        raise _Unhandled
    return total / 1e6
