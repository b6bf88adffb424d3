"""Everything the agent does differently on Windows, in one place.

The agent's POSIX path (process groups, ``killpg``, ``pass_fds``, ``add_signal_handler``,
cgroups, ``preexec_fn``) does not exist on Windows. Each call site asks this module instead,
and this module takes the platform branch:

=========================  =================================  ==================================
what                       Linux / POSIX                      Windows
=========================  =================================  ==================================
stop the agent             SIGTERM, SIGINT via the loop's     SIGINT (Ctrl+C), SIGBREAK
                           ``add_signal_handler``             (Ctrl+Break; the console's close,
                                                              logoff and shutdown events) via
                                                              ``signal.signal``, handed to the
                                                              loop with ``call_soon_threadsafe``;
                                                              and the agent's stop file
trainer's own group        ``start_new_session`` (+ the       ``CREATE_NEW_PROCESS_GROUP``
                           sandbox's ``preexec_fn``, Linux)
stop a trainer gently      SIGTERM to its process group       CTRL_BREAK_EVENT to its group
kill a trainer's tree      SIGKILL to its process group       ``TerminateJobObject`` on the Job
                           (and its cgroup: sandbox.py)       Object it was put in at start
                                                              (KILL_ON_JOB_CLOSE: the agent's
                                                              death kills it too); without one,
                                                              ``taskkill /T /F /PID``
progress pipe              ``os.pipe`` + ``pass_fds``,        a pipe whose write handle is made
                           ``TRAINFLEET_PROGRESS_FD``         inheritable and listed in
                                                              STARTUPINFO's ``handle_list``,
                                                              ``TRAINFLEET_PROGRESS_HANDLE``
=========================  =================================  ==================================

:func:`is_windows` reads ``sys.platform`` at every call, and the Windows-only primitives
(``_winapi``, ``msvcrt``, kernel32 through ctypes) are reached only through :data:`WIN`, an
object a test replaces with a fake: so the Windows branch's logic runs, and is tested, on
Linux. What only real Windows can show (that the Job Object holds grandchildren, that the
console events arrive under the Task Scheduler) was not run here: see deploy/README.md,
"Windows".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("trainfleet.agent")

# Win32 constants (the same values the subprocess module and winbase.h use).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CTRL_BREAK_EVENT = 1
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x00002000
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9
PROCESS_TERMINATE = 0x0001
PROCESS_SET_QUOTA = 0x0100

PROGRESS_FD_ENV = "TRAINFLEET_PROGRESS_FD"  # POSIX: an inherited file descriptor
PROGRESS_HANDLE_ENV = "TRAINFLEET_PROGRESS_HANDLE"  # Windows: an inherited pipe handle
TASKKILL_TIMEOUT_S = 10.0


def is_windows() -> bool:
    """Whether to take the Windows branch (read at each call, so tests can force it)."""
    return sys.platform == "win32"


# -- the agent's own stop -------------------------------------------------------------------
def stop_signals() -> tuple[int, ...]:
    """The signals that ask the agent to drain and stop.

    Windows has no SIGTERM from outside the process: the console delivers Ctrl+C as SIGINT
    and Ctrl+Break (and the close, logoff and shutdown events) as SIGBREAK."""
    if is_windows():
        return (signal.SIGINT, signal.SIGBREAK)  # type: ignore[attr-defined]  # Windows only
    return (signal.SIGTERM, signal.SIGINT)


def set_stop_handlers(handler: Callable[[int, Any], Any]) -> tuple[int, ...]:
    """``signal.signal(sig, handler)`` for every stop signal (before the event loop runs)."""
    sigs = stop_signals()
    for sig in sigs:
        signal.signal(sig, handler)
    return sigs


def install_stop_handlers(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> tuple[int, ...]:
    """Make every stop signal call ``stop`` on ``loop``; the signals handled.

    POSIX: ``loop.add_signal_handler``. Windows' Proactor loop has none (it raises
    NotImplementedError): a plain ``signal.signal`` handler runs in the main thread, and the
    loop, which wakes for signals through its wakeup fd, gets ``stop`` thread-safely."""
    sigs = stop_signals()
    if is_windows():

        def handler(_signum: int, _frame: Any) -> None:
            loop.call_soon_threadsafe(stop)

        for sig in sigs:
            signal.signal(sig, handler)
    else:
        for sig in sigs:
            loop.add_signal_handler(sig, stop)
    return sigs


# -- a trainer's process group and tree -------------------------------------------------------
def new_process_group_kwargs(preexec: Callable[[], None] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``create_subprocess_exec`` that start a trainer in a group of its
    own. ``preexec``: the sandbox's, run in the child before exec (Linux only; Windows has no
    ``preexec_fn``, and the Job Object is assigned after the start: :func:`attach_tree`)."""
    if is_windows():
        return {"creationflags": CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True, "preexec_fn": preexec if sys.platform.startswith("linux") else None}


_JOBS: dict[int, Any] = {}  # trainer pid -> its Job Object handle (Windows)


def attach_tree(pid: int) -> bool:
    """Windows: put the new trainer ``pid`` in a Job Object of its own that kills everything
    in it when closed (or when the agent dies); whether that worked. The trainer's children
    join its job as they start. POSIX: nothing to do (its session and cgroup hold it)."""
    if not is_windows():
        return False
    try:
        job = WIN.new_kill_job()
    except OSError as exc:
        log.warning("no Job Object for trainer %d (%s): its tree is killed with taskkill /T", pid, exc)
        return False
    try:
        WIN.assign(job, pid)
    except OSError as exc:
        WIN.close(job)
        log.warning("cannot put trainer %d in a Job Object (%s): its tree is killed with taskkill /T", pid, exc)
        return False
    _JOBS[pid] = job
    return True


def taskkill_argv(pid: int) -> list[str]:
    """The fallback that kills a live process and its descendants on Windows."""
    return ["taskkill", "/T", "/F", "/PID", str(pid)]


def signal_tree(pid: int, *, hard: bool) -> None:
    """Stop a trainer's group: gently (POSIX SIGTERM; Windows CTRL_BREAK_EVENT, which a
    Python trainer sees as SIGBREAK) or hard (:func:`kill_tree`). Gone already: nothing."""
    if hard:
        kill_tree(pid)
    elif is_windows():
        with contextlib.suppress(OSError):
            os.kill(pid, CTRL_BREAK_EVENT)  # to the process group ``pid`` leads
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)


def kill_tree(pid: int) -> None:
    """Kill what is left of trainer ``pid``'s tree (it may have exited itself).

    POSIX: SIGKILL its process group. Windows: terminate its Job Object; a trainer that got
    none is killed with ``taskkill /T /F`` (which finds descendants only while they still
    have a live parent)."""
    if not is_windows():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        return
    job = _JOBS.get(pid)
    if job is not None:
        try:
            WIN.terminate_job(job)
            return
        except OSError as exc:
            log.warning("terminating trainer %d's Job Object failed (%s); trying taskkill", pid, exc)
    WIN.run(taskkill_argv(pid))


def end_tree(pid: int) -> None:
    """After the trainer exited: kill whatever it left and let go of its Job Object."""
    kill_tree(pid)
    job = _JOBS.pop(pid, None)
    if job is not None:
        WIN.close(job)


# -- the progress pipe ------------------------------------------------------------------------
@dataclass
class ProgressPipe:
    """The pipe a trainer reports progress on: what the child gets (``env``,
    ``popen_kwargs``), and the agent's end (:meth:`reader`). Call :meth:`child_started`
    once the child exists (or failed to start), :meth:`abandon` if no reader will be made."""

    read_end: int
    write_end: int
    env: dict[str, str]
    popen_kwargs: dict[str, Any] = field(default_factory=dict)

    def reader(self) -> Any:
        """A pipe object for ``loop.connect_read_pipe`` (owns the read end from then on)."""
        if is_windows():
            return WIN.pipe_handle(self.read_end)
        return os.fdopen(self.read_end, "rb", buffering=0)

    def child_started(self) -> None:
        """Close the agent's copy of the write end: the reader sees EOF when the trainer exits."""
        _close(self.write_end)

    def abandon(self) -> None:
        _close(self.read_end)


def _close(end: int) -> None:
    if is_windows():
        WIN.close(end)
    else:
        os.close(end)


def progress_pipe() -> ProgressPipe:
    """A new progress pipe. POSIX: ``os.pipe``, the write fd passed with ``pass_fds`` and
    named in ``TRAINFLEET_PROGRESS_FD``. Windows (no ``pass_fds``): an overlapped read end
    for the Proactor loop and an inheritable write handle, passed through STARTUPINFO's
    ``handle_list`` (the child inherits that handle and its std handles, nothing else) and
    named in ``TRAINFLEET_PROGRESS_HANDLE`` (progress.report opens it with msvcrt)."""
    if is_windows():
        read_h, write_h = WIN.pipe()
        WIN.set_inheritable(write_h)
        kwargs = {"startupinfo": WIN.startupinfo([write_h]), "close_fds": True}
        return ProgressPipe(read_h, write_h, {PROGRESS_HANDLE_ENV: str(write_h)}, kwargs)
    read_fd, write_fd = os.pipe()
    return ProgressPipe(read_fd, write_fd, {PROGRESS_FD_ENV: str(write_fd)}, {"pass_fds": (write_fd,)})


def open_progress_handle(value: str) -> int:
    """The trainer's side on Windows: a C runtime fd for the inherited pipe handle ``value``."""
    return WIN.open_osfhandle(int(value))


# -- the Windows primitives -------------------------------------------------------------------
class _WinApi:
    """The Windows-only calls this module makes, imported when first used (a test swaps
    :data:`WIN` for a fake with the same methods)."""

    def __init__(self) -> None:
        self._k32: Any = None

    def kernel32(self) -> Any:
        if self._k32 is None:
            import ctypes
            from ctypes import wintypes

            k32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
            k32.CreateJobObjectW.argtypes = (ctypes.c_void_p, wintypes.LPCWSTR)
            k32.CreateJobObjectW.restype = wintypes.HANDLE
            k32.SetInformationJobObject.argtypes = (wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p, wintypes.DWORD)
            k32.SetInformationJobObject.restype = wintypes.BOOL
            k32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
            k32.OpenProcess.restype = wintypes.HANDLE
            k32.AssignProcessToJobObject.argtypes = (wintypes.HANDLE, wintypes.HANDLE)
            k32.AssignProcessToJobObject.restype = wintypes.BOOL
            k32.TerminateJobObject.argtypes = (wintypes.HANDLE, wintypes.UINT)
            k32.TerminateJobObject.restype = wintypes.BOOL
            k32.CloseHandle.argtypes = (wintypes.HANDLE,)
            k32.CloseHandle.restype = wintypes.BOOL
            self._k32 = k32
        return self._k32

    @staticmethod
    def _error(what: str) -> OSError:
        import ctypes

        code = ctypes.get_last_error()  # type: ignore[attr-defined]
        return OSError(code, f"{what} failed (Windows error {code})")

    def new_kill_job(self) -> int:
        import ctypes

        k32 = self.kernel32()
        job = k32.CreateJobObjectW(None, None)
        if not job:
            raise self._error("CreateJobObjectW")
        info = JobObjectExtendedLimitInformation()
        info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        if not k32.SetInformationJobObject(
            job, JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS, ctypes.byref(info), ctypes.sizeof(info)
        ):
            error = self._error("SetInformationJobObject")
            k32.CloseHandle(job)
            raise error
        return int(job)

    def assign(self, job: int, pid: int) -> None:
        k32 = self.kernel32()
        process = k32.OpenProcess(PROCESS_SET_QUOTA | PROCESS_TERMINATE, False, pid)
        if not process:
            raise self._error("OpenProcess")
        try:
            if not k32.AssignProcessToJobObject(job, process):
                raise self._error("AssignProcessToJobObject")
        finally:
            k32.CloseHandle(process)

    def terminate_job(self, job: int) -> None:
        if not self.kernel32().TerminateJobObject(job, 1):
            raise self._error("TerminateJobObject")

    def close(self, handle: int) -> None:
        self.kernel32().CloseHandle(handle)

    @staticmethod
    def run(argv: list[str]) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(argv, capture_output=True, timeout=TASKKILL_TIMEOUT_S, check=False)

    @staticmethod
    def pipe() -> tuple[int, int]:
        from asyncio import windows_utils  # type: ignore[attr-defined]

        read_h, write_h = windows_utils.pipe(overlapped=(True, False), duplex=False)
        return read_h, write_h

    @staticmethod
    def set_inheritable(handle: int) -> None:
        os.set_handle_inheritable(handle, True)  # type: ignore[attr-defined]

    @staticmethod
    def startupinfo(handles: list[int]) -> Any:
        return subprocess.STARTUPINFO(lpAttributeList={"handle_list": list(handles)})  # type: ignore[attr-defined]

    @staticmethod
    def pipe_handle(handle: int) -> Any:
        from asyncio import windows_utils  # type: ignore[attr-defined]

        return windows_utils.PipeHandle(handle)

    @staticmethod
    def open_osfhandle(handle: int) -> int:
        import msvcrt

        return msvcrt.open_osfhandle(handle, os.O_WRONLY)  # type: ignore[attr-defined]


def _job_structs() -> tuple[type, type]:
    """JOBOBJECT_BASIC_LIMIT_INFORMATION and JOBOBJECT_EXTENDED_LIMIT_INFORMATION (winnt.h)."""
    import ctypes

    size_t, large = ctypes.c_size_t, ctypes.c_int64

    class Basic(ctypes.Structure):
        _fields_ = [
            ("PerProcessUserTimeLimit", large),
            ("PerJobUserTimeLimit", large),
            ("LimitFlags", ctypes.c_uint32),
            ("MinimumWorkingSetSize", size_t),
            ("MaximumWorkingSetSize", size_t),
            ("ActiveProcessLimit", ctypes.c_uint32),
            ("Affinity", size_t),
            ("PriorityClass", ctypes.c_uint32),
            ("SchedulingClass", ctypes.c_uint32),
        ]

    class IoCounters(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_uint64)
            for name in (
                "ReadOperationCount",
                "WriteOperationCount",
                "OtherOperationCount",
                "ReadTransferCount",
                "WriteTransferCount",
                "OtherTransferCount",
            )
        ]

    class Extended(ctypes.Structure):
        _fields_ = [
            ("BasicLimitInformation", Basic),
            ("IoInfo", IoCounters),
            ("ProcessMemoryLimit", size_t),
            ("JobMemoryLimit", size_t),
            ("PeakProcessMemoryUsed", size_t),
            ("PeakJobMemoryUsed", size_t),
        ]

    return Basic, Extended


JobObjectBasicLimitInformation, JobObjectExtendedLimitInformation = _job_structs()
WIN: Any = _WinApi()
