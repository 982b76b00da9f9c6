#!/usr/bin/env python
"""Generate text from a checkpoint of ours (any layout, merged to one process), a Hugging Face
GPT-2 folder or a Megatron-LM checkpoint, on the CPU.

    python tools/generate.py --checkpoint runs/tiny_model/checkpoints --prompt "ROMEO:" \
        --max-new-tokens 40 --temperature 0.8 --top-k 40 --seed 1

One prompt: its text and then the new tokens are printed as they are generated. Several prompts
(repeat --prompt): they run as one batch, and each completion is printed when the batch is done,
in the order given. A row stops at the end-of-document token or after --max-new-tokens. Without
--greedy, tokens are sampled (temperature 1, no top-k or top-p cut unless given) with --seed.
The sampling and the key-value cache live in megagpt/generation.py.

--chat, for a model fine-tuned on the chat template (configs/dataset/finetuning.json): each
--prompt is a user's message (after --system's, when given), sent as training encodes examples
(megagpt.data.sft_dataset.chat_prompt_ids), and the completion is the assistant's answer.

Exit status: 0 done, 1 a checkpoint, tokenizer or prompt that cannot be used, 2 a bad argument
(sampling settings and the seed included).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megagpt.cli import run_main  # noqa: E402
from megagpt.convert import (ConversionError, load_source, single_process_model,  # noqa: E402
                             source_tokenizer)
from megagpt.data.sft_dataset import chat_prompt_ids, render  # noqa: E402
from megagpt.data.tokenizer import TokenizerError  # noqa: E402
from megagpt.generation import (Sampling, StreamDecoder, check_request, generate,  # noqa: E402
                                seeded)
from megagpt.training.checkpoint import CheckpointError  # noqa: E402


def sampling_of(args, parser) -> Sampling:
    chosen = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                             ("--top-p", args.top_p)) if v is not None]
    if args.greedy and chosen:
        parser.error(f"--greedy takes the most likely token; it cannot be combined with "
                     f"{', '.join(chosen)}")
    sampling = Sampling(greedy=args.greedy,
                        temperature=1.0 if args.temperature is None else args.temperature,
                        top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p)
    problems = sampling.problems({f: "--" + f.replace("_", "-")
                                  for f in ("greedy", "temperature", "top_k", "top_p")})
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens={args.max_new_tokens}: must be at least 1")
    try:
        seeded(args.seed, "--seed")
    except ValueError as e:
        problems.append(str(e))
    if problems:
        parser.error("; ".join(problems))
    return sampling


def chat_turns(text: str, system: str | None) -> list[tuple[str, str]]:
    """--chat's conversation: --system's message (when given), then the prompt as the user's."""
    return ([("system", system)] if system is not None else []) + [("user", text)]


def chat_text(text: str, system: str | None) -> str:
    """What --chat sends, as text (printed before the answer)."""
    return render(chat_turns(text, system)) + "Assistant:"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="save dir, step folder (ours, any layout), Hugging Face GPT-2 "
                             "folder, or Megatron-LM save dir")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="take the most likely token")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (default: all)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1.0: all)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--tokenizer", help="default: the checkpoint's (data.tokenizer_path, or "
                        "the Hugging Face folder's files), else the bundled GPT-2")
    parser.add_argument("--chat", action="store_true",
                        help="each prompt is a user's message to a model fine-tuned on the chat "
                             "template; the completion is its answer")
    parser.add_argument("--system", help="with --chat: a system message before each prompt")
    args = parser.parse_args(argv)
    sampling = sampling_of(args, parser)
    if args.system is not None and not args.chat:
        parser.error("--system is a message of the chat template: add --chat")
    try:
        source = load_source(args.checkpoint, "--checkpoint")
        tokenizer = source_tokenizer(source, args.tokenizer)
        model = single_process_model(source.model, source.full_state)
        texts = [chat_text(text, args.system) if args.chat else text for text in args.prompt]
        prompts = [chat_prompt_ids(chat_turns(text, args.system), tokenizer) if args.chat
                   else tokenizer.encode(text, allow_special=True) for text in args.prompt]
        check_request(prompts, args.max_new_tokens, source.model.vocab_size, source.model.seq_length,
                      "--max-new-tokens")
        vocab_limit = min(tokenizer.vocab_size, source.model.vocab_size)
        if tokenizer.vocab_size < source.model.vocab_size:
            print(f"generate: note: the tokenizer has {tokenizer.vocab_size} ids and the model "
                  f"{source.model.vocab_size} (model.vocab_size); ids from {tokenizer.vocab_size} "
                  f"on have no text and are never chosen", file=sys.stderr)
        stream = StreamDecoder(tokenizer.decode) if len(prompts) == 1 else None
        if stream is not None:
            print(texts[0], end="", flush=True)

        def show(row: int, token: int) -> None:
            if token != tokenizer.eod_id:
                print(stream.push(token), end="", flush=True)

        results = generate(model, prompts, max_new_tokens=args.max_new_tokens,
                           eod_id=tokenizer.eod_id, sampling=sampling, generator=seeded(args.seed),
                           on_token=show if stream is not None else None,
                           vocab_limit=vocab_limit)
    except (ConversionError, CheckpointError, TokenizerError, ValueError) as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 1
    if stream is not None:
        print(stream.flush())
        return 0
    for i, (text, new) in enumerate(zip(texts, results)):
        new = [t for t in new if t != tokenizer.eod_id]
        print(f"--- [{i}] ---\n{text}{tokenizer.decode(new)}")
    return 0


if __name__ == "__main__":
    run_main(main)
