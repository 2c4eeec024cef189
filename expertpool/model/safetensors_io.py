"""Safetensors directories on disk: the shard reader, the sharded writer and atomic directory writes.

Reading (``ShardReader``): a checkpoint directory holds ``model.safetensors`` or an index
(``model.safetensors.index.json``) and its shards. Single tensors are read with plain file reads
(``SafetensorsFile``, no mmap), so memory holds only the tensors taken and a truncated or corrupt
file is reported with its name; presence, shape and dtype are checked on request. A directory
fetched from a remote source (``model.storage``) may hold only the shards one process loads, plus
every shard's header (``storage.SHARD_HEADERS``): ``meta`` answers from those headers, reading a
tensor of a shard that was not fetched raises. Opening each shard is logged (one line per shard).

Writing: ``atomic_dir(out_dir)`` yields a temporary sibling directory and renames it into place when
the block ends (replacing an existing ``out_dir``), or removes it when the block raises, so a crash
never leaves a half-written directory. ``write_safetensors_dir`` writes config.json and tensors
(sharded above ``max_shard_bytes``, with an index) through it; expert patches use it too.

Errors name the file or tensor and the fix (``CheckpointError``). No model knowledge here: the HF
name map lives in ``model.checkpoint``.
"""

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from expertpool.errors import UserError
from expertpool.model.storage import SHARD_HEADERS

log = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded or saved; the message names the file/tensor and the fix."""


ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
             "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile:
    """Reads single tensors of a .safetensors file with plain file reads (no mmap): memory holds only
    the tensors taken, and a truncated or corrupt file is reported with the file name."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or n <= 0 or 8 + n > size:
                    raise ValueError(f"header of {n} bytes does not fit in a {size}-byte file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors ({e}); the file is truncated or corrupt, "
                                  "re-download or re-save it") from e
        header.pop("__metadata__", None)
        self.entries = header
        self.data_start = 8 + n
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self.data_start + end > size:
            raise CheckpointError(f"{path}: file is truncated: tensors need {self.data_start + end} bytes, the "
                                  f"file has {size}; re-download or re-save it")

    def keys(self):
        return self.entries.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        if e["dtype"] not in ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        begin, end = e["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        # unbuffered: the bytes go straight into the tensor, and exactly the tensor's bytes are read
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            done = 0
            while done < len(view):  # a read returns at most ~2 GiB on Linux
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"{self.path}: tensor {name!r} is cut short; the file is truncated")
                done += n
        return buf.view(ST_DTYPES[e["dtype"]]).reshape(e["shape"])


class ShardReader:
    """Lazy tensor access across the shards of a checkpoint directory (``model.safetensors`` or
    ``model.safetensors.index.json`` + shards); validates presence, shape and dtype."""

    def __init__(self, path: Path):
        self.path = path
        self._handles = {}
        self._opened = time.perf_counter()
        try:
            self._headers = json.loads((path / SHARD_HEADERS).read_text())
        except FileNotFoundError:
            self._headers = {}
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.exists():
            try:
                self.weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r}); it needs a 'weight_map'") from e
        elif single.exists():
            self.weight_map = {k: "model.safetensors" for k in self._open("model.safetensors").keys()}
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json; "
                                  "point --model at a Hugging Face checkpoint directory")

    def _open(self, fname: str):
        if fname not in self._handles:
            f = self.path / fname
            if not f.exists():
                if fname in self._headers:
                    raise CheckpointError(f"{f}: not fetched by this process (the shard holds only routed experts "
                                          "it does not load); load the experts it was fetched for, or fetch "
                                          "the checkpoint for these experts (model.storage.resolve_model)")
                raise CheckpointError(f"{f}: shard listed in the index is missing")
            self._handles[fname] = SafetensorsFile(f)
            # progress: one line per shard, when loading first reaches it (of those on this node:
            # a fetched copy holds only this process's shards)
            shards = getattr(self, "weight_map", {fname: fname}).values()  # unsharded: opened before the map
            local = {s for s in shards if (self.path / s).exists()}
            log.info("loading shard %s (%d of %d) from %s, %.2f GB, %.0f s", fname, len(self._handles), len(local),
                     self.path, f.stat().st_size / 1e9, time.perf_counter() - self._opened)
        return self._handles[fname]

    def close(self) -> None:
        self._handles.clear()

    def meta(self, name: str) -> tuple[list[int], str]:
        """Shape and safetensors dtype of a tensor, without reading its data (from the shard's header,
        or from the saved headers of a shard this process did not fetch)."""
        fname = self.weight_map[name]
        if not (self.path / fname).exists() and fname in self._headers:
            e = self._headers[fname][name]
        else:
            e = self._open(fname).entries[name]
        return e["shape"], e["dtype"]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str, shape: tuple | None = None, dtypes: tuple | None = None) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint"
                                  + (f" (expected shape {list(shape)})" if shape else ""))
        fname = self.weight_map[name]
        handle = self._open(fname)
        if name not in handle.entries:
            raise CheckpointError(f"{self.path / fname}: tensor {name!r} is listed in the index but not in the file")
        t = handle.get_tensor(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.path / fname}: tensor {name!r} has shape {list(t.shape)}, "
                                  f"expected {list(shape)} for this config.json")
        if dtypes is not None and t.dtype not in dtypes:
            raise CheckpointError(f"{self.path / fname}: tensor {name!r} has dtype {t.dtype}, "
                                  f"expected one of {[str(d) for d in dtypes]}")
        return t


@contextlib.contextmanager
def atomic_dir(out_dir) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` to fill; on success it replaces ``out_dir`` by rename,
    on an exception it is removed and the exception propagates."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_safetensors_dir(tensors: dict[str, torch.Tensor], config: dict, out_dir, *,
                          max_shard_bytes: int = 5 << 30, extra_files: dict[str, str] | None = None,
                          copy_from: Path | None = None) -> Path:
    """Write config.json + (sharded) safetensors atomically (``atomic_dir``), plus ``extra_files``
    (name -> text) and the non-model files of ``copy_from`` (a tokenizer)."""
    with atomic_dir(out_dir) as tmp:
        if copy_from is not None:
            for f in Path(copy_from).iterdir():  # not model*, config.json, nor a fetched copy's bookkeeping (.*)
                if f.is_file() and not f.name.startswith(("model", ".")) and f.name != "config.json":
                    shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        shards, cur, size = [], {}, 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[name], size = t, size + nbytes
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return Path(out_dir)
