"""Fine-tuning data: chat-formatted jsonl -> token windows whose loss covers only the responses.

Input: jsonl (or .jsonl.gz), one example a line, either
    {"prompt": "...", "response": "..."}
or  {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
(a prompt/response pair is the two messages user, assistant).

Template: every turn is rendered as `"<Role>:"` followed by `" <content>\\n"`, with the roles
written `System`, `User`, `Assistant`, and the example ends with `<|endoftext|>`:

    User: Who wrote Hamlet?
    Assistant: William Shakespeare.
    <|endoftext|>

The loss mask is 1 on the tokens of every assistant turn's `" <content>\\n"` and on the final
`<|endoftext|>` (so the model learns to stop), 0 elsewhere. Each piece is encoded on its own,
so a turn's tokens do not depend on its neighbours. At inference, prompt with `chat_prompt_ids`
(`tools/generate.py --chat`): the turns and `"Assistant:"`, encoded piece by piece as training
encodes them; then stop at `<|endoftext|>`. The text `"User: <question>\\nAssistant:"` encoded
in one piece gives the same tokens only when no turn's content ends in whitespace (a BPE
merges the whitespace at the end of a piece, `"\\n\\n"` one token, but splits it before a word).

Two layouts, both giving the pretraining item dict (`tokens`, `labels`, `loss_mask`):
- packed: examples, repeated for as many epochs as needed and shuffled as pretraining's
  documents are (Megatron's rule: an example may come again before another comes once), are
  concatenated into one stream cut into windows of `seq_length + 1` tokens (the pretraining
  index, examples may straddle windows); the mask moves with its tokens.
- padded: one example a sample, truncated to `seq_length + 1` tokens or padded with the
  end-of-document id, padding masked out.

Bad lines (invalid UTF-8 or JSON, missing or non-string fields, unknown roles, no assistant
turn, an empty user or assistant turn) are counted by reason and skipped; `dataset.skipped` holds
the counts. A system message with empty content is left out, as if absent.
Examples are tokenized in memory when the dataset is built.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from megagpt.data import jsonl
from megagpt.data.blend import parse_data_path
from megagpt.data.gpt_dataset import (DatasetBuildError, build_sample_index, content_digest,
                                     epoch_plan, gather_sample, make_item, split_ranges)
from megagpt.data.indexed import dataset_exists
from megagpt.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
NO_FIELDS = "neither prompt/response nor messages"
BAD_MESSAGE = "bad message (needs role system/user/assistant and string content)"
NO_ASSISTANT = "no assistant turn"
EMPTY_CONTENT = "empty content"


def example_turns(obj: dict) -> tuple[list[tuple[str, str]] | None, str | None]:
    """The (role, content) turns of one parsed line, or None and the reason it is skipped."""
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            return None, BAD_MESSAGE
        turns = []
        for m in messages:
            if (not isinstance(m, dict) or m.get("role") not in ROLE_NAMES
                    or not isinstance(m.get("content"), str)):
                return None, BAD_MESSAGE
            turns.append((m["role"], m["content"]))
    elif "prompt" in obj and "response" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["response"], str):
            return None, f"{jsonl.NOT_STRING} for 'prompt' or 'response'"
        turns = [("user", obj["prompt"]), ("assistant", obj["response"])]
    else:
        return None, NO_FIELDS
    # an empty system prompt (chat exports often carry one) is no system prompt
    turns = [(role, content) for role, content in turns if role != "system" or content.strip()]
    if not any(role == "assistant" for role, _ in turns):
        return None, NO_ASSISTANT
    # turns after the last answer teach nothing (mask 0), and the end-of-text the model learns
    # to write belongs after an answer, not after a user's turn
    last = max(i for i, (role, _) in enumerate(turns) if role == "assistant")
    turns = turns[:last + 1]
    if any(not content.strip() for _, content in turns):
        return None, EMPTY_CONTENT
    return turns, None


def render(turns: list[tuple[str, str]]) -> str:
    """The template's text of an example (without the final <|endoftext|>)."""
    return "".join(template_pieces(turns))


@dataclass
class SFTExamples:
    """Tokenized examples, flat: example i is tokens[offsets[i]:offsets[i + 1]] and its mask."""
    tokens: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray
    skipped: jsonl.SkipLog = field(default_factory=jsonl.SkipLog)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, start: int, stop: int) -> SFTExamples:
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        return SFTExamples(self.tokens[lo:hi], self.loss_mask[lo:hi],
                           self.offsets[start:stop + 1] - lo, self.skipped)


def template_pieces(turns: list[tuple[str, str]]) -> list[str]:
    """The template's text of turns in the pieces encoded one by one: `"<Role>:"` and
    `" <content>\\n"` a turn."""
    return [piece for role, content in turns
            for piece in (f"{ROLE_NAMES[role]}:", f" {content}\n")]


def chat_prompt_ids(turns: list[tuple[str, str]], tokenizer: Tokenizer) -> list[int]:
    """The ids that prompt a fine-tuned model for its next answer after `turns` ((role, content),
    roles system/user/assistant): the turns and `"Assistant:"`, each piece encoded on its own as
    `tokenize_examples` encodes training examples."""
    bad = [role for role, _ in turns if role not in ROLE_NAMES]
    if bad:
        raise ValueError(f"chat_prompt_ids: unknown role {bad[0]!r}; the roles are "
                         f"{', '.join(ROLE_NAMES)}")
    pieces = template_pieces(turns) + [f"{ROLE_NAMES['assistant']}:"]
    return [i for ids in tokenizer.encode_batch(pieces) for i in ids]


def tokenize_examples(examples: list[list[tuple[str, str]]], tokenizer: Tokenizer) -> SFTExamples:
    """Encode examples with the template (one encode_batch over every piece)."""
    pieces, masks, counts = [], [], []
    for turns in examples:
        pieces += template_pieces(turns)
        masks += [m for role, _ in turns for m in (0, int(role == "assistant"))]
        counts.append(2 * len(turns))
    encoded = tokenizer.encode_batch(pieces)
    eod = tokenizer.eod_id
    tokens, mask, offsets, k = [], [], [0], 0
    for count in counts:
        for ids, m in zip(encoded[k:k + count], masks[k:k + count]):
            tokens += ids
            mask += [m] * len(ids)
        tokens.append(eod)
        mask.append(1)
        k += count
        offsets.append(len(tokens))
    return SFTExamples(np.array(tokens, dtype=np.int64), np.array(mask, dtype=np.uint8),
                       np.array(offsets, dtype=np.int64))


def load_sft_examples(paths, tokenizer: Tokenizer, where: str = "data.train_data_path") -> SFTExamples:
    """Read and tokenize every good line of the jsonl files `paths` (in order)."""
    skipped = jsonl.SkipLog()
    examples = []
    for weight, path in parse_data_path(paths, where):
        if weight is not None:
            raise DatasetBuildError(f"{where}: blend weights are not supported for fine-tuning "
                                    f"data; fix: list the jsonl files without weights")
        prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
        if dataset_exists(prefix):
            raise DatasetBuildError(f"{where}={path!r} is a Megatron indexed dataset (pretraining "
                                    f"data), and data.format=sft reads jsonl of prompt/response "
                                    f"or messages; fix: give the fine-tuning jsonl, or "
                                    f"data.format=indexed with training.mode=pretrain")
        with jsonl.open_input(path, where) as stream:
            for line_no, raw in jsonl.iter_lines(stream, where):
                obj, reason = jsonl.parse_line(raw)
                turns = None
                if obj is not None:
                    turns, reason = example_turns(obj)
                if reason:
                    skipped.add(f"{os.path.basename(path)}: {reason}", line_no)
                else:
                    examples.append(turns)
    if skipped.total:
        log.warning("fine-tuning data %s: skipped %d line(s):\n%s", where, skipped.total,
                    "\n".join(skipped.lines()))
    if not examples:
        raise DatasetBuildError(f"{where}={paths!r} holds no usable example; expected jsonl lines "
                                f"with prompt/response or messages (see docs/data.md)")
    result = tokenize_examples(examples, tokenizer)
    result.skipped = skipped
    return result


class SFTDataset(torch.utils.data.Dataset):
    """Fine-tuning samples, packed or padded (see the module docstring).

    Args:
        examples: tokenized examples.
        seq_length: tokens per sample fed to the model.
        num_samples: samples needed (epochs repeat, shuffled together); None: one epoch.
        packing: pack into full windows (True) or one padded example a sample (False).
        seed: shuffle seed.
        pad_id: padding token id for the padded layout (masked out).
    """

    def __init__(self, examples: SFTExamples, seq_length: int, num_samples: int | None,
                 packing: bool, seed: int, pad_id: int):
        if seq_length < 1:
            raise DatasetBuildError(f"model.seq_length={seq_length} must be positive")
        self.examples = examples
        self.seq_length = seq_length
        self.packing = packing
        self.pad_id = pad_id
        self.num_samples = num_samples
        self.skipped = examples.skipped
        self.data_digest = content_digest(examples.tokens, examples.offsets)
        if packing:
            self.doc_idx, self.sample_idx, self.order = build_sample_index(
                examples.lengths, np.arange(len(examples)), seq_length, num_samples, seed)
        else:
            epochs = 1 if num_samples is None else max(1, -(-num_samples // len(examples)))
            rng = np.random.default_rng(seed)
            self.order = np.concatenate([rng.permutation(len(examples)) for _ in range(epochs)])
        # padded: an example longer than the window is cut to it, and may lose its response
        window, offsets = seq_length + 1, examples.offsets
        cut = [] if packing else np.flatnonzero(examples.lengths > window)
        self.truncated = len(cut)
        self.lost_response = sum(1 for i in cut if examples.loss_mask[
            offsets[i]:offsets[i + 1]].any() and not examples.loss_mask[
            offsets[i] + 1:offsets[i] + window].any())

    def __len__(self) -> int:
        return len(self.order)

    def same_order(self, num_samples: int | None) -> bool:
        """Whether built for `num_samples` samples instead, this dataset would serve the same
        samples in the same order (up to the shorter of the two). Padded: always (each epoch's
        permutation is drawn after the last); packed: the same epoch plan."""
        if not self.packing:
            return True
        tokens = int(self.examples.lengths.sum())
        return (epoch_plan(tokens, self.seq_length, num_samples)
                == epoch_plan(tokens, self.seq_length, self.num_samples))

    def _slice(self, array: np.ndarray):
        offsets = self.examples.offsets

        def get(doc: int, offset: int, length: int | None) -> np.ndarray:
            start = int(offsets[doc]) + offset
            stop = int(offsets[doc + 1]) if length is None else start + length
            return array[start:stop]
        return get

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.packing:
            j = int(self.order[i])
            tokens = gather_sample(self._slice(self.examples.tokens), self.doc_idx, self.sample_idx, j)
            mask = gather_sample(self._slice(self.examples.loss_mask), self.doc_idx, self.sample_idx, j)
            return make_item(tokens, mask)
        e = int(self.order[i])
        lo, hi = int(self.examples.offsets[e]), int(self.examples.offsets[e + 1])
        n = min(hi - lo, self.seq_length + 1)
        tokens = np.full(self.seq_length + 1, self.pad_id, dtype=np.int64)
        mask = np.zeros(self.seq_length + 1, dtype=np.uint8)
        tokens[:n] = self.examples.tokens[lo:lo + n]
        mask[:n] = self.examples.loss_mask[lo:lo + n]
        return make_item(tokens, mask)


def build_sft_datasets(train_data_path, val_data_path=(), test_data_path=(), *,
                       split: str = "90,10,0", tokenizer: Tokenizer | str = "gpt2",
                       seq_length: int, num_samples: tuple[int, int, int], packing: bool = True,
                       seed: int = 1234):
    """Train, validation and test fine-tuning datasets (each None when it needs no sample).

    Args:
        train_data_path: `data.train_data_path`: jsonl file(s) of examples.
        val_data_path: `data.val_data_path`; empty: validation and test examples are carved out
            of the training examples by `split` (contiguous ranges, in file order).
        test_data_path: `data.test_data_path`; empty: the test part of `split` (None when it
            holds no example).
        split: `data.split`, train,valid,test example weights such as "90,10,0".
        tokenizer: a Tokenizer or a `data.tokenizer_path`.
        seq_length: `model.seq_length`.
        num_samples: (train, valid, test) samples needed; a zero gives None.
        packing: `data.sft_packing`.
        seed: `training.seed`.
    Returns:
        (train, valid, test) `SFTDataset`s with items `tokens`, `labels` (int64) and `loss_mask`
        (float32, 1 on response tokens), each (seq_length,).
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    common = dict(seq_length=seq_length, packing=packing, seed=seed, pad_id=tok.eod_id)
    train = load_sft_examples(train_data_path, tok, "data.train_data_path")
    if parse_data_path(val_data_path, "data.val_data_path"):
        parts = [train, load_sft_examples(val_data_path, tok, "data.val_data_path"), None]
    else:
        ranges = split_ranges(split, len(train))
        parts = [train.subset(*r) if r[1] > r[0] else None for r in ranges]
    carved_test = True
    if parse_data_path(test_data_path, "data.test_data_path"):
        parts[2], carved_test = load_sft_examples(test_data_path, tok, "data.test_data_path"), False
    out = []
    for name, part, n in zip(("train", "valid", "test"), parts, num_samples):
        if not n or (name == "test" and carved_test and (part is None or not len(part))):
            out.append(None)
            continue
        if part is None or not len(part):
            raise DatasetBuildError(f"data.split={split!r} leaves the {name} split no example "
                                    f"({len(train)} examples in all) but {n} samples are needed; "
                                    f"fix: give the {name} split a weight that is at least one "
                                    f"example of {len(train)}, set data.val_data_path, or "
                                    f"training.eval_interval=0 to train without validation")
        out.append(SFTDataset(part, num_samples=n, **common))
        if out[-1].lost_response == len(part):      # no token would count
            lost = (f"fine-tuning data ({name} split): every one of its {len(part)} examples is "
                    f"longer than model.seq_length + 1 = {seq_length + 1} tokens and loses every "
                    f"response token when cut to it, so ")
            fix = ("fix: raise model.seq_length, shorten the prompts, or data.sft_packing=true (a "
                   "long example then goes on in the next window)")
            if name == "train":              # nothing to learn: refused
                raise DatasetBuildError(f"{lost}no step would count a token; {fix}")
            log.warning("%sits evaluation counts no token (its loss is NaN); %s", lost, fix)
        if out[-1].truncated:
            log.warning("fine-tuning data (%s split): %d of %d examples are longer than "
                        "model.seq_length + 1 = %d tokens and are cut to it, %d of them losing "
                        "every response token (a step of only such examples is skipped); fix: "
                        "raise model.seq_length, shorten the prompts, or data.sft_packing=true "
                        "(a long example then goes on in the next window)", name,
                        out[-1].truncated, len(part), seq_length + 1, out[-1].lost_response)
    return tuple(out)
