"""Train a byte-level BPE tokenizer (GPT-2 style) on a jsonl corpus.

    python tools/train_tokenizer.py --input corpus.jsonl.gz --vocab-size 32000 --output runs/tok

writes vocab.json + merges.txt + tokenizer.json (+ Hugging Face tokenizer_config.json) into the
new folder --output, which `--tokenizer runs/tok` (preprocess_data.py), `data.tokenizer_path`
and `AutoTokenizer.from_pretrained` read. <|endoftext|> is the last id. Bad lines are skipped
and counted. The work is done by megagpt.data.tokenizer.train_bpe_tokenizer.
"""
import argparse
import itertools
import sys

from megagpt.cli import run_main
from megagpt.data import jsonl
from megagpt.data.tokenizer import train_bpe_tokenizer
from megagpt.fsutil import clean_up_on_sigterm


def read_texts(path: str, key: str, skipped: jsonl.SkipLog):
    """Yield the `key` string of every good line of a jsonl file, counting the bad ones."""
    with jsonl.open_input(path) as stream:
        for line_no, raw in jsonl.iter_lines(stream):
            obj, reason = jsonl.parse_line(raw)
            text = None
            if obj is not None:
                text, reason = jsonl.text_field(obj, key)
            if reason:
                skipped.add(reason, line_no)
            else:
                yield text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="a .jsonl or .jsonl.gz file")
    parser.add_argument("--vocab-size", type=int, required=True, help="ids in the result, <|endoftext|> included")
    parser.add_argument("--output", required=True, help="a new (or empty) folder")
    parser.add_argument("--json-key", default="text", help="the string field to train on")
    parser.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair")
    args = parser.parse_args(argv)
    clean_up_on_sigterm()
    skipped = jsonl.SkipLog()
    try:
        jsonl.open_input(args.input).close()
        texts = read_texts(args.input, args.json_key, skipped)
        first = next(texts, None)
        if first is None:
            raise ValueError(f"--input {args.input!r} has no usable line for --json-key "
                             f"{args.json_key}; skipped:\n" + "\n".join(skipped.lines()))
        tok = train_bpe_tokenizer(itertools.chain([first], texts), args.vocab_size,
                                  args.output, min_frequency=args.min_frequency,
                                  names={"vocab_size": "--vocab-size", "output_dir": "--output",
                                         "min_frequency": "--min-frequency"})
    except (jsonl.InputError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: vocab_size {tok.vocab_size}, <|endoftext|> = {tok.eod_id}")
    if tok.vocab_size < args.vocab_size:
        print(f"note: --vocab-size {args.vocab_size} asked for more ids than the corpus gives "
              f"merges for (pairs seen at least --min-frequency {args.min_frequency} times); "
              f"the tokenizer has {tok.vocab_size}")
    if skipped.total:
        print(f"skipped {skipped.total} line(s):\n" + "\n".join(skipped.lines()))
    return 0


if __name__ == "__main__":
    run_main(main)
