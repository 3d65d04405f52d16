"""Property-based tests of the file loaders: whatever bytes a .jsonl/.json/.csv file holds, loading
and validating it gives rows or a DataError that names the file (and the line, for a line's fault),
never another exception; well-formed files round-trip exactly.

Bounded for CI: a fixed number of examples per property, no deadline, a few seconds in all.
"""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlxf.data import DataError, load_rows, validate_rows
from rlxf.data.formats import UNREADABLE

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("sft", "preference", "prompt")
TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected", "answer")

# JSON values, objects with the field names rows use, and lines built from them or from raw text
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
row_objects = st.dictionaries(st.sampled_from(TEXT_FIELDS + ("messages", "chosen_score", "margin")),
                              st.text(max_size=8) | json_values, max_size=5)


@st.composite
def jsonl_lines(draw) -> list[str]:
    """Lines of a .jsonl file: objects, objects cut short, other JSON values, blank lines, raw text."""
    lines = []
    for _ in range(draw(st.integers(1, 8))):
        choice = draw(st.integers(0, 4))
        if choice == 0:
            lines.append(json.dumps(draw(row_objects), ensure_ascii=draw(st.booleans())))
        elif choice == 1:
            whole = json.dumps(draw(row_objects))
            lines.append(whole[:draw(st.integers(0, len(whole)))])
        elif choice == 2:
            lines.append(json.dumps(draw(json_values)))
        elif choice == 3:
            lines.append(draw(st.sampled_from(["", "   ", "\t"])))
        else:
            lines.append(draw(st.text(max_size=20)).replace("\n", " "))
    return lines


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _load_and_validate(path, kind: str, keep_invalid: bool, skip_invalid: bool):
    """Rows, or the DataError; anything else propagates and fails the property."""
    try:
        rows = load_rows(str(path), kind=kind, keep_invalid=keep_invalid)
        return validate_rows(rows, kind=kind, skip_invalid=skip_invalid)
    except DataError as error:
        return error


def _check_error(error: DataError, path) -> None:
    message = str(error)
    assert str(path) in message, message
    if "invalid JSON" in message or "not valid UTF-8" in message or "CSV record" in message:
        assert re.search(rf"{re.escape(str(path))}:\d+", message), message


@FUZZ
@given(raw=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
       kind=st.sampled_from(KINDS), keep_invalid=st.booleans(), skip_invalid=st.booleans(),
       bom=st.booleans())
def test_any_bytes_give_rows_or_a_data_error_naming_the_file(folder, raw, suffix, kind, keep_invalid,
                                                            skip_invalid, bom):
    path = folder / f"bytes{suffix}"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + raw)
    result = _load_and_validate(path, kind, keep_invalid, skip_invalid)
    if isinstance(result, DataError):
        _check_error(result, path)
    else:
        rows, skipped = result
        assert rows and skipped >= 0


@FUZZ
@given(lines=jsonl_lines(), kind=st.sampled_from(KINDS), crlf=st.booleans(), bom=st.booleans())
def test_jsonl_lines_are_rows_or_counted_skips_or_errors_naming_their_lines(folder, lines, kind, crlf, bom):
    path = folder / "lines.jsonl"
    text = ("\r\n" if crlf else "\n").join(lines) + "\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    nonblank = [line for line in lines if line.strip()]
    try:
        rows = load_rows(str(path), kind=kind, keep_invalid=True)
    except DataError as error:
        assert not nonblank and "no rows in" in str(error)
        return
    assert len(rows) == len(nonblank)                     # one row (or placeholder) per non-blank line
    for row in rows:                                      # each readable row is the object of the line it names
        line = lines[int(row["_where"].rsplit(":", 1)[1]) - 1]
        if UNREADABLE not in row:
            assert json.dumps({k: v for k, v in row.items() if k != "_where"}, sort_keys=True) == \
                json.dumps(json.loads(line), sort_keys=True)
    result = _load_and_validate(path, kind, keep_invalid=True, skip_invalid=True)
    if isinstance(result, DataError):                     # only when no row at all is valid
        _check_error(result, path)
    else:
        valid, skipped = result
        assert len(valid) + skipped == len(nonblank)      # every bad line is counted, none disappears


@FUZZ
@given(objects=st.lists(st.dictionaries(st.sampled_from(TEXT_FIELDS), st.text(max_size=10), min_size=1,
                                        max_size=4), min_size=1, max_size=6),
       suffix=st.sampled_from([".jsonl", ".json"]), bom=st.booleans(), crlf=st.booleans())
def test_well_formed_json_files_round_trip(folder, objects, suffix, bom, crlf):
    path = folder / f"objects{suffix}"
    newline = "\r\n" if crlf else "\n"
    text = (newline.join(json.dumps(o, ensure_ascii=False) for o in objects) + newline if suffix == ".jsonl"
            else json.dumps(objects, ensure_ascii=False, indent=1).replace("\n", newline))
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    rows = load_rows(str(path), kind="sft")
    assert [{k: v for k, v in r.items() if k != "_where"} for r in rows] == objects


@FUZZ
@given(records=st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10),
                                  st.floats(allow_nan=False, allow_infinity=False)),
                        min_size=1, max_size=6),
       bom=st.booleans())
def test_well_formed_csv_round_trips_with_quotes_commas_and_newlines(folder, records, bom):
    path = folder / "pairs.csv"
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["prompt", "chosen", "chosen_score"])
    writer.writerows(records)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode())
    rows = load_rows(str(path), kind="preference")
    assert [{k: v for k, v in r.items() if k != "_where"} for r in rows] == \
        [{"prompt": p or None, "chosen": c or None, "chosen_score": s} for p, c, s in records]
