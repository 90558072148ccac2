"""S3, and the only module that imports boto3: one configuration for boto3, the DVC remote and MLflow; single
objects moved by boto3's transfer manager, with errors a person can act on.

Datasets move with DVC (`dvc add` + `dvc push`, or `dvc import-url s3://...`): it hashes, caches and transfers
them. This module moves single objects (checkpoint mirrors, a video a served model is allowed to read) with
boto3's `upload_file` / `download_file`, which do multipart transfers, retries and concurrency.

The configuration is the standard AWS one, read from the environment (``S3Config.from_env``; explicit
arguments, e.g. the `storage` section of params.yaml, win):

- ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``: the S3 endpoint (unset: AWS itself);
- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``: credentials;
- ``AWS_DEFAULT_REGION``, else ``AWS_REGION``: the region.

Unset credentials fall back to boto3's own chain (``AWS_PROFILE``, ``~/.aws``, instance roles). An endpoint that
is down, wrong credentials or a missing bucket raise one ``StorageError`` naming the endpoint, the bucket and the
variables to check; the connect timeout is short, so a dead endpoint fails in seconds.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from action3d.atomic import replacing
from action3d.errors import Action3dError

ENDPOINT_VARS = "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL"
CREDENTIAL_VARS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN, or AWS_PROFILE)"
TRANSFER = TransferConfig(multipart_threshold=8 * 1024**2, multipart_chunksize=8 * 1024**2, max_concurrency=4)

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "InvalidClientTokenId", "AuthorizationHeaderMalformed", "AccessDenied", "AllAccessDisabled", "403",
}


class StorageError(Action3dError):
    """An S3 operation failed; the message names the endpoint, the bucket (and key) and what to check."""

    def __init__(self, message: str, *, endpoint: str, bucket: str, key: str | None = None):
        super().__init__(message)
        self.endpoint, self.bucket, self.key = endpoint, bucket, key


# ---------------------------------------------------------------------------------------------- URIs


class S3Uri(NamedTuple):
    """``s3://bucket/key``; ``key`` is ``""`` for the bucket itself and never starts with ``/``."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, relative: str) -> S3Uri:
        """The URI of ``relative`` (a POSIX path) below this one taken as a folder."""
        prefix = self.key.rstrip("/")
        return S3Uri(self.bucket, f"{prefix}/{relative}" if prefix else relative)


def parse_s3_uri(uri: str) -> S3Uri:
    """Split ``s3://bucket/some/key`` into ``S3Uri("bucket", "some/key")``; anything else is a ValueError."""
    text = str(uri)
    if not text.startswith("s3://"):
        raise ValueError(f"{text!r} is not an S3 URI: write s3://BUCKET/KEY (for example s3://my-data/ucf101)")
    bucket, _, key = text[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{text!r} names no bucket: write s3://BUCKET/KEY")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"{text!r}: {bucket!r} is not a valid bucket name (3 to 63 characters: lowercase letters, digits, "
            "dots and hyphens, beginning and ending with a letter or digit)"
        )
    if key.startswith("/"):
        raise ValueError(f"{text!r}: the key starts with '/'; write s3://{bucket}/{key.lstrip('/')}")
    return S3Uri(bucket, key)


# --------------------------------------------------------------------------------------- configuration


def _env(env: Mapping[str, str], *names: str) -> str | None:
    """The first of ``names`` set to a non-empty value in ``env``."""
    return next((env[n] for n in names if env.get(n)), None)


@dataclass(frozen=True)
class S3Config:
    """Where S3 is and how to talk to it. ``None`` leaves the choice to boto3 (AWS endpoint, its credential chain).

    ``max_attempts`` counts every try of a request (first try included); ``connect_timeout`` and
    ``read_timeout`` are in seconds.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    max_attempts: int = 3
    connect_timeout: float = 3.0
    read_timeout: float = 60.0

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        **knobs: Any,
    ) -> S3Config:
        """Read the standard AWS variables from ``env`` (default ``os.environ``); explicit arguments win.

        ``knobs`` are the remaining fields (``max_attempts``, ``connect_timeout``, ``read_timeout``).
        """
        env = os.environ if env is None else env
        return cls(
            endpoint_url=endpoint_url or _env(env, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            region=region or _env(env, "AWS_DEFAULT_REGION", "AWS_REGION"),
            access_key_id=access_key_id or _env(env, "AWS_ACCESS_KEY_ID"),
            secret_access_key=secret_access_key or _env(env, "AWS_SECRET_ACCESS_KEY"),
            session_token=session_token or _env(env, "AWS_SESSION_TOKEN"),
            **knobs,
        )

    @classmethod
    def from_params(cls, storage: Any) -> S3Config:
        """From params.yaml's `storage` section (endpoint_url, region; null = the environment's)."""
        return cls.from_env(endpoint_url=storage.endpoint_url, region=storage.region)

    def client(self):
        """A boto3 S3 client: bounded retries with backoff, short connect timeout, path-style on custom endpoints."""
        botocore_config = Config(
            retries={"max_attempts": self.max_attempts, "mode": "standard"},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            # Virtual-host addressing needs DNS for BUCKET.host, which local and on-premise servers rarely have.
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        try:
            return boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=self.access_key_id,
                aws_secret_access_key=self.secret_access_key,
                aws_session_token=self.session_token,
                config=botocore_config,
            )
        except ValueError as err:  # botocore's word for a malformed endpoint URL
            raise StorageError(
                f"S3 endpoint {self.endpoint_url!r} is not a valid URL ({err}); fix {ENDPOINT_VARS}",
                endpoint=str(self.endpoint_url), bucket="",
            ) from err


def _resolve(config: S3Config | None) -> S3Config:
    return S3Config.from_env() if config is None else config


def dvc_remote_commands(
    uri: str, *, name: str = "s3", default: bool = True, local: bool = False, config: S3Config | None = None
) -> list[list[str]]:
    """The ``dvc remote add/modify`` commands (argv lists) that make ``uri`` a DVC remote on this configuration.

    Credentials are not written: dvc-s3 reads ``AWS_ACCESS_KEY_ID`` etc. from the environment, like boto3.
    ``local=True`` keeps the remote in ``.dvc/config.local`` (not committed), for a machine-specific endpoint.
    """
    parse_s3_uri(uri)
    cfg = _resolve(config)
    scope = ["--local"] if local else []
    commands = [["dvc", "remote", "add", *scope, *(["-d"] if default else []), "--force", name, uri]]
    for option, value in (("endpointurl", cfg.endpoint_url), ("region", cfg.region)):
        if value:
            commands.append(["dvc", "remote", "modify", *scope, name, option, value])
    return commands


def mlflow_env(config: S3Config | None = None) -> dict[str, str]:
    """Environment for an MLflow server (or client) whose artifact store is on S3, from this configuration.

    MLflow reads its S3 endpoint from ``MLFLOW_S3_ENDPOINT_URL``; boto3 inside it reads the AWS variables.
    Only values that are set appear, so ``{**os.environ, **mlflow_env()}`` never blanks a variable.
    """
    cfg = _resolve(config)
    pairs = {
        "MLFLOW_S3_ENDPOINT_URL": cfg.endpoint_url,
        "AWS_ENDPOINT_URL_S3": cfg.endpoint_url,
        "AWS_DEFAULT_REGION": cfg.region,
        "AWS_ACCESS_KEY_ID": cfg.access_key_id,
        "AWS_SECRET_ACCESS_KEY": cfg.secret_access_key,
        "AWS_SESSION_TOKEN": cfg.session_token,
    }
    return {name: value for name, value in pairs.items() if value}


# --------------------------------------------------------------------------------------- moving objects


class Bucket:
    """One bucket through one client: every botocore failure becomes a StorageError that can be acted on."""

    def __init__(self, config: S3Config, name: str):
        self.config, self.name = config, name
        self.client = config.client()
        self.endpoint = self.client.meta.endpoint_url

    def call(self, operation: str, key: str | None = None, **kwargs: Any) -> dict:
        """``client.<operation>(Bucket=..., Key=key, **kwargs)`` with errors translated."""
        if key is not None:
            kwargs["Key"] = key
        try:
            return getattr(self.client, operation)(Bucket=self.name, **kwargs)
        except (BotoCoreError, ClientError) as err:
            raise self.error(err, operation, key) from err

    def uri(self, key: str) -> str:
        return str(S3Uri(self.name, key))

    def error(self, err: Exception, operation: str, key: str | None = None) -> StorageError:
        """One message for a failure: what failed, at which endpoint and bucket, and what to check."""
        where = f"bucket {self.name!r} at S3 endpoint {self.endpoint}"
        target = f"{self.uri(key)} at S3 endpoint {self.endpoint}" if key else where
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            text = f"No usable S3 credentials for {where}: set {CREDENTIAL_VARS}."
        elif isinstance(err, (BotoConnectionError, HTTPClientError)):
            text = (f"Cannot reach {where} after {self.config.max_attempts} attempts ({err}). Check that the "
                    f"server is up and that {ENDPOINT_VARS} points at it.")
        elif isinstance(err, ClientError):
            code = str(err.response.get("Error", {}).get("Code", "?"))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (operation == "head_bucket" and status == 404):
                text = (f"Bucket {self.name!r} does not exist at S3 endpoint {self.endpoint}. Create it, or fix "
                        f"the bucket in the s3:// URI (or {ENDPOINT_VARS} if this is the wrong server).")
            elif code in _CREDENTIAL_CODES or status == 403:
                text = (f"S3 endpoint {self.endpoint} refused {operation} on bucket {self.name!r} ({code}): the "
                        f"credentials are wrong or lack permission. Check {CREDENTIAL_VARS}.")
            elif code in ("NoSuchKey", "404"):
                text = f"No object {target}."
            elif code == "PreconditionFailed":
                text = f"{target} changed while it was being downloaded; run the download again."
            else:
                text = f"S3 {operation} on {target} failed: {code}: {err.response.get('Error', {}).get('Message')}"
        else:
            text = f"S3 {operation} on {target} failed: {err}"
        return StorageError(text, endpoint=self.endpoint, bucket=self.name, key=key)



def _bucket(uri: str, config: S3Config | None) -> tuple[Bucket, str]:
    target = parse_s3_uri(uri)
    return Bucket(S3Config.from_env() if config is None else config, target.bucket), target.key


def check_bucket(uri: str, *, config: S3Config | None = None) -> None:
    """Return when the bucket of ``uri`` answers; else a StorageError naming the endpoint, the bucket and the fix
    (server down, wrong credentials, no such bucket). For checks before long work starts."""
    bucket, _ = _bucket(uri, config)
    bucket.call("head_bucket")


def upload(local_path: str | os.PathLike, uri: str, *, config: S3Config | None = None) -> str:
    """Upload one file to the object ``uri`` (``s3://bucket/key``) with boto3's transfer manager; returns ``uri``."""
    path = Path(local_path)
    bucket, key = _bucket(uri, config)
    if not key or key.endswith("/"):
        raise ValueError(f"{uri!r} names no object: write s3://BUCKET/KEY")
    if not path.is_file():
        raise FileNotFoundError(f"cannot upload {path}: no such file")
    try:
        bucket.client.upload_file(str(path), bucket.name, key, Config=TRANSFER)
    except (BotoCoreError, ClientError, boto3.exceptions.S3UploadFailedError) as err:
        raise bucket.error(getattr(err, "__cause__", None) or err, "upload", key) from err
    return uri


class TooLarge(StorageError):
    """An object larger than the caller allows; nothing was downloaded."""


def download(uri: str, local_path: str | os.PathLike, *, config: S3Config | None = None,
             max_bytes: int | None = None) -> Path:
    """Download the object ``uri`` to ``local_path`` (a temporary name beside it, then a rename: never half a
    file). With ``max_bytes``, a larger object raises TooLarge before any byte moves."""
    path = Path(local_path)
    bucket, key = _bucket(uri, config)
    if not key or key.endswith("/"):
        raise ValueError(f"{uri!r} names no object: write s3://BUCKET/KEY")
    size = bucket.call("head_object", key)["ContentLength"]
    if max_bytes is not None and size > max_bytes:
        raise TooLarge(f"{bucket.uri(key)} is {size} bytes, over the limit of {max_bytes}",
                       endpoint=bucket.endpoint, bucket=bucket.name, key=key)
    try:
        with replacing(path) as tmp:
            bucket.client.download_file(bucket.name, key, str(tmp), Config=TRANSFER)
    except (BotoCoreError, ClientError) as err:
        raise bucket.error(err, "download", key) from err
    return path


def list_objects(uri: str, *, config: S3Config | None = None) -> dict[str, int]:
    """Key -> size of every object under the prefix ``uri`` (a folder: ``s3://bucket/some/prefix/``)."""
    bucket, prefix = _bucket(uri, config)
    found: dict[str, int] = {}
    try:
        for page in bucket.client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name, Prefix=prefix):
            found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    except (BotoCoreError, ClientError) as err:
        raise bucket.error(err, "list_objects_v2", prefix) from err
    return found
