"""Config of the ``retrieve`` stage (section ``retrieve``, with its ``download`` subsection).

The section holds the keys every backend shares; each backend of
:mod:`raugment.stages.retrieve.backends` adds its own (``service_url``, ``indice_name`` ...), flat in
the same section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from raugment.core.config import ActorPoolConfig, ConfigError, positive, with_plugins
from raugment.stages.retrieve.backends import RETRIEVERS


@dataclass
class DownloadConfig:
    """Untrusted downloads (``raugment.stages.retrieve.download``): CPU actors, many requests in flight each.

    Addresses follow :mod:`raugment.stages.retrieve.addresses` (the IANA special-purpose
    registries): link-local (169.254.x, fe80::), cloud metadata, multicast, unspecified,
    documentation, benchmarking, reserved and site-local addresses are always refused, and 6to4,
    NAT64 and Teredo addresses are judged by the IPv4 address they embed; ``allow_loopback`` opens
    127/8 and ::1 (tests and the local demo), ``allow_private`` RFC 1918, 100.64/10 and fc00::/7
    only. Every redirect hop is checked again.
    """

    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(concurrency=2, num_cpus=0.25,
                                                                          batch_size=64))
    concurrency_per_actor: int = 32
    timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.5
    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_redirects: int = 5
    allow_loopback: bool = False
    allow_private: bool = False
    resize_max_side: int | None = None
    image_format: Literal["JPEG", "PNG", "WEBP"] = "JPEG"
    quality: int = 90
    user_agent: str = "raugment/0.1 (+research data augmentation)"

    def validate(self, key: str) -> None:
        positive(self.concurrency_per_actor, f"{key}.concurrency_per_actor")
        positive(self.timeout_s, f"{key}.timeout_s")
        positive(self.max_bytes, f"{key}.max_bytes")
        positive(self.max_pixels, f"{key}.max_pixels")
        if self.retries < 0 or self.max_redirects < 0 or self.backoff_s < 0:
            raise ConfigError(f"{key}: retries, max_redirects and backoff_s must be >= 0")


@with_plugins(RETRIEVERS)
@dataclass
class RetrieveConfig:
    """CLIP kNN retrieval with quota-driven growth of k (paper 3.1, "Laion nearest neighbor").

    Per class, k starts at ``k_start_factor * n`` and grows by ``k_step_factor * n`` up to
    ``k_max_factor * n`` (paper: 1.4 n ... 10 x 1.4 n) until n images survive downloads and the
    filters; the n most similar survivors are kept. n = ``images_per_class``, or
    ``ratio`` percent of the class's training images when ``ratio`` is set.
    """

    backend: str = "local"               # a name in RETRIEVERS (raugment.stages.retrieve.backends)
    # The index directory of a backend that needs one (default: the index stage's output).
    index: str | None = None
    url_base: str | None = None       # joined with relative URLs of the index (local demo pool)
    clip_model: str | None = None     # None: the model the index was built with
    clip_pretrained: str | None = None
    device: str = "auto"
    prompt: str = "simple_nows"
    images_per_class: int = 130
    ratio: float | None = None
    k_start_factor: float = 1.4
    k_step_factor: float = 1.4
    k_max_factor: float = 14.0
    aesthetic_threshold: float | None = 5.0
    # LAION predictor weights (a local path) for hits without a score; "random" by name for tests.
    # Required while aesthetic_threshold is set (null threshold: no aesthetic scoring at all).
    aesthetic_model: str | None = None
    nsfw_threshold: float = 0.5             # index tag / safety score at or above this is dropped
    drop_nsfw: bool = True
    safety_model: str | None = None      # SD safety checker on downloaded images (None: tag only)
    deduplicate: bool = True
    timeout_s: float = 30.0              # a request to a remote backend, and how often to retry it
    retries: int = 3
    download: DownloadConfig = field(default_factory=DownloadConfig)
    # Actors kept for the whole stage (every k round): CLIP + aesthetic predictor for hits that come
    # without an aesthetic score, and the safety checker. They use a GPU when num_gpus > 0 and the
    # cluster has one, else the CPU (gpu_fallback); fractional CPUs leave room beside the download
    # actors on 2 CPUs.
    score_pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(
        num_cpus=0.25, num_gpus=0.25, batch_size=64, gpu_fallback=True))
    safety_pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(
        num_cpus=0.25, num_gpus=0.25, batch_size=32, gpu_fallback=True))

    def validate(self, key: str) -> None:
        positive(self.images_per_class, f"{key}.images_per_class")
        if self.k_start_factor < 1 or self.k_max_factor < self.k_start_factor or self.k_step_factor <= 0:
            raise ConfigError(f"{key}: need 1 <= k_start_factor <= k_max_factor and k_step_factor > 0, got "
                              f"k_start_factor={self.k_start_factor}, k_max_factor={self.k_max_factor}, "
                              f"k_step_factor={self.k_step_factor} (paper: 1.4, 14, 1.4)")
        if self.ratio is not None and not 0 < self.ratio <= 2500:
            raise ConfigError(f"{key}.ratio is a percentage in (0, 2500], got {self.ratio}")
