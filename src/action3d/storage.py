"""S3 storage: one configuration for boto3, the DVC remote and MLflow; verified, resumable transfers.

The configuration is the standard AWS one, read from the environment (``S3Config.from_env``; explicit
arguments, e.g. from params, win):

- ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``: the S3 endpoint (unset: AWS itself);
- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``: credentials;
- ``AWS_DEFAULT_REGION``, else ``AWS_REGION``: the region.

Unset credentials fall back to boto3's own chain (``AWS_PROFILE``, ``~/.aws``, instance roles). The same
configuration drives the DVC remote (``dvc_remote_commands``) and an MLflow server's S3 artifact store
(``mlflow_env``), so an endpoint is written in one place.

Transfers (``upload``, ``download``, ``sync_up``, ``sync_down``, ``mirror_checkpoint``):

- only changed files move: a file is the same as an object when the sizes agree and the object's SHA-256,
  stored by us in its metadata (``x-amz-meta-sha256``), matches. Objects written by other tools have no such
  metadata; they are compared by MD5 when their ETag is a plain MD5 (single-part, not KMS-encrypted), else
  by size and modification time, as ``aws s3 sync`` does.
- every transfer is verified: parts carry Content-MD5 (the server rejects a corrupted part), uploads are
  checked against the object's size and checksum afterwards, and downloads are hashed before they take their
  final name; a mismatch raises ``StorageError`` and leaves no file behind.
- large files go in parts (boto3's ``TransferConfig`` sets threshold, part size and threads) and resume:
  an interrupted upload leaves its parts on the server (S3 keeps them until the upload is completed or
  aborted; a bucket lifecycle rule can expire stale ones), and the next upload of the same key reuses every
  part whose size and MD5 match the local file. An interrupted download leaves a hidden
  ``.<name>.<etag-hash>.s3part`` file beside the target, which the next download continues with a ranged GET
  (``If-Match`` the same ETag). A final path never holds a partial file: it is written by ``os.replace``.
- an endpoint that is down, wrong credentials or a missing bucket raise one ``StorageError`` naming the
  endpoint, the bucket and the variables to check. Transient errors are retried with backoff (botocore's
  ``standard`` retry mode, ``max_attempts`` in all); the connect timeout is short so a dead endpoint fails
  in seconds.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import boto3
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from tqdm import tqdm

from action3d.errors import Action3dError

CHECKSUM_KEY = "sha256"  # our object metadata key: x-amz-meta-sha256 = hex SHA-256 of the content
PART_SUFFIX = ".s3part"  # suffix of in-progress downloads; sync_up never uploads such files
MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
MIN_PART_SIZE = 5 * 1024**2  # S3's minimum size of every part but the last
ENDPOINT_VARS = "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL"
CREDENTIAL_VARS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN, or AWS_PROFILE)"
DEFAULT_TRANSFER = TransferConfig(multipart_threshold=8 * 1024**2, multipart_chunksize=8 * 1024**2, max_concurrency=4)

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "InvalidClientTokenId", "AuthorizationHeaderMalformed", "AccessDenied", "AllAccessDisabled", "403",
}
# Errors while reading a response body; botocore retries requests, not the streaming of their bodies.
_STREAM_ERRORS = (HTTPClientError, IncompleteReadError, urllib3.exceptions.HTTPError, ConnectionError)


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


# ------------------------------------------------------------------------------------------ checksums


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_md5(path: str | os.PathLike, offset: int = 0, length: int | None = None) -> str:
    """Hex MD5 of ``length`` bytes of a file from ``offset`` (to the end when ``None``): an S3 part's ETag."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        f.seek(offset)
        remaining = math.inf if length is None else length
        while remaining > 0 and (block := f.read(int(min(remaining, 1 << 20)))):
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()


def _object_checksum(head: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(algorithm, hexdigest)`` that an object's content must hash to, when the server tells us one."""
    if digest := head.get("Metadata", {}).get(CHECKSUM_KEY):
        return "sha256", digest
    etag = head.get("ETag", "").strip('"')
    # A plain-MD5 ETag: single-part upload without KMS/customer-key encryption (those ETags are opaque).
    if re.fullmatch(r"[0-9a-f]{32}", etag) and head.get("ServerSideEncryption") in (None, "AES256") \
            and "SSECustomerAlgorithm" not in head:
        return "md5", etag
    return None


def _matches(path: Path, head: Mapping[str, Any], sha256: str | None = None) -> bool:
    """Whether the local file at ``path`` has the object's content (see the module docstring)."""
    if not path.is_file() or path.stat().st_size != head["ContentLength"]:
        return False
    expected = _object_checksum(head)
    if expected is None:  # no checksum to compare: same size and the mtime we gave it on download
        return int(path.stat().st_mtime) == int(head["LastModified"].timestamp())
    algorithm, digest = expected
    if algorithm == "sha256":
        return (sha256 or file_sha256(path)) == digest
    return file_md5(path) == digest


# ------------------------------------------------------------------------------------ the bucket client


@dataclass(frozen=True)
class Transfer:
    """What happened to one file. ``bytes_moved`` counts bytes sent or received now (0 when skipped)."""

    uri: str
    local_path: Path
    size: int
    bytes_moved: int
    skipped: bool


class _Bucket:
    """One bucket through one client, turning every botocore failure into a StorageError that can be acted on."""

    def __init__(self, config: S3Config, bucket: str):
        self.config, self.name = config, bucket
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

    def pages(self, operation: str, result_key: str, **kwargs: Any) -> Iterator[dict]:
        """Every item of a paginated listing."""
        try:
            for page in self.client.get_paginator(operation).paginate(Bucket=self.name, **kwargs):
                yield from page.get(result_key, [])
        except (BotoCoreError, ClientError) as err:
            raise self.error(err, operation, kwargs.get("Key")) from err

    def check(self) -> None:
        """Fail early, with the reason, when the endpoint, the credentials or the bucket are wrong."""
        self.call("head_bucket")

    def head(self, key: str) -> dict | None:
        """The object's metadata, or None when there is no such object."""
        try:
            return self.client.head_object(Bucket=self.name, Key=key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self.error(err, "head_object", key) from err
        except BotoCoreError as err:
            raise self.error(err, "head_object", key) from err

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


class _Progress:
    """A thread-safe byte counter over a tqdm bar (workers report from their threads)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)
        self.lock = threading.Lock()

    def update(self, n: int) -> None:
        with self.lock:
            self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _backoff(attempt: int) -> float:
    """Full-jitter exponential backoff, as botocore's standard mode: seconds before try ``attempt + 1``."""
    return random.uniform(0, min(20.0, 2.0**attempt))


def _run_parallel(tasks: list[Callable[[], Any]], workers: int) -> list[Any]:
    """Run ``tasks`` on ``workers`` threads; the first failure cancels what has not started and is raised."""
    if workers <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(task) for task in tasks]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:  # in order, so the first failure by position is the one raised
            if future.done() and future.exception() is not None:
                raise future.exception()
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------ uploading


def _part_size(size: int, transfer: TransferConfig) -> int:
    """Bytes per part: the configured size, grown so that no file needs more than S3's 10,000 parts."""
    return max(int(transfer.multipart_chunksize), MIN_PART_SIZE, math.ceil(size / MAX_PARTS))


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _md5_header(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def _put_multipart(b: _Bucket, path: Path, key: str, size: int, sha256: str, transfer: TransferConfig,
                   progress: _Progress, workers: int, resume: bool = True) -> int:
    """Upload ``path`` in parts, reusing matching parts of an unfinished upload of ``key``; bytes sent."""
    part_size = _part_size(size, transfer)
    layout = [(n, (n - 1) * part_size, min(part_size, size - (n - 1) * part_size))
              for n in range(1, math.ceil(size / part_size) + 1)]  # (part number, offset, length)

    done: dict[int, str] = {}  # part number -> ETag of parts already on the server with our bytes
    upload_id = None
    if resume:
        unfinished = sorted((u for u in b.pages("list_multipart_uploads", "Uploads", Prefix=key) if u["Key"] == key),
                            key=lambda u: u["Initiated"], reverse=True)
        for upload in unfinished:
            parts = {p["PartNumber"]: p for p in b.pages("list_parts", "Parts", Key=key, UploadId=upload["UploadId"])}
            matching = {n: parts[n]["ETag"] for n, offset, length in layout
                        if n in parts and parts[n]["Size"] == length
                        and parts[n]["ETag"].strip('"') == file_md5(path, offset, length)}
            if upload_id is None and matching:
                upload_id, done = upload["UploadId"], matching
            else:  # parts of another content, or a second stale upload: free the space they hold
                b.call("abort_multipart_upload", key, UploadId=upload["UploadId"])
    resumed = upload_id is not None
    if not resumed:
        upload_id = b.call("create_multipart_upload", key, Metadata={CHECKSUM_KEY: sha256})["UploadId"]
    progress.update(sum(length for n, _, length in layout if n in done))

    def send(number: int, offset: int, length: int) -> tuple[int, str]:
        data = _read(path, offset, length)
        response = b.call("upload_part", key, UploadId=upload_id, PartNumber=number, Body=data,
                          ContentMD5=_md5_header(data))
        progress.update(length)
        return number, response["ETag"]

    missing = [(n, o, length) for n, o, length in layout if n not in done]
    done.update(_run_parallel([lambda p=p: send(*p) for p in missing], workers))
    b.call("complete_multipart_upload", key, UploadId=upload_id,
           MultipartUpload={"Parts": [{"PartNumber": n, "ETag": done[n]} for n in sorted(done)]})

    if resumed and (b.head(key) or {}).get("Metadata", {}).get(CHECKSUM_KEY) != sha256:
        # The resumed upload was started for an older version of the file whose first parts equal ours:
        # the content is right but the checksum in its metadata is not. Rare; upload afresh.
        progress.update(-size)
        sent = sum(length for _, _, length in missing)
        return sent + _put_multipart(b, path, key, size, sha256, transfer, progress, workers, resume=False)
    return sum(length for _, _, length in missing)


def _put(b: _Bucket, path: Path, key: str, transfer: TransferConfig, progress: _Progress, workers: int) -> Transfer:
    """Upload one file unless the object already has its content; verify the object afterwards."""
    size, sha256 = path.stat().st_size, file_sha256(path)
    head = b.head(key)
    if head is not None and _matches(path, head, sha256):
        progress.update(size)
        return Transfer(b.uri(key), path, size, 0, True)
    if size < max(int(transfer.multipart_threshold), MIN_PART_SIZE):
        data = path.read_bytes()
        b.call("put_object", key, Body=data, ContentMD5=_md5_header(data), Metadata={CHECKSUM_KEY: sha256})
        progress.update(size)
        moved = size
    else:
        moved = _put_multipart(b, path, key, size, sha256, transfer, progress, workers)
    head = b.head(key) or {}
    if head.get("ContentLength") != size or head.get("Metadata", {}).get(CHECKSUM_KEY) != sha256:
        raise StorageError(
            f"After uploading {path} to {b.uri(key)} at S3 endpoint {b.endpoint}, the object does not match "
            f"(size {head.get('ContentLength')} vs {size}, sha256 {head.get('Metadata', {}).get(CHECKSUM_KEY)} "
            f"vs {sha256}); was the file modified during the upload? Run it again.",
            endpoint=b.endpoint, bucket=b.name, key=key,
        )
    return Transfer(b.uri(key), path, size, moved, False)


def upload(local_path: str | os.PathLike, uri: str, *, config: S3Config | None = None,
           transfer: TransferConfig = DEFAULT_TRANSFER, progress: bool = True) -> Transfer:
    """Upload one file to the object ``uri`` (``s3://bucket/key``); skipped when the object has its content.

    Large files go in parts on ``transfer.max_concurrency`` threads and resume an interrupted upload.
    """
    path, target = Path(local_path), parse_s3_uri(uri)
    if not path.is_file():
        raise FileNotFoundError(f"cannot upload {path}: no such file")
    if not target.key or target.key.endswith("/"):
        raise ValueError(f"{uri!r} names no object: write s3://BUCKET/KEY (mirror_checkpoint accepts a folder)")
    b = _Bucket(_resolve(config), target.bucket)
    b.check()
    bar = _Progress(path.stat().st_size, f"upload {path.name}", progress)
    try:
        return _put(b, path, target.key, transfer, bar, int(transfer.max_concurrency))
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------- downloading


def _part_path(path: Path, etag: str) -> Path:
    """The hidden in-progress file of a download of the object version ``etag`` to ``path``."""
    tag = hashlib.sha256(etag.encode()).hexdigest()[:16]
    return path.with_name(f".{path.name}.{tag}{PART_SUFFIX}")


def _fetch(b: _Bucket, key: str, head: Mapping[str, Any], part: Path, progress: _Progress) -> int:
    """Append the object's missing bytes to ``part`` with ranged GETs, retrying broken streams; bytes received."""
    size, received, failures = head["ContentLength"], 0, 0
    part.touch()
    while (offset := part.stat().st_size) < size:
        response = b.call("get_object", key, Range=f"bytes={offset}-", IfMatch=head["ETag"])
        try:
            with open(part, "ab") as f:
                for chunk in response["Body"].iter_chunks(1 << 20):
                    f.write(chunk)
                    received += len(chunk)
                    progress.update(len(chunk))
        except _STREAM_ERRORS as err:
            failures += 1
            if failures >= b.config.max_attempts:
                raise b.error(err, "get_object", key) from err
            time.sleep(_backoff(failures))
        if part.stat().st_size == offset:  # a response that ends without data must not loop forever
            failures += 1
            if failures >= b.config.max_attempts:
                raise b.error(RuntimeError("the server returned no data"), "get_object", key)
    return received


def _get(b: _Bucket, key: str, path: Path, progress: _Progress, head: Mapping[str, Any] | None = None) -> Transfer:
    """Download one object to ``path`` unless the file already has its content; resume, verify, then rename."""
    head = head or b.head(key)
    if head is None:
        raise StorageError(f"No object {b.uri(key)} at S3 endpoint {b.endpoint}.",
                           endpoint=b.endpoint, bucket=b.name, key=key)
    size = head["ContentLength"]
    if _matches(path, head):
        progress.update(size)
        return Transfer(b.uri(key), path, size, 0, True)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(path, head["ETag"])
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*{PART_SUFFIX}"):
        if stale != part:  # left by a download of another version of the object
            stale.unlink(missing_ok=True)
    if part.exists() and part.stat().st_size > size:
        part.unlink()
    resumed = part.exists() and part.stat().st_size > 0
    progress.update(part.stat().st_size if resumed else 0)
    moved = _fetch(b, key, head, part, progress)

    expected = _object_checksum(head)
    if expected is not None:
        algorithm, digest = expected
        actual = file_sha256(part) if algorithm == "sha256" else file_md5(part)
        if actual != digest:
            part.unlink()
            if resumed:  # the kept bytes may be the culprit: fetch everything once more
                progress.update(-size)
                return _get(b, key, path, progress, head)
            raise StorageError(
                f"Downloaded {b.uri(key)} from S3 endpoint {b.endpoint} but its {algorithm} is {actual}, not "
                f"{digest} as recorded on the object; nothing was written to {path}. Run it again; if it "
                "persists, the object is corrupt: upload it again.",
                endpoint=b.endpoint, bucket=b.name, key=key,
            )
    modified = head["LastModified"].timestamp()
    os.utime(part, (modified, modified))  # lets objects without a checksum be compared by size + mtime
    os.replace(part, path)
    return Transfer(b.uri(key), path, size, moved, False)


def download(uri: str, local_path: str | os.PathLike, *, config: S3Config | None = None,
             progress: bool = True) -> Transfer:
    """Download the object ``uri`` to ``local_path``; skipped when the file already has its content.

    Continues an interrupted download of the same object version; verifies the checksum before renaming.
    """
    source, path = parse_s3_uri(uri), Path(local_path)
    if not source.key or source.key.endswith("/"):
        raise ValueError(f"{uri!r} names no object: write s3://BUCKET/KEY (sync_down takes a prefix)")
    b = _Bucket(_resolve(config), source.bucket)
    b.check()
    head = b.head(source.key)
    bar = _Progress(head["ContentLength"] if head else 0, f"download {path.name}", progress)
    try:
        return _get(b, source.key, path, bar, head)
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------- syncing


def _local_files(root: Path) -> list[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of every file below ``root``, sorted, in-progress downloads excluded."""
    return sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*")
                  if p.is_file() and not p.name.endswith(PART_SUFFIX))


def sync_up(local_dir: str | os.PathLike, uri_prefix: str, *, config: S3Config | None = None,
            transfer: TransferConfig = DEFAULT_TRANSFER, progress: bool = True) -> list[Transfer]:
    """Upload every file below ``local_dir`` to ``uri_prefix``/<relative path>; unchanged files stay put.

    Files move on ``transfer.max_concurrency`` threads (one file per thread). Objects with no local file are
    left alone. Returns one Transfer per local file, in path order.
    """
    root, prefix = Path(local_dir), parse_s3_uri(uri_prefix)
    if not root.is_dir():
        raise NotADirectoryError(f"cannot push {root}: not a directory")
    files = _local_files(root)
    b = _Bucket(_resolve(config), prefix.bucket)
    b.check()
    bar = _Progress(sum(p.stat().st_size for _, p in files), f"push {root.name or root}", progress)
    try:
        tasks = [lambda r=r, p=p: _put(b, p, prefix.child(r).key, transfer, bar, 1) for r, p in files]
        return _run_parallel(tasks, int(transfer.max_concurrency))
    finally:
        bar.close()


def sync_down(uri_prefix: str, local_dir: str | os.PathLike, *, config: S3Config | None = None,
              transfer: TransferConfig = DEFAULT_TRANSFER, progress: bool = True) -> list[Transfer]:
    """Download every object below ``uri_prefix`` into ``local_dir``/<relative key>; unchanged files stay put.

    Local files with no object are left alone. Returns one Transfer per object, in key order.
    """
    prefix, root = parse_s3_uri(uri_prefix), Path(local_dir)
    folder = prefix.key.rstrip("/") + "/" if prefix.key.rstrip("/") else ""
    b = _Bucket(_resolve(config), prefix.bucket)
    b.check()
    objects = sorted((o["Key"], o["Size"]) for o in b.pages("list_objects_v2", "Contents", Prefix=folder)
                     if not o["Key"].endswith("/"))
    plan = []
    for key, _ in objects:
        relative = key[len(folder):]
        target = (root / relative).resolve()
        if ".." in relative.split("/") or not target.is_relative_to(root.resolve()):
            raise StorageError(f"Object key {b.uri(key)} would be written outside {root}; rename it.",
                               endpoint=b.endpoint, bucket=b.name, key=key)
        plan.append((key, root / relative))
    bar = _Progress(sum(size for _, size in objects), f"pull {prefix}", progress)
    try:
        return _run_parallel([lambda k=k, p=p: _get(b, k, p, bar) for k, p in plan], int(transfer.max_concurrency))
    finally:
        bar.close()


def mirror_checkpoint(local_file: str | os.PathLike, uri: str, *, config: S3Config | None = None,
                      progress: bool = False) -> str:
    """Copy a checkpoint file to S3 and return the object's URI.

    ``uri`` is an object (``s3://b/run7/last.pt``) or, when it ends with ``/`` or is a bare bucket, a folder
    that receives the file under its own name. Unchanged checkpoints are not sent again.
    """
    path, target = Path(local_file), parse_s3_uri(uri)
    if not target.key or target.key.endswith("/"):
        target = target.child(path.name)
    return upload(path, str(target), config=config, progress=progress).uri


def check_bucket(uri: str, *, config: S3Config | None = None) -> None:
    """Return when the bucket of ``uri`` answers; else a StorageError naming the endpoint, the bucket and the fix
    (server down, wrong credentials, no such bucket). For checks before long work starts."""
    _Bucket(_resolve(config), parse_s3_uri(uri).bucket).check()
