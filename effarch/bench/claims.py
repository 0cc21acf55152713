"""Timing claims that survive a busy machine: measure, check, and measure again on failure.

A page that says "this path is linear in T" asserts the fitted exponent in the cell that
measures it, so the text can never contradict the figure. Wall-clock time on shared cores
is disturbed by other work, and a disturbance only ever slows calls down, unevenly: one
slowed length bends a fitted exponent, one slowed baseline shrinks a speed-up. Such a
disturbance is transient; a regression in the code is not. :func:`remeasured` therefore
re-runs the whole measurement when a claim fails and raises only when the claim fails on
every one of ``attempts`` independent measurements.

>>> import itertools
>>> noisy = itertools.chain([5.0], itertools.repeat(1.0))  # the first measurement disturbed
>>> def check(t):
...     assert t < 2, t
>>> remeasured(lambda: next(noisy), check, log=lambda msg: None)
1.0
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from .._checks import check_callable, check_positive_int

R = TypeVar("R")


def remeasured(
    measure: Callable[[], R],
    check: Callable[[R], Any],
    *,
    attempts: int = 3,
    log: Callable[[str], Any] = print,
) -> R:
    """Return ``measure()`` once ``check`` accepts it, measuring afresh up to ``attempts`` times.

    ``check(result)`` states the page's claims about a measurement with ``assert`` (a fitted
    exponent, an ordering, a speed-up with its margin). When it raises (a failed claim, or a
    fit that a series cut short by a time budget cannot support) the message is passed to
    ``log`` and the measurement is repeated from scratch; after ``attempts`` rejected
    measurements the last exception is raised, so a real regression still fails the page and
    its tests. An exception from ``measure`` itself propagates at once.

    Args:
        measure: takes no argument and returns the measurement (a sweep, a dict of times).
        check: asserts the claims about one measurement; its return value is ignored.
        attempts: the most measurements taken (>= 1).
        log: receives one line per rejected measurement (``print`` by default).

    Returns:
        The first measurement that ``check`` accepted.

    Raises:
        AssertionError: the claims failed on every measurement (or the exception that
            ``check`` raised).
        TypeError: ``measure``/``check``/``log`` is not callable.
        ValueError: ``attempts`` is not a positive integer.
    """
    check_callable("measure", measure)
    check_callable("check", check)
    check_callable("log", log)
    check_positive_int("attempts", attempts)
    for attempt in range(1, attempts + 1):
        result = measure()
        try:
            check(result)
        except Exception as err:
            if attempt == attempts:
                raise
            log(
                f"(measurement {attempt} of at most {attempts} broke a timing claim, "
                f"{_claim_line(err)}{err!s:.120}; other work on the cores slows calls "
                "unevenly: measuring again)"
            )
        else:
            return result
    raise AssertionError("unreachable")  # pragma: no cover


def _claim_line(err: BaseException) -> str:
    """The line of ``check`` that raised (its ``assert``), as ``"`line`: "``, or ``""``
    where its source is not known: a dict of measurements cut to 120 characters may not
    show which of several claims failed."""
    frames = traceback.extract_tb(err.__traceback__)
    # frames[0] is remeasured's own call of check; frames[1] is the line of check
    line = frames[1].line if len(frames) > 1 else None
    return f"`{line}`: " if line else ""
