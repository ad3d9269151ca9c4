"""Shared fixtures: one real local Ray for the whole session, one real S3 endpoint (moto) on loopback."""

from __future__ import annotations

import logging
import os
import socket
import sys

import pytest

# Test helpers (the zoo of broken files, the tiny CLIP, the fault proxy) import by their module names.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray instance shared by every test that needs one (ray.init costs ~5 s)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # One CPU more than the machine has, so a model actor and read/decode tasks always fit
        # beside each other on a 2-core box.
        # address="local": always a fresh instance of our own, never another process's cluster on this machine.
        ray.init(address="local", num_cpus=(os.cpu_count() or 2) + 1, include_dashboard=False, log_to_driver=True,
                 logging_level=logging.WARNING)
    yield ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto server) on 127.0.0.1; sets the standard AWS environment variables.

    Yields the endpoint URL. Fake credentials are set so botocore never looks for real ones, and Ray
    workers started after this fixture inherit them through the environment.
    """
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in
             ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing-key-id",
                      AWS_SECRET_ACCESS_KEY="testing-secret-key", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the moto server; yields its name."""
    boto3 = pytest.importorskip("boto3")
    name = "icar-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield name
