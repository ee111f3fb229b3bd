"""Locks and interruption for the converters (`fmoe extract`, `fmoe repack`, `fmoe verify`).

- :func:`directory_lock`: an advisory ``fcntl.flock`` on ``PACKED/.fmoe.lock``, exclusive for the
  command that writes the directory, shared for one that only reads it as its input; a second
  writer is refused at once with a one-line error naming the directory and the holder's pid.
- :class:`Stop` and :func:`sigint_stops`: while a conversion runs, Ctrl-C (SIGINT) only *sets* a
  flag; the main thread and the workers check it at known points and leave through ordinary
  exceptions. Why: an asynchronous KeyboardInterrupt can land inside a lock's critical section (the
  progress display's, a pool's) and leave every worker waiting on it forever.
- :func:`stopping_pool`, :func:`submit` and :func:`run_bounded`: thread pools whose pending work is
  cancelled and whose running work stops at its next check when anything goes wrong, so an
  interrupted or failed run returns within one work item, never after the whole queue.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fmoe.errors import FmoeError

if TYPE_CHECKING:
    from rich.progress import Progress

LOCK_FILE = ".fmoe.lock"  # in the packed directory; left in place (removing it would race a waiter)
POLL_S = 0.1  # how often a waiting main thread looks at the stop flag
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # file systems without flock
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)

T = TypeVar("T")
R = TypeVar("R")


# ---- the directory lock ------------------------------------------------------------------------
@contextlib.contextmanager
def directory_lock(folder: Path, command: str, *, shared: bool = False) -> Iterator[None]:
    """Hold ``folder``'s lock: exclusive (a writer; ``folder`` must exist) or shared (a reader).

    Never waits: a conflicting holder is a one-line FmoeError. A file system without locks, or a
    read-only input directory (shared), is used unlocked."""
    path = Path(folder) / LOCK_FILE
    fd = _open_lock_file(path, shared)
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FmoeError(_busy_message(Path(folder), fd, shared)) from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
        if not shared:
            _write_owner(fd, command)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_lock_file(path: Path, shared: bool) -> int | None:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if not shared or exc.errno not in _READ_ONLY:
            raise
    try:  # a read-only input directory: lock an existing file for reading, or nothing
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _write_owner(fd: int, command: str) -> None:
    data = json.dumps({"pid": os.getpid(), "command": command}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _busy_message(folder: Path, fd: int, shared: bool) -> str:
    holder = "another fmoe process"
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        pid, command = owner.get("pid"), owner.get("command")
        if isinstance(pid, int) and _alive(pid):
            holder += f" (pid {pid}" + (f", `{command}`" if isinstance(command, str) else "") + ")"
    except (OSError, ValueError, AttributeError):
        pass  # the holder may be writing the record right now: name no pid
    doing = "writing" if shared else "using"
    return f"{folder}: {holder} is {doing} this packed directory; wait for it to finish (or stop it) and run again"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- stopping ----------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """Raised at a check point once the run was asked to stop (Ctrl-C, or another worker failed)."""


class Stop:
    """A stop flag shared by a command's main thread and its workers."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Interrupted` when the run was asked to stop."""
        if self._event.is_set():
            raise Interrupted()


@contextlib.contextmanager
def sigint_stops(stop: Stop) -> Iterator[None]:
    """While inside, SIGINT sets ``stop`` instead of raising KeyboardInterrupt anywhere; leaving
    normally after a SIGINT raises :class:`Interrupted`. Outside the main thread: nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    stop.check()  # the work finished, but the user asked to stop: say so (exit 130)


# ---- pools -------------------------------------------------------------------------------------
@contextlib.contextmanager
def stopping_pool(workers: int, stop: Stop, name: str) -> Iterator[ThreadPoolExecutor]:
    """A thread pool that, when its block raises, sets ``stop`` (running work leaves at its next
    check), cancels what has not started and waits only for what is running."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix=name)
    try:
        yield pool
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def submit(pool: ThreadPoolExecutor, stop: Stop, fn: Callable[..., R], *args: Any) -> Future[R]:
    """``pool.submit`` of work that does not start once ``stop`` is set."""

    def guarded() -> R:
        stop.check()
        return fn(*args)

    return pool.submit(guarded)


def run_bounded(
    fn: Callable[..., R],
    items: Iterable[tuple[Any, ...]],
    *,
    workers: int,
    stop: Stop,
    name: str,
    on_result: Callable[[tuple[Any, ...], R], None] | None = None,
) -> None:
    """Run ``fn(*item)`` for every item on ``workers`` threads, at most ``2 * workers`` in flight
    (bounded memory); ``on_result(item, result)`` runs in the calling thread. The first error (or a
    stop) cancels the rest and is raised once the running items have left."""
    window = 2 * max(1, workers)
    pending: dict[Future[R], tuple[Any, ...]] = {}
    it = iter(items)
    with stopping_pool(workers, stop, name) as pool:
        while True:
            stop.check()
            while len(pending) < window and (item := next(it, None)) is not None:
                pending[submit(pool, stop, fn, *item)] = item
            if not pending:
                return
            finished, _ = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED)
            # a worker's own error first: the Interrupted of its neighbours is a consequence
            for fut in sorted(finished, key=lambda f: isinstance(f.exception(), Interrupted)):
                item = pending.pop(fut)
                result = fut.result()
                if on_result is not None:
                    on_result(item, result)


@contextlib.contextmanager
def hidden_on_error(progress: Progress) -> Iterator[Progress]:
    """Hide ``progress``'s bars when the block fails or is interrupted, so that its final render adds
    nothing to stderr: the one-line error (or "interrupted") is all the user sees."""
    try:
        yield progress
    except BaseException:
        for task in progress.tasks:
            progress.update(task.id, visible=False)
        raise
