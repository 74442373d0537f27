"""Read pretrained weights from safe formats into numpy, under Hugging Face tensor names.

Two readers share one interface (:class:`~jax_ensemble.models.checkpoint_map.TensorSource`):
``names() -> set[str]``, ``shape(name)``, ``get(name) -> np.ndarray`` and
``get_slice(name, index) -> np.ndarray`` (float32, Hugging Face layout: linear weights
(out, in); ``index`` one contiguous ``slice`` per dimension). ``get_slice`` reads only
that block from disk (safetensors' lazy ``get_slice``; GGUF's memory map, whole rows of
quantized blocks):

- :class:`SafetensorsFiles`: a Hugging Face directory (``model.safetensors`` or a sharded
  ``model.safetensors.index.json``);
- :class:`GGUFFile`: a llama.cpp GGUF file, dequantized by the ``gguf`` package, with
  GGUF tensor names mapped to Hugging Face names and the Q/K rows un-permuted from
  llama.cpp's interleaved-RoPE order back to the Hugging Face half-split order.

No pickle is ever read. Corrupt or truncated files raise :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from jax_ensemble.errors import CheckpointError


class SafetensorsFiles:
    """All ``*.safetensors`` tensors of a Hugging Face model directory."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
            files = sorted({directory / f for f in weight_map.values()})
        else:
            files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {directory}")
        self._handles: dict[str, Any] = {}
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"safetensors shard {file} listed in the index is missing")
            try:
                handle = safe_open(str(file), framework="numpy")
                for name in handle.keys():
                    self._handles[name] = handle
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"safetensors file {file} is corrupt or truncated: {e}") from None
        self._directory = directory

    def names(self) -> set[str]:
        return set(self._handles)

    def _handle(self, name: str) -> Any:
        try:
            return self._handles[name]
        except KeyError:
            raise CheckpointError(f"checkpoint in {self._directory} lacks the tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        handle = self._handle(name)
        try:
            return np.asarray(handle.get_tensor(name), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(f"tensor {name!r} in {self._directory} cannot be read: {e}") from None

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        handle = self._handle(name)
        try:
            return np.asarray(handle.get_slice(name)[index], dtype=np.float32)
        except Exception as e:
            raise CheckpointError(f"tensor {name!r} in {self._directory} cannot be read: {e}") from None


_GGUF_TO_HF = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]


def gguf_name_to_hf(name: str) -> str | None:
    """``blk.3.attn_q.weight`` → ``model.layers.3.self_attn.q_proj.weight`` (None if unknown)."""
    for pattern, target in _GGUF_TO_HF:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    return None


def unpermute_gguf_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows were reordered from the
    half-split pairs (i, i + Dh/2) to interleaved pairs (2i, 2i + 1)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """Tensors and metadata of a GGUF file (dequantized to float32 on access)."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        try:
            reader = gguf.GGUFReader(str(self.path))
            self.metadata: dict[str, Any] = {}
            for key, field in reader.fields.items():
                if not key.startswith("GGUF."):
                    self.metadata[key] = field.contents()
        except Exception as e:  # gguf raises ValueError/IndexError/struct errors on bad bytes
            raise CheckpointError(f"GGUF file {self.path} is truncated or corrupt ({type(e).__name__}: {e})") from None
        self._tensors = {}
        for tensor in reader.tensors:
            hf = gguf_name_to_hf(tensor.name)
            if hf is not None:
                self._tensors[hf] = tensor
        self._heads = self.metadata.get("llama.attention.head_count")
        self._kv_heads = self.metadata.get("llama.attention.head_count_kv") or self._heads

    def names(self) -> set[str]:
        return set(self._tensors)

    def _tensor(self, name: str) -> Any:
        tensor = self._tensors.get(name)
        if tensor is None:
            raise CheckpointError(f"GGUF file {self.path} lacks the tensor for {name!r}")
        return tensor

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    def get(self, name: str) -> np.ndarray:
        return self.get_slice(name, tuple(slice(None) for _ in self.shape(name)))

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Dequantize only the rows ``index[0]`` selects, widened to whole units (a head's
        rows for Q/K, whose rows llama.cpp permuted within each head; a 1-D tensor whole,
        its quantized blocks not being rows), then take ``index[1:]``."""
        import gguf

        tensor, shape = self._tensor(name), self.shape(name)
        heads = self._permuted_heads(name)
        unit = shape[0] if len(shape) == 1 else shape[0] // heads if heads else 1
        start, stop, _ = index[0].indices(shape[0])
        lo, hi = start - start % unit, -(-stop // unit) * unit
        try:
            w = np.asarray(gguf.quants.dequantize(tensor.data[lo:hi], tensor.tensor_type), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(f"GGUF tensor {tensor.name} in {self.path} cannot be read: {e}") from None
        w = w.reshape(hi - lo, *shape[1:])
        if heads:
            w = unpermute_gguf_rows(w, (hi - lo) // unit)
        return w[(slice(start - lo, stop - lo), *index[1:])]

    def _permuted_heads(self, name: str) -> int | None:
        """The head count of a Q or K projection (rows permuted per head); None for others."""
        if name.endswith("self_attn.q_proj.weight"):
            return int(self._heads)
        if name.endswith("self_attn.k_proj.weight"):
            return int(self._kv_heads)
        return None
