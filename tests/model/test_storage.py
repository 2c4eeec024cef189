"""Model sources: local dirs, Hugging Face repos (a hub cache in offline mode) and s3:// (a real
S3-compatible server on loopback). Each expert-parallel rank fetches only the dense shards and the
shards of its experts: counted in bytes, on the wire for S3 and with the kernel's read counter for the
hub cache."""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expertpool.model.checkpoint import load_checkpoint, save_checkpoint
from expertpool.model.dispatch import owned_experts
from expertpool.model.patch import base_fingerprint
from expertpool.model.storage import (SHARD_HEADERS, StorageError, basename, fetch_dir, needed_shards, parse,
                                      read_text, resolve_model, upload_dir, write_text)

ROOT = Path(__file__).resolve().parents[2]
SHARD_BYTES = 200_000  # the tiny model's 5.6 MB in ~30 shards: each layer's experts span several


@pytest.fixture(scope="module")
def sharded(tiny_dir, tmp_path_factory) -> Path:
    model = load_checkpoint(tiny_dir, dtype=torch.bfloat16)
    return save_checkpoint(model, tmp_path_factory.mktemp("sharded") / "tiny", max_shard_bytes=SHARD_BYTES,
                           tokenizer_dir=tiny_dir)


def _shards(d: Path) -> tuple[dict[str, str], dict[str, int]]:
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    return weight_map, {s: (d / s).stat().st_size for s in set(weight_map.values())}


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _same_tensors(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_parse_specs(tmp_path):
    assert parse("s3://bucket/models/v3/").path == "s3://bucket/models/v3"
    assert parse("gs://b/x").kind == "gs"
    loc = parse("deepseek-ai/DeepSeek-V3@main")
    assert (loc.kind, loc.path, loc.revision) == ("hf", "deepseek-ai/DeepSeek-V3", "main")
    assert parse("hf://org/name").kind == "hf" and parse("hf://org/name").revision is None
    (tmp_path / "org" / "name").mkdir(parents=True)
    os.chdir(tmp_path)
    try:
        assert parse("org/name").kind == "local"  # an existing directory wins over a repo id
        assert parse("./org/other").kind == "local"
    finally:
        os.chdir(ROOT)
    assert parse("/ckpt/v3").kind == "local" and parse("ckpt").kind == "local"
    assert basename("deepseek-ai/DeepSeek-V3@main") == "DeepSeek-V3" and basename("s3://b/m/tiny/") == "tiny"
    with pytest.raises(StorageError, match="names no bucket"):
        parse("s3://")


def test_needed_shards_dense_and_own_experts_only():
    wm = {"model.embed_tokens.weight": "a", "model.layers.1.mlp.experts.0.up_proj.weight": "a",
          "model.layers.1.mlp.experts.1.up_proj.weight": "b", "model.layers.1.mlp.experts.2.up_proj.weight": "c",
          "model.layers.1.mlp.gate.weight": "c", "model.layers.3.mlp.experts.1.up_proj.weight": "d",
          "model.layers.3.eh_proj.weight": "e"}
    assert needed_shards(wm, [0], None) == ["a", "c", "e"]  # c holds the gate
    assert needed_shards(wm, [1], None) == ["a", "b", "c", "d", "e"]
    assert needed_shards(wm, [1], skip_from_layer=3) == ["a", "b", "c"]  # MTP layer 3 not loaded
    assert needed_shards(wm, None, None) == ["a", "b", "c", "d", "e"]


def test_s3_each_rank_fetches_only_its_shards(s3, sharded, tmp_path, monkeypatch, caplog):
    s3.create_bucket("models")
    uri = "s3://models/deepseek/tiny"
    upload_dir(sharded, uri, last=["config.json"])
    weight_map, sizes = _shards(sharded)
    meta = sum(p.stat().st_size for p in sharded.iterdir() if not p.name.endswith(".safetensors"))
    args_layers = json.loads((sharded / "config.json").read_text())["num_hidden_layers"]
    fetched = []
    for rank in range(2):
        monkeypatch.setenv("EXPERTPOOL_CACHE", str(tmp_path / f"node{rank}"))
        experts = owned_experts(rank, 2, 256)
        need = needed_shards(weight_map, experts, args_layers)
        other = sorted(set(sizes) - set(need))
        assert other, "the layout must leave some shards to this rank's peer"
        before = s3.relay.received
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="expertpool.model.storage"):
            local = resolve_model(uri, experts=experts, with_mtp=False)
        got = s3.relay.received - before
        # on the wire: the needed shards whole, the metadata files, and only the header of every
        # other shard; the rest is HTTP framing, far less than the smallest shard it skipped
        floor = sum(sizes[s] for s in need) + meta + sum(_header_bytes(sharded / s) for s in other)
        assert floor <= got < floor + min(sizes[s] - _header_bytes(sharded / s) for s in other), (got, floor)
        assert sorted(p.name for p in local.glob("*.safetensors")) == need
        lines = [r.getMessage() for r in caplog.records if ": shard " in r.getMessage()]
        assert len(lines) == len(need)  # one line per shard, in order, with its size and time
        for k, (line, s) in enumerate(zip(lines, need), 1):
            assert re.fullmatch(rf"{uri}: shard {k}/{len(need)} {s}: {sizes[s] / 1e9:.2f} GB in \d+ s", line), line
        _same_tensors(load_checkpoint(local, dtype=torch.bfloat16, experts=experts, with_mtp=False),
                      load_checkpoint(sharded, dtype=torch.bfloat16, experts=experts, with_mtp=False))
        # shapes of the experts it did not fetch stay known: the patch fingerprint is the base's
        assert base_fingerprint(local) == base_fingerprint(sharded)
        assert (local / SHARD_HEADERS).exists()
        fetched.append(need)
        before = s3.relay.received
        resolve_model(uri, experts=experts, with_mtp=False)  # cached: listing and metadata only
        assert s3.relay.received - before < meta + 20_000
    assert fetched[0] != fetched[1]


def test_reading_an_unfetched_shard_names_the_reason(s3, sharded, tmp_path, monkeypatch):
    s3.create_bucket("models2")
    upload_dir(sharded, "s3://models2/tiny")
    monkeypatch.setenv("EXPERTPOOL_CACHE", str(tmp_path))
    local = resolve_model("s3://models2/tiny", experts=range(8), with_mtp=False)
    with pytest.raises(Exception, match="not fetched by this process"):
        load_checkpoint(local, dtype=torch.bfloat16, experts=range(200, 208), with_mtp=False)


def test_s3_dirs_and_text_round_trip(s3, tmp_path, monkeypatch):
    s3.create_bucket("runs")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "experts.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "p" / "manifest.json").write_text("{}")
    upload_dir(tmp_path / "p", "s3://runs/job/patch", last=["manifest.json"])
    monkeypatch.setenv("EXPERTPOOL_CACHE", str(tmp_path / "cache"))
    local = fetch_dir("s3://runs/job/patch")
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == ["experts.safetensors",
                                                                                      "manifest.json"]
    write_text("s3://runs/job/summary.json", '{"step": 3}')
    assert json.loads(read_text("s3://runs/job/summary.json")) == {"step": 3}
    with pytest.raises(StorageError, match="no files there"):
        fetch_dir("s3://runs/nothing-here")


def _hub_cache(src: Path, cache: Path, repo: str, commit: str) -> None:
    """``src`` laid out as huggingface_hub's cache: blobs by content hash, a snapshot of symlinks, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "snapshots" / commit).mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for f in src.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (root / "blobs" / digest).write_bytes(f.read_bytes())
        (root / "snapshots" / commit / f.name).symlink_to(Path("../../blobs") / digest)


PROBE = """
import json, sys, torch
from expertpool.model import storage
from expertpool.model.checkpoint import load_checkpoint
from expertpool.model.dispatch import owned_experts
import huggingface_hub, huggingface_hub.file_download  # imported before counting

def rchar():
    return int(next(l for l in open('/proc/self/io') if l.startswith('rchar')).split()[1])

# warm up: every module the measured calls import lazily is imported here, outside the count
try:
    storage.resolve_model("warm-up/not-cached")
except storage.StorageError:
    pass
load_checkpoint(sys.argv[3], dtype=torch.bfloat16, experts=[0], with_mtp=False)
experts = owned_experts(int(sys.argv[2]), 2, 256)
before = rchar()
d = storage.resolve_model(sys.argv[1], experts=experts, with_mtp=False)
model = load_checkpoint(d, dtype=torch.bfloat16, experts=experts, with_mtp=False)
used = rchar() - before
print(json.dumps({"dir": str(d), "read": used, "params": sum(t.numel() for t in model.state_dict().values())}))
"""


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io to count bytes read")
def test_hf_repo_offline_from_the_hub_cache(sharded, tmp_path):
    repo, commit = "deepseek-ai/tiny-v3", "0123456789abcdef0123456789abcdef01234567"
    _hub_cache(sharded, tmp_path / "hub", repo, commit)
    weight_map, sizes = _shards(sharded)
    layers = json.loads((sharded / "config.json").read_text())["num_hidden_layers"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=str(ROOT))
    env.pop("HF_TOKEN", None)
    for rank in range(2):
        env["EXPERTPOOL_CACHE"] = str(tmp_path / f"node{rank}")  # as on two nodes
        need = needed_shards(weight_map, owned_experts(rank, 2, 256), layers)
        other = sorted(set(sizes) - set(need))
        r = subprocess.run([sys.executable, "-c", PROBE, f"{repo}@main", str(rank), str(sharded)], env=env,
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        d = Path(out["dir"])
        assert d.parts[-2:] == ("deepseek-ai--tiny-v3", commit)  # @main pinned to its commit
        assert sorted(p.name for p in d.glob("*.safetensors")) == need
        # bytes read from disk: at most the needed shards, the small files and the other shards'
        # headers; reading any other shard's tensors would cost more than the slack allows
        small = sum(p.stat().st_size for p in sharded.iterdir() if not p.name.endswith(".safetensors"))
        ceiling = sum(sizes[s] for s in need) + small + sum(_header_bytes(sharded / s) for s in other)
        assert out["read"] < ceiling + min(sizes[s] - _header_bytes(sharded / s) for s in other), (out, ceiling)
    r = subprocess.run([sys.executable, "-c", PROBE, "deepseek-ai/not-cached", "0", str(sharded)], env=env,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode != 0 and "HF_HUB_OFFLINE is set" in r.stderr
