"""The cores of one process: BLAS threads, and worker processes forked to share a batch's work.

A one-process fit computes each minibatch's row blocks on every core it is given: ``n - 1``
worker processes are forked from it (they share its memory copy-on-write and one anonymous
shared mapping for the inputs and results of each step) and the process itself is the n-th.
Python threads were measured first: numpy releases the GIL in each call, but a training step
is hundreds of small calls whose GIL hand-offs made two threads at most 1.1x faster than one;
processes share nothing and are not limited by it. MPI ranks (:mod:`galdecomp.parallel`) are
the other axis; under MPI each rank computes its rows alone by default.

Workers never decide anything: they compute the blocks a step assigns them and write the
results into the shared mapping; the parent adds them up in block order, so results are
bitwise independent of the number of workers. A worker ignores SIGINT and SIGTERM (the parent
stops the job at a step's end, see :mod:`galdecomp.pipeline`) and exits when the parent closes
its pipe or dies.
"""
import contextlib
import mmap
import os
import signal
import time
import traceback

import numpy as np

__all__ = ["ForkedWorkers", "SharedArrays", "WorkerError", "available_cores", "blas_threads", "describe_threads",
           "threads_of"]

_CONTROLLER = None
#: this process's ends of the pipes of every pool of workers: a newly forked worker closes them
#: all, so that every worker sees its own pipe close when its parent closes it
_PARENT_FDS = set()


def blas_threads(n):
    """Context limiting BLAS to ``n`` threads (threadpoolctl); no-op for ``n=None``, without
    threadpoolctl, or when every BLAS library already uses ``n`` threads (a limit costs ~25 us,
    asking ~1 us: this runs once per network pass)."""
    global _CONTROLLER
    if n is None:
        return contextlib.nullcontext()
    if _CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
            _CONTROLLER = ThreadpoolController().select(user_api="blas")
        except ImportError:
            _CONTROLLER = False
    if not _CONTROLLER or all(lib.num_threads == int(n) for lib in _CONTROLLER.lib_controllers):
        return contextlib.nullcontext()
    return _CONTROLLER.limit(limits=int(n))


def available_cores():
    """Cores this process may run on (its CPU affinity, as a batch scheduler sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_of(training, comm):
    """Threads of execution of a fit's process: ``training["threads"]``, or when that is None
    every core the process may use (one process) or 1 (an MPI rank: ranks share nothing, and MPI
    and fork do not mix, so a rank never forks workers)."""
    if comm.size > 1:
        return 1
    return int(training.get("threads") or available_cores())


def describe_threads(n, comm):
    """What a log line says of the process's threads and the job's ranks."""
    what = "1 thread" if n == 1 else f"{n} threads (this process and {n - 1} forked worker{'s' * (n > 2)})"
    return f"{what} per process, {comm.size} MPI rank{'s' * (comm.size > 1)}"


class WorkerError(RuntimeError):
    """A worker process failed or died; the message says which and why."""


class SharedArrays:
    """Named numpy arrays in one anonymous shared mapping (seen by processes forked after it).

    Parameters
    ----------
    specs : dict
        name -> (shape, dtype).
    """

    def __init__(self, specs):
        offsets, n = {}, 0
        for name, (shape, dtype) in specs.items():
            n = -(-n // 64) * 64  # cache-line aligned
            offsets[name] = n
            n += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self._map = mmap.mmap(-1, max(n, 1))
        self.arrays = {name: np.frombuffer(self._map, dtype, int(np.prod(shape, dtype=np.int64)),
                                           offsets[name]).reshape(shape)
                       for name, (shape, dtype) in specs.items()}

    def __getitem__(self, name):
        return self.arrays[name]


class ForkedWorkers:
    """``n - 1`` worker processes forked from this one that run ``kernel(k)`` when told to.

    Parameters
    ----------
    n : int
        Threads of execution in all: this process is number 0, the workers 1 ... n - 1.
    kernel : callable
        ``kernel(k)`` does worker ``k``'s share of a task, reading its inputs from and writing
        its results to shared memory (:class:`SharedArrays` made before this). The workers run
        the kernel object as it was at the fork: anything that changes later must travel in the
        shared memory.

    Notes
    -----
    Only for a process that is not an MPI rank (MPI and fork do not mix). BLAS runs one thread
    in every worker.
    """

    #: How long a process waiting for the other side polls shared memory before it blocks on
    #: the pipe. Polling keeps its core awake: a virtual machine's idle core is halted, and
    #: waking it took longer than a 512-row block's work here (MPI libraries poll for the same
    #: reason).
    SPIN_SECONDS = 0.05

    def __init__(self, n, kernel):
        self.n = max(int(n), 1)
        self._kernel = kernel
        self._workers = []  # (pid, go_fd, done_fd)
        # task counter, then the last task each worker finished (written after its reply)
        self._flags = SharedArrays({"flags": ((self.n,), np.int64)})["flags"]
        for k in range(1, self.n):
            self._spawn(k)

    def _spawn(self, k):
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                for fd in _PARENT_FDS:  # the other workers' pipes stay with the parent
                    os.close(fd)
                os.close(go_w)
                os.close(done_r)
                self._serve(k, go_r, done_w)
            except BaseException:  # noqa: BLE001 - a worker must never return into the parent's code
                code = 1
            finally:
                os._exit(code)
        os.close(go_r)
        os.close(done_w)
        _PARENT_FDS.update((go_w, done_r))
        self._workers.append((pid, go_w, done_r))

    def _serve(self, k, go_fd, done_fd):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        flags, task = self._flags, 0
        with blas_threads(1):
            while True:
                _poll(flags, 0, task + 1, self.SPIN_SECONDS)
                if not os.read(go_fd, 1):  # the parent closed the pipe (or died)
                    return
                task += 1
                try:
                    self._kernel(k)
                    reply = b"ok"
                except Exception as e:  # noqa: BLE001 - sent to the parent, which raises it
                    last = traceback.extract_tb(e.__traceback__)[-1]
                    reply = f"{type(e).__name__}: {e} ({os.path.basename(last.filename)}:{last.lineno})".encode()
                os.write(done_fd, len(reply).to_bytes(4, "little") + reply)
                flags[k] = task

    def run(self):
        """Every worker runs ``kernel(k)``, this process ``kernel(0)``; returns when all are done.

        Raises
        ------
        WorkerError
            A worker's kernel raised (its message), or a worker died.
        """
        flags = self._flags
        flags[0] += 1
        for _, go, _ in self._workers:
            os.write(go, b"g")
        error = None
        try:
            with blas_threads(1):
                self._kernel(0)
        except Exception as e:  # noqa: BLE001 - the workers are still collected below
            error = e
        failures = []
        for k, (pid, _, done) in enumerate(self._workers, start=1):
            _poll(flags, k, flags[0], self.SPIN_SECONDS)
            head = _read_exactly(done, 4)
            if len(head) < 4:
                failures.append(f"worker process {k} (pid {pid}) died")
                continue
            reply = _read_exactly(done, int.from_bytes(head, "little")).decode(errors="replace")
            if reply != "ok":
                failures.append(f"worker process {k}: {reply}")
        if error is not None:
            raise error
        if failures:
            raise WorkerError("; ".join(failures))

    def close(self):
        """End the workers (closing their pipes) and wait for them."""
        workers, self._workers = self._workers, []
        for pid, go, done in workers:
            _PARENT_FDS.difference_update((go, done))
            os.close(go)
            os.close(done)
        for pid, _, _ in workers:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_workers", None):
            self.close()


def _poll(flags, i, value, seconds):
    """Wait up to ``seconds`` for ``flags[i] == value`` by polling (then the caller blocks on
    its pipe, which also tells it when the other side died)."""
    if flags[i] == value:
        return
    clock, give_way = time.perf_counter, getattr(os, "sched_yield", lambda: None)
    deadline = clock() + seconds
    while flags[i] != value and clock() < deadline:
        give_way()  # a process that shares this core runs meanwhile; an idle core stays awake


def _read_exactly(fd, n):
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            break
        out += chunk
    return out
