"""The click-log loader's fast path (rnnrec_fast/recsys/_fastread.py) against its row-by-row reader
(data._read_clicks without it): on every file, the same log to the bit (ids, their dtype, times) and
the same warnings, or the same error. Files are generated from a seeded RNG in the common formats,
then mutated byte by byte; the valid ones must be read by the fast path itself, not handed back."""
import csv
import gzip
import warnings

import numpy as np
import pytest

from rnnrec_fast.recsys import RecsysError, data, _fastread


@pytest.fixture
def reads(monkeypatch):
    """reads(load, path) -> (fast-path outcome, reader outcome, whether the fast path read the file)."""
    taken = []
    real = _fastread.read

    def spy(*args, **kw):
        out = real(*args, **kw)
        taken.append(out is not None)
        return out
    monkeypatch.setattr(_fastread, "read", spy)

    def run(load, path):
        outcomes = []
        del taken[:]
        for fast in (True, False):
            monkeypatch.setattr(data, "_FAST_READ", fast)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    log = load(path)
                    out = ("log", log.sessions.dtype.str, log.sessions.tolist(), log.items.dtype.str, log.items.tolist(),
                           log.times.dtype.str, log.times.view(np.int64).tolist())
                except RecsysError as exc:
                    out = ("error", str(exc))
            outcomes.append((out, [str(w.message) for w in caught]))
        return outcomes[0], outcomes[1], any(taken)
    return run


def _id(rng):
    kind = rng.integers(6)
    if kind == 0:
        return str(rng.integers(0, 10))
    if kind == 1:
        return str(-int(rng.integers(1, 10 ** 6)))
    if kind == 2:
        return str(int(rng.integers(10 ** 17, 10 ** 18)))
    if kind == 3:
        return "9223372036854775807"
    return str(int(rng.integers(1, 10 ** 9)))


def _text_id(rng):
    """Ids the reader keeps as text (an ASIN, a hex hash, a non-canonical integer) or, now and then,
    integers: a block of them alone reads as int64, as the reader's chunk does."""
    kind = rng.integers(6)
    if kind == 0:
        return "B0" + "".join(rng.choice(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 8))
    if kind == 1:
        return "".join(rng.choice(list("0123456789abcdef"), int(rng.integers(1, 33))))
    if kind == 2:
        return str(rng.choice(["007", "+7", "1_000", "-0", "7.0", "9223372036854775808", "-9223372036854775808",
                               "a\"b", "x:y/z-1", "~!@#$%^&*()[]{}<>?|=`'"]))
    return _id(rng)


def _number(rng):
    kind = rng.integers(7)
    if kind == 0:
        return str(int(rng.integers(10 ** 9, 2 * 10 ** 9)))
    if kind == 1:  # up to 17 significant digits, the point anywhere
        digits = "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(1, 18))))
        at = int(rng.integers(0, len(digits) + 1))
        return ("-" if rng.random() < 0.2 else "") + digits[:at] + "." + digits[at:]
    if kind == 2:
        return f"{rng.uniform(1.3e9, 1.5e9):.{int(rng.integers(0, 7))}f}"
    if kind == 3:
        return f"{rng.uniform(-5, 5):.3e}".replace("e", "eE"[int(rng.integers(2))])
    if kind == 4:
        return str(int(rng.integers(1.3e12, 1.5e12)))  # (milliseconds: the unit warning)
    if kind == 5:
        return repr(float(rng.uniform(0, 1e10)))
    return str(int(rng.integers(0, 100)))


def _stamp(rng, wild, date_only=False):
    """An ISO 8601 stamp; ``wild``: also days and times that do not exist, and years whose
    microseconds pass 2**53 (the fast path hands those back)."""
    years = [1, 1600, 1969, 1970, 2000, 2014, 2016, 2100, 2300, 9999] if wild else [1969, 1970, 2000, 2014, 2016, 2100]
    year, month = int(rng.choice(years)), int(rng.integers(1, 13))
    day = int(rng.integers(1, 32 if wild and rng.random() < 0.2 else 29))
    if rng.random() < 0.1:
        year, month, day = int(rng.choice([2000, 2015, 2016, 2100])) if wild else 2016, 2, 29
    text = f"{year:04d}-{month:02d}-{day:02d}"
    if date_only or rng.random() < 0.15:
        return text
    hour = int(rng.integers(0, 25 if wild and rng.random() < 0.1 else 24))
    sec = int(rng.integers(0, 61 if wild and rng.random() < 0.1 else 60))
    text += f"{'T' if rng.random() < 0.7 else ' '}{hour:02d}:{int(rng.integers(0, 60)):02d}:{sec:02d}"
    frac = int(rng.choice([0, 3, 6]))
    if frac:
        text += "." + "".join(str(d) for d in rng.integers(0, 10, frac))
    return text + ("Z" if rng.random() < 0.5 else "")


def _gru4rec(rng, n, wild):
    return "SessionId\tItemId\tTime\n" + "".join(f"{_id(rng)}\t{_id(rng)}\t{_number(rng)}\n" for _ in range(n))


def _gru4rec_stamps(rng, n, wild):
    return "SessionId\tItemId\tTime\n" + "".join(f"{_id(rng)}\t{_id(rng)}\t{_stamp(rng, wild)}\n" for _ in range(n))


def _raw(rng, n, wild):  # yoochoose-clicks.dat: no header, SessionId,Timestamp,ItemId,Category
    return "".join(f"{_id(rng)},{_stamp(rng, wild)},{_id(rng)},{rng.integers(0, 3)}\n" for _ in range(n))


def _diginetica(rng, n, wild):
    return "session_id;user_id;item_id;timeframe;eventdate\n" + "".join(
        f"{_id(rng)};NA;{_id(rng)};{rng.integers(0, 10 ** 7)};{_stamp(rng, wild, date_only=True)}\n" for _ in range(n))


def _text_ids(rng, n, wild):
    """Text ids in a column, integers in the other, or text in both."""
    both = rng.random() < 0.5
    return "SessionId\tItemId\tTime\n" + "".join(
        f"{_text_id(rng) if both else _id(rng)}\t{_text_id(rng)}\t{_number(rng)}\n" for _ in range(n))


def _columns(rng, n, wild):  # other columns around the named ones, in another order
    return "x,ts,item,session,y\n" + "".join(f"a b,{_number(rng)},{_id(rng)},{_id(rng)},\n" for _ in range(n))


FORMATS = {
    "gru4rec": (_gru4rec, data.load_clicks),
    "gru4rec-stamps": (_gru4rec_stamps, data.load_clicks),
    "text-ids": (_text_ids, data.load_clicks),
    "raw": (_raw, data.load_yoochoose_raw),
    "diginetica": (_diginetica, data.load_diginetica),
    "columns": (_columns, lambda p: data.load_clicks(p, session_col="session", item_col="item", time_col="ts")),
    "no-time": (_gru4rec, lambda p: data.load_clicks(p, time_col=None)),
    "no-header": (lambda rng, n, wild: _gru4rec(rng, n, wild).split("\n", 1)[1],
                  lambda p: data.load_clicks(p, header=False)),
    "numeric-extra": (lambda rng, n, wild: "s\ti\tt\tx\n" + "".join(
        f"{_id(rng)}\t{_id(rng)}\t{_number(rng)}\t{rng.integers(0, 10 ** 6)}\n" for _ in range(n)),
        lambda p: data.load_clicks(p, session_col="s", item_col="i", time_col="t", extra_time_col="x")),
    "ms-extra": (_diginetica, lambda p: data.load_clicks(p, session_col="session_id", item_col="item_id",
                                                            time_col="eventdate", extra_time_col="timeframe")),
}


def _variant(text, rng, kind):
    """The same rows written another way the reader accepts: CRLF, no last newline, a byte-order
    mark, blank lines before the header."""
    if kind == "crlf":
        return text.replace("\n", "\r\n")
    if kind == "no-last-newline":
        return text.rstrip("\n")
    if kind == "bom":
        return "\ufeff" + text
    if kind == "blank-lines":
        return "\n \n" + text
    return text


@pytest.mark.parametrize("variant", ["plain", "crlf", "no-last-newline", "bom", "blank-lines", "gzip", "blocks"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fast_path_reads_plain_files_to_the_readers_bits(reads, tmp_path, monkeypatch, fmt, variant):
    make, load = FORMATS[fmt]
    rng = np.random.default_rng([7, len(fmt), len(variant)])
    if variant == "blocks":  # blocks of a few lines: rows carried over a block's end
        monkeypatch.setattr(_fastread, "_BLOCK", int(rng.integers(40, 90)))
    for trial in range(12):
        text = _variant(make(rng, int(rng.integers(1, 40)), False), rng, variant)
        path = tmp_path / f"{fmt}-{variant}-{trial}.txt"
        raw = text.encode()
        path.write_bytes(gzip.compress(raw) if variant == "gzip" else raw)
        fast, slow, taken = reads(load, str(path))
        assert fast == slow, text
        assert taken, f"the fast path handed back a plain file:\n{text}"
        assert fast[0][0] == "log"


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fast_path_gives_the_readers_answer_on_mutated_files(reads, tmp_path, monkeypatch, fmt):
    """Random edits of valid files (a byte put in, taken out or changed, from the characters these
    formats hold and those they must not): the same log or the same error either way."""
    make, load = FORMATS[fmt]
    rng = np.random.default_rng([11, len(fmt)])
    alphabet = list("0123456789\t,;\n\r-.:TZ eE+\"x_\x00") + ["\u00e9", "\ufeff", "\u0663"]
    outcomes = {"fast": 0, "handed back": 0, "error": 0}
    for trial in range(150):
        if trial % 3 == 0:
            monkeypatch.setattr(_fastread, "_BLOCK", int(rng.integers(30, 120)))
        else:
            monkeypatch.setattr(_fastread, "_BLOCK", 8 << 20)
        text = make(rng, int(rng.integers(1, 12)), rng.random() < 0.3)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(text) + 1))
            c = alphabet[int(rng.integers(len(alphabet)))]
            edit = rng.integers(3)
            text = (text[:at] + c + text[at:] if edit == 0 else text[:at] + text[at + 1:] if edit == 1
                    else text[:at] + c + text[at + 1:])
        path = tmp_path / f"m{trial}.txt"
        path.write_bytes(text.encode())
        fast, slow, taken = reads(load, str(path))
        assert fast == slow, repr(text)
        outcomes["error" if fast[0][0] == "error" else "fast" if taken else "handed back"] += 1
    # (the edits must reach both ways: files the fast path reads and files it hands back)
    assert outcomes["fast"] >= 10 and outcomes["handed back"] + outcomes["error"] >= 10, outcomes


@pytest.mark.parametrize("field, kind", [
    ("7", "int"), ("0", "int"), ("-3", "int"), ("9223372036854775807", "int"), ("-9223372036854775808", "int"),
    ("123456789012345678", "int"),
    ("007", "text"), ("+7", "text"), ("-0", "text"), ("1_000", "text"), ("7.0", "text"), ("abc", "text"),
    ("9223372036854775808", "text"), ("-9223372036854775809", "text"), ("B00005N7P0", "text"), ('a"b', "text"),
    (" 7", None), ("7 ", None), ("a b", None), ("\u0663", None), ("\u00e9t\u00e9", None), ("", None), ("\x1c7", None),
])
def test_ids_int_where_canonical_else_text(reads, tmp_path, field, kind):
    """An id not written as ``str(int)`` writes it is text to the reader (``007`` is not ``7``), and
    so are all of its column's: the fast path reads ASCII text ids (no spaces or control characters,
    which the reader would strip) as the reader does, and hands the others back."""
    path = tmp_path / "ids.tsv"
    path.write_text(f"SessionId\tItemId\tTime\n1\t{field}\t5\n2\t8\t6\n", encoding="utf-8")
    got, want, taken = reads(data.load_clicks, str(path))
    assert got == want
    assert taken == (kind is not None)
    if kind is not None:
        assert got[0][3] == ("<i8" if kind == "int" else "|O")


@pytest.mark.parametrize("time, fast", [
    ("5", True), ("-5", True), (".5", True), ("5.", True), ("1e9", True), ("1.5E-3", True), ("+5", True),
    ("0.1", True), ("1396860669.277", True), ("12345678901234567890.5", True), ("1e308", True),
    ("1e400", False), ("nan", False), ("inf", False), ("1_0", False), ("0x10", False), ("", False), (" 5", True),
    ("2014-04-07", True), ("2014-04-07T10:51:09", True), ("2014-04-07T10:51:09.277Z", True),
    ("2014-04-07T10:51:09.123456", True), ("2016-02-29", True), ("1969-12-31T23:59:59.999999Z", True),
    ("2000-02-29T00:00:00Z", True), ("2100-02-28", True), ("2015-02-29", False), ("2100-02-29", False), ("2014-13-01", False), ("2014-04-07T24:00:00", False), ("2014-04-07T10:51:60", False),
    ("2014-04-07 10:51:09", True), ("2014-04-07 10:51:09.277Z", True), ("2014-04-07x10:51:09", False),
    ("2014-04-07T10:51:09.27", False), ("2014-04-07T10:51:09+02:00", False),
    ("0001-01-01", False), ("9999-12-31", False), ("2014-4-7", False),
])
def test_times_the_fast_path_takes(reads, tmp_path, time, fast):
    """Times in both paths: plain decimals (NumPy's reader, as ``float()``) and ISO stamps of the
    widths it knows, the rest left to the reader (which reads some of them, and refuses others)."""
    path = tmp_path / "t.tsv"
    path.write_text(f"SessionId\tItemId\tTime\n1\t10\t{time}\n", encoding="utf-8")
    got, want, taken = reads(lambda p: data.load_clicks(p, time_unit="s"), str(path))
    assert got == want
    assert taken == fast


@pytest.mark.parametrize("time_format, time, fast", [
    ("%Y-%m-%d", "2014-04-07", True), ("%Y-%m-%d", "2014-04-07T10:51:09", False), ("%Y-%m-%d", "5", False),
    ("%Y-%m-%d %H:%M:%S", "2014-04-07 10:51:09", True), ("%Y-%m-%d %H:%M:%S", "2014-04-07T10:51:09", False),
    ("%Y-%m-%dT%H:%M:%S", "2014-04-07T10:51:09", True), ("%Y-%m-%dT%H:%M:%S", "2014-04-07 10:51:09", False),
    ("%Y-%m-%d %H:%M:%S", "2014-04-07 10:51:60", False), ("%Y-%m-%d %H:%M:%S", "2014-4-7 1:51:09", False),
    ("%Y-%m-%dT%H:%M:%S", "2016-02-29T23:59:59", True), ("%d/%m/%Y", "07/04/2014", False),
])
def test_time_formats_the_fast_path_takes(reads, tmp_path, time_format, time, fast):
    """With a ``time_format`` the reader parses with ``strptime``: the fast path takes the formats
    whose strings it knows (each its own separator), the rest, and every refusal, stay the reader's."""
    path = tmp_path / "f.tsv"
    path.write_text(f"SessionId\tItemId\tTime\n1\t10\t{time}\n2\t11\t{time}\n", encoding="utf-8")
    got, want, taken = reads(lambda p: data.load_clicks(p, time_format=time_format), str(path))
    assert got == want
    assert taken == fast


def test_fast_path_hands_back_what_only_the_reader_handles(reads, tmp_path):
    """Quotes in a CSV, a lone CR, blank lines between rows, rows of other lengths, a header again,
    a header of integer names, other time formats, a NUL byte: the reader's answer (its rows, or its error
    naming the line)."""
    cases = {
        "quoted.csv": ('SessionId,ItemId,Time\n"1",10,5\n', data.load_clicks),
        "cr.tsv": ("SessionId\tItemId\tTime\r1\t10\t5\r", data.load_clicks),
        "blank.tsv": ("SessionId\tItemId\tTime\n1\t10\t5\n\n2\t11\t6\n", data.load_clicks),
        "short.tsv": ("SessionId\tItemId\tTime\n1\t10\t5\n2\t11\n", data.load_clicks),
        "long.tsv": ("SessionId\tItemId\tTime\n1\t10\t5\n2\t11\t6\t\n", data.load_clicks),
        "again.tsv": ("SessionId\tItemId\tTime\n1\t10\t5\nSessionId\tItemId\tTime\n", data.load_clicks),
        "again-text.tsv": ("SessionId\tItemId\tTime\n1\t10\t5\nSessionId\tItemId\t6\n", data.load_clicks),
        "again-int.tsv": ("7\tItemId\tTime\n1\t10\t5\n7\tItemId\t6\n",
                          lambda p: data.load_clicks(p, session_col="7")),
        "intnames.tsv": ("1\t2\tTime\n3\t4\t5\n1\t2\t6\n", lambda p: data.load_clicks(p, session_col="1", item_col="2")),
        "format.tsv": ("SessionId\tItemId\tTime\n1\t10\t07/04/2014\n",
                       lambda p: data.load_clicks(p, time_format="%d/%m/%Y")),
        "ragged.csv": ("1,10,5\n2,11,6,x\n", lambda p: data.load_clicks(p, header=False)),
        "mixed.tsv": ("SessionId\tItemId\tTime\n1\t10\t5\n2\t11\t2014-04-07\n", data.load_clicks),
        "empty.tsv": ("SessionId\tItemId\tTime\n", data.load_clicks),
        # (a row one field long, the next one short: as many separators as rows of three)
        "shifted.tsv": ("SessionId\tItemId\tTime\n1\t2\t3\t9\n4\t5\n", lambda p: data.load_clicks(p, time_col=None)),
        # (a quoted comma before the columns read: split there, they would be read one field over)
        "quoted-comma.csv": ('"a,b",x,5,6,7,8\n',
                             lambda p: data.load_clicks(p, header=False, session_col=3, item_col=4, time_col=5)),
        # (a lone CR before the header: a line of its own to the reader)
        "cr-blank.tsv": ("\r\r\nSessionId\tItemId\tTime\n1\t10\t5\n2\t11\t6\n", data.load_clicks),
        # (a NUL ending a text id: the reader keeps it, NumPy's bytes to str would drop it: 'a')
        "nul-id.tsv": ("SessionId\tItemId\tTime\n1\ta\x00\t5\n2\tb\t6\n", data.load_clicks),
    }
    for name, (text, load) in cases.items():
        path = tmp_path / name
        path.write_bytes(text.encode())
        got, want, taken = reads(load, str(path))
        assert got == want, name
        assert not taken, name
    # (the header again and the integer-named header's own row are the reader's errors, named)
    for name in ("again.tsv", "again-text.tsv", "again-int.tsv"):
        assert "the header line again" in reads(cases[name][1], str(tmp_path / name))[0][0][1], name
    assert "the header line again" in reads(cases["intnames.tsv"][1], str(tmp_path / "intnames.tsv"))[0][0][1]


def test_fast_path_reads_the_shared_samples_as_the_reader_does(reads):
    """The real click-log samples, where they are (../shared/data or RNNREC_FAST_DATA)."""
    folder = data.resolve_data_dir()
    if folder is None:
        pytest.skip("no click-log samples here")
    import os
    names = [n for n in sorted(os.listdir(folder)) if n.startswith(("yoochoose", "diginetica"))]
    assert names
    for name in names:
        got, want, taken = reads(data.load_any, os.path.join(folder, name))
        assert got == want and taken and got[0][0] == "log", name


_LONG = "x" * (csv.field_size_limit() + 1)
_ONCE = [
    ("session-past.tsv", "SessionId\tItemId\tTime\n1\t2\t3\n", dict(session_col=5)),
    ("time-past.tsv", "SessionId\tItemId\tTime\n1\t2\t3\n", dict(time_col=5)),
    ("extra-past.tsv", "SessionId\tItemId\tTime\n1\t2\t3\n", dict(extra_time_col=3)),
    ("extra-no-time.tsv", "SessionId\tItemId\tx\n1\t2\t5000\n3\t4\t7000\n", dict(time_col=None, extra_time_col="x")),
    ("extra-overflow.tsv", "s\ti\tt\tx\n1\t2\t1.7976931348623157e308\t1e308\n",
     dict(session_col="s", item_col="i", time_col="t", extra_time_col="x")),
    ("long-unread.tsv", f"SessionId\tItemId\tTime\tNote\n1\t2\t3\t{_LONG}\n", {}),
    ("long-unread.csv", f"1,2,3,{_LONG}\n", dict(header=False)),
    ("long-time.tsv", "SessionId\tItemId\tTime\n1\t2\t0." + "0" * len(_LONG) + "1\n", {}),
]


@pytest.mark.parametrize("name, text, kw", _ONCE, ids=[c[0] for c in _ONCE])
def test_fast_path_gives_the_readers_answer_where_it_once_did_not(reads, tmp_path, name, text, kw):
    """Files the fast path once read otherwise than the reader: a column past the header's (an
    IndexError, not the reader's malformed-row error), an extra time without a time column (the
    reader reads no extra time then: the row order), a time plus its extra past the largest double
    (the reader's error naming the line, not ClickLog's and a RuntimeWarning), and a field longer
    than the csv module's limit, in a column read or not (the reader's error)."""
    path = tmp_path / name
    path.write_bytes(text.encode())
    got, want, taken = reads(lambda p: data.load_clicks(p, **kw), str(path))
    assert got == want
    if name == "extra-no-time.tsv":
        assert got[0][6] == np.array([0.0, 1.0]).view(np.int64).tolist()


def test_keep_extra_without_extra_times_is_the_readers(tmp_path, monkeypatch):
    """The internal reader's keep_extra (Diginetica's loader) with no extra time read: the reader's
    answer (an empty array of extras), as the fast path hands the file back."""
    path = tmp_path / "k.tsv"
    path.write_text("SessionId\tItemId\tTime\tx\n1\t2\t3\t4\n", encoding="utf-8")
    for kw in (dict(time_col=None, extra_time_col=3), dict(time_col=2, extra_time_col=None)):
        outs = []
        for fast in (True, False):
            monkeypatch.setattr(data, "_FAST_READ", fast)
            log, extras, numeric = data._load_clicks(str(path), 0, 1, kw["time_col"], "\t", True, None,
                                                     kw["extra_time_col"], keep_extra=True)
            outs.append((log.times.tolist(), None if extras is None else extras.tolist(), numeric.tolist()))
        assert outs[0] == outs[1], kw
