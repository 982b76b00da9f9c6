"""Tokenizer loading (bundled GPT-2, tokenizer.json, vocab/merges folder), errors, and training."""
import gzip
import json
import os
import pickle
import random
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megagpt.data.tokenizer import GPT2_DIR, TokenizerError, load_tokenizer, train_bpe_tokenizer

TOOL = Path(__file__).resolve().parents[2] / "tools" / "train_tokenizer.py"
TRICKY = "Hello  world!\n\n  It's 2024 <|endoftext|> ünïcode 日本\ttabs  "


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def test_bundled_gpt2_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257
    assert tok.eod_id == 50256


def test_interface_round_trip(gpt2):
    ids = gpt2.encode(TRICKY)
    assert gpt2.decode(ids) == TRICKY
    assert gpt2.encode_batch([TRICKY, "Hello world"]) == [ids, [15496, 995]]
    assert gpt2.decode([15496, 995, gpt2.eod_id]) == "Hello world<|endoftext|>"


def test_matches_hugging_face_gpt2(gpt2):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2TokenizerFast(str(GPT2_DIR / "vocab.json"), str(GPT2_DIR / "merges.txt"))
    # Hugging Face reads the special string as its id; so does allow_special, and text without
    # it is the same either way.
    assert gpt2.encode(TRICKY, allow_special=True) == hf.encode(TRICKY)
    plain = TRICKY.replace("<|endoftext|>", "eot")
    assert gpt2.encode(plain) == gpt2.encode(plain, allow_special=True) == hf.encode(plain)


def test_special_strings_in_text_are_text(gpt2):
    # As GPT-2's own encoder and Megatron's: a document cannot smuggle in a document boundary.
    assert gpt2.encode("a<|endoftext|>b") == [64, 27, 91, 437, 1659, 5239, 91, 29, 65]
    assert gpt2.encode_batch(["a<|endoftext|>b"]) == [gpt2.encode("a<|endoftext|>b")]
    assert gpt2.eod_id not in gpt2.encode(TRICKY)
    assert gpt2.decode(gpt2.encode(TRICKY)) == TRICKY
    assert gpt2.encode("<|endoftext|>x<|endoftext|>", allow_special=True) == [
        gpt2.eod_id, 87, gpt2.eod_id]


def test_pickled_tokenizer_keeps_text_as_text(gpt2):
    clone = pickle.loads(pickle.dumps(gpt2))
    assert clone.encode("a<|endoftext|>b") == gpt2.encode("a<|endoftext|>b")
    assert clone.eod_id == gpt2.eod_id and clone.source == gpt2.source
    assert clone._tiktoken is not None      # and the fast path (preprocess workers get it so)


def test_loads_folder_and_tokenizer_json(tmp_path, gpt2):
    folder = tmp_path / "vm"
    shutil.copytree(GPT2_DIR, folder)
    assert load_tokenizer(folder).encode(TRICKY) == gpt2.encode(TRICKY)
    gpt2.backend.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(TRICKY) == gpt2.encode(TRICKY)
    assert load_tokenizer(tmp_path).encode(TRICKY) == gpt2.encode(TRICKY)  # folder with tokenizer.json


def _awkward_texts() -> list[str]:
    """Whitespace runs, contractions, numbers, special strings, scripts, emoji, combining marks,
    and code points across the whole Unicode range, alone and in random strings."""
    texts = [TRICKY, "", " ", "  ", "\n\n\n", "a\n\n b", "x \t\n y", "\r\n\r\n", "   lead",
             "trail   ", "it's we'll I'M don't 's's", "1234567890 12,345.67 ١٢ ½ Ⅻ",
             "<|endoftext|>", " <|endoftext|> ", "naïve café 東京 😀👍🏽",
             " nbsp em　", "é ​zero ﬁ Ǆ ʰ"]
    texts += [f"a {chr(c)}{chr(c)} b{chr(c)}" for c in range(0x20, 0x30000, 7)
              if not 0xD800 <= c < 0xE000]
    rng = random.Random(0)
    for _ in range(2000):
        texts.append("".join(chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0xD7FF),
                                             rng.randint(0xE000, 0x10FFFF), 0x20, 0x0A, 0x09]))
                             for _ in range(rng.randint(1, 40))))
    return texts


def test_gpt2_encodes_with_tiktoken_and_gives_the_tokenizers_ids(gpt2):
    """GPT-2's tokenizer takes the fast path in every form it loads from; its ids are those of
    `tokenizers` on awkward text and on the whole bundled corpus."""
    assert gpt2._tiktoken is not None
    texts = _awkward_texts()
    with gzip.open(GPT2_DIR.parent / "shakespeare.jsonl.gz", "rt", encoding="utf-8") as f:
        corpus = [json.loads(line)["text"] for line in f]
    for batch in (texts, corpus):
        slow = [e.ids for e in gpt2.backend.encode_batch(batch, add_special_tokens=False)]
        assert gpt2.encode_batch(batch) == slow
    long_pieces = ["a" * 100_000, "x" + "\u00e9" * 50_000, " " * 100_000 + "end"]
    assert [gpt2.encode(t) for t in long_pieces] == [
        gpt2.backend.encode(t, add_special_tokens=False).ids for t in long_pieces]
    assert [gpt2.encode(t) for t in texts[:50]] == [
        gpt2.backend.encode(t, add_special_tokens=False).ids for t in texts[:50]]


def test_only_gpt2s_own_tokenizer_takes_the_fast_path(tmp_path, gpt2):
    gpt2.backend.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "tokenizer.json")._tiktoken is not None
    trained = train_bpe_tokenizer(["hello world", "abc def"] * 50, 300, tmp_path / "trained")
    assert trained._tiktoken is None and load_tokenizer(tmp_path / "trained")._tiktoken is None
    spec = json.loads(gpt2.backend.to_str())
    eod_as_text = [dict(t, special=False) for t in spec["added_tokens"]]
    for change in ({"normalizer": {"type": "NFC"}},
                   {"pre_tokenizer": dict(spec["pre_tokenizer"], add_prefix_space=True)},
                   {"added_tokens": eod_as_text},
                   {"truncation": {"direction": "Right", "max_length": 8, "strategy": "LongestFirst",
                                   "stride": 0}},
                   {"padding": {"strategy": {"Fixed": 16}, "direction": "Right",
                                "pad_to_multiple_of": None, "pad_id": 50256, "pad_type_id": 0,
                                "pad_token": "<|endoftext|>"}}):
        changed = tmp_path / f"changed_{len(list(tmp_path.iterdir()))}.json"
        changed.write_text(json.dumps(dict(spec, **change)), encoding="utf-8")
        tok = load_tokenizer(changed)
        assert tok._tiktoken is None, change
        assert tok.encode(TRICKY) == tok.backend.encode(TRICKY, add_special_tokens=False).ids
    one_merge_less = dict(spec, model=dict(spec["model"], merges=spec["model"]["merges"][:-1]))
    (tmp_path / "fewer.json").write_text(json.dumps(one_merge_less), encoding="utf-8")
    assert load_tokenizer(tmp_path / "fewer.json")._tiktoken is None


def test_a_lone_surrogate_is_refused_on_the_fast_path_too(gpt2):
    """tiktoken would replace it with U+FFFD; the data pipeline must see the error and skip the
    document, as with `tokenizers`."""
    with pytest.raises(UnicodeEncodeError):
        gpt2.encode("bad \ud800 text")
    with pytest.raises(UnicodeEncodeError):
        gpt2.encode_batch(["fine", "bad \ud800 text"])


def test_megagpt_fast_bpe_0_keeps_tokenizers():
    code = "from megagpt.data.tokenizer import load_tokenizer; print(load_tokenizer('gpt2')._tiktoken)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, MEGAGPT_FAST_BPE="0")).stdout
    assert out.strip() == "None"


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist; fix: give \"gpt2\" (bundled)"),
    ("empty_folder", "is a folder with neither tokenizer.json nor vocab.json + merges.txt"),
    ("vocab_only_file", "is a BPE vocabulary, which needs its merges file; fix: give the folder"),
    ("megatron_vocab_file", "is a BPE vocabulary, which needs its merges file"),   # it was parsed
    ("text_file", "is a file but not a tokenizer.json"),                         # as a tokenizer
    ("broken_json", "is not a valid tokenizers tokenizer.json"),
    ("broken_merges", "cannot read vocab.json + merges.txt"),
    ("no_eod", "has no end-of-document token"),
])
def test_load_errors_name_the_path(tmp_path, gpt2, case, expected):
    path = tmp_path / case
    if case == "empty_folder":
        path.mkdir()
    elif case == "vocab_only_file":
        path = tmp_path / "vocab.json"
        shutil.copy(GPT2_DIR / "vocab.json", path)
    elif case == "megatron_vocab_file":
        path = tmp_path / "gpt2-vocab.json"
        shutil.copy(GPT2_DIR / "vocab.json", path)
    elif case == "text_file":
        path = tmp_path / "merges.txt"
        shutil.copy(GPT2_DIR / "merges.txt", path)
    elif case == "broken_json":
        path = tmp_path / "tokenizer.json"
        path.write_text("{not json")
    elif case == "broken_merges":
        path.mkdir()
        (path / "vocab.json").write_text('{"a": 0}')
        (path / "merges.txt").write_text("#version: 0.2\nx y z w\n")
    elif case == "no_eod":
        path.mkdir()
        (path / "vocab.json").write_text('{"a": 0, "b": 1, "ab": 2}')
        (path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(path)
    assert expected in str(e.value)
    assert str(path) in str(e.value)
    if case != "no_eod":    # a command line names its flag, every one but the last with a fix
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(path, "--tokenizer")
        assert str(e.value).startswith(f"--tokenizer {str(path)!r}") and "; fix: " in str(e.value)


def test_a_folder_of_megatrons_gpt2_vocab_and_merges_files_loads(tmp_path):
    """Megatron's --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt, in one folder."""
    shutil.copy(GPT2_DIR / "vocab.json", tmp_path / "gpt2-vocab.json")
    shutil.copy(GPT2_DIR / "merges.txt", tmp_path / "gpt2-merges.txt")
    (tmp_path / "._gpt2-vocab.json").write_bytes(b"\x00\x05")     # macOS metadata: ignored
    text = "ROMEO: But soft, what light through yonder window breaks?"
    assert load_tokenizer(tmp_path).encode(text) == load_tokenizer("gpt2").encode(text)
    shutil.copy(GPT2_DIR / "vocab.json", tmp_path / "other-vocab.json")
    with pytest.raises(TokenizerError, match=r"holds more than one vocabulary or merges file "
                                             r"\(gpt2-vocab.json, other-vocab.json, "
                                             r"gpt2-merges.txt\).*fix: point at a folder with one"):
        load_tokenizer(tmp_path)


def test_the_end_of_document_token_is_gpt2s_before_the_others(tmp_path):
    """A vocabulary may hold several candidates: <|endoftext|> wins, then </s>, by their order."""
    for vocab, eod in [('{"a": 0, "b": 1, "ab": 2, "</s>": 3, "<|endoftext|>": 4}', 4),
                       ('{"a": 0, "b": 1, "ab": 2, "<eos>": 3, "</s>": 4}', 4),
                       ('{"a": 0, "b": 1, "ab": 2, "[SEP]": 3, "<eos>": 4}', 4)]:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "vocab.json").write_text(vocab)
        (folder / "merges.txt").write_text("#version: 0.2\na b\n")
        assert load_tokenizer(folder).eod_id == eod, vocab


CORPUS = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer",
          "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"] * 5


def test_train_writes_a_folder_every_loader_reads(tmp_path):
    tok = train_bpe_tokenizer(CORPUS, vocab_size=300, output_dir=tmp_path / "tok")
    names = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json", "vocab.json"]
    assert tok.vocab_size == 300 and tok.eod_id == 299
    text = CORPUS[0] + " zebra ü"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(CORPUS[0])) < len(CORPUS[0].encode())  # merges were learned
    vocab = json.loads((tmp_path / "tok" / "vocab.json").read_text())
    assert vocab["<|endoftext|>"] == 299
    # the vocab/merges pair alone gives the same ids as tokenizer.json
    folder = tmp_path / "vm"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tmp_path / "tok" / name, folder / name)
    assert load_tokenizer(folder).encode(text) == tok.encode(text)
    transformers = pytest.importorskip("transformers")
    for cls in (transformers.AutoTokenizer, transformers.GPT2TokenizerFast):
        hf = cls.from_pretrained(str(tmp_path / "tok"))
        assert hf.encode(text) == tok.encode(text)
        assert hf.eos_token_id == 299


def test_train_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*at least 257"):
        train_bpe_tokenizer(CORPUS, vocab_size=100, output_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="min_frequency=-3: must be a count, 0 or more"):
        train_bpe_tokenizer(CORPUS, vocab_size=300, output_dir=tmp_path / "a", min_frequency=-3)
    (tmp_path / "f").write_text("a file")
    with pytest.raises(ValueError, match=f"output_dir '{tmp_path / 'f' / 'tok'}': cannot write there "
                                         f"\\({tmp_path / 'f'} is a file\\); fix: choose"):
        train_bpe_tokenizer(CORPUS, vocab_size=300, output_dir=tmp_path / "f" / "tok")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        train_bpe_tokenizer(CORPUS, vocab_size=300, output_dir=tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "f"]  # no temporary folder left


def test_a_tokenizer_that_cannot_be_written_is_a_message_and_leaves_nothing(tmp_path, monkeypatch):
    """The tokenizers library reports a full disk as a bare Exception: it was a traceback."""
    import tokenizers

    def full(self, path, *args, **kwargs):
        raise Exception("No space left on device (os error 28)")
    monkeypatch.setattr(tokenizers.Tokenizer, "save", full)
    with pytest.raises(ValueError, match=r"output_dir '.*tok': cannot write \(No space left on device "
                                         r"\(os error 28\)\); nothing was written; fix: free"):
        train_bpe_tokenizer(CORPUS, vocab_size=300, output_dir=tmp_path / "tok")
    assert list(tmp_path.iterdir()) == []


def test_train_tokenizer_tool(tmp_path, capsys):
    main = runpy.run_path(str(TOOL))["main"]
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join([json.dumps({"text": t}) for t in CORPUS] + ["{broken", '{"x": 1}']))
    assert main(["--input", str(data), "--vocab-size", "280", "--output", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "vocab_size 280" in out and "malformed JSON: 1" in out and "missing key 'text': 1" in out
    assert load_tokenizer(tmp_path / "t").vocab_size == 280 and "note:" not in out
    assert main(["--input", str(data), "--vocab-size", "100000", "--output", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    size = load_tokenizer(tmp_path / "w").vocab_size
    assert size < 100000 and (f"note: --vocab-size 100000 asked for more ids than the corpus gives "
                              f"merges for (pairs seen at least --min-frequency 2 times); the "
                              f"tokenizer has {size}") in out
    assert main(["--input", str(tmp_path / "nope.jsonl"), "--vocab-size", "280",
                      "--output", str(tmp_path / "u")]) == 2
    assert "--input" in capsys.readouterr().err
    unusable = tmp_path / "bad.jsonl"
    unusable.write_text('{broken\n{"text": "half a pair \\ud83d"}\n')
    assert main(["--input", str(unusable), "--vocab-size", "280", "--output", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "has no usable line for --json-key text" in err and "invalid UTF-8: 1 (line 2)" in err
    assert not (tmp_path / "v").exists()
    # the tool's messages name its flags
    for flags, message in ((["--vocab-size", "100"], "--vocab-size=100 is too small"),
                           (["--min-frequency", "-1"], "--min-frequency=-1: must be a count"),
                           (["--output", str(tmp_path / "t")], "--output '"),):
        argv = ["--input", str(data), "--vocab-size", "280", "--output", str(tmp_path / "x"), *flags]
        assert main(argv) == 2
        assert message in capsys.readouterr().err, flags
    # the trained folder takes the umask's mode, not tempfile's private 0700
    assert (tmp_path / "t").stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~_umask() for p in (tmp_path / "t").iterdir())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_the_fingerprint_is_the_tokenizers_wherever_it_was_loaded_from(tmp_path, gpt2):
    """A dataset's record names its tokenizer by fingerprint (docs/data.md): the same tokenizer
    loaded another way has the same one, and one that gives other ids has another, even with
    the same vocabulary (a prefix space, a lowercasing normalizer)."""
    from megagpt.convert import write_hf_tokenizer
    megatron = tmp_path / "megatron"
    megatron.mkdir()
    shutil.copy(GPT2_DIR / "vocab.json", megatron / "gpt2-vocab.json")
    shutil.copy(GPT2_DIR / "merges.txt", megatron / "gpt2-merges.txt")
    (tmp_path / "exported").mkdir()
    write_hf_tokenizer(gpt2, tmp_path / "exported", 1024)
    for route in (megatron, tmp_path / "exported", tmp_path / "exported" / "tokenizer.json"):
        assert load_tokenizer(route).fingerprint == gpt2.fingerprint, route
    spec = json.loads(gpt2.backend.to_str())
    for name, change in (("prefix", ("pre_tokenizer", dict(spec["pre_tokenizer"],
                                                            add_prefix_space=True))),
                         ("lower", ("normalizer", {"type": "Lowercase"}))):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dict(spec, **dict([change]))))
        other = load_tokenizer(path)
        assert other.vocab_size == gpt2.vocab_size and other.fingerprint != gpt2.fingerprint
        assert other.encode("Hello World") != gpt2.encode("Hello World")
    trained = train_bpe_tokenizer(CORPUS, vocab_size=300, output_dir=tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.json").fingerprint == trained.fingerprint
    assert trained.fingerprint != gpt2.fingerprint
