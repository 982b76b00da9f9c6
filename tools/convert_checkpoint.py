#!/usr/bin/env python
"""Convert a checkpoint: ours (any layout) or Megatron-LM's -> Hugging Face GPT-2, or ours /
Hugging Face / Megatron-LM's -> ours.

    python tools/convert_checkpoint.py --input runs/tiny_model/checkpoints --output runs/tiny_hf --to hf
    python tools/convert_checkpoint.py --input runs/tiny_model/checkpoints --output runs/tiny_1x1 \
        --to megagpt --tensor-parallel-size 1 --pipeline-parallel-size 1 --verify

--input: a save dir (its latest checkpoint), a step_NNNNNNN folder, a Hugging Face GPT-2
folder (config.json + model.safetensors or pytorch_model.bin), or a Megatron-LM save dir or
iter_NNNNNNN folder (megatron-core's GPTModel; docs/models.md, "Megatron-LM checkpoints").
--output must not exist or be empty; it is written under a temporary name and renamed when
complete. The logic lives in
megagpt/convert.py.

Exit status: 0 converted (and verified with --verify), 1 refused or failed (nothing written).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megagpt.cli import run_main  # noqa: E402
from megagpt.convert import ConversionError, convert  # noqa: E402
from megagpt.data.tokenizer import TokenizerError  # noqa: E402
from megagpt.fsutil import clean_up_on_sigterm  # noqa: E402
from megagpt.training.checkpoint import CheckpointError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True,
                        help="save dir, step folder, Hugging Face folder, or Megatron-LM save dir")
    parser.add_argument("--output", required=True, help="folder to create (absent or empty)")
    parser.add_argument("--to", required=True, choices=("hf", "megagpt"))
    parser.add_argument("--tensor-parallel-size", type=int, help="--to megagpt: default the source's")
    parser.add_argument("--pipeline-parallel-size", type=int, help="--to megagpt: default the source's")
    parser.add_argument("--virtual-pipeline-size", type=int, help="--to megagpt: default the source's")
    parser.add_argument("--tokenizer", help="--to hf: default the checkpoint's data.tokenizer_path")
    parser.add_argument("--verify", action="store_true",
                        help="compare the logits of the output and the source on a fixed batch")
    args = parser.parse_args(argv)
    clean_up_on_sigterm()
    try:
        result = convert(args.input, args.output, args.to, tp=args.tensor_parallel_size,
                         pp=args.pipeline_parallel_size, vp=args.virtual_pipeline_size,
                         tokenizer=args.tokenizer, verify=args.verify)
    except (ConversionError, CheckpointError, TokenizerError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"note: {note}")
    print(f"done: {result.output}")
    return 0


if __name__ == "__main__":
    run_main(main)
