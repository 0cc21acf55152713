"""pytest settings for the notebooks' nbval runs (``pytest --nbval-lax chapters/...``).

Once a cell has run, nbval waits for each of its output messages at most 5 seconds, a figure
it hard-codes (nbval issues 136 and 231). On a loaded machine, such as the test command's
two pages side by side on two cores, one of them running torch.distributed's processes, a
message can take longer, and the page then fails with "Timeout of 5 seconds exceeded
waiting for output" although nothing in it went wrong. Each cell waits up to a minute here.
The time a cell may take to run is nbval's own option (``--nbval-cell-timeout``).
"""

from __future__ import annotations

import pytest

OUTPUT_TIMEOUT_S = 60


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if hasattr(item, "output_timeout"):  # nbval's notebook cells
            item.output_timeout = OUTPUT_TIMEOUT_S
