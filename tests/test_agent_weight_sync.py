"""Weight sync helpers (agent/weight_sync.py): lazy, dtype-casting, bounded shards."""

import pytest
import torch
from safetensors.torch import load_file

from agent.weight_sync import engine_stream, write_shards


def counted(tensors, pulled):
    for name, tensor in tensors:
        pulled.append(name)
        yield name, tensor


def test_engine_stream_pulls_one_tensor_at_a_time_and_casts_each():
    source = [(f"w{i}", torch.full((4, 4), float(i), requires_grad=True)) for i in range(5)]
    pulled: list[str] = []
    stream = engine_stream(counted(source, pulled), torch.bfloat16)
    name, first = next(stream)
    assert pulled == ["w0"]  # nothing read ahead: the learner's stream is not materialised
    assert name == "w0" and first.dtype == torch.bfloat16 and not first.requires_grad
    rest = list(stream)
    assert pulled == [f"w{i}" for i in range(5)] and len(rest) == 4
    ints = list(engine_stream([("step", torch.tensor([3]))], torch.bfloat16))
    assert ints[0][1].dtype == torch.int64  # only floating tensors take the engine dtype


def test_engine_stream_names_a_bad_item():
    with pytest.raises(TypeError, match=r"\(name, tensor\) pairs, got \(str, list\)"):
        list(engine_stream([("w", [1.0])], torch.float32))


def test_write_shards_bounds_each_file_and_replaces_an_earlier_update(tmp_path):
    folder = tmp_path / "weights"
    tied = torch.randn(16, 16)
    tensors = [(f"layer{i}.weight", torch.randn(16, 16)) for i in range(6)]
    tensors += [("embed.weight", tied), ("head.weight", tied)]  # shared storage, as when tied
    pulled: list[str] = []
    count, nbytes = write_shards(counted(tensors, pulled), folder, bucket_bytes=2 * 16 * 16 * 4)
    assert (count, nbytes) == (8, 8 * 16 * 16 * 4)
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 4 and not list(folder.glob(".*.tmp"))
    loaded = {}
    for f in files:
        part = load_file(f)
        assert len(part) <= 2
        loaded.update(part)
    for name, tensor in tensors:
        assert torch.equal(loaded[name], tensor)

    write_shards([("only.weight", torch.ones(2))], folder)
    assert [f.name for f in folder.iterdir()] == ["shard-00000.safetensors"]


def test_write_shards_refuses_a_duplicate_or_empty_stream(tmp_path):
    with pytest.raises(ValueError, match="'a' appears twice"):
        write_shards(
            [("a", torch.ones(1)), ("b", torch.ones(1)), ("a", torch.ones(1))], tmp_path / "x"
        )
    with pytest.raises(ValueError, match="empty stream"):
        write_shards([], tmp_path / "y")
    with pytest.raises(ValueError, match="bucket_bytes must be positive, got 0"):
        write_shards([("a", torch.ones(1))], tmp_path / "z", bucket_bytes=0)
