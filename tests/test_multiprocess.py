"""A real two-process job on 127.0.0.1 (CPU collectives over gloo): killed mid-run with SIGKILL,
resumed by the same command, it must equal a single-process run of the same plan; and bad
start-up input fails fast with one line naming the value (tests/multiprocess_run.py is the job)."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import multiprocess_run
from lora_squeeze import multihost
from lora_squeeze.adapters import orbax_io
from lora_squeeze.errors import UserInputError

HERE = pathlib.Path(__file__).resolve().parent
TAGS = ("r4", "r4_to_r2", "r4_to_r2_plus4")
LIMIT_S = 600  # `timeout` per process: a hang is a failure with this exit status, not a stuck CI


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, port, *, n=2, seconds_per_batch=0.0, env_for=lambda i: {}, logs=None, extra=(), cluster_env=None):
  """Starts the n processes of one job; returns the Popen objects (stdout+stderr to logs[i]).

  The processes find each other through the JAX_* variables, or, with `cluster_env` (i -> the
  variables a launcher sets for process i), through JAX's own detection of that launcher.
  """
  procs = []
  for i in range(n):
    env = {
      **os.environ,
      "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
      "JAX_PLATFORMS": "cpu",
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": str(n),
      "JAX_PROCESS_ID": str(i),
      **env_for(i),
    }
    if cluster_env is not None:
      for name in (multihost.ENV_ADDRESS, multihost.ENV_COUNT, multihost.ENV_ID):
        env.pop(name)
      env.update(cluster_env(i))
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    out = open(logs[i], "w") if logs else subprocess.DEVNULL
    procs.append(
      subprocess.Popen(
        [
          "timeout",
          "-s",
          "KILL",
          str(LIMIT_S),
          sys.executable,
          str(HERE / "multiprocess_run.py"),
          str(workdir),
          str(seconds_per_batch),
          *extra,
        ],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
      )
    )
  return procs


def wait_all(procs, logs):
  codes = [p.wait(timeout=LIMIT_S + 30) for p in procs]
  assert codes == [0] * len(procs), [pathlib.Path(log).read_text()[-3000:] for log in logs]


def test_two_processes_killed_and_resumed_equal_one_process(tmp_path):
  job, logs = tmp_path / "job", [tmp_path / "p0.log", tmp_path / "p1.log"]
  procs = launch(job, free_port(), seconds_per_batch=0.5, logs=logs)
  # Kill both (as a scheduler's preemption does) once the first mid-stage checkpoint is committed.
  deadline = time.monotonic() + LIMIT_S
  while not (job / "checkpoints" / "0").is_dir():
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
      log.read_text()[-3000:] for log in logs
    ]
    time.sleep(0.05)
  for p in procs:
    os.killpg(p.pid, signal.SIGKILL)  # the session of `timeout` and its python child
  for p in procs:
    p.wait()
  assert not (job / "results.json").exists()

  resumed_logs = [tmp_path / "r0.log", tmp_path / "r1.log"]
  wait_all(launch(job, free_port(), logs=resumed_logs), resumed_logs)
  assert "resumed from checkpoint 0" in resumed_logs[0].read_text()
  assert "step " not in resumed_logs[1].read_text()  # progress lines: process 0 only

  single = tmp_path / "single"
  multiprocess_run.run(single, printer=lambda line: None)
  got, want = json.loads((job / "results.json").read_text()), json.loads((single / "results.json").read_text())
  assert got["complete"] and got["global_step"] == want["global_step"] == 10
  for tag in TAGS:
    assert got["evals"][tag]["rank"] == want["evals"][tag]["rank"]
    assert got["evals"][tag]["metrics"].keys() == want["evals"][tag]["metrics"].keys() == {"target_prob", "loss"}
    for name, value in want["evals"][tag]["metrics"].items():
      np.testing.assert_allclose(got["evals"][tag]["metrics"][name], value, rtol=1e-5, err_msg=f"{tag}: {name}")
    lora, meta = orbax_io.load_adapter(job / "adapters" / tag)
    ref, _ = orbax_io.load_adapter(single / "adapters" / tag)
    assert meta["ranks"] == _["ranks"] and meta["global_step"] == _["global_step"]
    for (path, x), (_, y) in zip(sorted(flat(lora).items()), sorted(flat(ref).items())):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=f"{tag}: {path}")
  np.testing.assert_allclose(
    got["squeezes"][0]["overall_retention"], want["squeezes"][0]["overall_retention"], rtol=1e-5
  )
  records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if r["event"] == "train"]
  assert steps == list(range(1, 11))
  assert sorted(r["tag"] for r in records if r["event"] == "evaluate") == sorted(TAGS)
  assert len([r for r in records if r["event"] == "squeeze"]) == 1
  for index, log in enumerate(resumed_logs):
    assert_sharded_squeeze_check(log, index)
    placed = [line for line in log.read_text().splitlines() if line.startswith("placement check: ")]
    # Two rows per device, each process's rows from its own copy (filled with its index).
    assert [json.loads(line.split(": ", 1)[1]) for line in placed] == [[[0.0] * 3] * 2 + [[1.0] * 3] * 2]


def assert_sharded_squeeze_check(log, index):
  """The job's closing check (multiprocess_run.sharded_squeeze_check) on process `index`: the
  squeeze on factors split across both processes equals the unsharded one, as declared, in both
  precisions (float32: the TSQR of the TPU path, its R blocks gathered across processes)."""
  lines = [line for line in log.read_text().splitlines() if line.startswith("sharded squeeze check: ")]
  assert len(lines) == 1, log.read_text()[-3000:]
  check = json.loads(lines[0].split(": ", 1)[1])
  assert check["process"] == [index, 2]
  assert sorted(check["precisions"]) == ["float32", "float64"], check
  for precision, result in check["precisions"].items():
    assert result["max_diff"] <= 1e-5, (precision, result)
    np.testing.assert_allclose(*result["retention"], rtol=1e-6, err_msg=precision)
    assert result["as_declared"], (precision, result)
    assert result["split_across_processes"] == result["leaves"] == 20, (precision, result)  # 10 modules


def free_port_in(low: int, high: int) -> int:
  """A port of low..high that is free now (launchers derive the coordinator's port from a job id)."""
  for port in np.random.default_rng().permutation(np.arange(low, high + 1))[:200]:
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", int(port)))
      except OSError:
        continue
      return int(port)
  raise RuntimeError(f"no free port in {low}..{high}")


def slurm_env(port):
  """What `srun --ntasks=2` on one node sets for each task (the variables jax's SlurmCluster reads);
  JAX takes the coordinator port from the job id: SLURM_JOB_ID % 4096 + 61440."""
  job_id = str(4096 * 7 + port - 61440)
  return lambda i: {
    "SLURM_JOB_ID": job_id,
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": str(i),
    "SLURM_LOCALID": str(i),
    "SLURM_STEP_NODELIST": "127.0.0.1",
    "SLURM_STEP_NUM_NODES": "1",
  }


def open_mpi_env(port):
  """What Open MPI 4's `mpirun -np 2` (ORTE) sets for each rank (the variables jax's OmpiCluster
  reads); JAX takes the coordinator's address from the launcher's URI and its port from the job id:
  (job id // 4096) % 4096 + 61440. Open MPI 5 (PRRTE) would need mpi4py and a real mpirun."""
  uri = f"{4096 * (port - 61440)}.0;tcp://127.0.0.1:{free_port()}"  # the launcher's own address
  return lambda i: {
    "OMPI_MCA_orte_hnp_uri": uri,
    "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_COMM_WORLD_RANK": str(i),
    "OMPI_COMM_WORLD_LOCAL_RANK": str(i),
  }


@pytest.mark.parametrize("launcher", [slurm_env, open_mpi_env], ids=["slurm", "open_mpi"])
def test_a_launcher_environment_is_detected_without_arguments(tmp_path, launcher):
  job, logs = tmp_path / "job", [tmp_path / "p0.log", tmp_path / "p1.log"]
  wait_all(launch(job, None, logs=logs, cluster_env=launcher(free_port_in(61440, 65535)), extra=("--quick",)), logs)
  assert "squeeze r4 -> r2" in logs[0].read_text() and "squeeze r4" not in logs[1].read_text()
  results = json.loads((job / "results.json").read_text())
  assert results["complete"] and results["global_step"] == 2 and list(results["evals"]) == ["r4_to_r2"]
  records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["event"] == "train"] == [1, 2]
  assert [r["event"] for r in records if r["event"] != "train"] == ["stage_end", "squeeze", "evaluate"]


def flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    out.update(flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {f"{prefix}{key}": np.asarray(value)})
  return out


def test_a_mesh_that_does_not_divide_the_devices_of_all_processes_fails_fast_and_writes_nothing(tmp_path):
  job, logs = tmp_path / "job", [tmp_path / "p0.log", tmp_path / "p1.log"]
  procs = launch(job, free_port(), logs=logs, extra=("3",))  # fsdp=3 on 2 processes x 1 device
  codes = [p.wait(timeout=LIMIT_S + 30) for p in procs]
  assert codes == [1, 1]
  for log in logs:
    assert log.read_text().strip().splitlines()[-1] == (
      "multiprocess_run: mesh fsdp=3 does not divide the 2 devices of 2 processes; allowed: a divisor of 2"
    )
  assert not job.exists()


def test_bad_process_count_id_or_address_name_the_value():
  env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2"}
  with pytest.raises(
    UserInputError,
    match=r"^JAX_PROCESS_ID=2 is not a process of a job of JAX_NUM_PROCESSES=2 "
    r"\(allowed: 0..1\)$",
  ):
    multihost.resolve_args(environ={**env, "JAX_PROCESS_ID": "2"})
  with pytest.raises(UserInputError, match=r"^JAX_NUM_PROCESSES='two': expected an integer >= 1$"):
    multihost.resolve_args(environ={**env, "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"})
  with pytest.raises(UserInputError, match=r"^JAX_COORDINATOR_ADDRESS 'node0': expected host:port"):
    multihost.resolve_args(environ={**env, "JAX_COORDINATOR_ADDRESS": "node0"})
  # Explicit values win over the environment.
  assert multihost.resolve_args(process_id=1, environ={**env, "JAX_PROCESS_ID": "0"}) == ("127.0.0.1:1234", 2, 1)


def test_unreachable_coordinator_fails_within_the_timeout():
  start = time.monotonic()
  with pytest.raises(UserInputError, match=r"^process 1: the coordinator 127.0.0.1:\d+ was not reachable within 1 s"):
    multihost.handshake(f"127.0.0.1:{free_port()}", 2, 1, timeout_s=1)
  assert time.monotonic() - start < 10


def run_handshakes(port, processes, timeout_s=20):
  """handshake() of each (count, id) in its own thread; returns the error (or None) of each."""
  errors = [None] * len(processes)

  def one(i, count, index):
    try:
      multihost.handshake(f"127.0.0.1:{port}", count, index, timeout_s=timeout_s)
    except UserInputError as e:
      errors[i] = str(e)

  threads = [threading.Thread(target=one, args=(i, *p)) for i, p in enumerate(processes)]
  threads[0].start()
  time.sleep(0.2)  # process 0 listens first (the peers retry anyway)
  for t in threads[1:]:
    t.start()
  for t in threads:
    t.join(timeout=timeout_s + 15)
  return errors


def test_handshake_accepts_a_consistent_job_and_names_a_count_mismatch_or_a_duplicate_id():
  assert run_handshakes(free_port(), [(3, 0), (3, 2), (3, 1)]) == [None, None, None]
  mismatch = "process 1 says num_processes=3, but process 0 says 2; every process needs the same count"
  assert run_handshakes(free_port(), [(2, 0), (3, 1)]) == [mismatch, mismatch]
  duplicate = "process_id=1 is used by two processes; each of 0..2 exactly once"
  assert run_handshakes(free_port(), [(3, 0), (3, 1), (3, 1)]) == [duplicate] * 3
  missing = run_handshakes(free_port(), [(3, 0), (3, 1)], timeout_s=1)
  assert missing[0].startswith("only processes [0, 1] of JAX_NUM_PROCESSES/num_processes=3 reached the coordinator")


def test_cli_names_an_unreachable_coordinator_in_one_line_and_writes_nothing(tmp_path):
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    "JAX_PLATFORMS": "cpu",
    "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}",
    "JAX_NUM_PROCESSES": "2",
    "JAX_PROCESS_ID": "1",
  }
  done = subprocess.run(
    [
      "timeout",
      "-s",
      "KILL",
      str(LIMIT_S),
      sys.executable,
      "-m",
      "lora_squeeze.cli",
      "train",
      f"--config={HERE.parent / 'configs' / 'default.py'}",
      f"--workdir={tmp_path / 'run'}",
      "--distributed_timeout=1",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=LIMIT_S + 30,
  )
  assert done.returncode == 1
  address = env["JAX_COORDINATOR_ADDRESS"]
  assert (
    done.stderr.strip()
    .splitlines()[-1]
    .startswith(f"lora-squeeze train: process 1: the coordinator {address} was not reachable within 1 s")
  )
  assert not (tmp_path / "run").exists()


def test_detect_cluster_reads_what_srun_or_mpirun_set(monkeypatch):
  for name in [*os.environ]:
    if name.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR")):
      monkeypatch.delenv(name)
  assert multihost.detect_cluster(None, None, None, timeout_s=5) == (None, None, None, None)
  for name, value in slurm_env(61440 + 77)(1).items():
    monkeypatch.setenv(name, value)
  assert multihost.detect_cluster(None, None, None, timeout_s=5) == ("127.0.0.1:61517", 2, 1, "slurm")
  assert multihost.detect_cluster("10.0.0.1:9", 4, None, timeout_s=5) == ("10.0.0.1:9", 4, 1, "slurm")
  for name in slurm_env(0)(0):
    monkeypatch.delenv(name, raising=False)
  for name, value in open_mpi_env(61440 + 5)(0).items():
    monkeypatch.setenv(name, value)
  assert multihost.detect_cluster(None, None, None, timeout_s=5) == ("127.0.0.1:61445", 2, 0, "ompi")


def test_a_launcher_job_missing_a_process_fails_in_one_line_within_the_timeout(tmp_path):
  port = free_port_in(61440, 65535)
  env = {**os.environ, **slurm_env(port)(0), "JAX_PLATFORMS": "cpu"}
  env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])
  for name in (multihost.ENV_ADDRESS, multihost.ENV_COUNT, multihost.ENV_ID):
    env.pop(name, None)
  command = [sys.executable, "-m", "lora_squeeze.cli", "train", f"--config={HERE.parent / 'configs' / 'default.py'}"]
  done = subprocess.run(
    ["timeout", "-s", "KILL", str(LIMIT_S), *command, f"--workdir={tmp_path / 'run'}", "--distributed_timeout=2"],
    env=env,
    capture_output=True,
    text=True,
    timeout=LIMIT_S + 30,
  )
  assert done.returncode == 1, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1] == (
    f"lora-squeeze train: only processes [0] of SLURM_NTASKS=2 reached the coordinator 127.0.0.1:{port} within 2 s"
  )
  assert not (tmp_path / "run").exists()
