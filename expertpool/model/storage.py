"""Where checkpoints, patches and training outputs live: local paths, Hugging Face repos, s3:// and gs://.

Specs (``model.path``, ``train.jobs.*.base_model``, ``output_dir``, patch locations), by ``parse``:
- ``s3://bucket/prefix``, ``gs://bucket/prefix``: object storage through ``pyarrow.fs``. Credentials
  come from the environment as pyarrow reads them (S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
  or an instance role, ``AWS_ENDPOINT_URL`` for an S3-compatible server; GCS: application default
  credentials).
- ``hf://org/name[@revision]``, or ``org/name[@revision]`` when no such local directory exists: a
  Hugging Face repo, downloaded with ``huggingface_hub`` into the hub cache (``HF_HUB_CACHE`` /
  ``HF_HOME``), so ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` apply as the hub defines them.
  ``revision`` is a branch, tag or commit; it is pinned to its commit on first contact.
- anything else: a local path (``./org/name`` forces a local reading of an ``org/name`` path).

``resolve_model(spec, experts=..., with_mtp=...)`` returns a local directory a loader can read.
A local spec is returned as is. A remote one becomes a directory of the local cache
(``EXPERTPOOL_CACHE``, default ``~/.cache/expertpool``; Hugging Face files are symlinks into the hub
cache) holding the small metadata files (config.json, tokenizer files, the safetensors index) and
only the shards this process loads: every shard that holds a tensor other than a routed expert, and
the shards that hold the routed experts in ``experts`` (read from ``model.safetensors.index.json``;
None = all). The safetensors headers of every shard go to ``SHARD_HEADERS`` beside them, read with
ranged reads (a header is a few hundred kB of a multi-GB shard), so shapes and dtypes of tensors this
process did not fetch stay known (``safetensors_io.ShardReader.meta``, the patch base fingerprint).
A file lands under a temporary name and is renamed into place, so the cache never holds a partial
file; one whose size and modification time match the remote is not fetched again. Each shard is one
log line: ``shard 12/40 model-00012-of-00163.safetensors: 4.1 GB in 38 s``.

Writing: ``upload_dir`` copies a local directory to a URI (files in order, the named ones last, so
a reader that waits for ``manifest.json`` sees a complete directory); ``fetch_dir`` is its inverse
for small directories (patches). ``read_text``/``write_text`` handle single small files anywhere.

Not here: no model knowledge beyond the HF name pattern of routed experts; no Ray. Other object
stores (Azure) are not supported.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from expertpool.errors import UserError

log = logging.getLogger(__name__)

OBJECT_SCHEMES = ("s3://", "gs://")
HF_SCHEME = "hf://"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD_HEADERS = ".shard-headers.json"  # {shard: {tensor: {dtype, shape, data_offsets}}}
_FETCHED = ".fetched.json"  # {file: [size, mtime_ns]} of object-store files in a cache directory
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")
# metadata a checkpoint directory carries besides its weights (all small)
_META_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
_HF_META = ("config.json", INDEX, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json")
_CHUNK = 16 << 20


class StorageError(UserError, ValueError):
    """A location that cannot be read or written; the message names it and the fix."""


def cache_dir() -> Path:
    """The local cache (``EXPERTPOOL_CACHE``, default ``~/.cache/expertpool``): the embedded model,
    fetched checkpoints and patches."""
    return Path(os.environ.get("EXPERTPOOL_CACHE", Path.home() / ".cache" / "expertpool"))


@dataclass(frozen=True)
class Location:
    kind: str           # local | hf | s3 | gs
    path: str           # local path, repo id, or the URI without a trailing '/'
    revision: str | None = None

    @property
    def remote(self) -> bool:
        return self.kind != "local"

    def __str__(self) -> str:
        if self.kind == "hf":
            return self.path + (f"@{self.revision}" if self.revision else "")
        return self.path

    def join(self, *parts: str) -> str:
        """A child location as a spec string (not for Hugging Face repos)."""
        assert self.kind != "hf", "Hugging Face repos are read-only here"
        if self.kind == "local":
            return str(Path(self.path, *parts))
        return "/".join([self.path, *parts])


def check(spec: str | os.PathLike) -> None:
    """Raise StorageError for a spec no location can have (a URI without a bucket, a malformed
    ``hf://``); reads no file system (config validation runs it)."""
    s = str(spec)
    if s.startswith(OBJECT_SCHEMES) and not s.split("://", 1)[1].strip("/"):
        raise StorageError(f"'{s}' names no bucket; write it as {s.split('://')[0]}://BUCKET/PREFIX")
    if s.startswith(HF_SCHEME) and not _HF_ID.match(s[len(HF_SCHEME):]):
        raise StorageError(f"'{s}' is not a Hugging Face repo id; write it as hf://ORG/NAME or hf://ORG/NAME@REVISION")


def parse(spec: str | os.PathLike, *, hub: bool = True) -> Location:
    """Classify a location spec (see the module docstring); ``org/name`` is a local path if it exists.
    ``hub=False`` (outputs and patches, never read from the hub): ``org/name`` is always a path."""
    check(spec)
    s = str(spec)
    if s.startswith(OBJECT_SCHEMES):
        return Location(s[:2], f"{s[:2]}://{s.split('://', 1)[1].strip('/')}")
    if s.startswith(HF_SCHEME):
        return _hf(s[len(HF_SCHEME):])
    if (not hub or s.startswith(("/", "./", "../", "~")) or Path(s).expanduser().exists()
            or not _HF_ID.match(s)):
        return Location("local", s)
    return _hf(s)


def _hf(repo: str) -> Location:
    name, _, rev = repo.partition("@")
    return Location("hf", name, rev or None)


def is_remote(spec: str | os.PathLike | None, *, hub: bool = True) -> bool:
    return spec is not None and parse(spec, hub=hub).remote


def basename(spec: str) -> str:
    """The last path component (a model id default): ``deepseek-ai/DeepSeek-V3@main`` -> ``DeepSeek-V3``.
    Reads no file system: a repo id and a local path of that name give the same."""
    s = str(spec).split("://", 1)[-1].rstrip("/\\")
    if str(spec).startswith(HF_SCHEME) or _HF_ID.match(s):
        s = s.partition("@")[0]
    return s.replace("\\", "/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------- selection

def needed_shards(weight_map: dict[str, str], experts: Iterable[int] | None, skip_from_layer: int | None) -> list[str]:
    """The shards holding any tensor a process loads: every tensor but routed experts outside
    ``experts`` (None = all experts) and layers >= ``skip_from_layer`` (the MTP layers when they are not
    loaded; None = every layer)."""
    wanted = None if experts is None else set(int(e) for e in experts)
    out = set()
    for name, shard in weight_map.items():
        layer = _LAYER.match(name)
        if skip_from_layer is not None and layer and int(layer.group(1)) >= skip_from_layer:
            continue
        expert = _EXPERT.match(name)
        if expert is None or wanted is None or int(expert.group(1)) in wanted:
            out.add(shard)
    return sorted(out)


def read_header(read_range) -> dict:
    """A safetensors header through ``read_range(offset, length) -> bytes`` (two small reads)."""
    n = int.from_bytes(read_range(0, 8), "little")
    header = json.loads(read_range(8, n))
    header.pop("__metadata__", None)
    return header


def _local_header(path: Path) -> dict:
    with open(path, "rb") as f:
        return read_header(lambda off, n: (f.seek(off), f.read(n))[1])


# ---------------------------------------------------------------------------------------------- stores

class _ArrowStore:
    """An s3:// or gs:// prefix through pyarrow.fs; files are fetched into ``local_dir``."""

    def __init__(self, loc: Location, cache_kind: str = "models"):
        from pyarrow import fs as pafs

        self.loc = loc
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(loc.path)
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False, allow_not_found=True))
        except (OSError, ValueError) as e:
            raise StorageError(f"{loc}: cannot list it ({e}); check the URI and the credentials in the "
                               "environment (AWS_* / AWS_ENDPOINT_URL for S3, application default credentials "
                               "for GCS)") from e
        self.files = {Path(i.path).name: (i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File}
        self.local_dir = cache_dir() / cache_kind / loc.path.replace("://", "/")

    def names(self) -> list[str]:
        return sorted(self.files)

    def get(self, name: str, optional: bool = False) -> tuple[Path | None, bool]:
        """(local path, whether it was downloaded now); (None, False) for a missing optional file."""
        if name not in self.files:
            if optional:
                return None, False
            raise StorageError(f"{self.loc}/{name}: not found; point the location at a checkpoint "
                               "directory (config.json + safetensors)")
        dest = self.local_dir / name
        stamp = list(self.files[name])
        fetched = _read_json(self.local_dir / _FETCHED)
        if dest.exists() and fetched.get(name) == stamp:
            return dest, False
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{name}.tmp-{os.getpid()}")
        try:
            with self.fs.open_input_stream(f"{self.root}/{name}") as src, open(tmp, "wb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
            os.replace(tmp, dest)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"{self.loc}/{name}: download failed ({e})") from e
        _update_json(self.local_dir / _FETCHED, {name: stamp})
        return dest, True

    def header(self, name: str) -> dict:
        local = self.local_dir / name
        if local.exists() and _read_json(self.local_dir / _FETCHED).get(name) == list(self.files[name]):
            return _local_header(local)
        with self.fs.open_input_file(f"{self.root}/{name}") as f:
            return read_header(lambda off, n: f.read_at(n, off))


class _HubStore:
    """A Hugging Face repo at one commit; files go through hf_hub_download (the hub cache) and are
    symlinked into ``local_dir``."""

    def __init__(self, loc: Location):
        from huggingface_hub import constants

        self.loc, self.repo = loc, loc.path
        self.offline = constants.HF_HUB_OFFLINE
        config = self._download("config.json", loc.revision)
        self.commit = Path(config).parent.name  # snapshots/<commit>/config.json
        self.local_dir = cache_dir() / "models" / "hf" / self.repo.replace("/", "--") / self.commit

    def _download(self, name: str, revision: str | None) -> str:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)

        try:
            return hf_hub_download(self.repo, name, revision=revision)
        except GatedRepoError as e:
            raise StorageError(f"{self.loc}: gated repo, access denied ({e.__class__.__name__}); accept its terms on "
                               "the hub and set HF_TOKEN (on Kubernetes: kubernetes.hf_token_secret)") from e
        except RepositoryNotFoundError as e:
            raise StorageError(f"{self.loc}: no such repo, or it is private; check the id or set HF_TOKEN") from e
        except RevisionNotFoundError as e:
            raise StorageError(f"{self.loc}: no revision {revision!r}; use a branch, tag or commit of it") from e
        except LocalEntryNotFoundError as e:
            if self.offline:
                raise StorageError(f"{self.loc}/{name}: not in the hub cache and HF_HUB_OFFLINE is set; download "
                                   "it once online (or copy a hub cache to HF_HUB_CACHE), or unset "
                                   "HF_HUB_OFFLINE") from e
            raise StorageError(f"{self.loc}/{name}: cannot reach the hub ({e}); check the network or "
                               "HF_ENDPOINT") from e
        except EntryNotFoundError as e:
            raise FileNotFoundError(name) from e

    def names(self) -> list[str]:
        return list(_HF_META)

    def get(self, name: str, optional: bool = False) -> tuple[Path | None, bool]:
        from huggingface_hub import try_to_load_from_cache

        was_cached = isinstance(try_to_load_from_cache(self.repo, name, revision=self.commit), str)
        try:
            target = Path(self._download(name, self.commit))
        except (FileNotFoundError, StorageError):
            if optional:
                return None, False
            raise
        dest = self.local_dir / name
        if not (dest.is_symlink() and dest.resolve() == target.resolve()):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{name}.tmp-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, dest)
        return dest, not was_cached

    def header(self, name: str) -> dict:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(self.repo, name, revision=self.commit)
        if isinstance(cached, str):
            return _local_header(Path(cached))
        from huggingface_hub import HfFileSystem  # fsspec: imported only for ranged reads from the hub

        if self.offline:
            raise StorageError(f"{self.loc}/{name}: its header is needed (shapes of experts other ranks load) but "
                               "the shard is not in the hub cache and HF_HUB_OFFLINE is set; download the "
                               "repo once online or unset HF_HUB_OFFLINE")
        fs = HfFileSystem()
        path = f"{self.repo}@{self.commit}/{name}"
        return read_header(lambda off, n: fs.cat_file(path, start=off, end=off + n))


def _store(loc: Location):
    return _HubStore(loc) if loc.kind == "hf" else _ArrowStore(loc)


# ---------------------------------------------------------------------------------------------- models

def resolve_model(spec: str | os.PathLike, *, experts: Iterable[int] | None = None, with_mtp: bool = True,
                  weights: bool = True) -> Path:
    """A local checkpoint directory for ``spec`` holding what this process loads (module docstring):
    the metadata files, and with ``weights`` the dense shards and those of ``experts`` (None = all);
    ``with_mtp=False`` skips shards that only hold MTP layers. Raises StorageError."""
    loc = parse(spec)
    if not loc.remote:
        return Path(loc.path).expanduser()
    experts = None if experts is None else sorted(set(int(e) for e in experts))
    store = _store(loc)
    out = store.local_dir
    for name in store.names():
        if name.endswith(_META_SUFFIXES):
            store.get(name, optional=name != "config.json")
    if not weights:
        return out
    index = out / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        config = json.loads((out / "config.json").read_text())
        need = needed_shards(weight_map, experts, None if with_mtp else int(config["num_hidden_layers"]))
    else:
        shards = need = [SINGLE]
    what = "every expert" if experts is None else f"{len(experts)} routed experts"
    log.info("%s: fetching %d of %d shards (dense weights and %s) into %s", loc, len(need), len(shards), what, out)
    t_all = time.perf_counter()
    for k, name in enumerate(need, 1):
        t0 = time.perf_counter()
        path, downloaded = store.get(name)
        gb = path.stat().st_size / 1e9
        log.info("%s: shard %d/%d %s: %.2f GB %s", loc, k, len(need), name, gb,
                 f"in {time.perf_counter() - t0:.0f} s" if downloaded else "(cached)")
    if len(need) < len(shards) and not (out / SHARD_HEADERS).exists():
        headers = {name: _local_header(out / name) if name in need else store.header(name) for name in shards}
        _write_json_atomic(out / SHARD_HEADERS, headers)
    log.info("%s: ready in %.0f s", loc, time.perf_counter() - t_all)
    return out


# ---------------------------------------------------------------------------------------------- directories

def fetch_dir(spec: str | os.PathLike) -> Path:
    """A local copy of a small directory (a patch) at ``spec``; a local spec is returned as is. Files
    already fetched and unchanged remotely are not fetched again."""
    loc = parse(spec, hub=False)
    if loc.kind == "local":
        return Path(loc.path).expanduser()
    if loc.kind == "hf":
        raise StorageError(f"{loc}: patches and outputs are read from local paths, s3:// or gs://, not from "
                           "Hugging Face repos")
    store = _ArrowStore(loc, cache_kind="dirs")
    if not store.files:
        raise StorageError(f"{loc}: no files there; point at a directory written by a fine-tuning job")
    for name in store.names():
        store.get(name)
    return store.local_dir


def upload_dir(local: str | os.PathLike, spec: str, *, last: Iterable[str] = ()) -> str:
    """Copy the files of a local directory (not recursive) to ``spec``; the files named in ``last``
    go last. A local spec gets a plain copy. Returns ``spec``."""
    local = Path(local)
    files = sorted((p for p in local.iterdir() if p.is_file()), key=lambda p: (p.name in set(last), p.name))
    loc = parse(spec, hub=False)
    if loc.kind == "local":
        dest = Path(loc.path).expanduser()
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest / f.name)
        return spec
    fs, root = _writable(loc)
    for f in files:
        with open(f, "rb") as src, fs.open_output_stream(f"{root}/{f.name}") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
    return spec


def _writable(loc: Location):
    from pyarrow import fs as pafs

    if loc.kind == "hf":
        raise StorageError(f"{loc}: outputs go to local paths, s3:// or gs://, not to Hugging Face repos")
    try:
        return pafs.FileSystem.from_uri(loc.path)
    except (OSError, ValueError) as e:
        raise StorageError(f"{loc}: cannot open it for writing ({e})") from e


def write_text(spec: str, text: str) -> None:
    loc = parse(spec, hub=False)
    if loc.kind == "local":
        path = Path(loc.path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    fs, path = _writable(loc)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def read_text(spec: str) -> str:
    loc = parse(spec, hub=False)
    if loc.kind == "local":
        return Path(loc.path).expanduser().read_text()
    fs, path = _writable(loc)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except OSError as e:
        raise StorageError(f"{loc}: cannot read it ({e})") from e


def remove(spec: str) -> None:
    """Delete one file if it exists."""
    loc = parse(spec, hub=False)
    if loc.kind == "local":
        Path(loc.path).expanduser().unlink(missing_ok=True)
        return
    from pyarrow import fs as pafs

    fs, path = _writable(loc)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def exists(spec: str) -> bool:
    loc = parse(spec, hub=False)
    if loc.kind == "local":
        return Path(loc.path).expanduser().exists()
    from pyarrow import fs as pafs

    fs, path = _writable(loc)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def listdir(spec: str) -> dict[str, tuple[bool, int]]:
    """The entries directly under ``spec``: name -> (is a directory, modification time in ns); {} if
    it does not exist."""
    loc = parse(spec, hub=False)
    if loc.kind == "local":
        path = Path(loc.path).expanduser()
        return {p.name: (p.is_dir(), p.stat().st_mtime_ns) for p in path.iterdir()} if path.is_dir() else {}
    from pyarrow import fs as pafs

    fs, path = _writable(loc)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return {Path(i.path).name: (i.type == pafs.FileType.Directory, i.mtime_ns or 0) for i in infos}


# ---------------------------------------------------------------------------------------------- small files

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _update_json(path: Path, entries: dict) -> None:
    """Merge ``entries`` into a JSON map beside the files (processes on one node may share a cache
    directory; each entry describes a complete file, so a lost update only costs a re-download)."""
    _write_json_atomic(path, _read_json(path) | entries)
