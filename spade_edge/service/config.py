"""The service's limits and behaviour: one frozen object, checked once. docs/service.md lists every
bound with its number and the threat model they answer."""

from __future__ import annotations

from dataclasses import dataclass

RELOAD_MODES = ("off", "local", "remote")


@dataclass(frozen=True)
class ServiceConfig:
    """Limits and behaviour of the service (one frozen object, checked once)."""

    queue_size: int = 8  # requests in the service at once: decoding, waiting or running
    deadline: float = 10.0  # seconds from arrival to answer, unless the request asks for less
    max_deadline: float = 120.0  # a request's own deadline is clipped to this
    max_bytes: int = 32 << 20  # request body
    max_pixels: int = 40_000_000  # decoded image (width x height)
    expect_size: tuple[int, int] | None = None  # (width, height) every image must have, if set
    min_side: int = 8
    neighbors: int = 5  # nearest normal images listed in a response
    heatmap_cache: int = 32  # heat maps kept for GET /heatmaps/<id>.png (oldest dropped)
    warmup: int = 2  # predictions run before the service says it is ready (and after a reload)
    # POST /reload: off; local (clients on this machine, the default); remote (any client)
    reload: str = "local"
    reload_dirs: tuple[str, ...] = ()  # a /reload body may name files under these only (none: the current files)
    reload_token: str | None = None  # if set, POST /reload needs 'Authorization: Bearer <token>'
    # seconds a client has to send a whole request (request line, headers, body) from its first
    # byte; also how long an idle keep-alive connection is kept
    read_timeout: float = 10.0
    max_connections: int = 64  # open connections; past that only /health and /metrics are answered
    max_parts: int = 16  # parts of a multipart body
    retry_after: int = 1  # seconds, in 503 answers
    # seconds one image may hold the worker before health says 'stalled' (0: max(60 s, 3 x deadline))
    stall_after: float = 0.0

    @property
    def stall_seconds(self) -> float:
        return self.stall_after or max(60.0, 3 * self.deadline)

    @property
    def allow_reload(self) -> bool:
        return self.reload != "off"

    @property
    def max_decode_bytes(self) -> int:
        """Decoded-pixel memory one request may take (``runtime.images.decode_cost``): 4 bytes a
        pixel at ``max_pixels``, what an 8-bit RGB image needs (Pillow stores RGB in 4 bytes)."""
        return 4 * self.max_pixels

    @property
    def max_receiving_bytes(self) -> int:
        """Bytes of request bodies held at once, counted as they arrive (bodies are read before a
        queue slot is taken, so they have their own bound): a full queue's worth."""
        return self.queue_size * self.max_bytes

    def __post_init__(self):
        for name in ("queue_size", "max_bytes", "max_pixels", "min_side", "max_connections", "max_parts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.deadline <= 0 or self.read_timeout <= 0:
            raise ValueError("deadline and read_timeout must be positive")
        if self.neighbors < 0 or self.heatmap_cache < 0 or self.warmup < 0:
            raise ValueError("neighbors, heatmap_cache and warmup cannot be negative")
        if self.reload not in RELOAD_MODES:
            raise ValueError(f"reload must be one of {', '.join(RELOAD_MODES)}, got {self.reload!r}")
        if isinstance(self.reload_dirs, (str, bytes)) or not all(isinstance(d, str) and d for d in self.reload_dirs):
            raise ValueError("reload_dirs must be a sequence of directory paths")
        object.__setattr__(self, "reload_dirs", tuple(self.reload_dirs))
        if self.reload_token is not None and not self.reload_token.strip():
            raise ValueError("reload_token must not be empty (leave it unset for no token)")
