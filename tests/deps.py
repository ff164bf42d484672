"""A missing test dependency fails with how to install it, not a bare ImportError."""

from __future__ import annotations

from typing import NoReturn

import pytest

INSTALL = "pip install -e '.[test]' (or scripts/install --test)"


def missing(error: ImportError) -> NoReturn:
    """Fails the test (or the collection of its module) naming the package and the install."""
    name = (error.name or str(error)).split(".")[0]
    pytest.fail(f"the test dependency {name!r} is not installed: {INSTALL}", pytrace=False)
