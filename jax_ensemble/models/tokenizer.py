"""Tokenizers from ``tokenizer.json`` or from GGUF metadata, behind one small class.

GGUF files of the ``gpt2`` tokenizer family carry the byte-level BPE vocabulary and merges
(``tokenizer.ggml.tokens`` / ``merges`` / ``token_type``); they are rebuilt with the
``tokenizers`` library: byte-level pre-tokenizer (GPT-2 regex), digits split one by one,
control tokens (type 3) registered as special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from jax_ensemble.errors import CheckpointError

_CONTROL_TOKEN = 3
_DIGIT_SPLITTING_PRE = {"smollm", "starcoder"}
_PLAIN_BYTE_LEVEL_PRE = {"gpt2", "default"}


class Tokenizer:
    """Text ↔ token ids, with the special ids the model needs."""

    def __init__(self, backend: Any, *, bos_id: int | None, eos_id: int | None, pad_id: int | None, add_bos: bool):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; a BOS id is prepended when the model expects one."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def tokenizer_from_json(path: str | Path, *, hf_config: dict[str, Any] | None = None) -> Tokenizer:
    """From a Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json`` beside it if present)."""
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    try:
        backend = Backend.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"tokenizer file {path} cannot be read: {e}") from None
    extra: dict[str, Any] = {}
    config_file = path.parent / "tokenizer_config.json"
    if config_file.is_file():
        extra = json.loads(config_file.read_text())
    hf_config = hf_config or {}

    def token_id(key: str) -> int | None:
        token = extra.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        found = backend.token_to_id(token) if isinstance(token, str) else None
        if found is not None:
            return found
        value = hf_config.get(f"{key}_id")
        return value[0] if isinstance(value, list) else value

    return Tokenizer(
        backend,
        bos_id=token_id("bos_token"),
        eos_id=token_id("eos_token"),
        pad_id=token_id("pad_token"),
        add_bos=bool(extra.get("add_bos_token", False)),
    )


def tokenizer_from_gguf(metadata: dict[str, Any]) -> Tokenizer:
    """Rebuild a byte-level BPE tokenizer from GGUF ``tokenizer.ggml.*`` metadata."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    types = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre in _DIGIT_SPLITTING_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _PLAIN_BYTE_LEVEL_PRE:
        backend.pre_tokenizer = byte_level
    else:
        raise CheckpointError(
            f"GGUF pre-tokenizer {pre!r} is not supported; pass a Hugging Face directory with tokenizer.json instead"
        )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL_TOKEN]
    )
    return Tokenizer(
        backend,
        bos_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_id=metadata.get("tokenizer.ggml.padding_token_id"),
        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
    )
