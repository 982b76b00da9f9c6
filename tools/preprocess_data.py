"""Tokenize a jsonl (or .jsonl.gz) corpus into Megatron's indexed format.

    python tools/preprocess_data.py --input corpus.jsonl.gz --output-prefix runs/data/corpus \
        --tokenizer gpt2 --json-keys text --append-eod --workers 8

writes runs/data/corpus_text_document.bin/.idx (one pair per --json-keys key); the training
config names the prefix runs/data/corpus_text_document. The work is done by
megagpt.data.preprocess.preprocess_jsonl; see docs/data.md.
"""
import argparse
import os
import sys

from megagpt.cli import run_main
from megagpt.data.jsonl import InputError
from megagpt.data.preprocess import PreprocessError, preprocess_jsonl
from megagpt.data.tokenizer import TokenizerError
from megagpt.fsutil import clean_up_on_sigterm


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="a .jsonl or .jsonl.gz file, one JSON object a line")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    parser.add_argument("--tokenizer", default="gpt2",
                        help='"gpt2" (bundled), a tokenizer.json, or a folder with vocab.json + merges.txt')
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="string fields to tokenize")
    parser.add_argument("--append-eod", action="store_true", help="end every document with <|endoftext|>")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 18, help="input bytes per worker task")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    clean_up_on_sigterm()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cpus and args.workers > cpus:
        print(f"note: --workers {args.workers} is more than the {cpus} CPUs this process may use; "
              f"the extra workers add memory, not speed (--workers {cpus})", file=sys.stderr)
    try:
        summary = preprocess_jsonl(args.input, args.output_prefix, tokenizer=args.tokenizer,
                                   json_keys=args.json_keys, append_eod=args.append_eod,
                                   workers=args.workers, chunk_bytes=args.chunk_bytes,
                                   progress=not args.no_progress)
    except (InputError, PreprocessError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    run_main(main)
