"""The scoring stage on real HAM10000 JPEGs, through real Ray Data, locally and on a real S3 (moto)."""
import io

from dermray.store import archive

from helpers import shard_bytes as _shard


def _read_shard(data: bytes):
    items = list(archive.iter_shard(io.BytesIO(data)))
    return [i for k, i in items if k == "sample"], [i for k, i in items if k == "problem"]


def test_shards_stream_and_brace_patterns_are_pure_functions():
    assert archive.expand_braces("s3://b/shard-{08..11}.tar") == [f"s3://b/shard-{i:02d}.tar" for i in (8, 9, 10, 11)]
    assert archive.expand_braces("a.tar") == ["a.tar"]
    assert archive.expand_braces("s3://b/{x,y}/s-{0..1}.tar") == ["s3://b/x/s-0.tar", "s3://b/x/s-1.tar",
                                                                   "s3://b/y/s-0.tar", "s3://b/y/s-1.tar"]
    samples, problems = _read_shard(b"not a tar at all")
    assert samples == [] and "not a readable tar archive" in problems[0]["reason"]
    data = _shard([("a", b"\xff\xd8jpeg", {"label": "L", "image_id": "img-a"}), ("b", b"\xff\xd8", {})])
    samples, problems = _read_shard(data)
    assert [s["image_id"] for s in samples] == ["img-a", "b"] and problems == []
    assert samples[0]["meta"]["label"] == "L" and samples[0]["data"] == b"\xff\xd8jpeg"


class _OneReadStream(io.RawIOBase):
    """A file object that hands out at most ``chunk`` bytes per read and records the largest read: a shard read
    as a stream never asks for the whole shard at once."""

    def __init__(self, data: bytes, chunk: int = 4096):
        self.data, self.pos, self.chunk, self.largest = data, 0, chunk, 0

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.chunk, len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        self.largest = max(self.largest, n)
        return n


def test_a_shard_is_read_one_member_at_a_time():
    big = [(f"k{i:03d}", bytes([i % 256]) * 50_000, {"label": "L"}) for i in range(40)]  # a 2 MB shard
    stream = _OneReadStream(_shard(big))
    seen = 0
    for kind, _item in archive.iter_shard(io.BufferedReader(stream, buffer_size=16384)):
        assert kind == "sample"
        seen += 1
        # When a sample is handed out, the stream has read at most one more member beyond it.
        assert stream.pos <= (seen + 1) * 2 * 51_200 + 10_240 * 2, (seen, stream.pos)
    assert seen == 40 and stream.largest <= 16384
