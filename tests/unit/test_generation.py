"""Generation: the key-value cache, left-padded batches, sampling, stopping, streaming."""
import re

import pytest
import torch

from megagpt.config import ModelConfig
from megagpt.convert import INFERENCE_KERNELS
from megagpt.data.tokenizer import load_tokenizer
from megagpt.generation import (GREEDY, Sampling, StreamDecoder, filter_logits, generate,
                                next_tokens, seeded)
from megagpt.model.gpt import GPTStage, KVCache, StageSpec, init_weights

M = ModelConfig(vocab_size=1001, d_model=32, n_heads=4, n_layers=2, seq_length=32, dropout=0.0,
                init_std=0.3)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100], [3, 4, 5], [900, 17, 17, 4]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is many times faster than two contending for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    stage = GPTStage(M, INFERENCE_KERNELS, StageSpec(0, M.n_layers, True, True))
    init_weights(stage, M, seed=3)
    with torch.no_grad():   # biases and norms random too, so every weight matters
        for p in stage.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    return stage.eval()


@torch.no_grad()
def test_cached_steps_give_the_full_forward_logits(model):
    ids = torch.randint(0, M.vocab_size, (2, 12), generator=seeded(0))
    full = model(ids)                                               # (2, 12, V) training path
    cache = KVCache(torch.ones(2, 12, dtype=torch.bool))
    prefix = model(ids[:, :5], positions=torch.arange(5).expand(2, 5), cache=cache)
    torch.testing.assert_close(prefix, full[:, :5], rtol=0, atol=1e-5)
    for i in range(5, 12):                                          # one position a step
        step = model(ids[:, i:i + 1], positions=torch.full((2, 1), i), cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, i], rtol=0, atol=1e-5)
    assert cache.length == 12


@torch.no_grad()
def test_a_left_padded_row_gives_the_logits_of_the_row_alone(model):
    alone = model(torch.tensor([[7, 8, 9]]))
    key_mask = torch.tensor([[False, False, True, True, True]])
    padded = model(torch.tensor([[0, 0, 7, 8, 9]]), positions=torch.tensor([[0, 0, 0, 1, 2]]),
                   cache=KVCache(key_mask))
    torch.testing.assert_close(padded[:, 2:], alone, rtol=0, atol=1e-5)


def test_greedy_with_the_cache_equals_greedy_without_it(model):
    with_cache = generate(model, PROMPTS, max_new_tokens=12)
    without = generate(model, PROMPTS, max_new_tokens=12, use_cache=False)
    assert with_cache == without
    assert all(len(row) == 12 for row in with_cache)
    assert len({tuple(row) for row in with_cache}) == len(PROMPTS)   # rows really differ


def test_a_batch_equals_each_prompt_alone(model):
    batched = generate(model, PROMPTS, max_new_tokens=10)
    assert batched == [generate(model, [p], max_new_tokens=10)[0] for p in PROMPTS]


def test_greedy_equals_hugging_face_generate(model):
    transformers = pytest.importorskip("transformers")
    from megagpt.hf import hf_config_dict, to_hf
    from megagpt.model.gpt import gather_full_state_dict

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        **hf_config_dict(M), bos_token_id=0, eos_token_id=0, pad_token_id=0))
    hf.load_state_dict(to_hf(gather_full_state_dict(model), M))
    ours = generate(model, PROMPTS[:2], max_new_tokens=8)
    for prompt, row in zip(PROMPTS[:2], ours):
        out = hf.eval().generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                 min_new_tokens=8)
        assert out[0, len(prompt):].tolist() == row


def test_each_row_stops_at_end_of_document_and_the_batch_when_all_have(model):
    free = generate(model, PROMPTS, max_new_tokens=10)
    eod = free[0][3]                                 # a token row 0 emits as its 4th
    stopped = generate(model, PROMPTS, max_new_tokens=10, eod_id=eod)
    for row, tokens in zip(free, stopped):
        end = row.index(eod) + 1 if eod in row else len(row)
        assert tokens == row[:end]
    assert stopped[0][-1] == eod and len(stopped[0]) == 4
    alone = generate(model, [PROMPTS[0]], max_new_tokens=10, eod_id=eod)
    assert alone == [stopped[0]]                     # one row: generation ends at its eod


def test_on_token_streams_every_new_token_in_order(model):
    seen = []
    result = generate(model, PROMPTS[:2], max_new_tokens=5, on_token=lambda r, t: seen.append((r, t)))
    assert [t for r, t in seen if r == 0] == result[0]
    assert [t for r, t in seen if r == 1] == result[1]
    assert [r for r, _ in seen] == [0, 1] * 5        # rows in order within each step


def test_sampling_is_reproducible_for_a_seed(model):
    sampling = Sampling(temperature=1.5)
    a = generate(model, PROMPTS, max_new_tokens=10, sampling=sampling, generator=seeded(1))
    b = generate(model, PROMPTS, max_new_tokens=10, sampling=sampling, generator=seeded(1))
    c = generate(model, PROMPTS, max_new_tokens=10, sampling=sampling, generator=seeded(2))
    assert a == b and a != c
    assert a != generate(model, PROMPTS, max_new_tokens=10)       # it does not just take the argmax


def test_top_k_one_and_a_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPTS, max_new_tokens=8)
    for sampling in (Sampling(top_k=1), Sampling(top_p=1e-6), Sampling(temperature=0.01)):
        assert generate(model, PROMPTS, max_new_tokens=8, sampling=sampling,
                        generator=seeded(5)) == greedy, sampling


def test_top_k_keeps_k_tokens_even_when_logits_tie():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 2.0]])
    kept = filter_logits(logits, top_k=1).isfinite()
    assert kept.sum(-1).tolist() == [1, 1]
    assert filter_logits(logits, top_k=2).isfinite().sum(-1).tolist() == [2, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tools/gpu_check.sh)")
def test_a_cpu_generator_samples_for_a_gpu_model_as_for_a_cpu_one(model):
    # tools/generate.py's generator is a CPU one: the draw moves to it, the same seed gives the
    # same tokens on either device (up to rounding of the logits, hence a confident model here).
    sampling = Sampling(temperature=0.5, top_k=3)
    on_cpu = generate(model, PROMPTS, max_new_tokens=6, sampling=sampling, generator=seeded(5))
    gpu_model = GPTStage(M, INFERENCE_KERNELS, StageSpec(0, M.n_layers, True, True)).cuda().eval()
    gpu_model.load_state_dict(model.state_dict())
    on_gpu = generate(gpu_model, PROMPTS, max_new_tokens=6, sampling=sampling, generator=seeded(5))
    assert on_gpu == on_cpu


def test_filter_logits_keeps_the_top_k_and_the_top_p_sets():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()       # probabilities, unsorted
    kept = lambda out: set(torch.isfinite(out[0]).nonzero().flatten().tolist())  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == {1, 3}
    assert kept(filter_logits(logits, top_k=3)) == {1, 2, 3}       # all but one of the vocabulary
    assert kept(filter_logits(logits, top_k=4)) == kept(filter_logits(logits, top_k=9)) == \
        {0, 1, 2, 3}
    assert kept(filter_logits(logits, top_p=0.5)) == {1}            # 0.5 reaches 0.5
    assert kept(filter_logits(logits, top_p=0.6)) == {1, 3}         # 0.5 + 0.3 reaches 0.6
    assert kept(filter_logits(logits, top_p=0.96)) == {0, 1, 2, 3}
    assert kept(filter_logits(logits, top_k=3, top_p=0.7)) == {1, 3}
    assert kept(filter_logits(logits)) == {0, 1, 2, 3}


def test_sampled_tokens_stay_inside_the_kept_set():
    logits = torch.randn(4000, 50, generator=seeded(0))
    allowed = logits.topk(5, dim=-1).indices
    drawn = next_tokens(logits, Sampling(top_k=5), seeded(1))
    assert (allowed == drawn[:, None]).any(dim=-1).all()
    assert len(set(drawn.tolist())) > 5          # several tokens are drawn, not only the best


def test_padding_logits_are_never_chosen(model):
    assert M.padded_vocab_size(1) > M.vocab_size
    rows = generate(model, PROMPTS, max_new_tokens=10, sampling=Sampling(temperature=50.0),
                    generator=seeded(3))
    assert max(max(r) for r in rows) < M.vocab_size


@torch.no_grad()
def test_ids_past_a_smaller_tokenizers_vocabulary_are_never_chosen(model):
    rows = generate(model, PROMPTS, max_new_tokens=10, sampling=Sampling(temperature=50.0),
                    generator=seeded(3), vocab_limit=40)
    assert max(max(r) for r in rows) < 40
    full = generate(model, PROMPTS, max_new_tokens=10, sampling=Sampling(temperature=50.0),
                    generator=seeded(3))
    assert max(max(r) for r in full) >= 40     # the limit did the work
    for limit in (0, M.vocab_size + 1):
        with pytest.raises(ValueError, match=f"vocab_limit={limit}: must be in 1..1001"):
            generate(model, PROMPTS, max_new_tokens=2, vocab_limit=limit)


@pytest.mark.parametrize("prompts, max_new, message", [
    ([], 4, "no prompts given"),
    ([[1, 2], []], 4, "prompt 1 is empty"),
    ([[1, 1001]], 4, "prompt 0 has token id 1001, outside the model's vocabulary of 1001"),
    ([[1] * 30], 4, "the longest prompt has 30 tokens; with max_new_tokens=4 the model reads 33 "
                    "positions, more than its context of 32 (model.seq_length); fix: set "
                    "max_new_tokens <= 3"),
    ([[1] * 33], 1, "the longest prompt has 33 tokens, more than the model's context of 32 "
                    "(model.seq_length); fix: shorten it to at most 32 tokens"),
    # the fix counts the new tokens: 29 tokens leave room for 4 (it said 32, then refused 32)
    ([[1] * 33], 4, "fix: shorten it to at most 29 tokens (room for max_new_tokens=4)"),
    ([[1] * 40], 50, "the longest prompt has 40 tokens and max_new_tokens=50, each more than the "
                     "model's context of 32 (model.seq_length); fix: max_new_tokens <= 33 - the "
                     "prompt's tokens"),
    ([[1]], 0, "max_new_tokens=0: must be an integer >= 1"),
    ([1, 2, 3], 4, "prompts must be token-id lists, one a prompt, such as [tok.encode(text)] (or "
                   "a (batch, length) integer tensor, or a list of 1-d ones); prompt 0 is int, "
                   "not a list of ids"),
    ("ROMEO:", 4, "; got str"),
    (torch.tensor([1, 2]), 4, "; got a 1-d tensor of torch.int64"),
    (torch.tensor([[1.0, 2.0]]), 4, "; prompt 0 holds 1.0, float, not an int"),
    ([list(torch.tensor([1, 2]))], 4,
     "; prompt 0 holds tensor(1), a tensor of torch.int64, not an int"),
])
def test_requests_the_model_cannot_serve_are_refused(model, prompts, max_new, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(model, prompts, max_new_tokens=max_new)


def test_prompts_may_be_tensors(model):
    lists = [[5, 6, 7], [8, 9, 10]]
    expected = generate(model, lists, max_new_tokens=3)
    assert generate(model, torch.tensor(lists), max_new_tokens=3) == expected
    assert generate(model, [torch.tensor(p) for p in lists], max_new_tokens=3) == expected


def test_the_whole_context_is_usable_and_the_model_keeps_its_mode(model):
    # The last new token is chosen, never read: a full-context prompt still gets one token,
    # and 30 + 3 tokens read 32 positions.
    full = [list(range(1, 33))]
    assert len(generate(model, full, max_new_tokens=1)[0]) == 1
    model.train()
    try:
        assert generate(model, [[1] * 30], max_new_tokens=3, use_cache=False) == generate(
            model, [[1] * 30], max_new_tokens=3)
        assert model.training   # generating mid-training leaves dropout on
    finally:
        model.eval()


@pytest.mark.parametrize("sampling, message", [
    (Sampling(temperature=0.0), "temperature=0.0: must be > 0"),
    (Sampling(temperature=float("inf")), "temperature=inf: must be > 0"),
    (Sampling(top_k=-1), "top_k=-1: must be >= 0"),
    (Sampling(top_p=0.0), r"top_p=0.0: must be in \(0, 1\]"),
    (Sampling(top_p=1.5), r"top_p=1.5: must be in \(0, 1\]"),
])
def test_bad_sampling_settings_are_refused(model, sampling, message):
    with pytest.raises(ValueError, match=message):
        generate(model, [[1]], max_new_tokens=2, sampling=sampling)
    assert GREEDY.problems() == []


def test_a_tiny_temperature_is_greedy_not_nan(model):
    greedy = generate(model, PROMPTS, max_new_tokens=4)
    for tiny in (1e-40, 1e-300):       # 1e-300 is 0 in float32: it was a NaN and a traceback
        assert generate(model, PROMPTS, max_new_tokens=4, sampling=Sampling(temperature=tiny),
                        generator=seeded(3)) == greedy


def test_the_stream_decoder_flushes_what_it_held_back_at_the_end():
    tokenizer = load_tokenizer("gpt2")
    ids = tokenizer.encode("ab 🦜")[:-1]              # generation stopped inside the parrot
    decoder = StreamDecoder(tokenizer.decode)
    shown = "".join(decoder.push(t) for t in ids)
    assert shown + decoder.flush() == tokenizer.decode(ids) and decoder.flush() == ""


def test_the_stream_decoder_holds_back_split_characters():
    tokenizer = load_tokenizer("gpt2")
    text = "ROMEO: héllo 🦜 日本語 done"
    decoder = StreamDecoder(tokenizer.decode)
    pieces = [decoder.push(t) for t in tokenizer.encode(text)]
    assert "".join(pieces) == text
    assert "" in pieces                              # the parrot's 4 bytes span 3 tokens
    assert all("\ufffd" not in p for p in pieces)


@torch.no_grad()
def test_an_end_of_document_id_outside_the_vocabulary_runs_to_max_new_tokens(model):
    """A tokenizer larger than the model (GPT-2's eod 50256 over 1001 ids) padded with that id
    and failed with an IndexError."""
    assert generate(model, PROMPTS, max_new_tokens=5, eod_id=50256) == generate(
        model, PROMPTS, max_new_tokens=5)


def test_a_part_of_a_split_model_is_refused():
    """A first pipeline stage's hidden states were taken for logits, silently."""
    first_half = GPTStage(M, INFERENCE_KERNELS, StageSpec(0, 1, True, False))
    with pytest.raises(ValueError, match=r"one part of a split model \(layers 0-0 of 2"):
        generate(first_half, PROMPTS, max_new_tokens=3)


@torch.no_grad()
def test_diverged_weights_are_said_not_sampled(model):
    broken = GPTStage(M, INFERENCE_KERNELS, StageSpec(0, M.n_layers, True, True))
    broken.load_state_dict(model.state_dict())
    broken.final_ln.weight.fill_(float("nan"))
    for sampling in (GREEDY, Sampling(temperature=0.8)):
        with pytest.raises(ValueError, match="logits are not finite .* diverged"):
            generate(broken.eval(), PROMPTS, max_new_tokens=3, sampling=sampling,
                     generator=seeded(1))


def test_a_seed_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"seed=18446744073709551616: must be in \[0, 2\*\*64\)"):
        seeded(2 ** 64)
    seeded(2 ** 64 - 1)
