"""The `lora-squeeze` dispatcher, run as users run it (the installed console script)."""

import os
import pathlib
import platform
import subprocess
import sys

import pytest

from lora_squeeze import allocator

CLI = pathlib.Path(sys.executable).parent / "lora-squeeze"


def run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=300)


def test_unknown_command_names_it_and_the_allowed_ones():
  result = run_cli("sqeeze")
  assert result.returncode == 2
  assert "unknown command 'sqeeze'; allowed: train, squeeze" in result.stderr


def test_no_command_prints_usage_and_fails():
  result = run_cli()
  assert result.returncode == 2 and "usage: lora-squeeze <command>" in result.stdout


def test_help_of_a_command_lists_its_own_flags():
  result = run_cli("squeeze", "--help")
  text = result.stdout + result.stderr
  assert "--rank" in text and "--energy" in text and "dry-run" in text, text


PROBE = "import os, sys; from lora_squeeze import allocator; allocator.restart_with_huge_pages(); print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])"


def run_probe(**env: str) -> tuple[subprocess.Popen, str]:
  environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT)}
  process = subprocess.Popen(
    [sys.executable, "-c", PROBE, "a", "--b=1"], env={**environ, **env}, stdout=subprocess.PIPE, text=True
  )
  out, _ = process.communicate(timeout=120)
  return process, out


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tunable is glibc's")
def test_the_process_restarts_in_place_with_huge_pages_and_its_arguments():
  process, out = run_probe()
  assert process.returncode == 0
  assert out.split(" ", 2) == [str(process.pid), allocator.TUNABLE, "['a', '--b=1']\n"]


@pytest.mark.parametrize("env", [{"GLIBC_TUNABLES": "glibc.malloc.check=0"}, {allocator.OPT_OUT: "default"}])
def test_a_users_tunables_or_the_opt_out_are_left_alone(env):
  process, out = run_probe(**env)
  assert process.returncode == 0
  assert out.split(" ", 2)[1] == env.get("GLIBC_TUNABLES", "None")


def test_a_bad_opt_out_value_is_a_one_line_error_from_the_cli():
  environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  result = subprocess.run(
    [str(CLI), "squeeze", "--help"],
    env={**environ, allocator.OPT_OUT: "hugepages"},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1
  assert result.stderr.strip() == (
    f"{allocator.OPT_OUT}='hugepages' is not one of 'huge_pages' (the default) or 'default'"
  )
