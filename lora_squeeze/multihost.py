"""Multi-process jobs: start-up that fails fast on bad input, and "process 0 writes" helpers.

Start-up (`initialize`) takes the coordinator address, process count and process id from, in
this order: explicit arguments (the `lora-squeeze train` flags), the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID variables, and otherwise JAX's own cluster detection (SLURM,
Open MPI, TPU pods, which need no arguments at all). `detect_cluster` asks JAX for the values it
would detect, so that the handshake below covers launcher-started jobs too.

Why a handshake before jax.distributed.initialize: when a peer cannot reach the coordinator, or
the processes disagree on the count, JAX's coordination service does not raise; it aborts the
process from C++ after `initialization_timeout` with a stack trace (and a process id used twice
can leave the others waiting). So when all three values are known, process 0 first listens on the
coordinator port, every other process connects (retrying until the timeout) and sends its
(count, id); process 0 checks that every count equals its own and the ids are 0..n-1 exactly once,
and answers each process "ok" or the one-line reason. Only then do all call JAX's initialize, on
the same port. Every wait is bounded by `timeout_s`.

Writes: every process runs the same program and joins every collective in the same order; files
that describe the run (metrics, results, exported adapters, progress lines, the run config) are
written by process 0 alone (`is_writer`). A step that can fail on process 0 only (the workdir
guard, an adapter export) goes through `on_writer`, which tells every process the outcome, so
the others raise the same error instead of waiting in the next collective forever.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from lora_squeeze.errors import UserInputError

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
# Environment variables that only exist when a launcher started several processes.
_MULTIPROCESS_COUNTS = (ENV_COUNT, "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
_HANDSHAKE = b"lora-squeeze-join"
_MESSAGE_BYTES = 1024  # an on_writer error message, utf-8, padded (longer ones are cut)


def multiprocess_env(environ: Mapping[str, str] | None = None) -> bool:
  """True when the environment says this is one process of a multi-process (multi-host) job."""
  environ = os.environ if environ is None else environ
  if environ.get(ENV_ADDRESS):
    return True
  for name in _MULTIPROCESS_COUNTS:
    value = environ.get(name, "")
    if value.isdigit() and int(value) > 1:
      return True
  return "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def _int_value(name: str, value: Any, *, minimum: int) -> int | None:
  if value is None or value == "":
    return None
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = None
  if number is None or isinstance(value, bool) or str(value).strip() != str(number) or number < minimum:
    raise UserInputError(f"{name}={value!r}: expected an integer >= {minimum}")
  return number


def parse_address(address: str, *, where: str = "coordinator address") -> tuple[str, int]:
  """'host:port' (IPv6 as '[::1]:port') -> (host, port); UserInputError otherwise."""
  host, sep, port = str(address).rpartition(":")
  host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserInputError(f"{where} {address!r}: expected host:port with a port in 1..65535")
  return host, int(port)


def resolve_args(
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  environ: Mapping[str, str] | None = None,
) -> tuple[str | None, int | None, int | None]:
  """(address, count, id): explicit values, else the JAX_* variables, else None (JAX detects them).

  Raises:
    UserInputError: a value that is not a valid address or integer, or an id outside 0..count-1.
  """
  environ = os.environ if environ is None else environ
  source = {}
  if coordinator_address is None and environ.get(ENV_ADDRESS):
    coordinator_address, source["address"] = environ[ENV_ADDRESS], ENV_ADDRESS
  if num_processes is None and environ.get(ENV_COUNT):
    num_processes, source["count"] = environ[ENV_COUNT], ENV_COUNT
  if process_id is None and environ.get(ENV_ID):
    process_id, source["id"] = environ[ENV_ID], ENV_ID
  count = _int_value(source.get("count", "num_processes"), num_processes, minimum=1)
  index = _int_value(source.get("id", "process_id"), process_id, minimum=0)
  if coordinator_address is not None:
    parse_address(coordinator_address, where=source.get("address", "coordinator_address"))
  if count is not None and index is not None and index >= count:
    raise UserInputError(
      f"{source.get('id', 'process_id')}={index} is not a process of a job of "
      f"{source.get('count', 'num_processes')}={count} (allowed: 0..{count - 1})"
    )
  return coordinator_address, count, index


# The variables that hold a launcher's process count and id (named in errors); JAX reads them.
_LAUNCHER_NAMES = {
  "slurm": ("SLURM_NTASKS", "SLURM_PROCID"),
  "ompi": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
  "mpi4py": ("the MPI world size", "the MPI rank"),
}


def detect_cluster(
  coordinator_address: str | None, num_processes: int | None, process_id: int | None, *, timeout_s: int
) -> tuple[str | None, int | None, int | None, str | None]:
  """The values JAX's cluster detection fills in for those left None: (address, count, id, launcher).

  launcher is the name of the detected environment ("slurm", "ompi", a TPU pod's, ...) or None
  when none is detected (the values stay as given). This is what jax.distributed.initialize()
  does first; JAX has no public call for it, so its (stable since 2022) cluster classes are used,
  and when they are missing the start falls back to JAX's own detection without the handshake.
  """
  try:
    from jax._src import clusters

    env = next(
      (e for e in clusters.ClusterEnv._cluster_types if not e.opt_in_only_method and e.is_env_present()),
      None,
    )
    if env is None:
      return coordinator_address, num_processes, process_id, None
    if coordinator_address is None:
      port = os.environ.get("JAX_COORDINATOR_PORT")  # JAX's own override of the launcher's port
      coordinator_address = env.get_coordinator_address(timeout_secs=timeout_s, override_coordinator_port=port)
    if num_processes is None:
      num_processes = int(env.get_process_count())
    if process_id is None:
      process_id = int(env.get_process_id())
    return coordinator_address, num_processes, process_id, env.name
  except (ImportError, AttributeError, TypeError):  # another JAX version: let jax.distributed detect
    return coordinator_address, num_processes, process_id, None


def _recv_line(conn: socket.socket, deadline: float) -> str:
  data = b""
  while not data.endswith(b"\n"):
    conn.settimeout(max(0.01, deadline - time.monotonic()))
    chunk = conn.recv(4096)
    if not chunk:
      break
    data += chunk
  return data.decode(errors="replace").strip()


def handshake(
  address: str,
  num_processes: int,
  process_id: int,
  *,
  timeout_s: float,
  names: tuple[str, str] = ("JAX_NUM_PROCESSES/num_processes", "process_id"),
) -> None:
  """Checks that `num_processes` processes with distinct ids 0..n-1 and the same count reach the
  coordinator within `timeout_s` (see the module docstring); UserInputError naming the bad value
  (`names`: what the count and the id are called where they came from)."""
  host, port = parse_address(address)
  deadline = time.monotonic() + timeout_s
  if process_id == 0:
    _handshake_coordinator(port, num_processes, deadline, timeout_s, address, names)
  else:
    _handshake_peer(host, port, num_processes, process_id, deadline, timeout_s, address)


def _handshake_coordinator(
  port: int, count: int, deadline: float, timeout_s: float, address: str, names: tuple[str, str]
) -> None:
  server = socket.create_server(("", port), reuse_port=hasattr(socket, "SO_REUSEPORT"))
  peers: dict[int, socket.socket] = {}
  conns: list[socket.socket] = []  # every peer that introduced itself, duplicates included
  problem = None
  try:
    while len(peers) < count - 1 and problem is None:
      server.settimeout(max(0.01, deadline - time.monotonic()))
      try:
        conn, _ = server.accept()
      except TimeoutError:
        problem = (
          f"only processes {sorted({0, *peers})} of {names[0]}={count} reached the "
          f"coordinator {address} within {timeout_s:g} s"
        )
        break
      try:
        fields = _recv_line(conn, deadline).split()
      except (OSError, TimeoutError):
        conn.close()
        continue
      if len(fields) != 3 or fields[0] != _HANDSHAKE.decode() or not fields[1].isdigit() or not fields[2].isdigit():
        conn.close()  # not one of ours (a port scanner, a stale client)
        continue
      their_count, their_id = int(fields[1]), int(fields[2])
      if their_count != count:
        problem = (
          f"process {their_id} says {names[0].rsplit('/', 1)[-1]}={their_count}, but process 0 says {count}; "
          "every process needs the same count"
        )
      elif their_id in peers or their_id == 0:
        problem = f"{names[1]}={their_id} is used by two processes; each of 0..{count - 1} exactly once"
      peers[their_id] = conn
      conns.append(conn)
    reply = ("error " + problem if problem else "ok") + "\n"
    for conn in conns:
      try:
        conn.sendall(reply.encode())
        _recv_line(conn, time.monotonic() + 5)  # the peer closes first: no TIME_WAIT on the port
      except OSError:
        pass
  finally:
    for conn in conns:
      conn.close()
    server.close()
  if problem:
    raise UserInputError(problem)


def _handshake_peer(
  host: str, port: int, count: int, index: int, deadline: float, timeout_s: float, address: str
) -> None:
  while True:
    try:
      conn = socket.create_connection((host, port), timeout=max(0.01, min(2.0, deadline - time.monotonic())))
      break
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserInputError(
          f"process {index}: the coordinator {address} was not reachable within {timeout_s:g} s ({e.strerror or e}); "
          "check the address and that process 0 runs"
        ) from None
      time.sleep(0.2)
  with conn:
    conn.sendall(f"{_HANDSHAKE.decode()} {count} {index}\n".encode())
    try:
      reply = _recv_line(conn, deadline + 10)
    except (OSError, TimeoutError):
      reply = ""
  if reply.startswith("error "):
    raise UserInputError(reply[len("error ") :])
  if reply != "ok":
    raise UserInputError(f"process {index}: no answer from the coordinator {address} within {timeout_s:g} s")


def initialize(
  *,
  enabled: bool | None = None,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  timeout_s: int = 300,
  environ: Mapping[str, str] | None = None,
) -> bool:
  """Joins the processes of a multi-process job (before any other JAX call); returns whether it did.

  enabled=None starts when the environment says multi-process or any argument is given; True
  always (values left None are auto-detected by JAX: SLURM, Open MPI, TPU pods); False never.
  """
  environ = os.environ if environ is None else environ
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  if enabled is False or (enabled is None and not explicit and not multiprocess_env(environ)):
    return False
  timeout_s = _int_value("distributed timeout", timeout_s, minimum=1)
  address, count, index = resolve_args(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, environ=environ
  )
  names = ("JAX_NUM_PROCESSES/num_processes", "process_id")
  if None in (address, count, index) and environ is os.environ:  # JAX's detection reads os.environ
    address, count, index, launcher = detect_cluster(address, count, index, timeout_s=timeout_s)
    if launcher is not None:
      names = _LAUNCHER_NAMES.get(launcher, (f"the {launcher} process count", f"the {launcher} process id"))
      if not 0 <= index < count:
        raise UserInputError(f"{names[1]}={index} is not a process of a job of {names[0]}={count}")
  if address is not None and count is not None and index is not None and count > 1:
    handshake(address, count, index, timeout_s=timeout_s, names=names)
  try:
    jax.distributed.initialize(
      coordinator_address=address, num_processes=count, process_id=index, initialization_timeout=timeout_s
    )
  except ValueError as e:  # JAX could not detect what was not given
    raise UserInputError(
      f"cannot start a multi-process job: {str(e).splitlines()[0]} (set {ENV_ADDRESS}, {ENV_COUNT} and {ENV_ID}, "
      "pass --coordinator_address/--num_processes/--process_id, or run under SLURM, Open MPI or on a TPU pod)"
    ) from None
  if count is not None and jax.process_count() != count:
    raise UserInputError(f"num_processes={count}, but {jax.process_count()} processes joined the job")
  return True


# ---------------------------------------------------------------------------------------------
# Process 0 writes.


def is_writer() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def _broadcast_message(message: str | None) -> str | None:
  """Process 0's `message` (None = no error) on every process (a collective: all must call it)."""
  from jax.experimental import multihost_utils

  buffer = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
  if message is not None:
    data = message.encode()[:_MESSAGE_BYTES]
    buffer[0], buffer[1 : 1 + len(data)] = 1, np.frombuffer(data, np.uint8)
  buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  if not buffer[0]:
    return None
  return bytes(buffer[1:]).rstrip(b"\0").decode(errors="replace")


def on_writer[T](fn: Callable[[], T], *, error_types: tuple[type[Exception], ...] = (ValueError,)) -> T | None:
  """Runs `fn` on process 0 only and returns its value there (None elsewhere).

  With several processes, an `error_types` exception of `fn` is re-raised on every process (as
  the same type when it takes one message, else UserInputError), so none waits for process 0 in a
  later collective. Other exceptions (bugs) keep their traceback on process 0; the others stop
  with a line pointing there.
  """
  if jax.process_count() == 1:
    return fn()
  result, error, message = None, None, None
  if is_writer():
    try:
      result = fn()
    except Exception as e:
      error = e
      message = json.dumps(
        {"type": type(e).__name__, "user": isinstance(e, error_types), "text": str(e)[: _MESSAGE_BYTES // 2]}
      )
  shared = _broadcast_message(message)
  if error is not None:
    raise error
  if shared is not None:
    info = json.loads(shared)
    text = info["text"] if info["user"] else f"process 0 failed with {info['type']}: {info['text']} (see its log)"
    kind = next((t for t in error_types if t.__name__ == info["type"]), None) if info["user"] else None
    raise (kind or UserInputError)(text) if info["user"] else RuntimeError(text)
  return result


def gather_to_host(tree: Any) -> Any:
  """Numpy copy of a pytree of (possibly sharded over several processes) arrays, on every process.

  A collective when the job has several processes: all must call it.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
