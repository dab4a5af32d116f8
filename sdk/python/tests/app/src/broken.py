"""A module that fails while it is imported."""

import wflib  # noqa: F401

raise RuntimeError("broken at import time")
