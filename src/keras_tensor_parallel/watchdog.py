"""Multi-process JAX that ends promptly: timeouts and a fault watchdog.

`jax.distributed` on its own lets a fault hang a job for minutes: a rank
that raises leaves the others in a collective until the shutdown barrier
times out (300 s), a killed rank is noticed after the heartbeat timeout
(100 s), and a rank that hangs is never noticed. `initialize_jax` joins
the job with those timeouts set from one `timeout`, and starts in every
process a watchdog thread that talks to the others through the
coordination service's key-value store:

- a process that raises posts its error before it exits; every other
  process sees it within a second and exits naming it;
- each watchdog beats a counter: a process whose counter stops (killed,
  crashed) is named by the others after `dead_after` seconds;
- a main thread that stands at one Python instruction while the process
  computes nothing (blocked in a collective, or hung) ends the job by
  `timeout`, with where every process stands, the likely hang first: one
  outside a JAX call, then the longest idle.
"""

from __future__ import annotations

import atexit
import os
import sys
import sysconfig
import threading
import time

from keras_tensor_parallel import processes

PREFIX = "keras_tp"
FAILED_KEY = f"{PREFIX}/failed"
POLL_S = 0.5
WAITING = " (in a JAX call)"
# A main thread standing at one instruction makes progress if the process
# computes meanwhile (a jitted step runs in XLA's threads, and a cached
# call adds no Python frame): more than this share of one core. Waiting
# in a collective, or asleep, it uses next to none.
BUSY = 0.25
# Process 0 holds the key-value store: after a failure it stays up to this
# long, until the others have read it (they poll every POLL_S); a killed
# process never does.
LINGER_S = 3 * POLL_S


def stall_after(timeout: float) -> float:
    """Seconds a main thread may stand still: early enough that the job
    has ended (poll, linger) by `timeout`."""
    return max(timeout - 2 * POLL_S - LINGER_S, timeout / 2)


def dead_after(timeout: float) -> float:
    """Seconds without a heartbeat after which a process counts as dead."""
    return max(5.0, min(timeout / 2, 30.0))


def _where(frame) -> str:
    """The innermost frame of user code (not the library's) as file:line."""
    lib = (sysconfig.get_paths()["stdlib"], "site-packages")
    found = innermost = frame
    while frame is not None:
        if not any(p in frame.f_code.co_filename for p in lib):
            found = frame
            break
        frame = frame.f_back
    name = os.path.basename(found.f_code.co_filename)
    where = f"{name}:{found.f_lineno} in {found.f_code.co_name}"
    return where + (WAITING if _in_jax(innermost) else "")


def _in_jax(frame) -> bool:
    # A main thread inside a JAX call most likely waits for a collective,
    # that is for another process; one in user code is the likely hang.
    name = frame.f_code.co_filename
    return f"{os.sep}jax{os.sep}" in name or f"{os.sep}jaxlib{os.sep}" in name


def _moved(frame, last) -> bool:
    # Holding the frame itself (not its id, which a new call may reuse)
    # tells a new activation from one still at the same instruction.
    return frame is not last[0] or frame.f_lasti != last[1]


def _try_get(client, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception:  # NOT_FOUND comes as a generic runtime error
        return None


class Watchdog:
    """One process's watchdog thread (see the module docstring)."""

    def __init__(self, client, process_id, num_processes, *, timeout):
        self.client = client
        self.me = process_id
        self.n = num_processes
        self.timeout = timeout
        self.dead_after = dead_after(timeout)
        self.stall_after = stall_after(timeout)
        self.stopped = False
        self._main = threading.main_thread().ident
        self._seen = {}  # peer -> (beat, local time it last changed)
        self.gone: set[int] = set()  # peers found dead
        self._wake = threading.Event()  # set to stop the thread at once

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="keras-tp-watchdog", daemon=True
        )
        self._thread.start()
        atexit.register(self.finish)

    def finish(self) -> None:
        """A normal exit: stop watching (the exit barrier is no stall).

        Joins the thread: a daemon thread still inside a call into the
        store when the interpreter finalizes is unwound by force through
        C++ frames, which aborts the process ("exception not rethrown").
        """
        self.stopped = True
        self._wake.set()
        self._thread.join(timeout=10 * POLL_S)
        try:
            self.client.key_value_set(f"{PREFIX}/done/{self.me}", "1")
        except Exception:
            pass

    def _run(self) -> None:
        beat, last, still_since = 0, (None, None), time.monotonic()
        failing_since, cpu = None, time.process_time()
        while not self.stopped:
            self._wake.wait(POLL_S)
            if self.stopped:
                return
            frame = sys._current_frames().get(self._main)
            if frame is None:  # the interpreter is finishing
                return
            busy, cpu = time.process_time() - cpu, time.process_time()
            if _moved(frame, last) or busy > BUSY * POLL_S:
                last = (frame, frame.f_lasti)
                still_since = time.monotonic()
            idle = time.monotonic() - still_since
            beat += 1
            where = _where(frame)
            try:
                self._check(beat, idle, where)
                failing_since = None
            except Exception as e:
                if self.stopped:
                    return  # the client is shutting down with the process
                # The store lives in process 0: unreachable means it died.
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since >= self.dead_after:
                    self.stop(f"0|coordinator unreachable ({e})")

    def _check(self, beat: int, idle: float, where: str) -> None:
        failed = _try_get(self.client, FAILED_KEY)
        if failed is not None:
            self.stop(failed)
        self.client.key_value_set(
            f"{PREFIX}/beat/{self.me}",
            f"{beat}|{idle:.0f}|{where}",
            allow_overwrite=True,
        )
        peers = self._peers()
        for peer in self._dead(peers):
            self.gone.add(peer)  # it will not say it saw the failure
            self.fail(
                peer,
                f"process {peer} stopped responding (no heartbeat for "
                f"{self.dead_after:.0f} s: killed or crashed)",
            )
        if idle >= self.stall_after:
            self.fail(*self._stall_report(peers, idle, where))

    def _peers(self) -> dict[int, tuple[int, float, str]]:
        out = {}
        for key, value in self.client.key_value_dir_get(f"{PREFIX}/beat/"):
            beat, idle, where = value.split("|", 2)
            out[int(key.rsplit("/", 1)[1])] = (int(beat), float(idle), where)
        return out

    def _dead(self, peers) -> list[int]:
        done = {
            int(k.rsplit("/", 1)[1])
            for k, _ in self.client.key_value_dir_get(f"{PREFIX}/done/")
        }
        now, dead = time.monotonic(), []
        for peer in range(self.n):
            if peer == self.me or peer in done:
                continue
            beat = peers.get(peer, (None,))[0]
            last, since = self._seen.get(peer, (None, now))
            if beat != last:
                self._seen[peer] = (beat, now)
            elif now - since >= self.dead_after:
                dead.append(peer)
        return dead

    def _stall_report(self, peers, idle, where) -> tuple[int, str]:
        peers[self.me] = (0, idle, where)
        order = sorted(
            peers.items(),
            key=lambda kv: (kv[1][2].endswith(WAITING), -kv[1][1]),
        )
        parts = [f"process {p} idle {i:.0f} s at {w}" for p, (_, i, w) in order]
        return order[0][0], (
            f"TimeoutError: no progress for {idle:.0f} s within the "
            f"{self.timeout:g} s timeout: " + "; ".join(parts)
        )

    def fail(self, origin: int, message: str) -> None:
        """Tell every process that `origin` failed with `message`; exit."""
        try:
            self.client.key_value_set(FAILED_KEY, f"{origin}|{message}")
        except Exception:
            pass  # another process posted first: report that one
        posted = _try_get(self.client, FAILED_KEY)
        self.stop(posted or f"{origin}|{message}")

    def stop(self, failed: str) -> None:
        """Exit because of the failure `failed` ("origin|message")."""
        origin, message = failed.split("|", 1)
        origin = int(origin)
        if origin == self.me:
            line = f"process {self.me} of {self.n} failed: {message}"
        else:
            line = (
                f"process {self.me} of {self.n} stopped: process {origin} "
                f"failed: {message}"
            )
        processes.write_error(message, origin=origin)
        if not processes.launched():  # else the launcher prints it once
            print(f"keras-tp: {line}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        self.exit()

    def exit(self) -> None:
        """Exit now, skipping the exit barrier (it waits for the others).

        Process 0 holds the store: it first waits (up to LINGER_S) until
        every other process has said it saw the failure.
        """
        try:
            self.client.key_value_set(f"{PREFIX}/stopped/{self.me}", "1")
            deadline = time.monotonic() + LINGER_S
            while self.me == 0 and time.monotonic() < deadline:
                seen = self.client.key_value_dir_get(f"{PREFIX}/stopped/")
                if len(seen) >= self.n - len(self.gone):
                    break
                time.sleep(POLL_S / 10)
        except Exception:
            pass  # the store is gone: nobody left to tell
        os._exit(1)


# Joining the job -----------------------------------------------------------


def _from_env(value, name: str, cast):
    if value is not None:
        return value
    raw = os.environ.get(name)
    try:
        return None if raw is None else cast(raw)
    except ValueError:
        raise ValueError(
            f"{name} must be {cast.__name__}. Received: {name}={raw!r}"
        ) from None


def _check_ids(num_processes, process_id) -> None:
    for name, value in (("num_processes", num_processes),
                        ("process_id", process_id)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"{name} must be an int (or set by `keras-tp launch`). "
                f"Received: {name}={value!r}"
            )
    if not 0 <= process_id < num_processes:
        raise ValueError(
            "process_id must be in [0, num_processes). Received: "
            f"process_id={process_id}, num_processes={num_processes}"
        )


def initialize_jax(
    job_addresses: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    timeout: float,
) -> Watchdog:
    """Join the JAX job with every timeout bounded; start the watchdog.

    Arguments left None come from the variables `keras-tp launch` sets
    (`KERAS_DISTRIBUTION_JOB_ADDRESSES`, `..._NUM_PROCESSES`,
    `..._PROCESS_ID`), as in `keras.distribution.initialize`.
    """
    import jax
    from jax._src import distributed
    from keras.src.backend.jax.distribution_lib import initialize_rng

    job_addresses = _from_env(
        job_addresses, "KERAS_DISTRIBUTION_JOB_ADDRESSES", str
    )
    num_processes = _from_env(
        num_processes, "KERAS_DISTRIBUTION_NUM_PROCESSES", int
    )
    process_id = _from_env(process_id, "KERAS_DISTRIBUTION_PROCESS_ID", int)
    if not job_addresses:
        raise ValueError(
            "A coordinator address is needed: pass job_addresses or run "
            "under `keras-tp launch`. Received: "
            f"job_addresses={job_addresses!r}"
        )
    _check_ids(num_processes, process_id)
    seconds = max(1, round(timeout))
    jax.distributed.initialize(
        coordinator_address=job_addresses.split(",")[0],
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=seconds,
        # A backstop only: the watchdog names a dead process after
        # dead_after(timeout); JAX's own check aborts without naming it.
        heartbeat_timeout_seconds=max(2 * seconds, 10),
        shutdown_timeout_seconds=seconds,
    )
    # The key-value store has no public handle; orbax reads it the same way.
    client = distributed.global_state.client
    watch = Watchdog(client, process_id, num_processes, timeout=timeout)
    _install_excepthook(watch)
    watch.start()
    initialize_rng()  # what keras.distribution.initialize does after joining
    return watch


def _install_excepthook(watch: Watchdog) -> None:
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        message = processes.error_line(exc)
        watch.stopped = True
        try:
            watch.client.key_value_set(FAILED_KEY, f"{watch.me}|{message}")
        except Exception:
            pass  # another process failed first; it is already reported
        previous(exc_type, exc, tb)  # under the launcher: records, exits
        print(
            f"keras-tp: process {watch.me} of {watch.n} failed: {message}",
            file=sys.stderr,
            flush=True,
        )
        watch.exit()

    sys.excepthook = hook
