"""The user's own components: modules and files imported into the registries, the same in every process.

Three sources, all registering into the same registries:

- ``--import MODULE_OR_FILE`` (repeatable) on ``toolbox.run`` and ``toolbox.sweep``;
- a sweep file's own ``import`` statements, or components defined in the sweep file itself;
- installed packages that declare the entry-point group ``toolbox.components``.

The driver records what it imported in the config (``imports``), and every process that builds a
component (a trial, a Ray Train worker, a fused worker, a process on another node) calls ``load``
with it first. A file's directory goes on ``sys.path`` first, so that the file's own imports of its
neighbours work; on a cluster the Python files of those directories travel in Ray's ``runtime_env`` as
one package (``shipped_code``), and the workers there import the same modules by name from it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
import traceback
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from toolbox.config.registry import ConfigError, Registry, one_line

ENTRY_POINT_GROUP = "toolbox.components"
# Set on the workers of a cluster the user's code was shipped to: files are imported by module name there,
# from the package they travel in (a py_module, which merges with a submitted job's own working_dir).
SHIPPED = "TOOLBOX_USER_CODE_SHIPPED"
SHIPPED_PACKAGE = "toolbox_user_code"
# Frames of these files are never the user's line: toolbox's own, the standard library's, installed packages'.
_NOT_USER_CODE = (
    "<",
    str(Path(__file__).resolve().parents[1]),
    *{sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")},
)

_files: dict[str, tuple[tuple[int, int], ModuleType]] = {}  # by resolved path: (mtime, size) and the module
_registering: set[str] = set()  # the resolved paths of imported files that registered components
_origins: dict[str, str] = {}
_code_dirs: list[str] = []  # the directories of the files ``load`` imported, in order: they travel to a cluster
_entry_points_loaded = False


def is_file(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or "/" in spec


def canonical(specs: Iterable[str]) -> tuple[str, ...]:
    """Files as absolute paths (a trial's process has another working directory), modules as given; once each."""
    out: list[str] = []
    for spec in specs:
        spec = str(Path(spec).expanduser().resolve()) if is_file(spec) else spec
        if spec not in out:
            out.append(spec)
    return tuple(out)


def load(specs: Iterable[str] = ()) -> None:
    """Import the installed entry points, then each of ``specs``; a failure is one ConfigError naming the file and line."""
    load_entry_points()
    for spec in specs:
        module = import_file(Path(spec)) if is_file(spec) else _import_module(spec, spec)
        _origins[spec] = getattr(module, "__file__", None) or spec
        if is_file(spec) and str(Path(spec).parent) not in _code_dirs and not os.environ.get(SHIPPED):
            _code_dirs.append(str(Path(spec).parent))


def origins() -> dict[str, str]:
    """Each spec ``load`` imported in this process, and the file it came from (on a cluster: the shipped copy)."""
    return dict(_origins)


def load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - any error in user code, an exit too, becomes one line
            raise ConfigError(
                f"{_where(exc, entry.value)}: entry point {entry.name!r} ({ENTRY_POINT_GROUP}) failed to import: {one_line(exc)}"
            ) from None


def import_file(path: Path, module_name: str | None = None, failing: str = "") -> ModuleType:
    """The module of a ``.py`` file, executed once per process (again only if the file changed).

    Its directory goes on ``sys.path`` first. On a cluster's worker the file is imported by name from
    the shipped code instead of from the driver's path, which need not exist there. ``failing`` says
    what failed in the error's line (default: "cannot import FILE")."""
    name = module_name or path.stem
    if os.environ.get(SHIPPED) and not module_name:
        shipped = importlib.import_module(SHIPPED_PACKAGE).__path__[0]
        if shipped not in sys.path:
            sys.path.insert(0, shipped)
        return _import_module(name, str(path))
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"--import {path}: no such file")
    key, stamp = str(path), (path.stat().st_mtime_ns, path.stat().st_size)
    if key in _files and _files[key][0] == stamp:
        return _files[key][1]
    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    taken = sys.modules.get(name)
    if taken is not None and getattr(taken, "__file__", None) and Path(taken.__file__).resolve() == path and key not in _files:
        _files[key] = (stamp, taken)  # imported already, by a plain import statement
        return taken
    if taken is not None and key not in _files and module_name is None:  # a sweep file's own name is toolbox's to reuse
        raise ConfigError(
            f"--import {path}: its module name {name!r} is taken by {getattr(taken, '__file__', None) or 'a built-in'}"
        )
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its own imports, and pickles by reference, find it by name
    before = Registry.registrations
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any error in user code, an exit too, becomes one line naming the file and line
        sys.modules.pop(name, None)
        raise ConfigError(f"{_where(exc, str(path))}: {failing or f'cannot import {path.name}'}: {one_line(exc)}") from None
    if Registry.registrations > before:
        _registering.add(key)
    _files[key] = (stamp, module)
    return module


def registers(path: Path) -> bool:
    """Whether importing this file (itself, or through its own imports) registered any component."""
    return str(path.expanduser().resolve()) in _registering


def _import_module(name: str, shown: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any error in user code, an exit too, becomes one line naming the file and line
        raise ConfigError(f"{_where(exc, shown)}: cannot import {name}: {one_line(exc)}") from None


def _where(exc: BaseException, fallback: str) -> str:
    """``file:line`` of the innermost frame of the user's code (not toolbox's, not the import machinery's)."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return f"{exc.filename}:{exc.lineno}"
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if not frame.filename.startswith(_NOT_USER_CODE)]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else fallback


def code_dirs() -> list[str]:
    """The directories of the user's files imported in this process (they go on every local worker's path)."""
    return list(_code_dirs)


def shipped_code() -> str | None:
    """A package directory holding the Python files and packages of ``code_dirs()``, for a cluster's
    ``runtime_env`` (``py_modules``): only code travels, not the data beside it. None when there is no user code."""
    if not _code_dirs:
        return None
    staging = Path(tempfile.mkdtemp(prefix="toolbox-user-code-")) / SHIPPED_PACKAGE
    staging.mkdir()
    (staging / "__init__.py").write_text("")
    for directory in map(Path, _code_dirs):
        for entry in directory.iterdir():
            target = staging / entry.name
            if entry.is_file() and entry.suffix == ".py" and entry.name != "__init__.py":
                if target.exists() and target.read_bytes() != entry.read_bytes():
                    raise ConfigError(f"two user modules named {entry.name} ({directory} and another directory): rename one")
                shutil.copy2(entry, target)
            elif entry.is_dir() and (entry / "__init__.py").is_file() and not target.exists():
                shutil.copytree(entry, target, ignore=_not_code)
    return str(staging)


def _not_code(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__" or (not n.endswith(".py") and not os.path.isdir(os.path.join(directory, n)))]
