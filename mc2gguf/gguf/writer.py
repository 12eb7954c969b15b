"""Write a GGUF file, streaming one tensor at a time.

gguf-py's writer is used in its streaming order (tensor infos, header, key/values, tensor info table, then
each tensor's bytes as soon as it is quantized), so memory holds one tensor at a time. The file is
written under a temporary name beside the output and renamed only when complete. Every tensor's checksum goes
into the key/values (placeholders first, filled in place once the bytes are written): ``verify`` checks them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from ..errors import Mc2ggufError
from .keys import TENSOR_CHECKSUM_DIGEST_BYTES, Keys

# Added by the writer itself or describing the file rather than the model.
_WRITER_OWNED_KEYS = ("general.architecture",)


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass(frozen=True)
class TensorPayload:
    """What the writer needs to know of a tensor before its data exists."""

    name: str
    shape: tuple[int, ...]  # numpy order, in weights
    ggml_type: Any  # GGMLQuantizationType
    nbytes: int


def read_metadata(path: Path) -> list[KeyValue]:
    """All key/values of a GGUF file (strings as raw bytes, so no vocabulary entry is re-encoded)."""
    reader = GGUFReader(path)
    out = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in _WRITER_OWNED_KEYS:
            continue
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        if main == GGUFValueType.STRING:
            value = bytes(field.parts[field.data[0]])
        elif sub == GGUFValueType.STRING:
            value = [bytes(field.parts[i]) for i in field.data]
        else:
            value = field.contents()
        out.append(KeyValue(field.name, value, main, sub))
    return out


def tensor_checksum(data) -> str:
    """The hex digest ``Keys.TENSOR_CHECKSUMS`` holds for a tensor's bytes."""
    return hashlib.blake2b(memoryview(np.ascontiguousarray(data)).cast("B"),
                           digest_size=TENSOR_CHECKSUM_DIGEST_BYTES).hexdigest()


_CHECKSUM_PLACEHOLDER = "0" * (2 * TENSOR_CHECKSUM_DIGEST_BYTES)


def _writer(path: Path, arch: str, metadata: list[KeyValue], tensors: list[TensorPayload]) -> tuple[GGUFWriter, int]:
    """The writer with the header, key/values and tensor infos written, and where the key/values end (the
    checksum placeholders, the last key/value, end there)."""
    writer = GGUFWriter(path, arch)
    # a checksum per tensor: written as placeholders of the digests' length, filled in once the data is written
    metadata = [kv for kv in metadata if kv.key != Keys.TENSOR_CHECKSUMS] + [
        KeyValue(Keys.TENSOR_CHECKSUMS, [_CHECKSUM_PLACEHOLDER] * len(tensors), GGUFValueType.ARRAY,
                 GGUFValueType.STRING)] if tensors else metadata
    for kv in metadata:
        writer.add_key_value(kv.key, kv.value, kv.vtype, kv.sub_type)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    kv_end = writer.fout[0].tell()
    writer.write_ti_data_to_file()
    return writer, kv_end


def expected_file_size(arch: str, metadata: list[KeyValue], tensors: list[TensorPayload]) -> int:
    """The exact byte size of the file ``write_gguf`` produces, found by writing its header alone."""
    with tempfile.TemporaryDirectory() as tmp:
        writer, _ = _writer(Path(tmp) / "header.gguf", arch, metadata, tensors)
        writer.close()
        header = (Path(tmp) / "header.gguf").stat().st_size
        align = writer.data_alignment
    if not tensors:
        return header
    return GGUFWriter.ggml_pad(header, align) + sum(GGUFWriter.ggml_pad(t.nbytes, align) for t in tensors)


@contextmanager
def atomic_output(out: Path, force: bool, needed_bytes: int) -> Iterator[Path]:
    """A temporary path beside ``out``, renamed to ``out`` on success and removed on any failure."""
    out = Path(out)
    if out.exists() and not force:
        raise Mc2ggufError(f"{out} exists; pass --force to overwrite it")
    if out.is_dir():
        raise Mc2ggufError(f"{out} is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise Mc2ggufError(f"cannot write {out}: directory {parent} does not exist")
    tmp = parent / f".{out.name}.partial"
    try:
        tmp.touch()
    except OSError as e:
        raise Mc2ggufError(f"cannot write {out}: {e.strerror}") from None
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        tmp.unlink(missing_ok=True)
        raise Mc2ggufError(f"not enough disk space for {out}: need {needed_bytes:,} bytes, {free:,} free")
    try:
        yield tmp
        os.replace(tmp, out)
    except OSError as e:  # disk full, device gone, ...
        tmp.unlink(missing_ok=True)
        raise Mc2ggufError(f"writing {out} failed: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_with_metadata(src: Path, dst: Path, replace: dict[str, KeyValue]) -> None:
    """``dst``: ``src`` with the key/values in ``replace`` changed, the tensors copied byte for byte."""
    reader = GGUFReader(src)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    metadata = [replace.get(kv.key, kv) for kv in read_metadata(src)]
    tensors = {t.name: t for t in reader.tensors}
    payloads = [TensorPayload(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type, int(t.n_bytes))
                for t in reader.tensors]
    with atomic_output(dst, True, expected_file_size(arch, metadata, payloads)) as tmp:
        write_gguf(tmp, arch, metadata, payloads, lambda p: np.asarray(tensors[p.name].data))


def write_gguf(
    path: Path,
    arch: str,
    metadata: list[KeyValue],
    tensors: list[TensorPayload],
    produce: Callable[[TensorPayload], np.ndarray],
    on_tensor: Callable[[TensorPayload], None] = lambda t: None,
) -> None:
    """Write a GGUF file; ``produce`` returns each tensor's bytes, called in order, one at a time. The file
    carries a checksum of every tensor (``Keys.TENSOR_CHECKSUMS``, :func:`verify`)."""
    writer, kv_end = _writer(path, arch, metadata, tensors)
    digests = []
    for t in tensors:
        data = produce(t)
        if data.nbytes != t.nbytes:
            raise Mc2ggufError(f"internal error: {t.name} produced {data.nbytes} bytes, planned {t.nbytes}")
        writer.write_tensor_data(data)
        digests.append(tensor_checksum(data))
        on_tensor(t)
    writer.close()
    if tensors:
        _fill_checksums(path, kv_end, digests)


def _fill_checksums(path: Path, kv_end: int, digests: list[str]) -> None:
    """Overwrite the placeholders in place, without mapping the file (a memory cap counts mappings): each digest
    is a string of the placeholder's length, so the file's layout does not move. The placeholders are the last
    key/value's array items, each a u64 length and the string, ending where the key/values end."""
    item = 8 + len(_CHECKSUM_PLACEHOLDER)
    start = kv_end - len(digests) * item
    placeholder = len(_CHECKSUM_PLACEHOLDER).to_bytes(8, "little") + _CHECKSUM_PLACEHOLDER.encode("ascii")
    with open(path, "r+b") as f:
        f.seek(start)
        if f.read(len(digests) * item) != placeholder * len(digests):
            raise Mc2ggufError(f"internal error: the checksum placeholders of {path} are not where they were written")
        f.seek(start)
        f.write(b"".join(len(d).to_bytes(8, "little") + d.encode("ascii") for d in digests))


@dataclass(frozen=True)
class Verification:
    n_tensors: int
    damaged: list[str]  # tensors whose bytes do not match their checksum


def verify(path: Path) -> Verification:
    """Every tensor's bytes against the checksum mc2gguf wrote for it (a damaged download, a truncated copy)."""
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise Mc2ggufError(f"{path} is not a readable GGUF file: {e}") from None
    field = reader.fields.get(Keys.TENSOR_CHECKSUMS)
    if field is None:
        raise Mc2ggufError(f"{path} has no {Keys.TENSOR_CHECKSUMS}: not written by mc2gguf (0.4.0 or later), "
                           "nothing to verify against")
    stored = [str(v) for v in field.contents()]
    if len(stored) != len(reader.tensors):
        raise Mc2ggufError(f"{path}: {len(stored)} checksums for {len(reader.tensors)} tensors")
    damaged = [t.name for t, digest in zip(reader.tensors, stored) if tensor_checksum(t.data) != digest]
    return Verification(len(stored), damaged)
