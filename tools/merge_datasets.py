"""Merge several indexed datasets (.bin/.idx prefixes) into one, keeping document boundaries.

    python tools/merge_datasets.py --inputs runs/data/a_text_document runs/data/b_text_document \
        --output-prefix runs/data/ab_text_document

The inputs must share a dtype (the same tokenizer). The output is written under temporary names
and renamed when complete. The work is done by megagpt.data.indexed.merge_datasets.
"""
import argparse
import sys

from megagpt.cli import run_main
from megagpt.data.indexed import IndexedDatasetError, merge_datasets
from megagpt.fsutil import clean_up_on_sigterm


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="+", required=True, help="dataset prefixes, in order")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    args = parser.parse_args(argv)
    clean_up_on_sigterm()
    try:
        merged = merge_datasets(args.inputs, args.output_prefix)
    except (IndexedDatasetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: {len(merged):,} sequences, "
          f"{merged.num_documents:,} documents, {merged.num_tokens:,} tokens")
    return 0


if __name__ == "__main__":
    run_main(main)
