#!/usr/bin/env python
"""Validate training configs, count parameters exactly and estimate memory per GPU.

    python tools/validate_config.py --config configs/training/base_model.json [--gpu-memory 80GB]
        [--section.field=value ...]

Exit status: 0 valid, 1 invalid (every problem listed), 2 unreadable file or bad JSON.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megagpt.config import (OVERRIDES_HELP, ConfigError, ConfigFileError,  # noqa: E402
                            load_config, split_config_args)
from megagpt.cli import run_main  # noqa: E402
from megagpt.estimate import parse_memory, report  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=OVERRIDES_HELP)
    parser.add_argument("--config", nargs="+", required=True, help="training config JSON file(s)")
    parser.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB)")
    args, overrides = parser.parse_known_args(argv)
    args.config, overrides = split_config_args(args.config, overrides)
    if not args.config:
        parser.error("--config needs at least one config file")
    try:
        gpu_memory = parse_memory(args.gpu_memory)
    except ValueError as e:
        parser.error(str(e))
    status = 0
    for path in args.config:
        try:
            cfg = load_config(path, overrides)
        except ConfigFileError as e:
            print(f"{path}: unreadable\n  {e}", file=sys.stderr)
            status = max(status, 2)
            continue
        except ConfigError as e:
            print(f"{path}: invalid, {e}", file=sys.stderr)
            status = max(status, 1)
            continue
        lines, problems = report(cfg, gpu_memory, overridden=bool(overrides))
        print(f"{path}: {'valid' if not problems else 'invalid'}")
        print("\n".join("  " + line for line in lines))
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        if problems:
            status = max(status, 1)
    return status


if __name__ == "__main__":
    run_main(main)
