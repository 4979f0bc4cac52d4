"""One run over several processes (hosts): JAX's distributed runtime around the trainer.

`python -m dhmd_jax.main --coordinator_address=HOST:PORT --num_processes=N --process_id=I`
(or `--distributed=auto`, which lets `jax.distributed.initialize()` read SLURM, Open MPI or
Kubernetes) calls `initialize` before any other JAX call; every process then runs the same
trainer over one global mesh (docs/multi-device.md). This module holds what the processes
agree on, all of it through the key-value store of JAX's coordination service (no RPC layer of
our own):

* who writes: process 0 (`is_primary`) writes the logs, TensorBoard, metrics.jsonl, the reports,
  the checkpoint manifests and holds the workdir's lock (`holding`); the others wait for its
  verdict on the lock and write nothing but their share of the orbax checkpoints;
* when to stop: Ctrl-C in any process stops all of them at the same chunk boundary
  (`any_process`);
* how to fail: a process that fails posts its one line (`failed`), and a watchdog thread in
  every process (`start_watchdog`) ends it with one line of its own when a peer posted one, when
  a peer's heartbeat has been silent for `timeout_s` seconds (a killed process, a crashed host),
  or when the key-value store cannot be reached. No process waits for a dead peer longer.

JAX's own heartbeat (which aborts with a stack trace) is set `JAX_HEARTBEAT_MARGIN_S` seconds
longer, so the one-line stop comes first. What this cannot cover: when process 0, which hosts
the coordination service, dies abruptly, JAX's client in every other process aborts at once
with its own log lines (its error callback cannot be replaced from Python). With one process
every function here is a no-op. This module imports nothing heavy: JAX only inside `initialize`.
"""

import contextlib
import logging
import os
import socket
import sys
import threading
import time

_LOG = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # how often each process says it is alive
DEFAULT_TIMEOUT_S = 60  # a peer silent this long is taken for dead
JAX_HEARTBEAT_MARGIN_S = 60  # JAX's own (aborting) heartbeat timeout is this much longer
_PREFIX = "dhmd/"  # our keys in the coordination service's key-value store

_STATE = {"process_id": 0, "num_processes": 1, "timeout_s": DEFAULT_TIMEOUT_S,
          "coordinator": None}


class SetupError(RuntimeError):
  """The distributed runtime cannot start (coordinator unreachable); one line."""


class FlagError(ValueError):
  """Flags that cannot start a distributed run (a command-line mistake); one line."""


def process_index():
  return _STATE["process_id"]


def process_count():
  return _STATE["num_processes"]


def active():
  """True when this run spans several processes."""
  return _STATE["num_processes"] > 1


def is_primary():
  """True in the process that writes logs, reports and manifests (process 0, or the only one)."""
  return _STATE["process_id"] == 0


def who():
  """"process 1 of 2" (for lines a process prints), or "" with one process."""
  return f"process {process_index()} of {process_count()}" if active() else ""


# ----------------------------------------------------------------------------- start


def initialize(*, coordinator_address="", num_processes=0, process_id=-1, auto=False,
               timeout_s=DEFAULT_TIMEOUT_S):
  """Starts JAX's distributed runtime before any other JAX call, or does nothing.

  Nothing is started unless `coordinator_address`, `num_processes` > 0 or `process_id` >= 0 is
  given, or `auto` (then JAX reads the missing values from the cluster's environment). On CPU
  the cross-process collectives are gloo's (TCP). Raises FlagError or SetupError (one line).
  """
  given = bool(coordinator_address) or num_processes > 0 or process_id >= 0
  if not given and not auto:
    return
  if not auto and not (coordinator_address and num_processes > 0 and process_id >= 0):
    raise FlagError("--coordinator_address, --num_processes and --process_id go together; "
                     "give all three (or --distributed=auto to read them from the cluster)")
  if not auto and process_id >= num_processes:
    raise FlagError(f"--process_id={process_id} must be below --num_processes={num_processes}")
  if timeout_s < 5 * HEARTBEAT_S:
    raise FlagError(f"--distributed_timeout_s={timeout_s} is too short; give at least "
                     f"{int(5 * HEARTBEAT_S)} seconds")
  import jax  # pylint: disable=g-import-not-at-top
  # Only the CPU client reads it: GPU and TPU collectives are their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  _STATE["coordinator"] = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  init_timeout = int(max(timeout_s, 30))
  if coordinator_address and process_id > 0:
    _wait_for_coordinator(coordinator_address, init_timeout)
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address or None,
        num_processes=num_processes if num_processes > 0 else None,
        process_id=process_id if process_id >= 0 else None,
        initialization_timeout=init_timeout,
        heartbeat_timeout_seconds=int(timeout_s + JAX_HEARTBEAT_MARGIN_S))
  except Exception as error:  # pylint: disable=broad-except
    raise SetupError(_cannot_start(error)) from None
  _STATE.update(process_id=jax.process_index(), num_processes=jax.process_count(),
                timeout_s=float(timeout_s))
  if not is_primary():  # the run's log lines come from process 0; warnings from all
    logging.getLogger("dhmd_jax").setLevel(logging.WARNING)


def _cannot_start(error):
  text = " ".join(str(error).split())[:300]
  where = _STATE["coordinator"] or "from the cluster"
  return (f"cannot start the distributed runtime (coordinator {where}): {text}; check that "
          f"every process got the same --coordinator_address and --num_processes, a distinct "
          f"--process_id, and that process 0's host:port is reachable")


def _wait_for_coordinator(address, timeout_s):
  """Raises SetupError (one line) unless process 0's host:port accepts a connection within
  `timeout_s` seconds (it may start later than this process). JAX's client, left to find out
  itself, aborts the process with a stack trace."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
        return
    except (OSError, ValueError) as error:
      if time.monotonic() > deadline:
        raise SetupError(_cannot_start(f"nothing answers there after {int(timeout_s)} s "
                                       f"({error})")) from None
    time.sleep(0.5)


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def _key(name):
  return _PREFIX + name


# ----------------------------------------------------------------------------- agreement


def broadcast(name, value=None):
  """Process 0's `value` (a string) in every process: process 0 passes it, the others get it
  (waiting at most the peer timeout; the watchdog ends a process whose peer died first)."""
  if not active():
    return value
  client = _client()
  if is_primary():
    client.key_value_set(_key(name), value)
    return value
  return client.blocking_key_value_get(_key(name), int(_STATE["timeout_s"] * 2000))


def barrier(name):
  """Waits until every process got here (`name`: unique to this point of the run)."""
  if active():
    _client().wait_at_barrier(_key(name), int(_STATE["timeout_s"] * 2000))


def any_process(flag, name):
  """True in every process when `flag` is true in any (each process calls it with a `name`
  unique to this point of the run, e.g. the epoch and chunk)."""
  if not active():
    return bool(flag)
  client = _client()
  client.key_value_set(_key(f"{name}/{process_index()}"), "1" if flag else "0")
  timeout_ms = int(_STATE["timeout_s"] * 2000)
  return any(client.blocking_key_value_get(_key(f"{name}/{i}"), timeout_ms) == "1"
             for i in range(process_count()))


@contextlib.contextmanager
def holding(workdir, what):
  """The workdir lock of a run (`workdir.hold`), held by process 0 only: its verdict (free, or
  busy with the holder's line) is broadcast, so every process stops with `workdir.Busy` when the
  workdir is in use. All processes need the workdir on one shared file system."""
  from dhmd_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if not active():
    with workdir_lib.hold(workdir, what):
      yield
    return
  if not is_primary():
    verdict = broadcast("lock")
    if verdict != "ok":
      raise workdir_lib.Busy(verdict)
    yield
    return
  try:
    lock = workdir_lib.hold(workdir, f"{what} ({who()})")
    lock.__enter__()  # pylint: disable=unnecessary-dunder-call
  except workdir_lib.Busy as busy:
    broadcast("lock", str(busy))
    raise
  except BaseException as error:
    broadcast("lock", f"process 0 could not lock {workdir}: {error}")
    raise
  broadcast("lock", "ok")
  try:
    yield
  except BaseException:
    if not lock.__exit__(*sys.exc_info()):
      raise
  else:
    lock.__exit__(None, None, None)


# ----------------------------------------------------------------------------- failures


class _Watchdog:
  """The heartbeat thread: says this process is alive and ends it (one line, status 1) when a
  peer posted a failure, went silent, or the coordinator cannot be reached."""

  def __init__(self, stream):
    self.stream = stream
    self.stopped = threading.Event()
    self.thread = threading.Thread(target=self._loop, name="dhmd-watchdog", daemon=True)

  def _loop(self):
    client, me, n = _client(), process_index(), process_count()
    timeout = _STATE["timeout_s"]
    seen = {i: (None, time.monotonic()) for i in range(n) if i != me}  # last beat, when seen
    beat = 0
    while not self.stopped.wait(HEARTBEAT_S):
      beat += 1
      try:
        client.key_value_set(_key(f"beat/{me}"), str(beat), allow_overwrite=True)
        failed = _try_get(client, "failed")
        if failed is not None and failed.startswith(f"process {me} "):  # its own, being reported
          failed = None
        now = time.monotonic()
        for i, (last, since) in seen.items():
          value = _try_get(client, f"beat/{i}")
          if value != last:
            seen[i] = (value, now)
          elif now - since > timeout:
            done = _try_get(client, f"done/{i}")
            if done is None:
              self._end(f"process {i} has not answered for {int(now - since)} s (killed, "
                        f"crashed, or its host is down)")
              return
      except Exception as error:  # pylint: disable=broad-except
        if self.stopped.is_set():
          return
        text = " ".join(str(error).split())[:160]
        where = _STATE["coordinator"] or "process 0"
        self._end(f"lost the coordinator at {where} (process 0 stopped, or its host is down: "
                  f"{text})")
        return
      if failed is not None and not self.stopped.is_set():
        self._end(failed)  # "process 1 stopped (...)"
        return

  def _end(self, why):
    if self.stopped.is_set():
      return
    _say(self.stream, f"error: {why}; {who()} stops too: rerun every process's command to "
                      f"resume from the last checkpoint")
    os._exit(1)  # pylint: disable=protected-access


def _try_get(client, name):
  try:
    return client.key_value_try_get(_key(name))
  except Exception as error:  # pylint: disable=broad-except
    if "NOT_FOUND" in str(error) or "not found" in str(error).lower():
      return None
    raise


def _say(stream, line):
  try:
    stream.write(line + "\n")
    stream.flush()
  except (OSError, ValueError):
    pass


_WATCHDOG = []


def start_watchdog(stream=None):
  """Starts the watchdog thread (several processes only); `finish` stops it."""
  if not active() or _WATCHDOG:
    return
  watchdog = _Watchdog(stream or sys.stderr)
  _WATCHDOG.append(watchdog)
  watchdog.thread.start()


def _stop_watchdog():
  if _WATCHDOG:
    _WATCHDOG[0].stopped.set()


def failed(error):
  """Called with the exception that ends this process's part of the run, before it is reported.

  Posts its one line for the peers (whose watchdogs stop them with it), except for the ends
  every process reaches by itself: a Ctrl-C the processes agreed on (`any_process`) and a busy
  workdir (`holding`). A runtime error of XLA (a collective whose peer died) is first given the
  watchdog's time to name the dead peer instead.
  """
  if not active():
    return
  import jax  # pylint: disable=g-import-not-at-top
  name = type(error).__name__
  if name in ("Interrupted", "Busy"):
    return
  if isinstance(error, jax.errors.JaxRuntimeError) and _WATCHDOG:
    _WATCHDOG[0].stopped.wait(_STATE["timeout_s"] + 3 * HEARTBEAT_S)  # it exits if it was that
  _stop_watchdog()  # this process's own line comes next, not a peer's
  text = " ".join(str(error).split()) or name
  if isinstance(error, KeyboardInterrupt):
    text = "interrupted (Ctrl-C)"
  text = text[len("error: "):] if text.startswith("error: ") else text
  try:
    _client().key_value_set(_key("failed"), f"process {process_index()} stopped ({text[:300]})")
  except Exception:  # pylint: disable=broad-except
    pass  # the store is gone: the peers' watchdogs see that too


def finish(status):
  """Ends this process's part of the run with exit status `status` (returned with one process).

  Success: every process waits for the others to finish (a barrier; a peer that dies meanwhile
  is caught by the watchdog), then JAX's runtime shuts down normally. Failure (its line printed,
  posted by `failed`): process 0, which hosts the key-value store, waits a moment for the peers
  to read it; the process exits at once, skipping JAX's shutdown barrier, which would wait for
  peers that are stopping or gone.
  """
  if not active():
    return status
  if status == 0:
    client = _client()
    try:
      client.key_value_set(_key(f"done/{process_index()}"), "1")
      client.wait_at_barrier(_key("end"), int(_STATE["timeout_s"] * 1000 * 10))
    except Exception as error:  # pylint: disable=broad-except
      _stop_watchdog()
      text = " ".join(str(error).split())[:160]
      _say(sys.stderr, f"error: the other processes did not finish ({text}); rerun every "
                       f"process's command to resume")
      _exit(1)
    _stop_watchdog()
    return 0
  _stop_watchdog()
  if is_primary():  # the store lives in this process: let the peers read the line first
    time.sleep(3 * HEARTBEAT_S)
  _exit(status)


def _exit(status):
  sys.stdout.flush()
  sys.stderr.flush()
  logging.shutdown()
  os._exit(status)  # pylint: disable=protected-access
