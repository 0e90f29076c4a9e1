"""Stopping a build when asked: Ctrl-C (SIGINT), SIGTERM, or a cancellation from the Prefect UI.

A stop request is a property of the whole process, not of one call: a signal arrives on the
main thread while the work runs in task-runner threads, torch threads or child processes,
and every long loop of every stage, in any thread, must see it. So it lives in one
process-level :class:`threading.Event`, the single deliberate exception to the house rule
"no mutable module globals" (like :mod:`signal` handlers and :data:`os.environ`, it is
process state by nature; passing it through every stage signature would reach the same
event). Nothing is set at import: :func:`install_stop_handlers` arms it.

Long loops call :func:`check_stop` (or pass :func:`stop_requested` as a ``should_stop``
callable to :mod:`tessera_model`, which must not import this package); it raises
:class:`~tasks.errors.StopRequested`. Stages commit their output last
(:func:`tasks.storage.commit_stage`), so a stage stopped half way leaves nothing that looks
complete and the next run resumes from what was committed (training from its last
checkpoint, saved on the way out).

How a signal becomes a stop request, in every process layout:

- **Our handler on top** (:func:`install_stop_handlers`, main thread): sets the event, then
  chains to the previous handler: Prefect's flow-engine bridge (which raises
  ``TerminationSignal`` in the main thread, so the engine marks the run Crashed, or
  Cancelled when the runner announced a cancellation), Python's ``KeyboardInterrupt`` for
  SIGINT, ``SystemExit(143)`` for a default SIGTERM. A second signal from outside exits at
  once with ``os._exit(128 + signum)`` (130 for SIGINT, 143 for SIGTERM): like ``kill -9``,
  that is safe, as nothing uncommitted is ever visible.
- **Prefect's bridge on top** (a subflow's engine installs it over ours for its duration):
  its handler raises in the main thread, whose engine then waits for the task threads,
  never telling them. A wakeup file descriptor (:func:`signal.set_wakeup_fd`) is written by
  the interpreter for every signal whatever Python handler runs, and a watcher thread reads
  it and sets the event, so the task threads stop and the engine's wait ends within
  seconds. When Prefect re-delivers the signal to the previous handler (ours) after its
  clean-up, that is recognised and not taken for a second signal.
- **Child processes** (a process-pool worker, a Dask worker, a torchrun rank): a group-wide
  signal (Ctrl-C, the Prefect runner's ``killpg``) reaches them directly; a stop request in
  a parent is forwarded to its multiprocessing children as SIGTERM; and a child watches its
  parent (:func:`watch_parent`), so a parent killed with ``kill -9`` stops it too.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from tasks.errors import StopRequested

__all__ = [
    "StopRequested",
    "arm_worker",
    "check_stop",
    "clear_stop",
    "install_stop_handlers",
    "request_stop",
    "stop_reason",
    "stop_requested",
    "watch_parent",
]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Signals that ask a build to stop."""
SAME_REQUEST_S = 1.0
"""A different stop signal within this many seconds of the first is the same request (a
child process gets Ctrl-C's SIGINT and its parent's forwarded SIGTERM)."""
PARENT_POLL_S = 1.0
"""Seconds between checks that the parent process is still alive (:func:`watch_parent`)."""
ORPHAN_EXIT_S = 15.0
"""Seconds an orphaned worker gets to stop its work (a training rank saves its checkpoint)
before it exits: nobody is left to take its result, and a client it holds may retry a dead
API for minutes."""

_stop = threading.Event()
_state: dict[str, Any] = {"reason": None, "handled": None, "wakeup": None, "parent_watch": False}
_lock = threading.RLock()  # re-entrant: a signal handler may run while the main thread holds it

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def stop_requested() -> bool:
    """Whether this process was asked to stop (cheap: an ``Event.is_set``)."""
    return _stop.is_set()


def stop_reason() -> str | None:
    """What asked this process to stop (``"SIGINT"``, ``"SIGTERM"``, ...), or None."""
    return _state["reason"]


def request_stop(reason: str) -> None:
    """Ask every loop of this process to stop; forward the request to child processes.

    Idempotent: only the first reason is kept and children are signalled once.
    """
    with _lock:
        if _stop.is_set():
            return
        _state["reason"] = reason
        _stop.set()
    _signal_children()


def check_stop(what: str = "") -> None:
    """Raise :class:`StopRequested` if this process was asked to stop.

    Call it in every loop that can run for more than a second or so (per block, per batch,
    per scene). ``what`` names the work interrupted, for the message.

    Raises:
        StopRequested: a stop was requested (a signal, a cancellation, the parent's death).
    """
    if _stop.is_set():
        where = f" during {what}" if what else ""
        raise StopRequested(
            f"Expected to run to completion. Got a stop request ({_state['reason']}){where}; "
            "committed stages are kept, run the same build again to resume."
        )


def clear_stop() -> None:
    """Forget a stop request (tests, or a long-lived process that starts a new build)."""
    with _lock:
        _stop.clear()
        _state["reason"] = None
        _state["handled"] = None


def _signal_children() -> None:
    """Forward a stop to this process's multiprocessing children (process-pool workers)."""
    with contextlib.suppress(Exception):
        for child in multiprocessing.active_children():
            if child.pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(child.pid, signal.SIGTERM)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _redelivered_by_prefect(frame: FrameType | None) -> bool:
    """Whether a signal is Prefect's own re-delivery to the previous handler.

    Prefect's ``capture_sigterm`` restores the handler it replaced and sends the signal to
    its own process after its clean-up, so the previous handler (ours) runs right there,
    in that frame; that is not a second request from outside.
    """
    depth = 0
    while frame is not None and depth < 4:
        if frame.f_code.co_name == "capture_sigterm" and "prefect" in frame.f_code.co_filename:
            return True
        frame, depth = frame.f_back, depth + 1
    return False


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _chain(signum: int, frame: FrameType | None, previous: Handler) -> None:
    """Run the handler ours replaced, or its default effect as an exception."""
    if callable(previous):
        previous(signum, frame)
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    if previous == signal.SIG_DFL:
        raise SystemExit(128 + signum)


def _make_handler(previous: Handler, interrupt_main: bool) -> Callable[[int, FrameType | None], None]:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        first = _state["handled"]
        if first is None:
            _state["handled"] = (signum, time.monotonic())
            request_stop(_signal_name(signum))
            if interrupt_main:
                _chain(signum, frame, previous)
        elif _redelivered_by_prefect(frame):
            _chain(signum, frame, previous)
        elif signum != first[0] and time.monotonic() - first[1] < SAME_REQUEST_S:
            return  # e.g. Ctrl-C reached a worker, then its parent's forwarded SIGTERM
        else:
            _flush()
            os._exit(128 + signum)

    on_signal.tessera_stop_handler = True  # type: ignore[attr-defined]
    return on_signal


def _is_ours(handler: Handler) -> bool:
    return bool(getattr(handler, "tessera_stop_handler", False))


def install_stop_handlers(interrupt_main: bool = True) -> bool:
    """Turn SIGINT and SIGTERM into a stop request of this process (main thread only).

    Idempotent: a handler already ours is kept; a foreign one on top (e.g. the bridge a
    Prefect flow engine installs) gets ours on top of it, chained to it. Also arms the
    wakeup-fd watcher that sees signals while another handler is on top, and, in a child
    process, :func:`watch_parent`. An ignored signal (``SIG_IGN``) stays ignored.

    Args:
        interrupt_main: on the first signal, also run the handler ours replaced (Prefect's
            bridge, ``KeyboardInterrupt``, ``SystemExit(143)``), which interrupts the main
            thread. False where the main thread does the work and checks the stop request
            itself, so it can end cleanly (a training rank saves its checkpoint): worker
            processes and torchrun ranks.

    Returns:
        True if the handlers are (now) installed; False off the main thread, where Python
        cannot install signal handlers (the parent-death watch is still armed there).
    """
    if multiprocessing.parent_process() is not None:
        watch_parent()
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if _is_ours(current) or current == signal.SIG_IGN:
            continue
        signal.signal(signum, _make_handler(current, interrupt_main))
    _arm_wakeup_watcher()
    return True


def arm_worker() -> None:
    """In a worker process (a process-pool, Dask or multiprocessing child), make it stop
    when asked: signal handlers if the work runs on its main thread, and a watch on the
    parent. Does nothing in the main process (whose entry point installs the handlers).

    Stages that run long call it on entry (training, embedding).
    """
    if multiprocessing.parent_process() is None:
        return
    install_stop_handlers(interrupt_main=False)


def _arm_wakeup_watcher() -> None:
    """Watch the interpreter's signal wakeup fd: every signal caught at the C level writes
    its number there, whichever Python handler is installed (bytes are passed on to a
    wakeup fd that was set before, e.g. an asyncio loop's)."""
    if _state["wakeup"] is not None:
        return
    rsock, wsock = socket.socketpair()
    rsock.setblocking(True)
    wsock.setblocking(False)
    try:
        old = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main thread
        rsock.close()
        wsock.close()
        return
    _state["wakeup"] = (rsock, wsock, old)

    def watch() -> None:
        stops = {int(s) for s in STOP_SIGNALS}
        while True:
            try:
                data = rsock.recv(64)
            except OSError:
                return
            if not data:
                return
            if old not in (-1, None):
                with contextlib.suppress(OSError):
                    os.write(old, data)
            for signum in data:
                if signum in stops and not _stop.is_set():
                    request_stop(_signal_name(signum))

    threading.Thread(target=watch, name="tessera-stop-watch", daemon=True).start()


def watch_parent(pid: int | None = None, poll_s: float = PARENT_POLL_S,
                 exit_after_s: float | None = ORPHAN_EXIT_S) -> None:
    """Request a stop when the parent process ends (e.g. killed with ``kill -9``), then exit.

    For child processes that do the work of a build (process-pool and Dask workers,
    torchrun ranks): without it they would run on, orphaned. Idempotent per process.

    Args:
        pid: the process to watch; default this process's parent at the time of the call.
        poll_s: seconds between checks.
        exit_after_s: after the stop request, exit (``os._exit(143)``) if still running
            this many seconds later; None: never.
    """
    with _lock:
        if _state["parent_watch"]:
            return
        _state["parent_watch"] = True
    target = os.getppid() if pid is None else pid

    def alive() -> bool:
        if os.getppid() != target and pid is None:
            return False  # re-parented: our parent is gone
        try:
            os.kill(target, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def watch() -> None:
        while alive():
            time.sleep(poll_s)
        request_stop(f"parent process {target} ended")
        if exit_after_s is not None:
            time.sleep(exit_after_s)
            _flush()
            os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="tessera-parent-watch", daemon=True).start()
