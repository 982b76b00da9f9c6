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


def test_the_demo_validates_every_shipped_training_config_and_only_those():
    """It validated every file in configs/training/, where configs/README.md tells users to add
    their own: one of theirs, invalid, stopped the demo."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("demo", ROOT / "tools" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    tracked = subprocess.run(["git", "ls-files", "configs/training/*.json"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert sorted(Path(p).stem for p in tracked) == sorted(demo.SHIPPED_CONFIGS)
