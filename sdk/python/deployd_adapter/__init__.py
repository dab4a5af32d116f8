"""deployd's Python adapter: serves one llama-index Workflow over deployd's service protocol.

Run as `python -m deployd_adapter` in the service's source root, with `PORT` and
`DEPLOYD_IMPORT_PATH` (or `--import-path`) in its environment. See README.md.
"""

__version__ = "0.1.0"

from .app import main  # noqa: E402

__all__ = ["main", "__version__"]
