"""The `lora-squeeze` dispatcher, run as users run it (the installed console script)."""

import pathlib
import subprocess
import sys

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
