"""Every setting of the service, in one pydantic-settings class (environment prefix ``SLIMSERVE_``).

Embedded defaults need no configuration at all: a SQLite file and an artifact folder under
``SLIMSERVE_HOME`` (default ``./var``), one in-process worker, no API keys (and then the server
only binds to loopback). ``SLIMSERVE_DATABASE_URL`` (Postgres) and ``SLIMSERVE_STORAGE_URL``
(``s3://bucket/prefix``) scale out. Key lists are comma-separated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """The service's configuration; each field is one ``SLIMSERVE_<NAME>`` environment variable."""

    model_config = SettingsConfigDict(env_prefix="SLIMSERVE_", extra="ignore", frozen=True)

    home: Path = Field(Path("var"), description="folder for the default SQLite file and artifact folder")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<home>/slimserve.db")
    storage_url: str | None = Field(None, description="a folder or s3://bucket/prefix; default <home>/artifacts")
    database_busy_timeout_seconds: float = Field(5.0, gt=0, description="SQLite: wait this long for a write lock")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto); default AWS")
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="keys with upload/delete/cancel/deploy rights"
    )
    infer_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="keys that may only run inference and read"
    )
    host: str = Field("127.0.0.1", description="`slimserve serve` bind address (non-loopback needs an API key)")
    port: int = Field(8000, ge=0, le=65535, description="`slimserve serve` port")
    keep_alive_seconds: float = Field(
        75.0, gt=0, description="idle HTTP connections close after this: above any proxy's idle timeout"
    )
    access_log: bool = Field(False, description="log one line per HTTP request (off: ~30-50 us each on the hot path)")
    run_worker: bool = Field(True, description="`slimserve serve` also runs one in-process worker")
    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="largest model upload (413 past it)")
    max_data_bytes: int = Field(512 * 1024**2, gt=0, description="largest sample-data upload (413 past it)")
    upload_idle_seconds: float = Field(
        60.0, gt=0, description="a request body or unfinished head that sends nothing this long is cut off"
    )
    lease_seconds: float = Field(60.0, gt=0, description="a claimed job's lease; expired leases are reclaimed")
    heartbeat_seconds: float = Field(10.0, gt=0, description="how often a worker renews its lease")
    max_attempts: int = Field(3, ge=1, description="claims of one job before it fails (worker lost each time)")
    poll_seconds: float = Field(1.0, gt=0, description="idle worker's wait between claims")
    job_timeout_seconds: float = Field(3600.0, gt=0, description="wall-time limit of one optimization child")
    job_memory_bytes: int | None = Field(16 * 1024**3, gt=0, description="the child's address-space limit")
    job_cpu_threads: int | None = Field(None, ge=1, description="thread count for the child's math libraries")
    job_nice: int = Field(10, ge=0, le=19, description="the child's CPU priority drop: serving keeps the CPU")
    serve_models: bool = Field(True, description="`slimserve serve` serves every ready version over KServe v2")
    max_batch_size: int = Field(32, ge=1, le=4096, description="dynamic batching: rows per batch")
    preferred_batch_size: Annotated[list[int], NoDecode] = Field(
        default_factory=list, description="batch sizes dispatched at once, comma-separated"
    )
    max_queue_delay_microseconds: int = Field(2000, ge=0, description="longest wait to fill a batch")
    max_queue_size: int = Field(1024, ge=1, description="requests waiting per version; past it 503 at once")
    inference_timeout_seconds: float = Field(30.0, gt=0, description="not started by then: 503, never run later")
    concurrent_batches: int = Field(1, ge=1, description="batches running at once per version")
    inference_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads per session (0: its default)")
    registry_poll_seconds: float = Field(2.0, gt=0, description="how often serving follows the database's versions")
    drain_seconds: float = Field(5.0, ge=0, description="on SIGTERM: not ready, then this long before stopping")
    metrics_port: int | None = Field(None, ge=1, le=65535, description="serve /metrics on this port instead")
    metrics_enabled: bool = Field(True, description="serve Prometheus metrics on /metrics")
    docs_enabled: bool = Field(True, description="serve the OpenAPI page on /docs and /openapi.json")
    log_level: str = Field("info", description="log level of the service")

    @field_validator("preferred_batch_size", mode="before")
    @classmethod
    def _split_sizes(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [int(part) for part in value.split(",") if part.strip()]
        return value

    @field_validator("admin_keys", "infer_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def database(self) -> str:
        """The SQLAlchemy URL in effect."""
        return self.database_url or f"sqlite:///{(self.home / 'slimserve.db').resolve()}"

    @property
    def storage(self) -> str:
        """The artifact store location in effect (a folder path or an ``s3://`` URL)."""
        return self.storage_url or str((self.home / "artifacts").resolve())

    @property
    def auth_enabled(self) -> bool:
        """Whether requests need a key (any key configured)."""
        return bool(self.admin_keys or self.infer_keys)
