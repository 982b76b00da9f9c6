"""Tokenizers: one interface over Hugging Face `tokenizers`, the loader, and BPE training.

`load_tokenizer(path)` accepts:
- `"gpt2"`: the GPT-2 byte-level BPE bundled in `megagpt/data/assets/gpt2/` (works from any
  working directory);
- a `tokenizer.json` file (the `tokenizers` serialisation);
- a folder holding `tokenizer.json`, or `vocab.json` + `merges.txt` (GPT-2 style byte-level BPE).

Every tokenizer is returned as a `Tokenizer` with `encode`, `encode_batch`, `decode`, `vocab_size`
and `eod_id` (the end-of-document id appended between documents). `train_bpe_tokenizer` trains a
byte-level BPE and writes a folder that this loader and Hugging Face `AutoTokenizer` /
`GPT2TokenizerFast` both read.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import tiktoken
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from megagpt.fsutil import replace_folder_atomically, why_not_a_folder

GPT2_DIR = Path(__file__).resolve().parent / "assets" / "gpt2"
EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens looked for, in order, in a tokenizer that is not GPT-2's.
EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
BYTE_ALPHABET_SIZE = 256
# GPT-2's pre-tokenizer pattern, as `tokenizers`' ByteLevel pre-tokenizer applies it
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# MEGAGPT_FAST_BPE=0 (read at import): GPT-2's tokenizer encodes with `tokenizers`, not tiktoken
FAST_BPE = os.environ.get("MEGAGPT_FAST_BPE", "1").lower() not in ("0", "false", "off", "no")


class TokenizerError(ValueError):
    """A tokenizer path that does not load; the message names the path and what was expected."""


def _without_offsets(part):
    """A tokenizers component's JSON without `trim_offsets`, which changes offsets, not ids."""
    if isinstance(part, dict):
        return {k: _without_offsets(v) for k, v in part.items() if k != "trim_offsets"}
    if isinstance(part, list):
        return [_without_offsets(v) for v in part]
    return part


class Tokenizer:
    """A loaded tokenizer: raw token ids in and out, no special tokens added by encoding.

    Text is text: a special token's string inside a document (a literal `<|endoftext|>` in web
    text, or in a fine-tuning answer) is encoded as its characters, as GPT-2's own encoder and
    Megatron's tokenizer do, never as the special id; end-of-document ids are added by the data
    pipeline only. `encode(text, allow_special=True)` (prompts typed by a user) reads the
    tokenizer's special strings as their ids.

    Args:
        backend: the `tokenizers.Tokenizer` doing the work.
        source: where it was loaded from (shown in messages).
    """

    def __init__(self, backend: tokenizers.Tokenizer, source: str):
        self.backend = backend
        self.backend.encode_special_tokens = True
        self.source = source
        self.eod_id = _find_eod(backend, source)
        self._special_ids = {t.content: i for i, t in backend.get_added_tokens_decoder().items()
                             if t.special}
        self._special_split = re.compile(
            "(" + "|".join(re.escape(s) for s in sorted(self._special_ids, key=len, reverse=True)) + ")"
        ) if self._special_ids else None
        # encode_batch_fast (tokenizers >= 0.21) skips the offset bookkeeping we never use.
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self._tiktoken = _gpt2_tiktoken() if FAST_BPE and _is_gpt2(backend) else None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (GPT-2: 50257)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def ids_below(self) -> int:
        """One more than the largest id (`vocab_size` unless the ids leave gaps)."""
        return max(self.backend.get_vocab(with_added_tokens=True).values()) + 1

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 of what decides the ids text gets: every id's token (added ones included),
        the model's kind, merges and options, the normalizer and the pre-tokenizer (not the
        offsets-only `trim_offsets`), so the same tokenizer loaded another way (the bundled
        gpt2, Megatron's gpt2-vocab.json + gpt2-merges.txt, a tokenizer.json) has the same one,
        and one that splits or normalises text otherwise has another."""
        return self._fingerprint_of(self.backend.get_vocab(with_added_tokens=True).items())

    def prefix_fingerprint(self, size: int) -> str:
        """The `fingerprint` of this tokenizer cut to its ids below `size`: another tokenizer's
        `fingerprint` when this one is that one with tokens added after its ids (see `extends`;
        `size` its `ids_below`), so a record of the other's fingerprint and `ids_below` tells it
        without its vocabulary."""
        return self._fingerprint_of(item for item in self.backend.get_vocab(
            with_added_tokens=True).items() if item[1] < size)

    def _fingerprint_of(self, vocab) -> str:
        """SHA-256 of (token, id) pairs `vocab` with what splits text (`_splitting`)."""
        decisive = dict(self._splitting(), vocab=sorted(vocab, key=lambda item: item[1]))
        return hashlib.sha256(json.dumps(decisive, ensure_ascii=False, sort_keys=True)
                              .encode()).hexdigest()

    def _splitting(self) -> dict:
        """What decides how text is split into tokens, besides the vocabulary: the model's kind,
        merges and options, the normalizer, the pre-tokenizer."""
        spec = json.loads(self.backend.to_str())
        model = {k: None if v == "" else v            # "" and None: no prefix or suffix
                 for k, v in (spec.get("model") or {}).items() if k != "vocab"}
        model["merges"] = [m if isinstance(m, str) else " ".join(m)
                           for m in model.get("merges") or []]
        return {"model": model, "normalizer": spec.get("normalizer"),
                "pre_tokenizer": _without_offsets(spec.get("pre_tokenizer"))}

    def extends(self, other: Tokenizer) -> bool:
        """Whether this tokenizer is `other` with tokens added after its own (special tokens
        for a chat template, say): it splits text as `other` does, and each of other's tokens
        has the same id here."""
        mine = self.backend.get_vocab(with_added_tokens=True)
        theirs = other.backend.get_vocab(with_added_tokens=True)
        return (self._splitting() == other._splitting()
                and all(mine.get(token) == i for token, i in theirs.items()))

    def __reduce__(self):
        # A pickled `tokenizers.Tokenizer` forgets `encode_special_tokens`: rebuild through
        # __init__, which sets it again.
        return Tokenizer, (self.backend, self.source)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; with `allow_special`, the special tokens' strings in it become
        their ids (`"<|endoftext|>"` -> the end-of-document id) instead of characters."""
        if not allow_special or self._special_split is None:
            return self._encode_text(text)
        ids = []
        for piece in self._special_split.split(text):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            elif piece:
                ids += self._encode_text(piece)
        return ids

    def _encode_text(self, text: str) -> list[int]:
        if self._tiktoken is None:
            return self.backend.encode(text, add_special_tokens=False).ids
        text.encode("utf-8")  # a lone surrogate raises here, as in `tokenizers` (tiktoken would
        return self._tiktoken.encode_ordinary(text)  # replace it with U+FFFD, silently)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; the `tokenizers` library may use several threads (tiktoken,
        for GPT-2's tokenizer, one)."""
        if self._tiktoken is not None:
            return [self._encode_text(text) for text in texts]
        return [e.ids for e in self._encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (special tokens such as the end-of-document id included)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


def _gpt2_files() -> tuple[dict[str, int], list[str]]:
    """The bundled GPT-2 vocabulary (token -> id) and merges ("a b" each)."""
    vocab = json.loads((GPT2_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (GPT2_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    return vocab, [m for m in lines if m and not m.startswith("#version")]


def _is_gpt2(backend: tokenizers.Tokenizer) -> bool:
    """Whether `backend` is exactly GPT-2's tokenizer: its vocabulary and merges in a BPE with
    nothing else changing the ids (no normaliser, the ByteLevel pre-tokenizer without a prefix
    space, no added token but a special `<|endoftext|>`, no truncation or padding; the post-
    processor and decoder do not take part in `encode` without special tokens)."""
    spec = json.loads(backend.to_str())
    added = [(t["content"], t["special"]) for t in spec.get("added_tokens", [])]
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    plain_bpe = (model.get("type") == "BPE" and not model.get("dropout")
                 and not model.get("continuing_subword_prefix")
                 and not model.get("end_of_word_suffix") and not model.get("byte_fallback")
                 and not model.get("ignore_merges"))
    if not (plain_bpe and spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("add_prefix_space") is False and pre.get("use_regex", True)
            and added in ([], [(EOD_TOKEN, True)]) and spec.get("truncation") is None
            and spec.get("padding") is None):
        return False
    vocab, merges = _gpt2_files()
    return model["vocab"] == vocab and [m if isinstance(m, str) else " ".join(m)
                                        for m in model["merges"]] == merges


@functools.lru_cache(maxsize=None)
def _gpt2_tiktoken() -> tiktoken.Encoding:
    """GPT-2's encoding in tiktoken, built from the bundled files (tiktoken's own "gpt2" would
    download them): the byte-level alphabet's characters back to bytes, each token's rank its
    id (GPT-2's ids follow its merges' order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    vocab, _ = _gpt2_files()
    ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items() if token != EOD_TOKEN}
    return tiktoken.Encoding("megagpt-gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOD_TOKEN: vocab[EOD_TOKEN]})


def _find_eod(backend: tokenizers.Tokenizer, source: str) -> int:
    for token in EOD_CANDIDATES:
        token_id = backend.token_to_id(token)
        if token_id is not None:
            return token_id
    raise TokenizerError(
        f"tokenizer {source!r} has no end-of-document token: expected one of "
        f"{', '.join(EOD_CANDIDATES)} in its vocabulary; fix: add {EOD_TOKEN!r} as a special "
        f"token (tools/train_tokenizer.py does)")


def _byte_level_bpe(vocab: Path, merges: Path, source: str) -> tokenizers.Tokenizer:
    """GPT-2's pipeline (the same as Hugging Face GPT2TokenizerFast) over a vocab/merges pair."""
    try:
        backend = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{source}: cannot read {vocab.name} + {merges.name} as a byte-level "
                             f"BPE ({e}); fix: give GPT-2 style vocab.json (token -> id) and "
                             f"merges.txt (one merge a line)") from e
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    if backend.token_to_id(EOD_TOKEN) is not None:
        backend.add_special_tokens([EOD_TOKEN])
    return backend


def _from_json(path: Path, source: str) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:
        raise TokenizerError(f"{source}: {path} is not a valid tokenizers tokenizer.json ({e}); "
                             f"fix: give a tokenizer.json that tokenizers.Tokenizer.from_file "
                             f"reads") from e


TOKENIZER_CHOICES = ("\"gpt2\" (bundled), a tokenizer.json file, or a folder with tokenizer.json or "
                     "vocab.json + merges.txt")


def load_tokenizer(path: str | os.PathLike, name: str = "tokenizer") -> Tokenizer:
    """Load a tokenizer from `"gpt2"`, a tokenizer.json file, or a folder.

    Args:
        path: `"gpt2"` (the bundled GPT-2 BPE), a `tokenizer.json` file, or a folder with
            `tokenizer.json` or with `vocab.json` + `merges.txt`.
        name: what the messages call the path (a flag or a config field).
    Raises:
        TokenizerError: naming the path and what was expected there.
    """
    source = str(path)
    shown = f"{name} {source!r}"
    if source == "gpt2":
        return Tokenizer(_byte_level_bpe(GPT2_DIR / "vocab.json", GPT2_DIR / "merges.txt", shown),
                         source)
    p = Path(path).expanduser()
    if p.is_file():
        if p.name.endswith("vocab.json"):      # a BPE vocabulary (Megatron's --vocab-file)
            raise TokenizerError(f"{shown} is a BPE vocabulary, which needs its merges file; "
                                 f"fix: give the folder holding both (vocab.json + merges.txt, "
                                 f"or Megatron's gpt2-vocab.json + gpt2-merges.txt), or \"gpt2\" "
                                 f"for GPT-2's own")
        if p.suffix != ".json":
            raise TokenizerError(f"{shown} is a file but not a tokenizer.json; fix: give "
                                 f"{TOKENIZER_CHOICES}")
        return Tokenizer(_from_json(p, shown), source)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return Tokenizer(_from_json(p / "tokenizer.json", shown), source)
        # vocab.json + merges.txt (Hugging Face), or one <name>-vocab.json + <name>-merges.txt
        # (Megatron's gpt2-vocab.json, gpt2-merges.txt)
        vocabs, merges = ([x for x in sorted(p.glob(pattern)) if not x.name.startswith(".")]
                          for pattern in ("*vocab.json", "*merges.txt"))
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            vocabs, merges = [p / "vocab.json"], [p / "merges.txt"]
        if len(vocabs) == 1 and len(merges) == 1:
            return Tokenizer(_byte_level_bpe(vocabs[0], merges[0], shown), source)
        if vocabs and merges:
            raise TokenizerError(
                f"{shown} holds more than one vocabulary or merges file "
                f"({', '.join(x.name for x in vocabs + merges)}): which pair is the tokenizer is "
                f"not clear; fix: point at a folder with one pair")
        found = sorted(x.name for x in p.iterdir())[:10]
        raise TokenizerError(
            f"{shown} is a folder with neither tokenizer.json nor vocab.json + merges.txt "
            f"(found: {', '.join(found) or 'nothing'}); fix: point at a folder written by "
            f"tools/train_tokenizer.py or a Hugging Face GPT-2 tokenizer folder, or use \"gpt2\"")
    raise TokenizerError(f"{shown} does not exist; fix: give {TOKENIZER_CHOICES}")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | os.PathLike,
                        min_frequency: int = 2, names: dict[str, str] | None = None) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE and write it to `output_dir`.

    The folder gets `vocab.json` + `merges.txt` (GPT-2 form), `tokenizer.json`, and the Hugging
    Face `tokenizer_config.json` / `special_tokens_map.json`, so `load_tokenizer`,
    `GPT2TokenizerFast.from_pretrained` and `AutoTokenizer.from_pretrained` all read it.
    `<|endoftext|>` is the last id. The folder is written under a temporary name and renamed when
    complete; an existing non-empty `output_dir` is refused.

    Args:
        texts: the training documents.
        vocab_size: ids in the result, `<|endoftext|>` included; at least 257 (256 bytes + 1).
        output_dir: the folder to create.
        min_frequency: a pair must occur this often to be merged.
        names: the name to show in messages for an argument (a command line's flag), by the
            argument's name; default the argument's own.
    """
    def name(arg: str) -> str:
        return (names or {}).get(arg, arg)

    if vocab_size < BYTE_ALPHABET_SIZE + 1:
        raise ValueError(f"{name('vocab_size')}={vocab_size} is too small: a byte-level BPE needs "
                         f"the {BYTE_ALPHABET_SIZE} byte tokens plus {EOD_TOKEN}; fix: use at least "
                         f"{BYTE_ALPHABET_SIZE + 1}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
        raise ValueError(f"{name('min_frequency')}={min_frequency!r}: must be a count, 0 or more "
                         f"(a pair must occur this often to be merged); fix: e.g. 2")
    out = Path(output_dir)
    reason = why_not_a_folder(out.parent)
    if reason:
        raise ValueError(f"{name('output_dir')} {str(out)!r}: cannot write there ({reason}); "
                         f"fix: choose another location")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{name('output_dir')} {str(out)!r} exists and is not an empty "
                              f"folder; fix: choose a new path or remove it")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_special_tokens([EOD_TOKEN])

    try:
        _write_trained(backend, out)
    except OSError as e:         # a full disk, a read-only file system
        raise ValueError(f"{name('output_dir')} {str(out)!r}: cannot write "
                         f"({getattr(e, 'strerror', None) or e}); nothing was written; fix: free "
                         f"space or choose another location") from e
    return load_tokenizer(out)


def save_to(save, path: Path) -> None:
    """`save(str(path))`, a tokenizers library save (`Tokenizer.save`, `model.save`), whose I/O
    errors (a full disk, a missing folder) come as a bare Exception: raised as an OSError."""
    try:
        save(str(path))
    except Exception as e:
        raise OSError(str(e)) from e


def _write_trained(backend, out: Path) -> None:
    """The trained tokenizer's files, written into a temporary folder renamed to `out`."""
    with replace_folder_atomically(out) as tmp:
        save_to(backend.model.save, tmp)  # vocab.json + merges.txt, without the added token
        vocab = json.loads((tmp / "vocab.json").read_text(encoding="utf-8"))
        vocab[EOD_TOKEN] = backend.token_to_id(EOD_TOKEN)
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        save_to(backend.save, tmp / "tokenizer.json")
        special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024,
                  "add_prefix_space": False, **special}
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
