"""An S3 bucket's settings, importable without boto3 (the optional `s3` extra)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class S3Config:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region_name: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    public_url: str | None = None  # objects are served from here; else presigned URLs
    url_expiry_seconds: int = 86400

    def redacted(self) -> dict:
        shown = asdict(self)
        if self.secret_access_key:
            shown["secret_access_key"] = "***"
        if self.access_key_id:
            shown["access_key_id"] = self.access_key_id[:4] + "***"
        return shown
