"""Put on PYTHONPATH of a child process: records what the process changes on disk and every
SQLite database it opens, through Python's audit hooks (PEP 578).

$WRITE_AUDIT_WATCH: the folder whose changes are recorded; $WRITE_AUDIT_LOG: a folder that
receives rank-$RANK.txt at exit, one "event<TAB>path" line each. Writes made by C++ code
(torch.save to a path) are not seen, but the files and folders around them are.
"""

import atexit
import os
import sys

_WATCH = os.path.abspath(os.environ.get("WRITE_AUDIT_WATCH") or "/nonexistent")
_LOG = os.environ.get("WRITE_AUDIT_LOG")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_events: list[tuple[str, str]] = []
_busy = [False]


def _is_write(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(letter in mode for letter in "wax+")
    return bool((flags or 0) & _WRITE_FLAGS)


def _record(event: str, path) -> None:
    if isinstance(path, (str, bytes, os.PathLike)):
        text = os.fsdecode(path)
        full = os.path.abspath(text)
        if full == _WATCH or full.startswith(_WATCH + os.sep):
            _events.append((event, full))


def _hook(event: str, args) -> None:
    if _busy[0]:
        return
    if event == "open" and _is_write(args[1], args[2]):
        _record("write", args[0])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree"):
        _record(event, args[0])
    elif event == "os.rename":
        _record(event, args[1])
    elif event == "sqlite3.connect":
        _events.append((event, os.fsdecode(args[0])))


def _dump() -> None:
    _busy[0] = True
    with open(os.path.join(_LOG, f"rank-{os.environ.get('RANK', 'none')}.txt"), "a") as handle:
        handle.writelines(f"{event}\t{path}\n" for event, path in _events)


if os.environ.get("WRITE_AUDIT_WATCH") and _LOG:
    sys.addaudithook(_hook)
    atexit.register(_dump)
