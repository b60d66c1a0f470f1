"""Blobs in any S3-compatible store (AWS S3, MinIO, Ceph, GCS's interoperability API).

boto3 is AWS's own client: it reads the standard variables (``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), retries throttling and
transient errors itself, and leaves multipart uploads to us, so that an upload that fails
is aborted here and never left half-made in the bucket.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, ResponseStreamingError
from botocore.exceptions import ConnectionError as BotoConnectionError

from ftune.service.blobs.base import (
    BlobInfo,
    BlobMissing,
    BlobStore,
    add_outage_test,
    check_key,
)

log = logging.getLogger(__name__)

# S3's smallest part is 5 MiB (but the last); 8 MiB keeps memory low and requests few.
PART_SIZE = 8 << 20


def s3_client(*, attempts: int = 5, timeout_s: float = 30.0) -> Any:
    """A client from the standard variables, path-style (what MinIO and most others need)."""
    config = Config(s3={"addressing_style": "path"}, connect_timeout=timeout_s,
                    read_timeout=timeout_s, retries={"max_attempts": attempts,
                                                     "mode": "standard"})
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.session.Session().client("s3", region_name=region, config=config)


class S3BlobStore(BlobStore):
    def __init__(self, bucket: str, prefix: str = "", client: Any = None,
                 part_size: int = PART_SIZE) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = client if client is not None else s3_client()
        self.part_size = part_size
        self._probe: S3BlobStore | None = None  # made on the first health probe
        self.location = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def reachable(self) -> str:
        # One try with short timeouts: a health probe must answer fast, not retry for minutes.
        if self._probe is None:
            self._probe = S3BlobStore(self.bucket, self.prefix,
                                      s3_client(attempts=1, timeout_s=2.0))
        return BlobStore.reachable(self._probe)

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _write(self, key: str, chunks: Iterable[bytes]) -> int:
        name, buffer, size = self._name(key), bytearray(), 0
        upload: _Multipart | None = None
        try:
            for chunk in chunks:
                buffer += chunk
                size += len(chunk)
                while len(buffer) >= self.part_size:
                    upload = upload or _Multipart(self.client, self.bucket, name)
                    upload.add(bytes(buffer[:self.part_size]))
                    del buffer[:self.part_size]
            if upload is None:  # small: one request, visible when it returns
                self.client.put_object(Bucket=self.bucket, Key=name, Body=bytes(buffer))
            else:
                if buffer:
                    upload.add(bytes(buffer))
                upload.complete()  # the object appears whole, now
        except BaseException:
            if upload is not None:
                upload.abort()
            raise
        return size

    def read_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._name(key))
        except ClientError as exc:
            if _missing(exc):
                raise BlobMissing(key) from None
            raise
        body = response["Body"]
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def presigned_url(self, key: str, *, filename: str, ttl_s: int) -> str | None:
        url: str = self.client.generate_presigned_url(
            "get_object", ExpiresIn=ttl_s,
            Params={"Bucket": self.bucket, "Key": self._name(key),
                    "ResponseContentDisposition": f'attachment; filename="{filename}"'})
        return url

    def info(self, key: str) -> BlobInfo | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        return BlobInfo(key, int(head["ContentLength"]))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def keys(self, prefix: str) -> Iterator[str]:
        name = self._name(prefix.rstrip("/"))
        skip = len(self.prefix) + 1 if self.prefix else 0
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                       Prefix=name)
        for page in pages:
            for item in page.get("Contents", []):
                found = item["Key"]
                if found == name or found.startswith(name + "/"):
                    yield found[skip:]


class _Multipart:
    """One multipart upload: parts as they fill, then complete, or abort on any failure."""

    def __init__(self, client: Any, bucket: str, name: str) -> None:
        self.client, self.bucket, self.name = client, bucket, name
        self.upload_id = client.create_multipart_upload(Bucket=bucket, Key=name)["UploadId"]
        self.parts: list[dict] = []

    def add(self, data: bytes) -> None:
        number = len(self.parts) + 1
        etag = self.client.upload_part(Bucket=self.bucket, Key=self.name, PartNumber=number,
                                       UploadId=self.upload_id, Body=data)["ETag"]
        self.parts.append({"PartNumber": number, "ETag": etag})

    def complete(self) -> None:
        self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.name,
                                              UploadId=self.upload_id,
                                              MultipartUpload={"Parts": self.parts})

    def abort(self) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.name,
                                               UploadId=self.upload_id)
        except Exception as exc:  # the error that got us here is the one to raise
            # The store keeps the parts until a lifecycle rule for incomplete uploads (or a
            # later sweep) removes them.
            log.warning("could not abort the upload of %s: %s", self.name, exc)


def _outage(exc: BaseException) -> bool:
    # Connection refused or reset, timeouts, a body cut off; or the store's own 5xx.
    if isinstance(exc, (BotoConnectionError, HTTPClientError, ResponseStreamingError)):
        return True
    return isinstance(exc, ClientError) and int(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) >= 500


add_outage_test(_outage)


def _missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")
