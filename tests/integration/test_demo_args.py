"""tools/demo.py takes no options: --help describes it and anything else is refused, before it
starts (it ran the whole demo, moving runs/tiny_model aside, on --help or a typo)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_help_and_unknown_options_do_not_run_the_demo():
    run = [sys.executable, "tools/demo.py"]
    shown = subprocess.run([*run, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "Takes no options" in shown.stdout, shown.stderr
    refused = subprocess.run([*run, "--bogus"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "unrecognized arguments: --bogus" in refused.stderr
    assert "Validate the shipped configs" not in shown.stdout + refused.stdout
