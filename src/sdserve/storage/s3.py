"""Files in an S3-compatible bucket (AWS, R2, Spaces, B2, MinIO, moto...) through boto3."""

from __future__ import annotations

import mimetypes
import time
from pathlib import Path, PurePosixPath

import boto3
import botocore.config
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError

from sdserve.errors import S3Unavailable
from sdserve.storage.local import InvalidStorageKey
from sdserve.storage.s3config import S3Config


class S3Storage:
    def __init__(self, config: S3Config):
        self.config = config
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region_name,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            config=botocore.config.Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=5,
                read_timeout=30,
                retries={"max_attempts": 2, "mode": "standard"},
            ),
        )

    def _object(self, key: str) -> str:
        parts = PurePosixPath(key).parts
        if not parts or any(p in ("..", "", ".") for p in parts) or key.startswith("/"):
            raise InvalidStorageKey(key)
        if "\\" in key or "//" in key:
            raise InvalidStorageKey(key)
        prefix = self.config.prefix.strip("/")
        return f"{prefix}/{key}" if prefix else key

    def _fail(self, operation: str, exc: Exception) -> S3Unavailable:
        reason = type(exc).__name__
        if isinstance(exc, ClientError):
            reason = exc.response.get("Error", {}).get("Code", reason)
        return S3Unavailable(f"S3 {operation} on bucket {self.config.bucket} failed: {reason}")

    def put(self, key: str, data: bytes) -> None:
        kind = mimetypes.guess_type(key)[0] or "application/octet-stream"
        try:  # one PUT is atomic: a re-run job overwrites, never leaves half an object
            self._client.put_object(
                Bucket=self.config.bucket, Key=self._object(key), Body=data, ContentType=kind
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("put", exc) from None

    def get(self, key: str) -> bytes:
        try:
            answer = self._client.get_object(Bucket=self.config.bucket, Key=self._object(key))
            return answer["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(key) from None
            raise self._fail("get", exc) from None
        except BotoCoreError as exc:
            raise self._fail("get", exc) from None

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.config.bucket, Key=self._object(key))
            return True
        except InvalidStorageKey:
            return False
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return False
            raise self._fail("head", exc) from None
        except BotoCoreError as exc:
            raise self._fail("head", exc) from None

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.config.bucket, Key=self._object(key))
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("delete", exc) from None

    def delete_older_than(self, folder: str, max_age_seconds: float) -> int:
        cutoff = time.time() - max_age_seconds
        removed = 0
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.config.bucket, Prefix=self._object(folder) + "/"
            )
            for page in pages:
                old = [
                    {"Key": item["Key"]}
                    for item in page.get("Contents", [])
                    if item["LastModified"].timestamp() < cutoff
                ]
                if old:
                    self._client.delete_objects(
                        Bucket=self.config.bucket, Delete={"Objects": old, "Quiet": True}
                    )
                    removed += len(old)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("cleanup", exc) from None
        return removed

    def list(self, prefix: str) -> list[str]:
        """Keys (without the storage prefix) of the objects whose key starts with `prefix`."""
        base = self._object(prefix)
        strip = len(self._object(prefix)) - len(prefix)
        found = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.config.bucket, Prefix=base
            )
            for page in pages:
                found += [item["Key"][strip:] for item in page.get("Contents", [])]
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("list", exc) from None
        return found

    def upload_file(self, key: str, path: Path) -> None:
        """A large file, in parts (boto3's managed transfer), without reading it into memory."""
        try:
            self._client.upload_file(str(path), self.config.bucket, self._object(key))
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise self._fail("upload", exc) from None

    def download_file(self, key: str, path: Path) -> None:
        try:
            self._client.download_file(self.config.bucket, self._object(key), str(path))
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("download", exc) from None

    def url(self, key: str) -> str:
        name = self._object(key)
        if self.config.public_url:
            return f"{self.config.public_url.rstrip('/')}/{name}"
        return self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.config.bucket, "Key": name},
            ExpiresIn=self.config.url_expiry_seconds,
        )

    def check(self) -> None:
        """Raise S3Unavailable unless the bucket can be written and deleted from."""
        probe = f".sdserve-probe/{time.time_ns()}"
        try:
            self._client.head_bucket(Bucket=self.config.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("head_bucket", exc) from None
        self.put(probe, b"ok")
        self.delete(probe)
