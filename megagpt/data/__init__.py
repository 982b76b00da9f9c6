"""Data: tokenizers, indexed datasets, GPT and fine-tuning datasets, samplers.

The names below import lazily (PEP 562), so `tools/preprocess_data.py` and its worker processes
do not pay for importing torch, which only the dataset modules need.
"""
import importlib

_EXPORTS = {
    "Tokenizer": "tokenizer", "TokenizerError": "tokenizer", "load_tokenizer": "tokenizer",
    "train_bpe_tokenizer": "tokenizer",
    "IndexedDataset": "indexed", "IndexedDatasetError": "indexed", "IndexedDatasetWriter": "indexed",
    "merge_datasets": "indexed", "write_documents": "indexed", "best_dtype": "indexed",
    "preprocess_jsonl": "preprocess", "PreprocessError": "preprocess",
    "GPTDataset": "gpt_dataset", "DatasetBuildError": "gpt_dataset", "build_gpt_datasets": "gpt_dataset",
    "BlendedDataset": "blend", "parse_data_path": "blend",
    "SFTDataset": "sft_dataset", "build_sft_datasets": "sft_dataset",
    "MockGPTDataset": "mock", "build_mock_datasets": "mock",
    "MegatronPretrainingSampler": "sampler",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megagpt.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"megagpt.data.{_EXPORTS[name]}"), name)
