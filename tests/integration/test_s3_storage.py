"""action3d.storage against S3 servers on loopback (moto in server mode, over HTTP): single objects through boto3's
transfer manager, a size bound checked before any byte moves, and one clear error for every way S3 refuses."""

from __future__ import annotations

import os

import boto3
import pytest

from action3d import storage
from action3d.storage import S3Config, StorageError, TooLarge
from tests.helpers import moto

pytestmark = pytest.mark.integration


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_upload_download_list_round_trip_is_byte_identical(s3_bucket, s3_env, tmp_path):
    big = write(tmp_path / "big.bin", os.urandom(20 * 1024**2 + 3))  # over the multipart threshold: in parts
    small = write(tmp_path / "small.bin", b"a checkpoint")
    assert storage.upload(big, f"s3://{s3_bucket}/run/big.bin") == f"s3://{s3_bucket}/run/big.bin"
    storage.upload(small, f"s3://{s3_bucket}/run/small.bin")
    assert storage.list_objects(f"s3://{s3_bucket}/run/") == {"run/big.bin": big.stat().st_size,
                                                              "run/small.bin": small.stat().st_size}
    back = storage.download(f"s3://{s3_bucket}/run/big.bin", tmp_path / "out" / "big.bin")
    assert back.read_bytes() == big.read_bytes()
    assert sorted(p.name for p in back.parent.iterdir()) == ["big.bin"]  # no temporary file left beside it

    with pytest.raises(TooLarge, match="over the limit of 1000"):
        storage.download(f"s3://{s3_bucket}/run/big.bin", tmp_path / "bounded" / "big.bin", max_bytes=1000)
    assert not (tmp_path / "bounded").exists() or not any((tmp_path / "bounded").iterdir())


def test_missing_bucket_and_object_are_named(s3_env, s3_bucket, tmp_path):
    source = write(tmp_path / "f.bin", b"x")
    for action in (lambda: storage.upload(source, "s3://no-such-bucket/k"),
                   lambda: storage.download("s3://no-such-bucket/k", tmp_path / "out" / "f.bin"),
                   lambda: storage.check_bucket("s3://no-such-bucket/p")):
        with pytest.raises(StorageError) as caught:
            action()
        message = str(caught.value)
        assert "no-such-bucket" in message and s3_env.endpoint_url in message
    with pytest.raises(StorageError, match=f"No object s3://{s3_bucket}/nothing/here"):
        storage.download(f"s3://{s3_bucket}/nothing/here", tmp_path / "out" / "x")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory):
    """A moto server that checks signatures, with one user allowed everything on S3: (server, key id, secret)."""
    # Moto lets the first N requests through unsigned: exactly the three that create the user.
    with moto(tmp_path_factory.mktemp("moto-iam") / "moto.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as server:
        iam = boto3.client("iam", endpoint_url=server.endpoint_url, region_name="us-east-1",
                           aws_access_key_id="x", aws_secret_access_key="x")
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'))
        yield server, key["AccessKeyId"], key["SecretAccessKey"]


def test_wrong_credentials_are_one_clear_error(iam_s3, tmp_path):
    server, key_id, secret = iam_s3
    server.client(aws_access_key_id=key_id, aws_secret_access_key=secret).create_bucket(Bucket="guarded")
    good = S3Config(endpoint_url=server.endpoint_url, region="us-east-1", access_key_id=key_id,
                    secret_access_key=secret)
    storage.upload(write(tmp_path / "f.bin", b"checkpoint"), "s3://guarded/f.bin", config=good)
    for wrong in (S3Config(endpoint_url=server.endpoint_url, access_key_id=key_id, secret_access_key="wrong"),
                  S3Config(endpoint_url=server.endpoint_url, access_key_id="AKIAUNKNOWN", secret_access_key="x")):
        with pytest.raises(StorageError) as caught:
            storage.download("s3://guarded/f.bin", tmp_path / "out" / "f.bin", config=wrong)
        message = str(caught.value)
        assert "'guarded'" in message and server.endpoint_url in message and "AWS_SECRET_ACCESS_KEY" in message
    assert not (tmp_path / "out").exists()


def test_an_endpoint_that_went_down_fails_naming_it(tmp_path):
    with moto(tmp_path / "moto.log") as server:
        config = S3Config(endpoint_url=server.endpoint_url, access_key_id="testing", secret_access_key="testing",
                          max_attempts=1)
        server.client().create_bucket(Bucket="gone")
        storage.upload(write(tmp_path / "f.bin", b"x"), "s3://gone/f.bin", config=config)
    with pytest.raises(StorageError) as caught:
        storage.download("s3://gone/f.bin", tmp_path / "out" / "f.bin", config=config)
    message = str(caught.value)
    assert server.endpoint_url in message and "'gone'" in message and "AWS_ENDPOINT_URL" in message
    assert not (tmp_path / "out").exists()
