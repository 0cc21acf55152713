"""`bench.remeasured`: a claim that fails on a disturbed measurement is measured again; a
claim that fails every time is raised."""

import pytest

from effarch import bench


def _series(*values):
    it = iter(values)
    calls = []

    def measure():
        calls.append(1)
        return next(it)

    return measure, calls


def _below_two(t):
    assert t < 2, f"t = {t}"


def test_a_disturbed_measurement_is_taken_again_and_the_clean_one_returned():
    measure, calls = _series(5.0, 7.0, 1.5)
    lines = []
    assert bench.remeasured(measure, _below_two, attempts=3, log=lines.append) == 1.5
    assert len(calls) == 3
    assert len(lines) == 2 and "t = 5.0" in lines[0] and "t = 7.0" in lines[1]
    assert all('`assert t < 2, f"t = {t}"`' in line for line in lines)  # which claim
    assert not any("Error:" in line for line in lines)


def test_a_clean_first_measurement_is_not_repeated():
    measure, calls = _series(1.0, 5.0)
    lines = []
    assert bench.remeasured(measure, _below_two, log=lines.append) == 1.0
    assert len(calls) == 1 and lines == []


def test_a_claim_that_fails_every_time_is_raised_after_the_last_attempt():
    measure, calls = _series(5.0, 6.0, 7.0, 1.0)
    with pytest.raises(AssertionError, match="t = 6.0"):
        bench.remeasured(measure, _below_two, attempts=2, log=lambda _: None)
    assert len(calls) == 2


def test_a_fit_the_measurement_cannot_support_is_retried_too():
    measure, calls = _series([1.0], [1.0, 2.0])  # the first series cut short

    def fits(series):
        if len(series) < 2:
            raise ValueError("fit_exponent needs at least 2 points")

    lines = []
    assert bench.remeasured(measure, fits, log=lines.append) == [1.0, 2.0]
    assert len(calls) == 2 and "fit_exponent needs" in lines[0]
    # the line lands in a page's output, where "Error:" reads as a failed cell
    assert "Error:" not in lines[0] and "Traceback" not in lines[0]


def test_an_error_in_the_measurement_itself_is_not_retried():
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        bench.remeasured(broken, _below_two, log=lambda _: None)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"measure": 3}, TypeError, "measure must be callable"),
        ({"check": None}, TypeError, "check must be callable"),
        ({"attempts": 0}, ValueError, "attempts must be a positive int, got 0"),
        ({"attempts": 1.5}, TypeError, "attempts must be an int"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"measure": lambda: 1.0, "check": _below_two} | kwargs
    with pytest.raises(error, match=match):
        bench.remeasured(**args)
