"""S3 faults, injected for real: a proxy in front of the moto server throttles (503 SlowDown), drops connections
mid-response and denies access; transient faults are survived with the same result, permanent ones fail fast
with a clear message and nothing written. See pipeline/io/storage.py for the retry layers these tests pin down.
Also here: credentials never reach logs, errors or run.json (an S3 run with distinctive fake credentials).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from faultproxy import FaultProxy
from zoo import make_corpus, tar_bytes, truncated_tar, write_tar_shard

# The shipped tiny demo CLIP: these tests are about storage, not the model.
MODEL_ARGS = ["--model", "demo", "--scorer", "heuristic", "--full-depth",
              "--batch-size", "4", "--no-progress", "--decode-tasks", "1"]


@pytest.fixture()
def proxy(s3_server, monkeypatch):
    """A fault proxy in front of moto; this process and the Ray workers it starts talk to S3 through it."""
    import s3fs

    with FaultProxy(s3_server) as px:
        monkeypatch.setenv("AWS_ENDPOINT_URL", px.url)
        s3fs.S3FileSystem.clear_instance_cache()
        yield px
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture()
def direct(s3_server):
    """An s3fs filesystem that bypasses the proxy: the ground truth of what is stored."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)


def record(name: str, **figures) -> None:
    """Print one line of figures for the reliability table and append it to $ICAR_RELIABILITY_FIGURES."""
    print(f"\nRELIABILITY {name} " + " ".join(f"{k}={v}" for k, v in figures.items()))
    path = os.environ.get("ICAR_RELIABILITY_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


def table(n: int = 2000) -> pa.Table:
    return pa.table({"key": [f"k{i}" for i in range(n)], "x": np.arange(n, dtype=np.float32)})


# ----------------------------------------------------------------------------------------------- storage layer


def test_throttling_on_writes_reads_and_heads_is_retried(proxy, s3_bucket, direct):
    from pipeline.io import storage

    url = f"s3://{s3_bucket}/t/a.parquet"
    put = proxy.add("slowdown", "PUT", r"/t/a\.parquet", count=3)
    storage.write_parquet(table(), url)
    head = proxy.add("slowdown", "HEAD", r"/t/a\.parquet", count=6)  # beyond botocore's 5 tries, s3fs adds none
    assert storage.exists(url)
    get = proxy.add("slowdown", "GET", r"/t/a\.parquet", count=3)
    assert storage.read_parquet(url).equals(table())
    assert (put.fired, head.fired, get.fired) == (3, 6, 3)
    assert direct.find(s3_bucket) == [f"{s3_bucket}/t/a.parquet"]  # no temporary or duplicate object
    record("s3-storage-throttling", faults=12, operations=3, survived=3)


def test_dropped_connections_on_writes_and_reads_are_retried(proxy, s3_bucket, direct):
    from pipeline.io import storage

    url = f"s3://{s3_bucket}/t/b.json"
    doc = {"rows": list(range(500))}
    lost = proxy.add("drop", "PUT", r"/t/b\.json", count=3)  # stored by the server, answer lost: PUT again
    reset = proxy.add("reset", "PUT", r"/t/b\.json", count=2)  # connection reset before the server saw it
    storage.write_json(doc, url)
    cut = proxy.add("drop", "GET", r"/t/b\.json", count=8)  # body cut halfway, more often than s3fs's 5 tries
    assert storage.read_json(url) == doc
    assert (lost.fired, reset.fired, cut.fired) == (3, 2, 8)
    with direct.open(f"{s3_bucket}/t/b.json") as f:
        assert f.read() == storage.json.dumps(doc, indent=2).encode() + b"\n"
    record("s3-storage-dropped-connections", faults=13, operations=2, survived=2)


def test_missing_bucket_fails_fast_and_clearly(proxy):
    from pipeline.io import storage

    t0 = time.monotonic()
    with pytest.raises(storage.MissingBucketError, match="bucket 'icar-no-such-bucket' does not exist: create it"):
        storage.check_writable("s3://icar-no-such-bucket/runs/r1")
    with pytest.raises(FileNotFoundError, match="does not exist"):  # still what s3fs callers expect
        storage.write_json({}, "s3://icar-no-such-bucket/runs/r1/run.json")
    assert time.monotonic() - t0 < 10
    assert len(proxy.requests("PUT")) == 2  # one try each: nothing to retry


def test_access_denied_fails_fast_with_no_partial_output(proxy, s3_bucket, direct):
    from pipeline.io import storage

    proxy.add("denied", "PUT", "/runs/", count=1000)
    proxy.add("denied", "HEAD", "/runs/", count=1000)
    t0 = time.monotonic()
    with pytest.raises(storage.StorageAccessError, match="access denied: check the credentials") as err:
        storage.check_writable(f"s3://{s3_bucket}/runs/r1")
    assert isinstance(err.value, PermissionError) and err.value.permanent
    with pytest.raises(storage.StorageAccessError, match=f"cannot check s3://{s3_bucket}/runs/r1/manifest.parquet"):
        storage.exists(f"s3://{s3_bucket}/runs/r1/manifest.parquet")  # s3fs's exists() would have said False
    seconds = time.monotonic() - t0
    assert seconds < 10
    assert proxy.faults("denied") == 2  # no retries of a permanent failure
    assert direct.find(s3_bucket) == []
    record("s3-access-denied", faults=2, requests=2, seconds=round(seconds, 2), partial_objects=0)


def test_throttling_that_never_ends_is_reported_not_retried_forever(proxy, s3_bucket, monkeypatch):
    import s3fs

    from pipeline.io import storage

    monkeypatch.setattr(storage, "STORE_BACKOFF_S", 0.05)
    proxy.add("slowdown", "PUT", "/t/", count=1000)
    # The client's own retries off (s3fs's and botocore's), so that the count below is this module's alone.
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    options = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
    with pytest.raises(storage.StorageError, match="still failing after 4 tries") as err:
        storage.write_json({}, f"s3://{s3_bucket}/t/c.json", options)
    assert not err.value.permanent
    assert proxy.faults("slowdown") == storage.STORE_ATTEMPTS


def test_storage_errors_cross_process_boundaries_intact():
    """A StorageError raised in a shard task reaches the driver through pickling: message, errno and class kept."""
    import pickle

    from ray import cloudpickle

    from pipeline.io import storage

    for cls in (storage.StorageError, storage.StorageFullError, storage.MissingBucketError,
                storage.StorageAccessError):
        e = cls("cannot write /x/part-00001.parquet: no space left (OSError: [Errno 28])", True, 28)
        for lib in (pickle, cloudpickle):
            back = lib.loads(lib.dumps(e))
            assert type(back) is cls and str(back) == str(e) and back.errno == 28 and back.permanent


# ----------------------------------------------------------------------------------------------- icar embed


@pytest.fixture()
def s3_corpus(s3_bucket, direct):
    """Three tar shards of four real images each, uploaded straight to moto (not through the proxy)."""
    rng = np.random.default_rng(3)
    for s in range(3):
        direct.pipe(f"{s3_bucket}/in/{s:05d}.tar", tar_bytes(make_corpus(rng, 4, prefix=f"s{s}-", max_side=96)))
    return s3_bucket


def read_s3_run(direct, run: str) -> tuple[pa.Table, pa.Table]:
    """Return (manifest, all committed rows) of a run directory on S3, read past the proxy."""
    direct.invalidate_cache()
    with direct.open(f"{run}/manifest.parquet") as f:
        manifest = pq.read_table(f)
    tables = []
    for out in manifest.column("output").to_pylist():
        with direct.open(f"{run}/{out}") as f:
            tables.append(pq.read_table(f))
    return manifest, pa.concat_tables(tables)


def embeddings_by_key(rows: pa.Table) -> dict[str, list]:
    keys = rows.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "duplicate keys in a run"
    return dict(zip(keys, rows.column("embedding").to_pylist()))


@pytest.mark.slow
def test_embed_survives_throttling_and_dropped_connections(proxy, s3_corpus, direct, ray_session):
    """The same run, clean and under faults on every kind of request it makes, gives identical rows."""
    from jobs.embed import main

    bucket = s3_corpus
    clean, faulty = f"s3://{bucket}/runs/clean", f"s3://{bucket}/runs/faulty"
    assert main([f"s3://{bucket}/in/*.tar", "--output", clean, *MODEL_ARGS]) == 0
    rules = [
        proxy.add("slowdown", "GET", r"/in/00000\.tar", count=4),  # input reads throttled
        proxy.add("drop", "GET", r"/in/00001\.tar", count=3),  # input read cut mid-body
        # More cuts than s3fs's 5 tries: the shard task fails and Ray runs it again (the task-retry layer).
        proxy.add("drop", "GET", r"/in/00002\.tar", count=7),
        proxy.add("slowdown", "PUT", "/runs/faulty/shards/", count=3),  # shard writes throttled
        proxy.add("drop", "PUT", "/runs/faulty/shards/", count=2),  # shard stored, answer lost
        proxy.add("slowdown", "PUT", r"/runs/faulty/manifest\.parquet", count=3),
        proxy.add("reset", "PUT", r"/runs/faulty/run\.json", count=2),
        proxy.add("slowdown", "HEAD", "/runs/faulty/", count=3),
    ]
    assert main([f"s3://{bucket}/in/*.tar", "--output", faulty, *MODEL_ARGS]) == 0
    assert [r.fired for r in rules] == [r.count for r in rules], "every planned fault was injected"
    m_clean, rows_clean = read_s3_run(direct, clean)
    m_faulty, rows_faulty = read_s3_run(direct, faulty)
    assert m_faulty.column("source").to_pylist() == m_clean.column("source").to_pylist()
    assert m_faulty.column("rows").to_pylist() == m_clean.column("rows").to_pylist() == [4, 4, 4]
    assert embeddings_by_key(rows_faulty) == embeddings_by_key(rows_clean)
    names = sorted(p.rsplit("/", 1)[-1] for p in direct.find(f"{bucket}/runs/faulty"))
    assert names == ["manifest.parquet", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet",
                     "run.json"]
    record("s3-embed-transient", faults=sum(r.fired for r in rules), runs=1, survived=1, rows=rows_faulty.num_rows,
           rows_lost=0, duplicates=0)


@pytest.mark.slow
def test_embed_with_inputs_denied_reports_every_shard(proxy, s3_corpus, direct, ray_session, capsys):
    from jobs.embed import main

    bucket = s3_corpus
    denied = proxy.add("denied", "GET", "/in/", count=1000)
    rc = main([f"s3://{bucket}/in/*.tar", "--output", f"s3://{bucket}/runs/denied", *MODEL_ARGS,
               "--shard-retries", "1"])
    captured = capsys.readouterr()
    err = captured.err
    # 1: shards failed. Nothing was committed, so there is no cost report to audit and no hint to run embed first.
    assert rc == 1, err
    assert "report:" not in captured.out and "refuses" not in err, captured.out + err
    for s in range(3):
        assert f"FAILED s3://{bucket}/in/{s:05d}.tar: " in err
    assert err.count("Access Denied") >= 3
    # Each shard is tried 1 + --shard-retries times (Ray's task retry) and each try stops at its first 403.
    assert denied.fired == 3 * 2
    direct.invalidate_cache()
    assert not direct.exists(f"{bucket}/runs/denied/manifest.parquet")
    assert not [p for p in direct.find(f"{bucket}/runs/denied") if "/shards/" in p]
    record("s3-inputs-denied", faults=denied.fired, shards_reported=3, partial_shards=0)


def test_embed_into_a_missing_bucket_is_a_clear_error(proxy, s3_corpus, direct, ray_session, capsys):
    from jobs.embed import main

    rc = main([f"s3://{s3_corpus}/in/*.tar", "--output", "s3://icar-missing-bucket/runs/r1", *MODEL_ARGS])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bucket 'icar-missing-bucket' does not exist" in err and "create it" in err
    assert "Traceback" not in err


def test_permanent_output_failures_stop_the_job_before_ray_starts(proxy, s3_corpus, direct, monkeypatch, capsys):
    """A missing bucket or denied writes end the job in about a second, before any cluster or model starts."""
    from jobs.embed import main
    from pipeline.embed import execution

    def no_ray(address):
        raise AssertionError("Ray was started before the output location was checked")

    monkeypatch.setattr(execution, "init_ray", no_ray)
    t0 = time.monotonic()
    assert main([f"s3://{s3_corpus}/in/*.tar", "--output", "s3://icar-missing-bucket/runs/r1", *MODEL_ARGS]) == 2
    assert "bucket 'icar-missing-bucket' does not exist" in capsys.readouterr().err
    proxy.add("denied", "PUT", "/runs/", count=1000)
    assert main([f"s3://{s3_corpus}/in/*.tar", "--output", f"s3://{s3_corpus}/runs/r2", *MODEL_ARGS]) == 2
    assert "access denied" in capsys.readouterr().err
    assert time.monotonic() - t0 < 20
    direct.invalidate_cache()
    assert not direct.exists(f"{s3_corpus}/runs")


# ----------------------------------------------------------------------------------------------- credentials

SECRET_ID = "AKIAICARFAKEKEY7RELI"
SECRET_KEY = "icarFAKEsecret/DoNotLog+0123456789abcdefXYZ"


@pytest.mark.slow
def test_credentials_never_appear_in_logs_errors_or_run_json(s3_server, monkeypatch, ray_session, capfd, caplog,
                                                             tmp_path):
    """Run `icar embed` on S3 with distinctive fake credentials, a failing shard and a denied bucket; the
    credentials appear in none of: this process's output and logs, the Ray session's log files, run.json,
    the manifest, the error rows."""
    import logging

    import boto3
    import s3fs

    from jobs.embed import main

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    s3fs.S3FileSystem.clear_instance_cache()
    caplog.set_level(logging.DEBUG)
    # Every logger at DEBUG for this test, whatever an earlier in-process CLI run set (it quiets the libraries).
    for name in ("pipeline", "jobs", "botocore", "s3fs", "aiobotocore", "urllib3", "fsspec"):
        caplog.set_level(logging.DEBUG, logger=name)
    bucket = "icar-secrets"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    rng = np.random.default_rng(2)
    write_tar_shard(tmp_path / "good.tar", make_corpus(rng, 3, max_side=64))
    truncated_tar(tmp_path / "bad.tar")
    fs.put(str(tmp_path / "good.tar"), f"{bucket}/in/good.tar")
    fs.put(str(tmp_path / "bad.tar"), f"{bucket}/in/bad.tar")
    run = f"s3://{bucket}/runs/r1"
    rc = main([f"s3://{bucket}/in/*.tar", "--output", run, *MODEL_ARGS, "--shard-retries", "0",
               "--storage-options", json.dumps({"key": SECRET_ID, "secret": SECRET_KEY})])
    assert rc != 0  # bad.tar failed
    rc2 = main([f"s3://{bucket}/in/*.tar", "--output", "s3://icar-no-such-bucket-secrets/r", *MODEL_ARGS])
    assert rc2 == 2
    out = capfd.readouterr()
    # This test turns the libraries' DEBUG logging on, and the CLI's handler prints it: botocore's DEBUG dump of
    # the signed request names the access key id (an identifier, not a secret). Such library DEBUG lines are
    # judged like the log records below; every other line, and the secret key everywhere, must be clean.
    library_debug = re.compile(r"^\S+ \S+ DEBUG (botocore|aiobotocore|urllib3|s3fs|fsspec)[\w.]*: ")
    err_lines = out.err.splitlines()
    texts = {"stdout": out.out,
             "stderr": "\n".join(ln for ln in err_lines if not library_debug.match(ln)),
             "stderr (library DEBUG lines, secret key only)": "\n".join(
                 ln.replace(SECRET_ID, "<access key id>") for ln in err_lines if library_debug.match(ln))}
    # Every log record, DEBUG included: the secret never. The access key id (an identifier, not a secret) is in
    # botocore's DEBUG dump of the signed request headers; it must not appear at INFO or above, nor from our code.
    for r in caplog.records:
        message = r.getMessage()
        ours = r.name.split(".")[0] in ("pipeline", "jobs", "icar")
        if SECRET_KEY in message or (SECRET_ID in message and (ours or r.levelno >= logging.INFO)):
            texts[f"log record of {r.name} at {r.levelname}"] = message
    fs.invalidate_cache()
    for path in fs.find(f"{bucket}/runs"):
        texts[path] = fs.cat_file(path).decode("latin-1")
    logs_dir = Path(ray_session._private.worker._global_node.get_logs_dir_path())
    time.sleep(1.0)  # let Ray's log writers flush
    for p in logs_dir.rglob("*"):
        if p.is_file():
            texts[str(p)] = p.read_bytes().decode("latin-1")
    assert len(texts) > 5 and len(caplog.records) > 50
    leaks = [where for where, text in texts.items() if SECRET_KEY in text or SECRET_ID in text]
    assert not leaks, f"credentials found in: {leaks}"
    record("credentials", places_searched=len(texts), log_records=len(caplog.records), leaks=0)
