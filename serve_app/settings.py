"""The one place the process environment is read, typed.

Our own variables share one prefix, ``GGUF_SERVE_``. The Hugging Face variables (``HF_ENDPOINT``, ``HF_TOKEN``,
``HF_HUB_OFFLINE``) and ``RAY_ADDRESS`` keep the names their own libraries and platforms document, so a user's
existing environment works unchanged. ``Settings()`` reads the environment when it is built: build one where the
value is needed rather than caching it at import, so a process (or a test) that changes its environment is heard.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_HF_ENDPOINT = "https://huggingface.co"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GGUF_SERVE_", extra="ignore", frozen=True)

    # ---- ours (GGUF_SERVE_*) ----
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="Comma-separated bearer keys, added to server.api_keys.")
    low_latency: bool = Field(
        default=True, description="0 turns off by-value handle calls from the RunPod worker to the Ingress.")
    app_name: str = Field(default="llm", description="The Serve application the RunPod worker calls.")
    config: str = Field(default="serve_config.yaml", description="Serve config the RunPod worker deploys.")
    runpod_max_concurrency: int | None = Field(default=None, ge=1, description="Cap on jobs per worker.")
    runpod_ready_timeout_s: float = Field(default=3600.0, gt=0, description="How long the worker waits for ready.")
    runpod_max_input_bytes: int = Field(default=4 * 1024 * 1024, ge=1024,
                                        description="Largest RunPod job input (its JSON), refused before any work.")

    runpod_mode: Literal["auto", "queue", "lb"] = Field(
        default="auto", description="RunPod endpoint type: queue (jobs) or lb (HTTP on $PORT, /ping on "
        "$PORT_HEALTH); auto: queue when RunPod hands out jobs (RUNPOD_WEBHOOK_GET_JOB), lb when PORT or "
        "PORT_HEALTH is set, else queue.")

    # ---- RunPod's own names: its job API (queue endpoints), its ports (load-balancing endpoints) ----
    runpod_webhook_get_job: str | None = Field(default=None, validation_alias="RUNPOD_WEBHOOK_GET_JOB")
    port: int | None = Field(default=None, ge=1, le=65535, validation_alias="PORT")
    port_health: int | None = Field(default=None, ge=1, le=65535, validation_alias="PORT_HEALTH")

    # ---- cold start: read-only model sources the cache consults (serve_app/cache/sources.py); "" turns off ----
    baked_dir: str = Field(default="/opt/models",
                           description="Read-only model directory baked into the image, consulted first.")
    hf_cache_dirs: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("/runpod-volume/huggingface-cache/hub",),
        description="Comma-separated Hugging Face cache directories to adopt verified models from.")

    # ---- other libraries' and platforms' own names ----
    hf_endpoint: str | None = Field(default=None, validation_alias="HF_ENDPOINT")
    hf_token: SecretStr | None = Field(default=None, validation_alias="HF_TOKEN")
    hf_offline: bool = Field(default=False, validation_alias=AliasChoices("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    ray_address: str | None = Field(default=None, validation_alias="RAY_ADDRESS")

    # ---- builder: Ray Serve's own event-loop switches, when the operator set them (Ray's own names) ----
    ray_serve_run_user_code_in_separate_thread: str | None = Field(
        default=None, validation_alias="RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD")
    ray_serve_run_router_in_separate_loop: str | None = Field(
        default=None, validation_alias="RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP")

    # ---- engine: the GPU CUDA shows this process (CUDA's own name) ----
    cuda_visible_devices: str | None = Field(default=None, validation_alias="CUDA_VISIBLE_DEVICES")

    @field_validator("api_keys", "hf_cache_dirs", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(k.strip() for k in v.split(",") if k.strip())
        return v

    @field_validator("hf_endpoint", "ray_address", "runpod_webhook_get_job", "port", "port_health", mode="before")
    @classmethod
    def _blank_is_default(cls, v: object) -> object:
        if isinstance(v, str) and not v.strip():
            return None
        return v

    def endpoint(self) -> str:
        return (self.hf_endpoint or DEFAULT_HF_ENDPOINT).rstrip("/")

    def address(self) -> str:
        return self.ray_address or "auto"

    def runpod_endpoint(self) -> Literal["queue", "lb"]:
        """The endpoint type the RunPod worker serves (``runpod_mode``, or what the environment says)."""
        if self.runpod_mode != "auto":
            return self.runpod_mode
        if self.runpod_webhook_get_job:
            return "queue"
        return "lb" if self.port is not None or self.port_health is not None else "queue"

    def health_port(self) -> int | None:
        """Where /ping answers beside the HTTP API; None when it is the HTTP port itself (the Ingress answers)."""
        if self.port_health is None or self.port_health == self.port:
            return None
        return self.port_health

    @field_validator("hf_token", mode="before")
    @classmethod
    def _blank_token(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("hf_offline", mode="before")
    @classmethod
    def _truthy(cls, v: object) -> object:
        if isinstance(v, str):
            return v.strip().lower() in {"1", "on", "yes", "true"}
        return v

    def ray_serve_loop_overrides(self) -> dict[str, str]:
        """The operator's own values of the two Ray Serve loop switches the builder sets on the token path."""
        given = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": self.ray_serve_run_user_code_in_separate_thread,
                 "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": self.ray_serve_run_router_in_separate_loop}
        return {k: v for k, v in given.items() if v is not None}

    def token(self) -> str | None:
        return self.hf_token.get_secret_value() if self.hf_token is not None else None
