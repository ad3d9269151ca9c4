"""Readers over real files (tar, Parquet, folders) on local disk and on a real S3 endpoint (moto on loopback)."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.readers import InputError, InputShard, Sample, ShardReadError, expand_inputs, iter_samples
from zoo import (NON_UTF8_CAPTION, NON_UTF8_CAPTION_DECODED, ShardSample, make_corpus, parquet_without_image_column,
                 tar_bytes, truncated_tar, write_image_folder, write_parquet_shard, write_tar_shard)


@pytest.fixture(scope="module")
def corpus() -> list[ShardSample]:
    return make_corpus(np.random.default_rng(0), 6, min_side=32, max_side=64)


def _read(shard: InputShard, **kw) -> list[Sample]:
    return list(iter_samples(shard, **kw))


def _only(urls, **kw) -> InputShard:
    shards = expand_inputs(urls, **kw)
    assert len(shards) == 1, shards
    return shards[0]


# ----------------------------------------------------------------------------------------------- formats


def test_tar_shard_roundtrip(tmp_path, corpus):
    path = write_tar_shard(tmp_path / "00000.tar", corpus)
    shard = _only([path])
    assert (shard.format, shard.uri, shard.size) == ("tar", str(path), os.path.getsize(path))
    assert shard.mtime and shard.mtime.endswith("+00:00") and shard.etag is None
    samples = _read(shard)
    assert [s.key for s in samples] == [c.key for c in corpus]
    for s, c in zip(samples, corpus):
        assert (s.data, s.caption, s.url, s.error, s.source) == (c.image, c.caption, c.url, None, str(path))


def test_parquet_shard_roundtrip_and_column_choices(tmp_path, corpus):
    plain = write_parquet_shard(tmp_path / "a.parquet", corpus)
    hf = write_parquet_shard(tmp_path / "b.parquet", corpus, image_column="image", hf_struct=True)
    custom = write_parquet_shard(tmp_path / "c.parquet", corpus, image_column="pixels_encoded")
    for path, kw in ((plain, {}), (hf, {}), (custom, {"image_column": "pixels_encoded"})):
        samples = _read(_only([path]), **kw)
        assert [(s.key, s.data, s.caption, s.url, s.error) for s in samples] == \
            [(c.key, c.image, c.caption, c.url, None) for c in corpus], path


def test_parquet_without_key_column_uses_stem_and_row(tmp_path, corpus):
    table = pa.table({"jpg": [c.image for c in corpus[:3]], "text": ["x", "y", "z"]})
    pq.write_table(table, tmp_path / "part-7.parquet", row_group_size=2)
    samples = _read(_only([str(tmp_path / "part-7.parquet")]))
    assert [s.key for s in samples] == ["part-7/0", "part-7/1", "part-7/2"]
    assert [s.caption for s in samples] == ["x", "y", "z"]  # caption from the "text" column


def test_parquet_null_image_is_an_error_sample_with_img2dataset_status(tmp_path, corpus):
    table = pa.table({
        "key": ["a", "b"], "jpg": pa.array([corpus[0].image, None], pa.binary()),
        "status": ["success", "failed_to_download"], "error_message": [None, "HTTP 404"],
    })
    pq.write_table(table, tmp_path / "s.parquet")
    good, bad = _read(_only([str(tmp_path / "s.parquet")]))
    assert good.error is None and good.data == corpus[0].image
    assert bad.data is None and "no image bytes" in bad.error and "failed_to_download" in bad.error
    assert "HTTP 404" in bad.error


def test_parquet_missing_image_column_names_columns_and_fix(tmp_path):
    path = parquet_without_image_column(tmp_path / "meta.parquet")
    with pytest.raises(ShardReadError) as e:
        _read(_only([path]))
    msg = str(e.value)
    assert "meta.parquet" in msg and "similarity" in msg and "caption" in msg and "--image-column" in msg
    with pytest.raises(ShardReadError, match="no column 'photo'"):
        _read(_only([path]), image_column="photo")
    with pytest.raises(ShardReadError, match="not image bytes"):
        _read(_only([path]), image_column="caption")


def test_corrupt_parquet_is_a_shard_error(tmp_path, corpus):
    path = write_parquet_shard(tmp_path / "x.parquet", corpus)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ShardReadError, match="not a readable Parquet file"):
        _read(_only([path]))


def test_folder_shard_keys_captions_and_junk(tmp_path, corpus):
    root = tmp_path / "photos"
    nested = [ShardSample(key=f"{'sub/deeper/' if i % 2 else ''}{c.key}", image=c.image, ext=c.ext, caption=c.caption)
              for i, c in enumerate(corpus)]
    expected = write_image_folder(root, nested)
    (root / "notes.md").write_text("not an image")
    (root / "._000000000.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS debris: skipped
    shard = _only([str(root)])
    assert shard.format == "folder" and shard.uri == f"{root}#0000000-0000999" and shard.etag.startswith("listing-")
    assert shard.size == sum(len(c.image) + len(c.caption) for c in corpus)
    samples = _read(shard)
    assert [s.key for s in samples] == expected
    assert "sub/deeper/000000001" in expected  # key = relative posix path without its extension, as in a tar
    by_key = {s.key: s for s in samples}
    for n, c in zip(nested, corpus):
        s = by_key[n.key]
        assert (s.data, s.caption, s.error) == (c.image, c.caption, None)


def test_folder_fingerprint_changes_when_a_file_changes(tmp_path, corpus):
    root = tmp_path / "f"
    write_image_folder(root, corpus[:2])
    before = _only([str(root)])
    (root / "000000001.png").write_bytes(corpus[3].image)
    after = _only([str(root)])
    assert before.etag != after.etag and before.uri == after.uri


# ----------------------------------------------------------------------------------------------- expansion


def test_expand_directory_glob_dedup_and_order(tmp_path, corpus):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_tar_shard(data / "b.tar", corpus[:2])
    write_tar_shard(data / "sub" / "a.tar", corpus[2:4])
    write_parquet_shard(data / "c.parquet", corpus[4:])
    (data / "README.md").write_text("shards")
    want = sorted([str(data / "b.tar"), str(data / "sub" / "a.tar"), str(data / "c.parquet")])
    assert [s.uri for s in expand_inputs([str(data)])] == want
    # the same shards named three ways come back once, sorted
    got = expand_inputs([str(data / "*.tar"), str(data / "b.tar"), str(data), str(data) + "/"])
    assert [s.uri for s in got] == want
    recursive = expand_inputs([str(data / "**" / "*.tar")])
    assert [s.uri for s in recursive] == [str(data / "b.tar"), str(data / "sub" / "a.tar")]
    assert [s.format for s in expand_inputs([str(data / "*.parquet")])] == ["parquet"]


def test_expand_subfolders_glob_gives_one_folder_shard_each(tmp_path, corpus):
    write_image_folder(tmp_path / "imgs" / "2020", corpus[:2])
    write_image_folder(tmp_path / "imgs" / "2021", corpus[2:4])
    assert [s.format for s in expand_inputs([str(tmp_path / "imgs")])] == ["folder"]
    per_year = expand_inputs([str(tmp_path / "imgs" / "*")])
    assert [s.uri for s in per_year] == [f"{tmp_path}/imgs/2020#0000000-0000999", f"{tmp_path}/imgs/2021#0000000-0000999"]
    # keys are relative to the input root (imgs/), so the two years' files never share a key
    assert [[x.key for x in _read(s)] for s in per_year] == [[f"2020/{c.key}" for c in corpus[:2]],
                                                            [f"2021/{c.key}" for c in corpus[2:4]]]


def test_expand_errors_name_the_url(tmp_path, corpus):
    with pytest.raises(InputError, match="nope.*does not exist"):
        expand_inputs([str(tmp_path / "nope")])
    with pytest.raises(InputError, match=r"\*\.tar matched nothing"):
        expand_inputs([str(tmp_path / "*.tar")])
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(InputError, match="unknown input format.*a.csv"):
        expand_inputs([str(tmp_path / "a.csv")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.md").write_text("x")
    with pytest.raises(InputError, match="holds no .tar, .parquet or image files"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(InputError, match="no input given"):
        expand_inputs([])


# ----------------------------------------------------------------------------------------------- tar details


def _tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_keys_captions_and_per_sample_errors(tmp_path, corpus):
    jpg, png = corpus[0].image, corpus[1].image
    data = _tar_of([
        ("./a.b/000001.jpg", jpg), ("./a.b/000001.txt", b"dotted dir"),  # key keeps the dotted directory
        ("000002.jpg", jpg), ("000002.txt", NON_UTF8_CAPTION), ("000002.json", b'{"url": "http://x/2"}'),
        ("000003.json", b'{"url": "http://x/3", "caption": "from json"}'),  # no image member
        ("000004.seg.png", png), ("000004.jpg", jpg), ("000004.cls", b"3"),  # mask beside the image
        ("000005.webp", png), ("000005.json", b"{not json"),  # bad metadata: image still used
        ("000002.jpg", jpg),  # key seen again, not adjacent
    ])
    (tmp_path / "t.tar").write_bytes(data)
    samples = _read(_only([str(tmp_path / "t.tar")]))
    assert [s.key for s in samples] == ["a.b/000001", "000002", "000003", "000004", "000005", "000002"]
    s1, s2, s3, s4, s5, dup = samples
    assert (s1.data, s1.caption, s1.error) == (jpg, "dotted dir", None)
    assert (s2.caption, s2.url) == (NON_UTF8_CAPTION_DECODED, "http://x/2") and "\ufffd" in s2.caption
    assert s3.data is None and "no image member" in s3.error and "json" in s3.error
    assert (s3.url, s3.caption) == ("http://x/3", "from json")
    assert s4.data == jpg and s4.error is None
    assert s5.data == png and s5.url is None and s5.error is None
    assert dup.data is None and "duplicate key '000002'" in dup.error and "first one was kept" in dup.error


def test_truncated_tar_yields_good_samples_then_raises(tmp_path):
    good_keys = truncated_tar(tmp_path / "cut.tar")
    it = iter_samples(_only([str(tmp_path / "cut.tar")]))
    got = []
    with pytest.raises(ShardReadError) as e:
        for s in it:
            got.append(s.key)
    assert got == good_keys and len(good_keys) == 4
    assert "cut.tar" in str(e.value) and "truncated" in str(e.value) and "after 4 complete samples" in str(e.value)


@pytest.mark.parametrize("damage", ["at_member_boundary", "inside_header", "garbage_header", "empty", "not_a_tar"])
def test_damaged_tars_are_shard_errors(tmp_path, corpus, damage):
    full = tar_bytes(corpus[:3])
    with tarfile.open(fileobj=io.BytesIO(full)) as tf:
        second = tf.getmembers()[3]  # first member of the second sample
    data = {
        "at_member_boundary": full[: second.offset],  # no end-of-archive block: tarfile alone would not notice
        "inside_header": full[: second.offset + 100],
        "garbage_header": full[: second.offset] + b"x" * 512 + full[second.offset + 512:],
        "empty": b"",
        "not_a_tar": b"<html>" * 300,
    }[damage]
    (tmp_path / "d.tar").write_bytes(data)
    with pytest.raises(ShardReadError, match="d.tar"):
        _read(_only([str(tmp_path / "d.tar")]))


def test_gzipped_tar_and_its_truncation(tmp_path, corpus):
    gz = gzip.compress(tar_bytes(corpus))
    (tmp_path / "a.tar.gz").write_bytes(gz)
    (tmp_path / "b.tgz").write_bytes(gz[: len(gz) // 2])
    a, b = expand_inputs([str(tmp_path)])
    assert [s.key for s in _read(a)] == [c.key for c in corpus]
    with pytest.raises(ShardReadError, match="b.tgz"):
        _read(b)


# ----------------------------------------------------------------------------------------------- streaming


def test_tar_is_streamed_lazily_with_bounded_memory(tmp_path):
    rng = np.random.default_rng(1)
    n, member = 120, 128 * 1024
    write_tar_shard(tmp_path / "big.tar", [ShardSample(f"{i:06d}", rng.bytes(member), caption="c") for i in range(n)])
    shard = _only([str(tmp_path / "big.tar")])
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_samples(shard))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 8 * member, f"peak {peak} bytes for a {n * member}-byte shard: not streaming"

    # Lazy: after the first sample, cut the file on disk; the reader only notices when it gets there.
    it = iter_samples(shard)
    first = next(it)
    assert first.key == "000000"
    os.truncate(tmp_path / "big.tar", 40 * member)
    with pytest.raises(ShardReadError):
        for _ in it:
            pass


def test_parquet_memory_is_bounded_by_row_group_not_file(tmp_path):
    rng = np.random.default_rng(2)
    n, image = 200, 32 * 1024
    samples = [ShardSample(f"{i:06d}", rng.bytes(image)) for i in range(n)]
    write_parquet_shard(tmp_path / "big.parquet", samples, row_group_size=10)
    base, high, count = pa.total_allocated_bytes(), 0, 0
    for s in iter_samples(_only([str(tmp_path / "big.parquet")])):
        count += 1
        high = max(high, pa.total_allocated_bytes() - base)
    assert count == n
    assert high < 0.25 * n * image, f"{high} bytes of Arrow memory held for a {n * image}-byte file"


# ----------------------------------------------------------------------------------------------- S3


def test_s3_glob_tar_parquet_and_folder(s3_bucket, corpus):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.pipe({
        f"{s3_bucket}/shards/00000.tar": tar_bytes(corpus[:3]),
        f"{s3_bucket}/shards/00001.tar": tar_bytes(corpus[3:]),
        f"{s3_bucket}/shards/notes.txt": b"ignored by the glob",
    })
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["p0"], "jpg": [corpus[0].image]}), buf)
    fs.pipe(f"{s3_bucket}/pq/part.parquet", buf.getvalue())
    fs.pipe({f"{s3_bucket}/imgs/a/{c.key}.{c.ext}": c.image for c in corpus[:2]})

    shards = expand_inputs([f"s3://{s3_bucket}/shards/*.tar"])
    assert [s.uri for s in shards] == [f"s3://{s3_bucket}/shards/00000.tar", f"s3://{s3_bucket}/shards/00001.tar"]
    for s in shards:
        info = fs.info(s.uri)
        assert s.format == "tar" and s.size == info["size"] and s.etag == info["ETag"].strip('"') and s.mtime
    samples = [x for s in shards for x in iter_samples(s)]
    assert [(x.key, x.data, x.caption) for x in samples] == [(c.key, c.image, c.caption) for c in corpus]
    assert samples[0].source == f"s3://{s3_bucket}/shards/00000.tar"

    (p,) = expand_inputs([f"s3://{s3_bucket}/pq"])
    assert p.format == "parquet" and [x.key for x in iter_samples(p)] == ["p0"]
    (folder,) = expand_inputs([f"s3://{s3_bucket}/imgs"])
    assert folder.format == "folder" and folder.uri == f"s3://{s3_bucket}/imgs#0000000-0000999"
    assert [x.key for x in iter_samples(folder)] == [f"a/{c.key}" for c in corpus[:2]]

    with pytest.raises(InputError, match=f"s3://{s3_bucket}/nothing/\\*.tar matched nothing"):
        expand_inputs([f"s3://{s3_bucket}/nothing/*.tar"])
    with pytest.raises(InputError, match="does not exist"):
        expand_inputs([f"s3://{s3_bucket}/missing.tar"])


def test_img2dataset_metadata_parquet_beside_tar_is_not_a_shard(tmp_path):
    """img2dataset writes 00000.parquet (metadata, no image bytes) beside 00000.tar: only the tar is a shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.io.readers import expand_inputs

    rng = np.random.default_rng(0)
    write_tar_shard(tmp_path / "00000.tar", make_corpus(rng, 2))
    pq.write_table(pa.table({"key": ["a"], "status": ["success"]}), tmp_path / "00000.parquet")
    pq.write_table(pa.table({"key": ["b"], "jpg": [b"x"]}), tmp_path / "other.parquet")
    uris = [s.uri for s in expand_inputs([str(tmp_path)])]
    assert uris == [str(tmp_path / "00000.tar"), str(tmp_path / "other.parquet")]


# ----------------------------------------------------------------------------------------------- bad inputs (issue 18)


SECRET = b"TOP-SECRET-" * 8  # the content of a file outside the input: no byte of it may reach any output


def _no_secret(samples: list[Sample]) -> None:
    for s in samples:
        for v in (s.data, s.caption, s.url, s.error, s.key):
            text = v if isinstance(v, bytes) else (v or "").encode("utf-8", "surrogateescape")
            assert b"TOP-SECRET" not in text, s


def test_folder_symlink_outside_the_input_is_refused_and_never_read(tmp_path, corpus):
    (tmp_path / "secret.jpg").write_bytes(SECRET)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "far.jpg").write_bytes(SECRET)
    root = tmp_path / "in"
    write_image_folder(root, corpus[:2])
    a = f"{corpus[0].key}.{corpus[0].ext}"
    (root / "x.jpg").symlink_to(tmp_path / "secret.jpg")  # an image linked from outside
    (root / "y.jpg").write_bytes(corpus[2].image)
    (root / "y.txt").symlink_to(tmp_path / "secret.jpg")  # its caption linked from outside
    (root / "inner.jpg").symlink_to(root / a)  # a link that stays inside the input: read
    (root / "outdir").symlink_to(tmp_path / "elsewhere")  # a folder outside: not even listed
    (root / "loop").symlink_to(root)  # a link back up the tree: not walked twice
    samples = _read(_only([str(root)]))
    _no_secret(samples)
    # y.txt's refusal is keyed by the sample it belongs to (y), beside y's own row; its message names the file
    by_key = {(s.key, s.error is None): s for s in samples}
    assert sorted(s.key for s in samples) == sorted([corpus[0].key, corpus[1].key, "inner", "x", "y", "y"])
    for key, link in (("x", "x.jpg"), ("y", "y.txt")):
        bad = by_key[key, False]
        assert bad.data is None and "symlink outside the input" in bad.error
        assert bad.error.startswith(f"{link}:") and "--follow-symlinks" in bad.error
    y = by_key["y", True]
    assert (y.data, y.caption, y.error) == (corpus[2].image, None, None)
    assert by_key["inner", True].data == corpus[0].image

    followed = {s.key: s for s in _read(_only([str(root)], follow_symlinks=True), follow_symlinks=True)}
    assert followed["x"].data == SECRET and followed["y"].caption == SECRET.decode()
    assert followed["outdir/far"].data == SECRET

    # A link swapped in after the listing is caught when the file is read.
    shard = _only([str(root)])
    (root / "y.jpg").unlink()
    (root / "y.jpg").symlink_to(tmp_path / "secret.jpg")
    late = {s.key: s for s in _read(shard)}
    _no_secret(list(late.values()))
    assert late["y"].data is None and "symlink outside the input" in late["y"].error


def test_non_utf8_and_percent_names_become_lossless_keys(tmp_path, corpus):
    from urllib.parse import unquote_to_bytes

    root = tmp_path / "names"
    root.mkdir()
    names = [b"caf\xe9.jpg", b"100%.jpg", b"ok.jpg", "日本.jpg".encode()]
    for name, c in zip(names, corpus):
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(c.image)
    samples = _read(_only([str(root)]))
    keys = [s.key for s in samples]
    assert sorted(keys) == sorted(["caf%E9", "100%25", "ok", "日本"])
    assert {unquote_to_bytes(s.key) + b".jpg": s.data for s in samples} == {n: c.image for n, c in zip(names, corpus)}
    pa.array(keys, pa.string())  # what the shard and errors/ writers do with keys: no UnicodeEncodeError

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for name, data in [("a.jpg", corpus[0].image), (os.fsdecode(b"caf\xe9.jpg"), corpus[1].image),
                           (os.fsdecode(b"caf\xe9.txt"), b"a caption"), (os.fsdecode(b"d\xff/x.bin"), b"?"),
                           ("z.jpg", corpus[2].image)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "n.tar").write_bytes(buf.getvalue())
    samples = _read(_only([str(tmp_path / "n.tar")]))
    assert [(s.key, s.data, s.caption) for s in samples] == [
        ("a", corpus[0].image, None), ("caf%E9", corpus[1].image, "a caption"), ("d%FF/x", None, None),
        ("z", corpus[2].image, None)]
    assert "d%FF/x.bin" in samples[2].error
    pa.array([s.key for s in samples] + [s.error or "" for s in samples], pa.string())


class _Zeros(io.RawIOBase):
    """A file object of ``size`` zero bytes, produced as read (so a test can write a huge member in little memory)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def test_oversize_tar_member_is_refused_from_its_header_with_flat_memory(tmp_path, corpus):
    big = (256 << 20) + (44 << 20)  # just over the default --max-sample-bytes (256 MiB): 300 MiB of zeros, ~0.3 MB gz
    path = tmp_path / "bomb.tar.gz"
    with gzip.open(path, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tf:
        for name, size, data in [("a.jpg", len(corpus[0].image), io.BytesIO(corpus[0].image)),
                                 ("big.jpg", big, _Zeros(big)), ("big.txt", 3, io.BytesIO(b"cap")),
                                 ("c.jpg", len(corpus[1].image), io.BytesIO(corpus[1].image))]:
            info = tarfile.TarInfo(name)
            info.size = size
            tf.addfile(info, data)
    assert os.path.getsize(path) < 2 << 20
    shard = _only([str(path)])
    tracemalloc.start()
    try:
        samples = _read(shard)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [s.key for s in samples] == ["a", "big", "c"]
    a, b, c = samples
    assert (a.data, c.data) == (corpus[0].image, corpus[1].image)
    assert b.data is None and b.caption == "cap"
    assert "'big.jpg'" in b.error and f"{big:,} bytes" in b.error and "--max-sample-bytes" in b.error
    assert peak < 32 << 20, f"peak {peak / 2**20:.0f} MiB to skip a {big >> 20} MiB member: it was read"


def test_oversize_folder_file_and_parquet_cell_are_error_samples(tmp_path, corpus):
    write_image_folder(tmp_path / "f", corpus[:3])
    cap = sorted(len(c.image) for c in corpus[:3])[1]  # the middle size: one image over, one at, one under
    samples = _read(_only([str(tmp_path / "f")]), max_sample_bytes=cap)
    over = [s for s in samples if s.error]
    assert len(over) == 1 and over[0].data is None and "--max-sample-bytes" in over[0].error
    assert [s.data for s in samples if not s.error] == [c.image for c in corpus[:3] if len(c.image) <= cap]
    path = write_parquet_shard(tmp_path / "p.parquet", corpus[:3])
    samples = _read(_only([path]), max_sample_bytes=cap)
    assert [s.error is None for s in samples] == [len(c.image) <= cap for c in corpus[:3]]


def _process(shard: InputShard, run) -> tuple[list[str], list[tuple[str, str]]]:
    """Return (embedded keys, (key, error) rows) that execution.process_shard commits for ``shard``, no Ray: the
    model is a stand-in that returns a fixed vector per image."""
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.execution import ModelFacts, process_shard

    def fetch(n):
        return {"seconds": 0.0, "embedding": np.ones((n, 4), np.float32), "complexity": np.zeros(n, np.float32),
                "exit_layer": np.ones(n, np.int16), "gflops": np.zeros(n, np.float32)}

    cfg = EmbedConfig(inputs=[], output=str(run), progress=False)
    row = process_shard(shard, 0, cfg, ModelFacts(32, 4, 0.0), lambda pixels, keys: len(keys), fetch)
    shards = pq.read_table(run / row["output"]).column("key").to_pylist()
    errors = pq.read_table(run / "errors" / "part-00000.parquet").to_pylist()
    return shards, [(e["key"], e["error"]) for e in errors]


def test_repeated_key_in_a_tar_is_reported_like_parquet(tmp_path, corpus):
    first, second, other = corpus[0].image, corpus[1].image, corpus[2].image
    (tmp_path / "t.tar").write_bytes(_tar_of([("a.jpg", first), ("a.jpg", second), ("b.jpg", other)]))
    samples = _read(_only([str(tmp_path / "t.tar")]))
    assert [(s.key, s.data) for s in samples] == [("a", first), ("a", None), ("b", other)]  # the first one is kept
    pq.write_table(pa.table({"key": ["a", "a", "b"], "jpg": [first, second, other]}), tmp_path / "t.parquet")
    for name in ("t.tar", "t.parquet"):
        shard = _only([str(tmp_path / name)])
        keys, errors = _process(shard, tmp_path / f"run-{name}")
        assert keys == ["a", "b"]
        assert errors == [("a", f"duplicate key 'a' in {shard.uri}; the first one was kept")]


def test_folder_is_cut_into_resumable_shards_and_changes_are_reported(tmp_path, corpus, caplog):
    from pipeline.io.rundir import assign_parts

    root = tmp_path / "many"
    keys = write_image_folder(root, corpus)  # 6 images
    shards = expand_inputs([str(root)], folder_shard_size=4)
    assert [s.uri for s in shards] == [f"{root}#0000000-0000003", f"{root}#0000004-0000007"]
    assert [s.key for s in shards for s in _read(s)] == sorted(keys)
    assert expand_inputs([str(root)], folder_shard_size=4) == shards  # a resumed run finds the same shards

    class Committed:  # a manifest that committed both shards as they are now
        rows = [{"source": s.uri, "part": i, "source_size": s.size, "source_mtime": s.mtime, "source_etag": s.etag}
                for i, s in enumerate(shards)]
        committed = {r["source"]: r for r in rows}

        def next_part(self):
            return 2

    assert assign_parts(shards, Committed()) == []
    (root / "0-first.jpg").write_bytes(corpus[0].image)  # sorts first: every shard's files shift by one
    changed = expand_inputs([str(root)], folder_shard_size=4)
    assert [s.uri for s in changed] == [s.uri for s in shards] and all(
        a.etag != b.etag for a, b in zip(changed, shards))
    with caplog.at_level("WARNING", logger="pipeline.embed.execution"):
        assert assign_parts(changed, Committed()) == []
    assert "2 committed input shard(s) changed" in caplog.text and "--reembed-changed" in caplog.text
    assert [p for _, p in assign_parts(changed, Committed(), reembed_changed=True)] == [0, 1]


def test_one_key_and_caption_rule_across_tar_folder_and_parquet(tmp_path, corpus):
    """The same image with the same caption file gives the same key and caption whichever layout holds it."""
    img = corpus[0].image
    caption = b"  a red bicycle\r\n"  # as editors save it: trailing newline (CRLF), stray spaces
    (tmp_path / "t.tar").write_bytes(_tar_of([("sub/cat.jpg", img), ("sub/cat.txt", caption),
                                              ("sub/dog.jpg", img), ("sub/dog.txt", b"\n \n"),
                                              ("sub/eel.jpg", img), ("sub/eel.json", b'{"caption": "an eel"}'),
                                              ("sub/eel.txt", b" ")]))
    folder = tmp_path / "f" / "sub"
    folder.mkdir(parents=True)
    (folder / "cat.jpg").write_bytes(img)
    (folder / "cat.txt").write_bytes(caption)
    (folder / "dog.jpg").write_bytes(img)
    (folder / "dog.json").write_bytes(b'{"caption": "\\n"}')  # a blank caption is no caption
    (folder / "eel.jpg").write_bytes(img)
    (folder / "eel.txt").write_bytes(b"\n")  # a blank .txt does not hide the .json's caption
    (folder / "eel.json").write_bytes(b'{"caption": "an eel "}')
    pq.write_table(pa.table({"key": ["sub/cat", "sub/dog", "sub/eel"], "jpg": [img, img, img],
                             "caption": [caption.decode(), " ", "an eel\n"]}), tmp_path / "p.parquet")
    for url in (tmp_path / "t.tar", tmp_path / "f", tmp_path / "p.parquet"):
        got = [(s.key, s.caption, s.error) for s in _read(_only([str(url)]))]
        assert got == [("sub/cat", "a red bicycle", None), ("sub/dog", None, None), ("sub/eel", "an eel", None)], url


def test_folder_images_differing_only_in_extension_keep_one_and_report_the_other(tmp_path, corpus):
    root = tmp_path / "f"
    root.mkdir()
    (root / "a.png").write_bytes(corpus[1].image)
    (root / "a.jpg").write_bytes(corpus[0].image)  # jpg wins, as a tar sample holding a.jpg and a.png picks it
    (root / "a.txt").write_bytes(b"the caption\n")
    (root / "b.webp").write_bytes(corpus[2].image)
    samples = _read(_only([str(root)]))
    assert [(s.key, s.data, s.caption) for s in samples] == [
        ("a", corpus[0].image, "the caption"), ("a", None, None), ("b", corpus[2].image, None)]
    assert samples[1].error == ("duplicate key 'a': a.png and a.jpg differ only in their extension; a.jpg was kept "
                                "(rename one of them)")
