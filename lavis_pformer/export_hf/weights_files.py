"""The weights in the safetensors format (a JSON header and the raw little-endian tensor bytes), written without a
transformers newer than LAVIS's, sharded when large; JSON files and sha256 digests."""
import hashlib
import json
import os
import struct
import sys

import torch

from lavis_pformer.export_hf import ExportError

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path, tensors, metadata=None):
    """Write ``{name: tensor}`` to ``path`` in the safetensors format.

    Layout: 8-byte little-endian header size N, N bytes of JSON header ({name: {dtype, shape, data_offsets}},
    ``__metadata__``: str -> str) padded with spaces to a multiple of 8, then the tensors' bytes back to back.
    """
    if sys.byteorder != "little":
        raise ExportError("writing safetensors needs a little-endian machine")
    header = {"__metadata__": {str(k): str(v) for k, v in (metadata or {"format": "pt"}).items()}}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ExportError(f"tensor {name} has dtype {tensor.dtype}, which the export does not write")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for tensor in tensors.values():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                f.write(flat.view(torch.uint8).numpy().data)


def write_weights(out_dir, tensors, max_shard_bytes):
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index when larger than ``max_shard_bytes``."""
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards, current, current_size = [], {}, 0
    for name, tensor in tensors.items():
        if current and current_size + sizes[name] > max_shard_bytes:
            shards.append(current)
            current, current_size = {}, 0
        current[name] = tensor
        current_size += sizes[name]
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, {"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(out_dir, file_name), shard, {"format": "pt"})
        names.append(file_name)
        weight_map.update({name: file_name for name in shard})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
    return names


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def sha256_of(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_size(text):
    """'5GB', '200MB', '100KB' or a number of bytes -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    value = str(text).strip().upper()
    for unit, factor in units.items():
        if value.endswith(unit):
            number = value[: -len(unit)].strip()
            break
    else:
        number, factor = value, 1
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise ExportError(f"--max-shard-size: cannot read {text!r}; give e.g. 5GB, 500MB or a number of bytes")
    if size <= 0:
        raise ExportError(f"--max-shard-size must be positive, got {text!r}")
    return size
