"""configs/dataset/*.json: the shape the config loader reads, and the pretraining pipeline they
describe run end to end on the bundled corpus."""
import dataclasses
import json
from pathlib import Path

import pytest

from megagpt.config import DataConfig, PreprocessingConfig
from megagpt.data.gpt_dataset import build_gpt_datasets
from megagpt.data.preprocess import output_prefix_for, preprocess_jsonl

REPO = Path(__file__).resolve().parents[2]


def load(name):
    return json.loads((REPO / "configs" / "dataset" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["pretraining", "finetuning"])
def test_keys_are_data_section_fields(name):
    config = load(name)
    assert set(config) <= {f.name for f in dataclasses.fields(DataConfig)}
    assert config["format"] == ("indexed" if name == "pretraining" else "sft")
    if config["preprocessing"] is not None:
        assert set(config["preprocessing"]) <= {f.name for f in dataclasses.fields(PreprocessingConfig)}


def test_pretraining_paths_agree_with_preprocessing():
    config = load("pretraining")
    pre = config["preprocessing"]
    assert (REPO / pre["input"]).is_file()
    assert config["train_data_path"] == [output_prefix_for(pre["output_prefix"], key) for key in pre["json_keys"]]


@pytest.mark.slow
def test_bundled_corpus_end_to_end(tmp_path):
    config = load("pretraining")
    pre = config["preprocessing"]
    summary = preprocess_jsonl(REPO / pre["input"], tmp_path / "shakespeare", tokenizer=config["tokenizer_path"],
                               json_keys=pre["json_keys"], append_eod=pre["append_eod"],
                               workers=pre["workers"], progress=False)
    assert summary.documents == 198 and summary.skipped.total == 0
    train, valid, test = build_gpt_datasets(str(tmp_path / "shakespeare_text_document"), split=config["split"],
                                            seq_length=256, num_samples=(1000, 50, 5), seed=1234)
    assert len(train) >= 1000 and len(valid) >= 50 and len(test) >= 5
    assert train[0]["tokens"].shape == (256,)


def test_package_exports_load_lazily():
    import megagpt.data as data
    assert data.build_gpt_datasets.__module__ == "megagpt.data.gpt_dataset"
    assert data.MegatronPretrainingSampler.__module__ == "megagpt.data.sampler"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        data.nope
