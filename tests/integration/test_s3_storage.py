"""action3d.storage against a real S3 server (moto) on loopback: round trips, only-changed sync, resume, errors."""

import hashlib
import os

import boto3
import pytest
import torch
from boto3.s3.transfer import TransferConfig

from action3d import storage
from action3d.storage import S3Config, StorageError

pytestmark = pytest.mark.integration

MiB = 1024**2
SMALL_PARTS = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2)


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def tree(root):
    """{relative path: bytes} of every file below root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_upload_download_round_trip_is_byte_identical_and_skips_unchanged(s3_bucket, tmp_path):
    for size in (1000, 12 * MiB + 123):  # one put_object, one multipart upload of three parts
        source = write(tmp_path / f"src-{size}.bin", os.urandom(size))
        uri = f"s3://{s3_bucket}/files/{source.name}"

        sent = storage.upload(source, uri, transfer=SMALL_PARTS, progress=False)
        assert (sent.skipped, sent.bytes_moved, sent.size) == (False, size, size)
        head = boto3.client("s3").head_object(Bucket=s3_bucket, Key=f"files/{source.name}")
        assert head["Metadata"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert storage.upload(source, uri, transfer=SMALL_PARTS, progress=False).skipped

        target = tmp_path / f"out-{size}" / source.name
        got = storage.download(uri, target, progress=False)
        assert (got.skipped, got.bytes_moved) == (False, size)
        assert target.read_bytes() == source.read_bytes()
        assert storage.download(uri, target, progress=False).skipped
        assert [p.name for p in target.parent.iterdir()] == [target.name]  # no in-progress file left


def test_sync_moves_only_changed_files(s3_bucket, tmp_path):
    local = tmp_path / "raw"
    write(local / "a.bin", os.urandom(50_000))
    write(local / "class1" / "v1.mp4", os.urandom(20_000))
    write(local / "class1" / "deep" / "v2.mp4", b"")
    write(local / "big.bin", os.urandom(6 * MiB))
    prefix = f"s3://{s3_bucket}/datasets/raw"

    first = storage.sync_up(local, prefix, transfer=SMALL_PARTS, progress=False)
    assert [t.uri for t in first] == [f"{prefix}/{k}" for k in ("a.bin", "big.bin", "class1/deep/v2.mp4",
                                                                 "class1/v1.mp4")]
    assert not any(t.skipped for t in first)
    again = storage.sync_up(local, prefix, transfer=SMALL_PARTS, progress=False)
    assert all(t.skipped for t in again) and sum(t.bytes_moved for t in again) == 0

    # A change that keeps the size is caught by the checksum, and a new file moves; nothing else does.
    write(local / "a.bin", os.urandom(50_000))
    write(local / "class2" / "v3.mp4", b"new video")
    moved = {t.uri for t in storage.sync_up(local, prefix, transfer=SMALL_PARTS, progress=False) if not t.skipped}
    assert moved == {f"{prefix}/a.bin", f"{prefix}/class2/v3.mp4"}

    pulled = tmp_path / "pulled"
    down = storage.sync_down(prefix, pulled, transfer=SMALL_PARTS, progress=False)
    assert tree(pulled) == tree(local) and not any(t.skipped for t in down)
    assert all(t.skipped for t in storage.sync_down(prefix, pulled, progress=False))

    write(pulled / "class1" / "v1.mp4", os.urandom(20_000))  # local damage of the same size
    repaired = [t for t in storage.sync_down(prefix + "/", pulled, progress=False) if not t.skipped]
    assert [t.local_path for t in repaired] == [pulled / "class1" / "v1.mp4"]
    assert tree(pulled) == tree(local)


def test_interrupted_multipart_upload_resumes_with_missing_parts_only(s3_bucket, tmp_path):
    part = 5 * MiB
    source = write(tmp_path / "video.bin", os.urandom(3 * part - 1000))
    data, key = source.read_bytes(), "resume/video.bin"
    sha256 = hashlib.sha256(data).hexdigest()
    s3 = boto3.client("s3")
    # What an upload killed after two parts leaves: an unfinished multipart upload holding them.
    upload_id = s3.create_multipart_upload(Bucket=s3_bucket, Key=key, Metadata={"sha256": sha256})["UploadId"]
    for number in (1, 2):
        s3.upload_part(Bucket=s3_bucket, Key=key, UploadId=upload_id, PartNumber=number,
                       Body=data[(number - 1) * part: number * part])

    result = storage.upload(source, f"s3://{s3_bucket}/{key}", transfer=SMALL_PARTS, progress=False)

    assert result.bytes_moved == len(data) - 2 * part  # only the third part was sent
    assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == data
    assert s3.head_object(Bucket=s3_bucket, Key=key)["Metadata"] == {"sha256": sha256}
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_resumed_upload_without_our_checksum_is_redone(s3_bucket, tmp_path):
    """Parts that match but an upload started elsewhere (no checksum metadata): the result must still carry it."""
    part = 5 * MiB
    source = write(tmp_path / "video.bin", os.urandom(2 * part + 10))
    data, key = source.read_bytes(), "foreign/video.bin"
    s3 = boto3.client("s3")
    upload_id = s3.create_multipart_upload(Bucket=s3_bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=s3_bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=data[:part])

    storage.upload(source, f"s3://{s3_bucket}/{key}", transfer=SMALL_PARTS, progress=False)

    assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == data
    assert s3.head_object(Bucket=s3_bucket, Key=key)["Metadata"] == {"sha256": hashlib.sha256(data).hexdigest()}
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_unfinished_upload_of_other_content_is_discarded(s3_bucket, tmp_path):
    part = 5 * MiB
    source = write(tmp_path / "video.bin", os.urandom(2 * part + 10))
    key = "stale/video.bin"
    s3 = boto3.client("s3")
    upload_id = s3.create_multipart_upload(Bucket=s3_bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=s3_bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=os.urandom(part))

    result = storage.upload(source, f"s3://{s3_bucket}/{key}", transfer=SMALL_PARTS, progress=False)

    assert result.bytes_moved == source.stat().st_size
    assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == source.read_bytes()
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_interrupted_download_resumes_from_its_part_file(s3_bucket, tmp_path):
    data = os.urandom(3 * MiB + 7)
    s3 = boto3.client("s3")
    source = write(tmp_path / "src.bin", data)
    storage.upload(source, f"s3://{s3_bucket}/d/file.bin", progress=False)
    etag = s3.head_object(Bucket=s3_bucket, Key="d/file.bin")["ETag"]
    target = tmp_path / "out" / "file.bin"
    partial = storage._part_path(target, etag)  # the name an interrupted download leaves
    write(partial, data[: 2 * MiB])

    result = storage.download(f"s3://{s3_bucket}/d/file.bin", target, progress=False)

    assert result.bytes_moved == len(data) - 2 * MiB
    assert target.read_bytes() == data and not partial.exists()

    # Kept bytes that are wrong are found by the checksum; the object is fetched again in full.
    target.unlink()
    write(partial, os.urandom(MiB))
    storage.download(f"s3://{s3_bucket}/d/file.bin", target, progress=False)
    assert target.read_bytes() == data and sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_download_with_wrong_checksum_fails_and_leaves_no_file(s3_bucket, tmp_path):
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="bad.bin", Body=b"payload",
                                  Metadata={"sha256": hashlib.sha256(b"other").hexdigest()})
    target = tmp_path / "out" / "bad.bin"

    with pytest.raises(StorageError, match="sha256") as caught:
        storage.download(f"s3://{s3_bucket}/bad.bin", target, progress=False)

    assert f"s3://{s3_bucket}/bad.bin" in str(caught.value)
    assert list(target.parent.iterdir()) == []


def test_missing_bucket_is_one_clear_error(s3_env, tmp_path):
    source = write(tmp_path / "f.bin", b"x")
    for action in (lambda: storage.upload(source, "s3://no-such-bucket/k", progress=False),
                   lambda: storage.download("s3://no-such-bucket/k", tmp_path / "out" / "f.bin", progress=False),
                   lambda: storage.sync_up(tmp_path, "s3://no-such-bucket/p", progress=False)):
        with pytest.raises(StorageError) as caught:
            action()
        message = str(caught.value)
        assert "'no-such-bucket' does not exist" in message and s3_env.endpoint_url in message
    assert not (tmp_path / "out").exists()


def test_missing_object_names_it(s3_bucket, tmp_path):
    with pytest.raises(StorageError, match=f"No object s3://{s3_bucket}/nothing/here"):
        storage.download(f"s3://{s3_bucket}/nothing/here", tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def iam_s3(start_moto, tmp_path_factory):
    """A moto server that checks signatures, with one user allowed everything on S3: (server, key id, secret)."""
    # Moto lets the first N requests through unsigned: exactly the three that create the user.
    with start_moto(tmp_path_factory.mktemp("moto-iam") / "moto.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as server:
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
    source = write(tmp_path / "f.bin", b"checkpoint")
    good = S3Config(endpoint_url=server.endpoint_url, region="us-east-1", access_key_id=key_id,
                    secret_access_key=secret)
    assert not storage.upload(source, "s3://guarded/f.bin", config=good, progress=False).skipped

    for wrong in (S3Config(endpoint_url=server.endpoint_url, access_key_id=key_id, secret_access_key="wrong"),
                  S3Config(endpoint_url=server.endpoint_url, access_key_id="AKIAUNKNOWN", secret_access_key="x")):
        with pytest.raises(StorageError) as caught:
            storage.download("s3://guarded/f.bin", tmp_path / "out" / "f.bin", config=wrong, progress=False)
        message = str(caught.value)
        assert "'guarded'" in message and server.endpoint_url in message and "AWS_SECRET_ACCESS_KEY" in message
    assert not (tmp_path / "out").exists()


def test_endpoint_that_went_down_fails_naming_it(start_moto, tmp_path):
    with start_moto(tmp_path / "moto.log") as server:
        config = S3Config(endpoint_url=server.endpoint_url, access_key_id="testing", secret_access_key="testing")
        server.client().create_bucket(Bucket="gone")
        storage.upload(write(tmp_path / "f.bin", b"x"), "s3://gone/f.bin", config=config, progress=False)
    with pytest.raises(StorageError) as caught:
        storage.download("s3://gone/f.bin", tmp_path / "out" / "f.bin", config=config, progress=False)
    message = str(caught.value)
    assert server.endpoint_url in message and "'gone'" in message and "AWS_ENDPOINT_URL" in message
    assert not (tmp_path / "out").exists()


def test_mirrored_checkpoint_comes_back_identical(s3_bucket, tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3), torch.nn.BatchNorm3d(4))
    checkpoint = {"arch": "tiny", "epoch": 3, "state_dict": model.state_dict(), "best_metric": 0.5}
    path = tmp_path / "last.pt"
    torch.save(checkpoint, path)

    uri = storage.mirror_checkpoint(path, f"s3://{s3_bucket}/runs/7/")
    assert uri == f"s3://{s3_bucket}/runs/7/last.pt"
    back = tmp_path / "restored" / "last.pt"
    storage.download(uri, back, progress=False)

    assert back.read_bytes() == path.read_bytes()
    restored = torch.load(back, weights_only=True)
    assert restored["epoch"] == 3 and restored["state_dict"].keys() == checkpoint["state_dict"].keys()
    assert all(torch.equal(restored["state_dict"][k], v) for k, v in checkpoint["state_dict"].items())
