"""Property-based tests of the results-CSV reader: valid tables round-trip, bad ones are named."""

import csv
import math
import tempfile

from hypothesis import given, settings, strategies as st

from bigmodel.scaling import results

positive = st.floats(min_value=1e-3, max_value=1e15, allow_nan=False, allow_infinity=False)
bad = st.sampled_from(["nan", "-1", "0", "", "abc", "inf"])


def write(rows, header=("params", "tokens", "loss")):
    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False, newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return f.name


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(positive, positive, positive), min_size=1, max_size=30))
def test_valid_tables_read_back_exactly(rows):
    data = results.read_results(write([[repr(v) for v in r] for r in rows]))
    assert list(data.params) == [r[0] for r in rows]
    assert list(data.tokens) == [r[1] for r in rows]
    assert list(data.loss) == [r[2] for r in rows]
    assert all(math.isclose(c, 6 * n * d) for c, n, d in zip(data.flops, data.params, data.tokens))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(positive, positive, positive), min_size=1, max_size=10), st.data())
def test_one_bad_value_is_named_with_row_and_column(rows, draw):
    rows = [[repr(v) for v in r] for r in rows]
    i = draw.draw(st.integers(0, len(rows) - 1))
    j = draw.draw(st.integers(0, 2))
    rows[i][j] = draw.draw(bad)
    try:
        results.read_results(write(rows))
    except results.ScalingDataError as e:
        message = str(e)
        assert ("params", "tokens", "loss")[j] in message
        assert str(i + 2) in message  # the file line (header is line 1)
    else:
        raise AssertionError(f"accepted a bad value {rows[i][j]!r}")


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["params", "tokens", "loss"]))
def test_missing_column_is_named(column):
    header = [c for c in ("params", "tokens", "loss") if c != column]
    try:
        results.read_results(write([["1.0", "2.0"]], header=header))
    except results.ScalingDataError as e:
        assert column in str(e)
    else:
        raise AssertionError("accepted a table without " + column)
