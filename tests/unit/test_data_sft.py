"""Fine-tuning data: template, loss masks aligned with labels, packed and padded layouts, bad
lines, splits, and the bundled example file."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megagpt.data.gpt_dataset import DatasetBuildError
from megagpt.data.sft_dataset import (SFTDataset, build_sft_datasets, example_turns, load_sft_examples,
                                      render, tokenize_examples)
from megagpt.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "megagpt" / "data" / "assets" / "sft_example.jsonl"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


def write(path: Path, lines: list) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines) + b"\n")
    return path


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Hamlet?"},
                     {"role": "assistant", "content": "Shakespeare."}, {"role": "user", "content": "When?"},
                     {"role": "assistant", "content": "Around 1600."}]}


def test_template_and_mask_cover_only_responses(tok):
    turns, reason = example_turns(CHAT)
    assert reason is None
    ex = tokenize_examples([turns], tok)
    assert tok.decode(ex.tokens) == render(turns) + "<|endoftext|>"
    assert render(turns) == "System: Be brief.\nUser: Who wrote Hamlet?\nAssistant: Shakespeare.\nUser: When?\nAssistant: Around 1600.\n"
    assert tok.decode(ex.tokens[ex.loss_mask == 1]) == " Shakespeare.\n Around 1600.\n<|endoftext|>"
    pair, _ = example_turns({"prompt": "Q?", "response": "A."})
    assert pair == [("user", "Q?"), ("assistant", "A.")]


def test_a_literal_end_of_document_string_in_an_answer_is_not_a_stop(tok):
    turns, _ = example_turns({"prompt": "What ends a GPT-2 document?", "response": "<|endoftext|>"})
    ex = tokenize_examples([turns], tok)
    assert ex.tokens.tolist().count(tok.eod_id) == 1 and ex.tokens[-1] == tok.eod_id


@pytest.mark.parametrize("obj, reason", [
    ({"text": "x"}, "neither prompt/response nor messages"),
    ({"prompt": "q", "response": 3}, "non-string value for 'prompt' or 'response'"),
    ({"messages": []}, "bad message"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "bad message"),
    ({"messages": [{"role": "user", "content": None}]}, "bad message"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"prompt": "q", "response": "  "}, "empty content"),
    ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": ""},
                   {"role": "assistant", "content": "a"}]}, "empty content"),
])
def test_bad_examples_are_classified(obj, reason):
    turns, got = example_turns(obj)
    assert turns is None and got.startswith(reason)


def test_an_empty_system_prompt_is_left_out_not_the_example():
    turns, reason = example_turns({"messages": [{"role": "system", "content": " "},
                                                {"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "a"}]})
    assert reason is None and turns == [("user", "q"), ("assistant", "a")]


def test_turns_after_the_last_answer_are_left_out(tok):
    """A conversation ending with a user's turn taught the model to write end-of-text after it."""
    turns, reason = example_turns({"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "yo"},
                                                {"role": "user", "content": "thanks"}]})
    assert reason is None and turns == [("user", "hi"), ("assistant", "yo")]
    ex = tokenize_examples([turns], tok)
    assert tok.decode(ex.tokens[ex.loss_mask.astype(bool)].tolist()) == " yo\n<|endoftext|>"


def test_bad_lines_are_counted_and_skipped(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, b"{oops", b"\xff\xfe",
                                        {"messages": [{"role": "user", "content": "x"}]}, b"",
                                        {"prompt": "c", "response": "d"},
                                        # half a surrogate pair: one such line failed the whole
                                        # file's encode_batch before it was counted as invalid
                                        b'{"prompt": "e", "response": "\\udc00"}'])
    ex = load_sft_examples([str(path)], tok)
    assert len(ex) == 2
    assert ex.skipped.counts == {"d.jsonl: malformed JSON": 1, "d.jsonl: invalid UTF-8": 2,
                                 "d.jsonl: no assistant turn": 1, "d.jsonl: blank line": 1}
    assert ex.skipped.first_lines["d.jsonl: no assistant turn"] == [4]
    with pytest.raises(DatasetBuildError, match="holds no usable example"):
        load_sft_examples([str(write(tmp_path / "bad.jsonl", [b"{x"]))], tok)
    with pytest.raises(DatasetBuildError, match="blend weights are not supported"):
        load_sft_examples(["1.0", str(path)], tok)
    with pytest.raises(ValueError, match="data.train_data_path '.*missing.jsonl' does not exist"):
        load_sft_examples([str(tmp_path / "missing.jsonl")], tok)


def test_a_damaged_gzip_file_is_named_by_its_setting(tmp_path, tok):
    """It was reported against --input, a flag of preprocess_data, not of the trainer."""
    import gzip
    lines = b"".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}).encode() + b"\n"
                     for i in range(2000))
    whole = gzip.compress(lines)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r"^data.val_data_path '.*cut.jsonl.gz': cannot read past "
                                         r"line \d+"):
        load_sft_examples([str(cut)], tok, "data.val_data_path")


def stream(ex, order):
    tokens = np.concatenate([ex.tokens[ex.offsets[e]:ex.offsets[e + 1]] for e in order])
    mask = np.concatenate([ex.loss_mask[ex.offsets[e]:ex.offsets[e + 1]] for e in order])
    return tokens, mask


def test_packed_windows_keep_the_mask_on_its_tokens(tok):
    examples = [[("user", f"Question {i}?"), ("assistant", f"Answer number {i}.")] for i in range(30)]
    ex = tokenize_examples(examples, tok)
    ds = SFTDataset(ex, seq_length=16, num_samples=40, packing=True, seed=2, pad_id=tok.eod_id)
    tokens, mask = stream(ex, ds.doc_idx)
    for i in range(len(ds)):
        item, j = ds[i], int(ds.order[i])
        window = slice(j * 16 + 1, j * 16 + 17)  # the labels of sample j
        assert item["labels"].tolist() == tokens[window].tolist()
        assert item["loss_mask"].tolist() == mask[window].astype(float).tolist()
        assert torch.equal(item["tokens"][1:], item["labels"][:-1])
    assert len(ds) >= 40


def test_same_order_of_fine_tuning_samples(tok):
    """Padded samples keep their order for any count (each epoch's permutation follows the
    last); packed ones as long as the epochs do (as pretraining's)."""
    ex = tokenize_examples([[("user", f"Question {i}?"), ("assistant", f"Answer {i}.")]
                            for i in range(30)], tok)
    def order(n, packing):
        return SFTDataset(ex, seq_length=16, num_samples=n, packing=packing, seed=2,
                          pad_id=tok.eod_id)
    padded = order(40, False)
    assert padded.same_order(100)
    assert order(100, False).order[:len(padded)].tolist() == padded.order.tolist()
    packed = order(40, True)
    epoch = len(order(None, True))
    for n in (41, epoch * 3):
        kept = [packed[i]["tokens"].tolist() for i in range(40)] == \
            [order(n, True)[i]["tokens"].tolist() for i in range(40)]
        assert packed.same_order(n) is kept, n
    assert not packed.same_order(epoch * 3)


def test_padded_examples_mask_padding_and_count_truncation(tok):
    examples = [[("user", "Hi?"), ("assistant", "Hello there.")],
                [("user", "Long?"), ("assistant", "word " * 40)]]
    ex = tokenize_examples(examples, tok)
    ds = SFTDataset(ex, seq_length=24, num_samples=None, packing=False, seed=0, pad_id=tok.eod_id)
    assert len(ds) == 2 and ds.truncated == 1
    short = ds[[int(e) for e in ds.order].index(0)]
    n = int(ex.offsets[1])  # tokens of example 0
    assert short["tokens"][:n - 1].tolist() == ex.tokens[:n - 1].tolist()
    assert short["labels"][n - 1:].tolist() == [tok.eod_id] * (24 - n + 1)  # padding
    assert short["loss_mask"][n - 1:].sum() == 0
    assert short["loss_mask"][:n - 1].tolist() == ex.loss_mask[1:n].astype(float).tolist()
    assert tok.decode(short["labels"][short["loss_mask"] == 1]) == " Hello there.\n<|endoftext|>"
    cut = ds[[int(e) for e in ds.order].index(1)]    # its first seq_length + 1 tokens, whole
    lo = int(ex.offsets[1])
    assert cut["tokens"].tolist() == ex.tokens[lo:lo + 24].tolist()
    assert cut["labels"].tolist() == ex.tokens[lo + 1:lo + 25].tolist()
    assert cut["loss_mask"].tolist() == ex.loss_mask[lo + 1:lo + 25].astype(float).tolist()
    assert SFTDataset(ex, 24, num_samples=5, packing=False, seed=0, pad_id=0).order.tolist().count(0) >= 2


def test_cut_examples_are_reported_with_those_that_lose_their_response(tmp_path, tok, caplog):
    """Padded: examples longer than the window were cut without a word, some losing every
    response token (their steps then have nothing to learn from)."""
    lines = [{"prompt": "Hi?", "response": "Hello."},
             {"prompt": "Long? " * 40, "response": "Lost."},          # the response is cut off
             {"prompt": "Short?", "response": "word " * 40}]          # cut, response kept
    path = write(tmp_path / "sft.jsonl", lines)
    with caplog.at_level("WARNING", logger="megagpt"):
        train, _, _ = build_sft_datasets([str(path)], [], [], split="1,0,0", tokenizer=tok,
                                         seq_length=24, num_samples=(3, 0, 0), packing=False,
                                         seed=0)
    assert (train.truncated, train.lost_response) == (2, 1)
    assert ("fine-tuning data (train split): 2 of 3 examples are longer than model.seq_length + "
            "1 = 25 tokens and are cut to it, 1 of them losing every response token") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="megagpt"):
        build_sft_datasets([str(path)], [], [], split="1,0,0", tokenizer=tok, seq_length=24,
                           num_samples=(3, 0, 0), packing=True, seed=0)
    assert "are cut" not in caplog.text                        # packed: they go on
    # every example losing its response: no step would count a token (the run trained nothing,
    # its losses NaN, and ended with status 0)
    lost = write(tmp_path / "lost.jsonl", [{"prompt": "Long? " * 40, "response": "Lost."}] * 3)
    with pytest.raises(DatasetBuildError, match=r"fine-tuning data \(train split\): every one of "
                                                r"its 3 examples is longer than model.seq_length "
                                                r"\+ 1 = 25 tokens and loses every response token"):
        build_sft_datasets([str(lost)], [], [], split="1,0,0", tokenizer=tok, seq_length=24,
                           num_samples=(3, 0, 0), packing=False, seed=0)
    # a held-out split of only such examples: its evaluation counts nothing, said, not refused
    caplog.clear()
    with caplog.at_level("WARNING", logger="megagpt"):
        train, valid, _ = build_sft_datasets([str(path)], [str(lost)], [], split="1,0,0",
                                             tokenizer=tok, seq_length=24, num_samples=(3, 2, 0),
                                             packing=False, seed=0)
    assert "fine-tuning data (valid split): every one of its 3 examples" in caplog.text
    assert "its evaluation counts no token" in caplog.text and len(valid) >= 2


def test_an_indexed_dataset_given_as_fine_tuning_data_is_named_as_one(tmp_path, tok):
    """It said the prefix 'does not exist' (its .bin was read as jsonl when given)."""
    from megagpt.data.indexed import write_documents
    prefix = str(write_documents(tmp_path / "d_text_document", [[1, 2, 3]]).prefix)
    for given in (prefix, prefix + ".bin"):
        with pytest.raises(DatasetBuildError, match=r"data.train_data_path='.*d_text_document"
                                                    r"(\.bin)?' is a Megatron indexed dataset "
                                                    r"\(pretraining data\), and data.format=sft "
                                                    r"reads jsonl"):
            build_sft_datasets([given], [], [], split="1,0,0", tokenizer=tok, seq_length=24,
                               num_samples=(3, 0, 0), packing=False, seed=0)


def test_bundled_example_builds_with_the_finetuning_config(tok):
    config = json.loads((REPO / "configs" / "dataset" / "finetuning.json").read_text())
    assert config["train_data_path"] == ["megagpt/data/assets/sft_example.jsonl"]
    assert EXAMPLE.read_bytes().isascii()
    train, valid, test = build_sft_datasets(
        [str(REPO / p) for p in config["train_data_path"]], config["val_data_path"], config["test_data_path"],
        split=config["split"], tokenizer=config["tokenizer_path"], seq_length=64, num_samples=(100, 10, 0),
        packing=config["sft_packing"], seed=1)
    assert test is None and train.skipped.total == 0
    assert len(train.examples) + len(valid.examples) == len(EXAMPLE.read_text().splitlines())
    item = train[0]
    assert item["tokens"].shape == (64,) and 0 < item["loss_mask"].sum() < 64
    with pytest.raises(DatasetBuildError, match=r"data.split='100,0,0' leaves the valid split no example"):
        build_sft_datasets([str(EXAMPLE)], split="100,0,0", tokenizer=tok, seq_length=64, num_samples=(1, 1, 0))
    # a test share without an example is no test set (the trainer says so), as for indexed data
    assert build_sft_datasets([str(EXAMPLE)], split="90,10,0", tokenizer=tok, seq_length=64,
                              num_samples=(1, 1, 1))[2] is None


def test_separate_validation_file(tmp_path, tok):
    val = write(tmp_path / "v.jsonl", [{"prompt": "x?", "response": "y."}])
    train, valid, _ = build_sft_datasets([str(EXAMPLE)], [str(val)], tokenizer=tok, seq_length=32,
                                         num_samples=(4, 2, 0), packing=False)
    assert len(train.examples) == len(EXAMPLE.read_text().splitlines()) and len(valid.examples) == 1


@pytest.mark.parametrize("content", ["Who wrote Hamlet?", "Fix this:\n\nprint(x)\n",
                                     "trailing spaces  ", "\n starts with a newline"])
def test_a_chat_prompt_is_what_training_saw_before_the_answer(content):
    """chat_prompt_ids: the turns and "Assistant:" encoded piece by piece, the tokens training
    saw before an answer, whatever whitespace a turn ends with."""
    from megagpt.data.sft_dataset import chat_prompt_ids
    tok = load_tokenizer("gpt2")
    turns = [("system", "Be brief."), ("user", content)]
    example = tokenize_examples([turns + [("assistant", "Yes.")]], tok)
    answer = len(tok.encode_batch([" Yes.\n"])[0]) + 1
    assert chat_prompt_ids(turns, tok) == example.tokens[:-answer].tolist()
    with pytest.raises(ValueError, match="unknown role 'bot'; the roles are system, user"):
        chat_prompt_ids([("bot", "x")], tok)


def test_the_data_digest_follows_the_examples_tokens():
    """What a checkpoint records of its training data: equal for the same examples, another
    for an example changed (a resume on it is told)."""
    tok = load_tokenizer("gpt2")
    turns = [[("user", "Who wrote Hamlet?"), ("assistant", "Shakespeare.")],
             [("user", "When?"), ("assistant", "Around 1600.")]]
    changed = [turns[0], [("user", "When?"), ("assistant", "Around 1601.")]]
    same_lengths = [[("user", "Who wrote Hamlet?"), ("assistant", "Bacon.")], turns[1]]
    examples = [tokenize_examples(t, tok) for t in (turns, turns, changed, same_lengths)]
    assert np.array_equal(examples[3].offsets, examples[0].offsets)   # other tokens alone
    digests = [SFTDataset(x, 16, None, True, 1, tok.eod_id).data_digest for x in examples]
    assert digests[0] == digests[1] and len(digests[0]) == 16
    assert digests[2] != digests[0] and digests[3] != digests[0]
