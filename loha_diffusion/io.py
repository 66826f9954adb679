"""Reading and writing adapter files: safetensors with metadata, atomic writes, clear errors.

Only safetensors are read unless the caller opts in to pickles (``allow_pickle=True``), which
are then loaded with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save_file as _save_safetensors

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class AdapterFileError(ValueError):
    """An adapter file that cannot be used; the message says what was expected and found."""


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, validated against the file size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path}: {size} bytes is too short to be a safetensors file "
                                   "(it needs an 8-byte header length); the file is truncated or not safetensors")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise AdapterFileError(f"{path}: the header claims {header_len} bytes but the file has {size}; "
                                   "the file is truncated or not a safetensors file")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path}: the safetensors header is not valid JSON ({exc}); the file is corrupt "
                               "or not a safetensors file") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise AdapterFileError(f"{path}: the safetensors metadata is not a map of strings; the file is corrupt")
    data_end = 0
    for key, entry in header.items():
        if key != "__metadata__":
            data_end = max(data_end, _checked_entry_end(path, key, entry))
    if 8 + header_len + data_end > size:
        raise AdapterFileError(f"{path}: the header describes {data_end} bytes of tensor data but only "
                               f"{size - 8 - header_len} are present; the file is truncated (re-download it)")
    return header


# bytes per element of the safetensors dtype names torch can load
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1,
                "F8_E5M2FNUZ": 1}


def _checked_entry_end(path: Path, key: str, entry) -> int:
    """Where one tensor's data ends, after checking that its header entry is self-consistent, so
    that nothing past this point allocates memory for sizes the file does not hold."""
    def is_count(n):
        return isinstance(n, int) and not isinstance(n, bool) and n >= 0

    problem = None
    if not isinstance(entry, dict):
        problem = "is not a JSON object"
    elif entry.get("dtype") not in _DTYPE_SIZES:
        problem = f"has dtype {entry.get('dtype')!r}, expected one of {', '.join(_DTYPE_SIZES)}"
    elif not (isinstance(entry.get("shape"), list) and all(map(is_count, entry["shape"]))):
        problem = f"has shape {entry.get('shape')!r}, expected a list of non-negative integers"
    elif not (isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(map(is_count, entry["data_offsets"])) and entry["data_offsets"][0] <= entry["data_offsets"][1]):
        problem = f"has data_offsets {entry.get('data_offsets')!r}, expected [start, end] with 0 <= start <= end"
    else:
        start, end = entry["data_offsets"]
        numel = 1
        for n in entry["shape"]:
            numel *= n
        if numel * _DTYPE_SIZES[entry["dtype"]] != end - start:
            problem = (f"has shape {entry['shape']} of {entry['dtype']} ({numel * _DTYPE_SIZES[entry['dtype']]} "
                       f"bytes) but data_offsets span {end - start} bytes")
    if problem is not None:
        raise AdapterFileError(f"{path}: the header entry of tensor {key!r} {problem}; the file is corrupt")
    return entry["data_offsets"][1]


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file holding an object (a PEFT ``adapter_config.json``), or one clear error."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path}: not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(value, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    return dict(read_safetensors_header(path).get("__metadata__") or {})


def load_state_dict(path: str | os.PathLike,
                    allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES or not _looks_like_safetensors(path):
        if not allow_pickle:
            raise AdapterFileError(
                f"{path}: not a safetensors file. Pickled checkpoints can run code when loaded, so they are "
                "refused by default; convert the file to .safetensors, or pass allow_pickle=True if you trust it "
                "(it is then loaded with torch.load(weights_only=True))")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise AdapterFileError(f"{path}: could not be loaded as a weights-only pickle: {exc}") from None
        if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
            data = data["state_dict"]
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise AdapterFileError(f"{path}: the pickle does not hold a flat dict of tensors")
        return dict(data), {}
    header = read_safetensors_header(path)
    try:
        tensors = _load_safetensors(str(path), device="cpu")
    except Exception as exc:
        raise AdapterFileError(f"{path}: safetensors could not read the file: {exc}") from None
    return tensors, dict(header.get("__metadata__") or {})


def _looks_like_safetensors(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or inf; min/max first, since a NaN or inf anywhere shows up
    there, without a full-size boolean tensor (several times faster on large weights)."""
    if tensor.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor.detach().float() if tensor.dtype in
                                                        (torch.float16, torch.bfloat16) else tensor.detach()))).all())


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically: a temp file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _save_safetensors(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
