"""Text generation with a single-process model: sampling, a key-value cache, batched prompts.

    source = load_source("runs/tiny_model/checkpoints")          # megagpt.convert
    model = single_process_model(source.model, source.full_state)
    tok = source_tokenizer(source, None)
    tokens = generate(model, [tok.encode("ROMEO:")], max_new_tokens=40, eod_id=tok.eod_id,
                      sampling=Sampling(temperature=0.8, top_k=40), generator=seeded(1))

`generate` runs the prompts as one batch. Prompts of different lengths are left-padded: row r
with pad_r padding positions gives its token j the position id j - pad_r, so every row's first
real token is at position 0, and the padding positions are masked out of every row's attention
(`megagpt.model.gpt.KVCache`); a row's logits are the same as running it alone (so greedy
rows are too; sampled rows draw from one generator, so a row's draws depend on the batch). The first
step runs the whole (padded) prompt batch and fills the cache; each later step feeds only the
token just chosen (one position per row). A row stops after it emits the end-of-document id;
the batch stops when every row has, or after `max_new_tokens`.

Sampling (`Sampling`): greedy takes the most likely token; otherwise the logits are divided by
the temperature, cut to the `top_k` most likely tokens (0: no cut), then to the smallest set
whose probability reaches `top_p` (1.0: no cut), and a token is drawn from what is left with the
given `torch.Generator`, so a seed gives the same text every time. Logits of the vocabulary
padding are never candidates.
"""
from __future__ import annotations

import math
import numbers

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megagpt.model.gpt import GPTStage, KVCache


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits.

    Args:
        greedy: take the most likely token (the other fields are then unused).
        temperature: divide the logits by this (> 0); lower is more conservative.
        top_k: keep only the k most likely tokens; 0 keeps all.
        top_p: keep the smallest set of most likely tokens whose probability reaches p, in (0, 1].
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def problems(self, names: dict[str, str] | None = None) -> list[str]:
        """What is wrong with these settings, one sentence each naming the value and the fix;
        `names` gives the name to show for a field (a command line's flag), default its own."""
        def name(field: str) -> str:
            return (names or {}).get(field, "greedy=True" if field == "greedy" else field)

        found = []
        if self.greedy:
            return found
        if not 0 < self.temperature < math.inf:
            found.append(f"{name('temperature')}={self.temperature}: must be > 0 and finite; "
                         f"fix: e.g. 0.8, or greedy decoding ({name('greedy')}) for the most likely "
                         f"token at each step")
        if self.top_k < 0:
            found.append(f"{name('top_k')}={self.top_k}: must be >= 0 (0 keeps every token); "
                         f"fix: e.g. 40")
        if not 0 < self.top_p <= 1:
            found.append(f"{name('top_p')}={self.top_p}: must be in (0, 1] (1 keeps every token); "
                         f"fix: e.g. 0.9")
        return found


GREEDY = Sampling(greedy=True)


def seeded(seed: int, name: str = "seed") -> torch.Generator:
    """A CPU generator for `generate`, seeded: the same seed draws the same tokens. `name` is the
    seed's name in the message when it is out of range."""
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"{name}={seed}: must be in [0, 2**64); fix: e.g. 1234")
    return torch.Generator().manual_seed(seed)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (b, V) with every token outside the top-k and top-p sets set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        # by index, not by value: tokens tied with the k-th would otherwise all stay
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(
            -1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)         # (b, V) each
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs                          # mass of likelier tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def next_tokens(logits: torch.Tensor, sampling: Sampling,
                generator: torch.Generator | None) -> torch.Tensor:
    """The chosen token of each row, (b,) int64, from the logits of its last position (b, V)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    # the row's largest logit subtracted first: a tiny temperature then sends the others to
    # -inf (greedy in the limit) instead of every logit to +-inf and the softmax to NaN
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / sampling.temperature
    # a temperature below float32's range (1e-300) divides by 0: the largest logits' 0 / 0 is 0
    logits = torch.where(logits.isnan(), torch.zeros_like(logits), logits)
    probs = filter_logits(logits, sampling.top_k, sampling.top_p).softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        # drawn where the generator lives (a CPU one for a GPU model: the same seed, the
        # same tokens on either device)
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(
            probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def as_token_lists(prompts):
    """A (batch, length) tensor of ids, or a list of 1-d tensors, as token-id lists; anything
    else as given (check_request judges it)."""
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        return prompts.tolist()
    if isinstance(prompts, (list, tuple)) and prompts and all(
            isinstance(p, torch.Tensor) and p.dim() == 1 for p in prompts):
        return [p.tolist() for p in prompts]
    return prompts


def _prompts_problem(prompts) -> str | None:
    """What is wrong with the form of `prompts` (naming the first bad part), or None."""
    if isinstance(prompts, torch.Tensor):
        return f"got a {prompts.dim()}-d tensor of {prompts.dtype}"
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        return f"got {type(prompts).__name__}"
    for r, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            return f"prompt {r} is a {prompt.dim()}-d tensor of {prompt.dtype}"
        if not isinstance(prompt, (list, tuple)):
            return f"prompt {r} is {type(prompt).__name__}, not a list of ids"
        for t in prompt:
            if not isinstance(t, numbers.Integral) or isinstance(t, bool):
                kind = (f"a tensor of {t.dtype}" if isinstance(t, torch.Tensor)
                        else type(t).__name__)
                return f"prompt {r} holds {t!r}, {kind}, not an int"
    return None


def check_request(prompts: list[list[int]], max_new_tokens: int, vocab_size: int,
                  seq_length: int, name: str = "max_new_tokens") -> None:
    """Refuse prompts the model cannot continue, with a ValueError naming the value and the fix;
    `name` is max_new_tokens's name in the messages (a command line's flag)."""
    problem = _prompts_problem(prompts)
    if problem:
        raise ValueError(f"generate: prompts must be token-id lists, one a prompt, such as "
                         f"[tok.encode(text)] (or a (batch, length) integer tensor, or a list of "
                         f"1-d ones); {problem}")
    if not prompts:
        raise ValueError("generate: no prompts given; fix: pass at least one prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"{name}={max_new_tokens}: must be an integer >= 1")
    for r, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {r} is empty (no tokens); fix: give it some text")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {r} has token id {bad[0]}, outside the model's vocabulary of "
                             f"{vocab_size} (model.vocab_size); fix: use the tokenizer the model "
                             f"was trained with (--tokenizer)")
    longest = max(len(p) for p in prompts)
    if longest > seq_length and max_new_tokens > seq_length:   # no prompt length would do
        raise ValueError(f"the longest prompt has {longest} tokens and {name}="
                         f"{max_new_tokens}, each more than the model's context of {seq_length} "
                         f"(model.seq_length); fix: {name} <= {seq_length + 1} - the "
                         f"prompt's tokens")
    if longest > seq_length:
        raise ValueError(f"the longest prompt has {longest} tokens, more than the model's context "
                         f"of {seq_length} (model.seq_length); fix: shorten it to at most "
                         f"{seq_length - max_new_tokens + 1} tokens (room for {name}="
                         f"{max_new_tokens}), or fewer new tokens")
    # the last new token is chosen, never read: the model reads longest + max_new_tokens - 1
    if longest + max_new_tokens - 1 > seq_length:
        raise ValueError(f"the longest prompt has {longest} tokens; with {name}="
                         f"{max_new_tokens} the model reads {longest + max_new_tokens - 1} "
                         f"positions, more than its context of {seq_length} (model.seq_length); "
                         f"fix: set {name} <= {seq_length - longest + 1} or shorten the "
                         f"prompt")


@torch.no_grad()
def generate(model: GPTStage, prompts: list[list[int]], *, max_new_tokens: int,
             eod_id: int | None = None, sampling: Sampling = GREEDY,
             generator: torch.Generator | None = None, use_cache: bool = True,
             on_token: Callable[[int, int], None] | None = None,
             vocab_limit: int | None = None) -> list[list[int]]:
    """Continue each prompt; returns the new token ids of each row.

    Args:
        model: a whole single-process model (`GPTStage` holding every layer, tp = pp = 1).
        prompts: token ids of each prompt, of any lengths (left-padded into one batch): lists
            of ints, 1-d tensors, or a (batch, length) tensor.
        max_new_tokens: tokens generated per row at most; the longest prompt plus this, less
            one (the last new token is never read), must fit the model's context
            (`model.seq_length`).
        eod_id: the end-of-document id; a row stops after emitting it (it ends that row's
            result). None: rows run to max_new_tokens.
        sampling: greedy or temperature / top-k / top-p (`Sampling`).
        generator: the random generator for sampling (`seeded(seed)`); a CPU generator serves
            a model on any device.
        use_cache: keep keys and values between steps (one position per step); False runs the
            whole sequence again at every step (the reference the cache is tested against).
        on_token: called as on_token(row, token_id) for each new token of each running row,
            rows in order within a step, as soon as the step has chosen them (streaming).
        vocab_limit: choose only ids below this (a tokenizer's vocabulary smaller than the
            model's: the ids past it have no text); None: the model's whole vocabulary.
    """
    problems = sampling.problems()
    if problems:
        raise ValueError("; ".join(problems))
    m, spec = model.cfg, model.spec
    whole = (spec.pre_process and spec.post_process and spec.first_layer == 0
             and spec.last_layer == m.n_layers)
    if not whole or (model.tp_group is not None and dist.get_world_size(model.tp_group) > 1):
        raise ValueError(f"generate: the model is one part of a split model (layers "
                         f"{spec.first_layer}-{spec.last_layer - 1} of {m.n_layers}, embedding "
                         f"{spec.pre_process}, output {spec.post_process}, tensor-parallel "
                         f"group {model.tp_group}); fix: build the whole model in one process "
                         f"(`convert.single_process_model`, as tools/generate.py does)")
    prompts = as_token_lists(prompts)
    check_request(prompts, max_new_tokens, m.vocab_size, m.seq_length)
    if vocab_limit is not None and not 0 < vocab_limit <= m.vocab_size:
        raise ValueError(f"vocab_limit={vocab_limit}: must be in 1..{m.vocab_size} (the model's "
                         f"vocabulary), or None")
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompts, max_new_tokens, eod_id, sampling, generator, use_cache,
                         on_token, vocab_limit or m.vocab_size)
    finally:
        model.train(was_training)


def _generate(model, prompts, max_new_tokens, eod_id, sampling, generator, use_cache, on_token,
              vocab_limit):
    device = model.word_embedding_weight().device
    rows, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + max_new_tokens
    pad_id = 0   # any id the model has: padding is masked, a finished row's tokens unread
    tokens = torch.full((rows, total), pad_id, dtype=torch.long, device=device)  # (b, total)
    key_mask = torch.ones(rows, total, dtype=torch.bool, device=device)          # False: padding
    pads = [longest - len(p) for p in prompts]
    for r, prompt in enumerate(prompts):
        tokens[r, pads[r]:longest] = torch.tensor(prompt, device=device)
        key_mask[r, :pads[r]] = False
    # row r's token j sits at position j - pads[r]; the padding's positions are never attended
    positions = (torch.arange(total, device=device)[None, :]
                 - torch.tensor(pads, device=device)[:, None]).clamp(min=0)     # (b, total)

    results: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    cache, cached = KVCache(key_mask), 0
    for length in range(longest, total):
        if not use_cache:
            cache, cached = KVCache(key_mask), 0
        logits = model(tokens[:, cached:length], positions=positions[:, cached:length], cache=cache)
        cached = length
        last = logits[:, -1, :vocab_limit]
        if not bool(torch.isfinite(last).all()):
            raise ValueError(f"the model's logits are not finite (NaN or inf) after {length} "
                             f"tokens: its weights have diverged; fix: use an earlier checkpoint")
        chosen = next_tokens(last, sampling, generator)   # (b,)
        chosen = chosen.masked_fill(finished, pad_id)
        tokens[:, length] = chosen
        for r in range(rows):
            if not finished[r]:
                results[r].append(int(chosen[r]))
                if on_token is not None:
                    on_token(r, int(chosen[r]))
        if eod_id is not None:
            finished |= chosen == eod_id
            if bool(finished.all()):
                break
    return results


class StreamDecoder:
    """Text of a token stream, piece by piece, for printing as tokens arrive.

    A byte-level BPE token can end in the middle of a UTF-8 character; `push` holds text back
    until the character is complete, so the pieces joined equal `decode(all tokens)`.

    Args:
        decode: token ids -> text (`Tokenizer.decode`).
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that became printable (maybe empty)."""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):           # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        piece, self.shown = text[self.shown:], len(text)
        return piece

    def flush(self) -> str:
        """The text still held back when the stream ends (a character the last token left
        incomplete, or a token that decodes to U+FFFD itself), so that everything shown equals
        `decode(all tokens)`."""
        text = self.decode(self.ids)
        piece, self.shown = text[self.shown:], len(text)
        return piece
