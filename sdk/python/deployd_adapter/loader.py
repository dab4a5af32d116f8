"""Finding and importing the workflow an `import-path` names.

llama_deploy 0.8 and 0.9 load a service this way (`Deployment._load_services`):

    module_path_str, workflow_name = service_config.import_path.split(":")
    module_path = Path(module_path_str)
    module_name = module_path.name
    pythonpath = (destination / module_path.parent).resolve()
    sys.path.append(str(pythonpath))
    module = importlib.import_module(module_name)
    workflow = getattr(module, workflow_name)

where `destination` is the deployment's folder, in which a local source `location: src` is copied
to `<destination>/src` and a git source is checked out at `<destination>` itself. deployd starts
the adapter in the root of the service's synced source instead: the checkout of a git source (the
same folder), or the copy of a local source's folder (`<destination>/src` above). So the folder
part of the path is looked up from the working directory first as it is, then without its leading
parts, one at a time: `src/workflow` finds `./src/workflow.py` or, in the copy of `src`,
`./workflow.py`. The first folder that holds the module wins; when none does, the path is used as
written and the import fails with Python's own error.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any


class LoadError(Exception):
    """The workflow cannot be loaded. `str()` is the one line to show."""


@dataclass
class Flavor:
    """The workflow library a workflow is written with, and the parts of it the adapter uses."""

    package: str  # "workflows" or "llama_index.core.workflow"
    distribution: str  # the PyPI name, for messages
    version: str
    Workflow: type
    Context: type
    JsonSerializer: type
    Event: type
    StopEvent: type


@dataclass
class Loaded:
    workflow: Any
    flavor: Flavor
    module_dir: Path
    module_name: str
    attribute: str


def split_import_path(import_path: str) -> tuple[str, str]:
    """`"src/workflow:echo_workflow"` → `("src/workflow", "echo_workflow")`."""
    parts = import_path.strip().split(":")
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        raise LoadError(
            f"invalid import-path {import_path!r}: expected `path/to/module:attribute`, "
            "e.g. `src/workflow:echo_workflow`"
        )
    return parts[0].strip(), parts[1].strip()


def _has_module(folder: Path, module_name: str) -> bool:
    top = module_name.split(".")[0]
    return (folder / f"{top}.py").is_file() or (folder / top).is_dir()


def resolve(import_path: str, root: Path) -> tuple[Path, str, str]:
    """The folder to put on `sys.path`, the module name and the attribute."""
    module_path_str, attribute = split_import_path(import_path)
    module_path = Path(module_path_str)
    if module_path.is_absolute():
        raise LoadError(f"invalid import-path {import_path!r}: the path must be relative")
    module_name = module_path.name
    # `src/workflow.py:wf` is taken as `src/workflow:wf` (llama_deploy would fail on it).
    if module_name.endswith(".py") and len(module_name) > 3:
        module_name = module_name[:-3]
    parents = module_path.parent.parts
    if parents == (".",):
        parents = ()
    for skip in range(len(parents) + 1):
        folder = root.joinpath(*parents[skip:])
        if _has_module(folder, module_name):
            return folder.resolve(), module_name, attribute
    return root.joinpath(*parents).resolve(), module_name, attribute


def _version(distribution: str) -> str:
    try:
        from importlib import metadata

        return metadata.version(distribution)
    except Exception:
        return "unknown"


def _workflow_base(cls: type) -> tuple[str, type] | None:
    """The library (`workflows` or `llama_index.core.workflow`) and the `Workflow` base class
    that `cls` derives from, if any."""
    for base in cls.__mro__:
        if base.__name__ != "Workflow":
            continue
        module = base.__module__ or ""
        if module == "workflows" or module.startswith("workflows."):
            return "workflows", base
        if module.startswith("llama_index.core.workflow"):
            return "llama_index.core.workflow", base
    return None


def detect_flavor(workflow: Any) -> Flavor | None:
    """Which library the workflow's class derives from: `workflows` (llama-index-workflows) or
    `llama_index.core.workflow` (llama-index-core). From llama-index-core 0.12.4x on, the latter
    re-exports the former, so a workflow written against the core package is then found to be a
    `workflows` one: the same classes."""
    found = _workflow_base(type(workflow))
    if found is None:
        return None
    package, base = found
    return _flavor_workflows(base) if package == "workflows" else _flavor_core(base)


def _flavor_workflows(base: type) -> Flavor:
    import workflows
    from workflows import events
    from workflows.context import JsonSerializer

    return Flavor(
        package="workflows",
        distribution="llama-index-workflows",
        version=_version("llama-index-workflows"),
        Workflow=base,
        Context=workflows.Context,
        JsonSerializer=JsonSerializer,
        Event=events.Event,
        StopEvent=events.StopEvent,
    )


def _flavor_core(base: type) -> Flavor:
    core = importlib.import_module("llama_index.core.workflow")
    try:
        serializer = core.JsonSerializer
    except AttributeError:  # older llama-index-core
        serializer = importlib.import_module(
            "llama_index.core.workflow.context_serializers"
        ).JsonSerializer
    return Flavor(
        package="llama_index.core.workflow",
        distribution="llama-index-core",
        version=_version("llama-index-core"),
        Workflow=base,
        Context=core.Context,
        JsonSerializer=serializer,
        Event=core.Event,
        StopEvent=core.StopEvent,
    )


def _last_traceback_line(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    text = "".join(lines).strip().splitlines()
    return text[-1].strip() if text else type(exc).__name__


def load(import_path: str, root: Path | None = None) -> Loaded:
    """Imports the module an import-path names and returns its workflow.

    Raises `LoadError` with one line naming the import-path, the module, its folder, the attribute
    and the last line of the Python traceback. The full traceback of an error raised while the
    module runs is printed to stderr first.
    """
    root = Path.cwd() if root is None else root
    folder, module_name, attribute = resolve(import_path, root)
    where = f"import-path {import_path!r} (module {module_name!r} in {folder}, attribute {attribute!r})"

    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    importlib.invalidate_caches()
    try:
        module: ModuleType = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # The module itself (or its package) is missing: the traceback adds nothing.
        if exc.name and module_name.split(".")[0] == exc.name.split(".")[0]:
            raise LoadError(f"cannot load {where}: {_last_traceback_line(exc)}") from None
        traceback.print_exc()
        raise LoadError(f"cannot load {where}: {_last_traceback_line(exc)}") from None
    except BaseException as exc:  # anything the module's own code raised, SystemExit included
        traceback.print_exc()
        raise LoadError(f"cannot load {where}: {_last_traceback_line(exc)}") from None

    if not hasattr(module, attribute):
        exc = AttributeError(f"module {module_name!r} has no attribute {attribute!r}")
        found = getattr(module, "__file__", None)
        elsewhere = ""
        if found and not Path(found).resolve().is_relative_to(folder):
            # Another module of the same name came first on sys.path (llama_deploy appends the
            # folder to sys.path, so an installed or standard module of that name wins).
            elsewhere = f" (the module imported is {found})"
        raise LoadError(f"cannot load {where}: {_last_traceback_line(exc)}{elsewhere}")
    workflow = getattr(module, attribute)

    if isinstance(workflow, type) and _workflow_base(workflow) is not None:
        raise LoadError(
            f"cannot load {where}: TypeError: {attribute!r} is a Workflow class, not an "
            f"instance; create one in the module (`workflow = {workflow.__name__}()`) "
            "and name it in the import-path"
        )
    flavor = detect_flavor(workflow)
    if flavor is None or not isinstance(workflow, flavor.Workflow):
        kind = type(workflow).__name__
        raise LoadError(
            f"cannot load {where}: TypeError: {attribute!r} is a {kind}, not a Workflow instance "
            "(llama-index-workflows' `workflows.Workflow` or llama-index-core's "
            "`llama_index.core.workflow.Workflow`)"
        )
    return Loaded(
        workflow=workflow,
        flavor=flavor,
        module_dir=folder,
        module_name=module_name,
        attribute=attribute,
    )
