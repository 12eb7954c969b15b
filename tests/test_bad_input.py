"""Bad input to ``mc2gguf convert`` and ``inspect``: a clear message, a non-zero exit, no output left."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mc2gguf.cli import main


@pytest.fixture()
def model(tiny_mixtral, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_mixtral, tmp_path / "model"))


def _fails(capsys, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "mc2gguf: error:" in err
    for fragment in fragments:
        assert fragment in err, err


def _no_output_left(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial"))


def _shards(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def test_missing_config(model, tmp_path, capsys):
    (model / "config.json").unlink()
    out = tmp_path / "out.gguf"
    _fails(capsys, ["convert", str(model), str(out)], "config.json")
    _no_output_left(out)


def test_missing_model_directory(tmp_path, capsys):
    _fails(capsys, ["convert", str(tmp_path / "nowhere"), str(tmp_path / "o.gguf")], "is not a directory")


def test_missing_shard(model, tmp_path, capsys):
    victim = _shards(model)[1]
    victim.unlink()
    out = tmp_path / "out.gguf"
    _fails(capsys, ["convert", str(model), str(out)], "missing shard", victim.name)
    _no_output_left(out)


def test_no_shards_at_all(model, tmp_path, capsys):
    for shard in _shards(model):
        shard.unlink()
    (model / "model.safetensors.index.json").unlink()
    _fails(capsys, ["convert", str(model), str(tmp_path / "o.gguf")], "no *.safetensors")


def test_truncated_shard(model, tmp_path, capsys):
    victim = _shards(model)[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out.gguf"
    _fails(capsys, ["convert", str(model), str(out)], "truncated shard", victim.name)
    _no_output_left(out)


def test_corrupt_shard_header(model, tmp_path, capsys):
    victim = _shards(model)[1]
    data = bytearray(victim.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage in the JSON header
    victim.write_bytes(bytes(data))
    out = tmp_path / "out.gguf"
    _fails(capsys, ["convert", str(model), str(out)], "corrupt shard", victim.name)
    _no_output_left(out)


def test_unsupported_architecture(model, tmp_path, capsys):
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.gguf"
    _fails(capsys, ["convert", str(model), str(out)], "GPT2LMHeadModel", "supported: DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, MixtralForCausalLM")
    _no_output_left(out)


def test_existing_output_needs_force(model, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    _fails(capsys, ["convert", str(model), str(out)], "--force")
    assert out.read_bytes() == b"precious"
    assert main(["convert", str(model), str(out), "--force", "--type", "Q8_0"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("where", ["missing-dir", "proc"])
def test_unwritable_output(model, tmp_path, capsys, where):
    out = tmp_path / "no" / "such" / "dir" / "o.gguf" if where == "missing-dir" else Path("/proc/mc2gguf-test.gguf")
    _fails(capsys, ["convert", str(model), str(out)], "cannot write")
    assert not out.exists()


def test_unknown_type(model, tmp_path, capsys):
    _fails(capsys, ["convert", str(model), str(tmp_path / "o.gguf"), "--type", "Q9_9"], "unknown type", "Q4_K")


def test_failure_while_writing_leaves_nothing(model, tmp_path, capsys, monkeypatch):
    """An error after some tensors were written (here: a shard that vanishes mid-run) leaves no file."""
    import mc2gguf.convert as convert_module

    real = convert_module.encode_tensor
    calls = []

    def failing(plan):
        calls.append(plan.spec.name)
        if len(calls) == 5:
            for shard in _shards(model):
                shard.unlink()
        return real(plan)

    monkeypatch.setattr(convert_module, "encode_tensor", failing)
    out = tmp_path / "out.gguf"
    _fails(capsys, ["convert", str(model), str(out)], "cannot read")
    assert len(calls) == 5
    _no_output_left(out)


def test_inspect_rejects_non_gguf(tmp_path, capsys):
    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    _fails(capsys, ["inspect", str(bogus)], "not a readable GGUF")
    _fails(capsys, ["inspect", str(tmp_path / "missing.gguf")], "does not exist")


def test_no_disk_space(model, tmp_path, capsys, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out.gguf"
    _fails(capsys, ["convert", str(model), str(out)], "not enough disk space", "1,000 free")
    _no_output_left(out)


def _rewrite_shard(shard: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_tensor(model, tmp_path, capsys, value):
    victim = _shards(model)[1]
    name = []

    def poison(tensors):
        name.append(sorted(tensors)[0])
        tensors[name[0]].view(-1)[3] = value

    _rewrite_shard(victim, poison)
    out = tmp_path / "out.gguf"
    _fails(capsys, ["convert", str(model), str(out), "--type", "Q8_0"], name[0], "NaN or infinite")
    _no_output_left(out)


def test_config_that_lies_about_a_size(model, tmp_path, capsys):
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.gguf"
    _fails(capsys, ["convert", str(model), str(out)], "model.layers.0.block_sparse_moe.experts.0.w1.weight has shape",
           "config.json implies")
    _no_output_left(out)


@pytest.mark.parametrize("how", ["copy", "symlink"])
def test_duplicated_shard(model, tmp_path, capsys, how):
    (model / "model.safetensors.index.json").unlink()  # then every *.safetensors is a shard
    first = _shards(model)[0]
    twin = model / "zz-twin.safetensors"
    if how == "copy":
        shutil.copyfile(first, twin)
    else:
        twin.symlink_to(first)
    out = tmp_path / "out.gguf"
    _fails(capsys, ["convert", str(model), str(out)], "is in two shards", first.name, twin.name)
    _no_output_left(out)


def test_verify_catches_every_damaged_tensor(model, tmp_path, capsys):
    """GGUF has no checksums: mc2gguf writes one per tensor (placeholders filled in place, so the planned size
    holds) and ``verify`` checks them; every seeded single-byte corruption of tensor data is caught and named,
    while the file still loads as GGUF. A file without checksums is a clear error."""
    import random

    from gguf import GGUFReader

    out = tmp_path / "good.gguf"
    assert main(["convert", str(model), str(out), "--type", "Q4_K"]) == 0
    assert main(["verify", str(out)]) == 0
    assert "all 23 tensors match" in capsys.readouterr().out
    assert main(["inspect", str(out), "--verify"]) == 0
    tensors = GGUFReader(out).tensors
    data = out.read_bytes()
    rng = random.Random(0)
    for case in range(40):
        victim = rng.choice(tensors)
        offset = int(victim.data_offset) + rng.randrange(int(victim.n_bytes))
        bad = bytearray(data)
        bad[offset] ^= 1 << rng.randrange(8)
        damaged = tmp_path / "bad.gguf"
        damaged.write_bytes(bytes(bad))
        _fails(capsys, ["verify", str(damaged)], "do not match their checksums", victim.name)
    plain = tmp_path / "plain.gguf"
    from mc2gguf.gguf.edit import rewrite

    rewrite(out, plain)  # rewritten copies carry no checksums rather than stale ones
    _fails(capsys, ["verify", str(plain)], "has no mc2gguf.tensor_checksums")
