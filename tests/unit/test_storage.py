"""action3d.storage without a server: URIs, configuration, and the error for an endpoint that is down."""

import socket
import threading

import pytest

from action3d import storage
from action3d.storage import S3Config, S3Uri, StorageError, parse_s3_uri


@pytest.mark.parametrize("uri, expected", [
    ("s3://my-data/ucf101/train", S3Uri("my-data", "ucf101/train")),
    ("s3://my-data/ucf101/", S3Uri("my-data", "ucf101/")),
    ("s3://my-data/", S3Uri("my-data", "")),
    ("s3://my-data", S3Uri("my-data", "")),
    ("s3://a.b-c/x y/z.mp4", S3Uri("a.b-c", "x y/z.mp4")),
])
def test_parse_s3_uri(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri, says", [
    ("my-data/key", "not an S3 URI"),
    ("https://my-data/key", "not an S3 URI"),
    ("s3://", "names no bucket"),
    ("s3:///key", "names no bucket"),
    ("s3://ab/key", "not a valid bucket name"),
    ("s3://My_Data/key", "not a valid bucket name"),
    ("s3://-data/key", "not a valid bucket name"),
    ("s3://my..data/key", "not a valid bucket name"),
    ("s3://my-data//key", "starts with '/'"),
])
def test_parse_s3_uri_rejects_with_the_reason(uri, says):
    with pytest.raises(ValueError, match=says) as caught:
        parse_s3_uri(uri)
    assert repr(uri) in str(caught.value)


def test_uri_child_and_str():
    assert str(S3Uri("b", "data/raw").child("a/x.mp4")) == "s3://b/data/raw/a/x.mp4"
    assert S3Uri("b", "data/raw/").child("x") == S3Uri("b", "data/raw/x")
    assert S3Uri("b", "").child("x") == S3Uri("b", "x")


def test_config_from_env_prefers_the_s3_endpoint_and_explicit_arguments():
    env = {"AWS_ENDPOINT_URL": "http://all:1", "AWS_ENDPOINT_URL_S3": "http://s3:2", "AWS_ACCESS_KEY_ID": "id",
           "AWS_SECRET_ACCESS_KEY": "secret", "AWS_REGION": "eu-west-3", "AWS_SESSION_TOKEN": ""}
    config = S3Config.from_env(env)
    assert (config.endpoint_url, config.region, config.access_key_id, config.secret_access_key) == \
        ("http://s3:2", "eu-west-3", "id", "secret")
    assert config.session_token is None  # empty means unset
    assert "secret" not in repr(config)
    assert S3Config.from_env({"AWS_ENDPOINT_URL": "http://all:1"}).endpoint_url == "http://all:1"
    assert S3Config.from_env({**env, "AWS_DEFAULT_REGION": "us-west-2"}).region == "us-west-2"
    override = S3Config.from_env(env, endpoint_url="http://params:3", region="ap-south-1", max_attempts=2)
    assert (override.endpoint_url, override.region, override.max_attempts) == ("http://params:3", "ap-south-1", 2)
    assert S3Config.from_env({}) == S3Config()


def test_one_configuration_serves_dvc_and_mlflow():
    config = S3Config(endpoint_url="http://127.0.0.1:9000", region="us-east-1", access_key_id="id",
                      secret_access_key="secret")
    assert storage.dvc_remote_commands("s3://bucket/dvc", name="store", config=config) == [
        ["dvc", "remote", "add", "-d", "--force", "store", "s3://bucket/dvc"],
        ["dvc", "remote", "modify", "store", "endpointurl", "http://127.0.0.1:9000"],
        ["dvc", "remote", "modify", "store", "region", "us-east-1"],
    ]
    local = storage.dvc_remote_commands("s3://bucket/dvc", default=False, local=True, config=S3Config())
    assert local == [["dvc", "remote", "add", "--local", "--force", "s3", "s3://bucket/dvc"]]
    with pytest.raises(ValueError):
        storage.dvc_remote_commands("bucket/dvc", config=config)

    assert storage.mlflow_env(config) == {
        "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret",
    }
    assert storage.mlflow_env(S3Config()) == {}


def _connections_until_given_up(tmp_path, max_attempts: int) -> int:
    """How many connections a download makes to a server that drops every one, before it raises StorageError."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []

    def drop_every_connection():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=drop_every_connection, daemon=True).start()
    config = S3Config(endpoint_url=f"http://127.0.0.1:{listener.getsockname()[1]}", access_key_id="id",
                      secret_access_key="secret", max_attempts=max_attempts)
    try:
        with pytest.raises(StorageError, match=f"after {max_attempts} attempts"):
            storage.download("s3://my-data/f.bin", tmp_path / "f.bin", config=config)
    finally:
        listener.close()
    return len(accepted)


def test_a_failing_endpoint_is_retried_max_attempts_times_then_given_up(tmp_path):
    """Bounded retries, counted at a server that drops every connection: each extra attempt is one more request
    (the HTTP pool re-sends a dropped request once more on its own, the same for any max_attempts)."""
    once, four = _connections_until_given_up(tmp_path, 1), _connections_until_given_up(tmp_path, 4)
    assert four - once == 3 and once <= 2


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_that_is_down_fails_naming_endpoint_and_bucket(tmp_path):
    endpoint = f"http://127.0.0.1:{unused_port()}"
    config = S3Config(endpoint_url=endpoint, access_key_id="id", secret_access_key="secret")
    with pytest.raises(StorageError) as caught:
        storage.download("s3://my-data/f.bin", tmp_path / "out" / "f.bin", config=config)
    message = str(caught.value)
    assert endpoint in message and "'my-data'" in message and "AWS_ENDPOINT_URL" in message
    assert (caught.value.endpoint, caught.value.bucket) == (endpoint, "my-data")

    once = S3Config(endpoint_url=endpoint, access_key_id="id", secret_access_key="secret", max_attempts=1)
    source = tmp_path / "f.bin"
    source.write_bytes(b"x")
    for action in (lambda: storage.upload(source, "s3://my-data/f.bin", config=once),
                   lambda: storage.list_objects("s3://my-data/raw/", config=once),
                   lambda: storage.check_bucket("s3://my-data/raw", config=once),
                   lambda: storage.download("s3://my-data/f.bin", tmp_path / "out" / "f.bin", config=once)):
        with pytest.raises(StorageError, match=f"Cannot reach bucket 'my-data' at S3 endpoint {endpoint}"):
            action()
    assert not (tmp_path / "out").exists()


def test_bad_arguments_fail_before_any_request(tmp_path):
    with pytest.raises(StorageError, match="not a valid URL"):
        S3Config(endpoint_url="not a url").client()
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.upload(tmp_path / "nope.bin", "s3://my-data/k")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="names no object"):
        storage.upload(tmp_path / "f.bin", "s3://my-data/folder/")
    with pytest.raises(ValueError, match="names no object"):
        storage.download("s3://my-data", tmp_path / "g.bin")
