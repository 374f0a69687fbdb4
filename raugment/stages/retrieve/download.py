"""Downloading untrusted image URLs: many requests in flight per Ray CPU actor, never a crash.

The core is :func:`download_urls` (plain asyncio + aiohttp, usable without Ray); :class:`DownloadPool`
runs it on Ray actors that stay up for every call (a stage's k rounds). Every URL ends
as one row of ``schema.DOWNLOADS``: the verified image bytes, or a ``reason`` such as ``http_404``,
``timeout``, ``too_large``, ``too_many_pixels``, ``not_an_image``, ``corrupt``, ``refused_address``,
``too_many_redirects``, ``bad_url``.

Security (downloads are untrusted input): only http/https; the host of every hop (first request and each
redirect, followed by hand) is resolved and checked *before* a connection is made, and the
connector's resolver checks again so a DNS answer that changes in between is refused too
(aiohttp skips the resolver for IP literals, which the pre-check covers). Response size is capped
while streaming, pixels are capped before decoding, and the bytes must decode fully. Nothing from
a URL becomes a file path. Decoding runs on at most :func:`decode_threads` threads per actor (its
``pool.num_cpus``): a decoded image takes up to ``3 x max_pixels`` bytes, and the machine's CPU
count says nothing about the memory one actor may use.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import pyarrow as pa

from raugment.core import schema
from raugment.core.imageio import ImageDecodeError, decode_image, encode_image, item_id, resize_max_side
from raugment.stages.retrieve.addresses import refusal
from raugment.stages.retrieve.config import DownloadConfig

log = logging.getLogger(__name__)

REDIRECTS = (301, 302, 303, 307, 308)
# Worth another try: the server or the network may do better later. 4xx and bad bytes will not.
RETRYABLE = {"timeout", "connect_error", "disconnected", "broken_body", "http_429", "http_500",
             "http_502", "http_503", "http_504"}


class RefusedAddress(OSError):
    """A host resolved to an address the config does not allow (never connected to)."""


class _Failed(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DownloadResult:
    """The outcome of one URL. ``reason`` is None on success."""

    url: str
    reason: str | None = None
    detail: str = ""
    attempts: int = 0
    image: bytes | None = None
    num_bytes: int = 0
    content_hash: str | None = None
    width: int | None = None
    height: int | None = None

    def row(self) -> dict[str, Any]:
        """A ``schema.DOWNLOADS`` row; ids are stable per URL."""
        return {schema.ID: download_id(self.url), schema.URL: self.url, schema.REASON: self.reason,
                schema.DETAIL: self.detail[:500] or None, schema.ATTEMPTS: self.attempts,
                schema.NUM_BYTES: self.num_bytes, schema.CONTENT_HASH: self.content_hash,
                schema.IMAGE: self.image, schema.WIDTH: self.width, schema.HEIGHT: self.height}


def download_id(url: str) -> str:
    """Stable id of a URL (the same as retrieved images use)."""
    return item_id("ret", url)


def address_refused(ip: str, cfg: DownloadConfig) -> bool:
    """True if connecting to ``ip`` is not allowed by ``cfg`` (:func:`refused_because` says why)."""
    return refused_because(ip, cfg) is not None


def refused_because(ip: str, cfg: DownloadConfig) -> str | None:
    """Why ``ip`` is refused under ``cfg`` (the special-purpose block it lies in), or None if allowed.

    The policy is :mod:`raugment.stages.retrieve.addresses`: the IANA special-purpose registries;
    ``allow_loopback`` / ``allow_private`` open loopback / private-use ranges only, never
    link-local, metadata, or loopback and private hosts behind 6to4, NAT64 or Teredo.
    """
    return refusal(ip, cfg.allow_loopback, cfg.allow_private)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


def _guarded_resolver(cfg: DownloadConfig):
    """An aiohttp resolver that drops refused addresses (built inside the running loop)."""
    from aiohttp.resolver import ThreadedResolver

    class GuardedResolver(ThreadedResolver):
        async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
            infos = await super().resolve(host, port, family)
            allowed = [i for i in infos if not address_refused(i["host"], cfg)]
            if not allowed:
                refused = "; ".join(sorted({refused_because(i["host"], cfg) or i["host"] for i in infos}))
                raise RefusedAddress(f"{host} resolves only to refused addresses ({refused})")
            return allowed

    return GuardedResolver()


async def _check_host(host: str, resolver: Any, cfg: DownloadConfig) -> None:
    if _is_ip(host):
        why = refused_because(host, cfg)
        if why is not None:
            raise _Failed("refused_address", why)
        return
    try:
        await resolver.resolve(host, 0, socket.AF_UNSPEC)
    except RefusedAddress as exc:
        raise _Failed("refused_address", str(exc)) from None
    except OSError as exc:
        raise _Failed("dns_error", f"{host}: {exc}") from None


async def _fetch_once(session: Any, url: str, resolver: Any, cfg: DownloadConfig) -> bytes:
    import aiohttp

    for _hop in range(cfg.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _Failed("bad_url", f"only http(s) URLs with a host are fetched: {url[:200]}")
        await _check_host(parts.hostname, resolver, cfg)
        try:
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status in REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        raise _Failed("bad_redirect", f"{resp.status} without Location")
                    url = urljoin(url, location)
                    continue
                if resp.status != 200:
                    raise _Failed(f"http_{resp.status}")
                declared = resp.content_length
                if declared is not None and declared > cfg.max_bytes:
                    raise _Failed("too_large", f"Content-Length {declared} > {cfg.max_bytes}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body.extend(chunk)
                    if len(body) > cfg.max_bytes:
                        raise _Failed("too_large", f"more than {cfg.max_bytes} bytes")
                return bytes(body)
        except (asyncio.TimeoutError, TimeoutError):
            raise _Failed("timeout", f"{cfg.timeout_s} s") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(getattr(exc, "os_error", None), RefusedAddress):
                raise _Failed("refused_address", str(exc.os_error)) from None
            raise _Failed("connect_error", str(exc)) from None
        except aiohttp.ServerDisconnectedError as exc:
            raise _Failed("disconnected", str(exc)) from None
        except aiohttp.ClientPayloadError as exc:
            raise _Failed("broken_body", str(exc)) from None
        except aiohttp.InvalidURL as exc:
            raise _Failed("bad_url", str(exc)) from None
        except aiohttp.ClientError as exc:
            raise _Failed("client_error", f"{type(exc).__name__}: {exc}") from None
    raise _Failed("too_many_redirects", f"more than {cfg.max_redirects}")


def _verify(data: bytes, cfg: DownloadConfig) -> tuple[bytes, int, int]:
    """Decode (pixel cap + verify); re-encode only when resizing. Runs in a worker thread."""
    img = decode_image(data, max_pixels=cfg.max_pixels)
    if cfg.resize_max_side and max(img.size) > cfg.resize_max_side:
        img = resize_max_side(img, cfg.resize_max_side)
        data = encode_image(img, cfg.image_format, cfg.quality)
    return data, img.width, img.height


def decode_threads(num_cpus: float) -> int:
    """Images an actor with ``num_cpus`` CPUs decodes at once: its whole CPUs, at least 1."""
    return max(1, math.floor(num_cpus))


async def _download_one(session: Any, url: str, resolver: Any, cfg: DownloadConfig,
                        gate: asyncio.Semaphore, decoder: Executor) -> DownloadResult:
    result = DownloadResult(url=url)
    async with gate:
        for attempt in range(cfg.retries + 1):
            result.attempts = attempt + 1
            try:
                data = await _fetch_once(session, url, resolver, cfg)
                result.reason, result.detail = None, ""
                break
            except _Failed as exc:
                result.reason, result.detail = exc.reason, exc.detail
                if exc.reason not in RETRYABLE or attempt == cfg.retries:
                    return result
                await asyncio.sleep(cfg.backoff_s * (2 ** attempt))
            except Exception as exc:  # a bug or an odd library error must not kill the batch
                result.reason, result.detail = "error", f"{type(exc).__name__}: {exc}"
                return result
    try:
        loop = asyncio.get_running_loop()
        result.num_bytes = len(data)
        result.content_hash = hashlib.sha256(data).hexdigest()
        result.image, result.width, result.height = await loop.run_in_executor(decoder, _verify, data, cfg)
    except ImageDecodeError as exc:
        result.reason, result.detail = exc.reason, str(exc)
        result.image = None
    return result


async def _download_all(urls: Sequence[str], cfg: DownloadConfig, decoder: Executor) -> list[DownloadResult]:
    import aiohttp

    resolver = _guarded_resolver(cfg)
    connector = aiohttp.TCPConnector(resolver=resolver, limit=cfg.concurrency_per_actor,
                                     ttl_dns_cache=60)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    gate = asyncio.Semaphore(cfg.concurrency_per_actor)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                     headers={"User-Agent": cfg.user_agent}) as session:
        return list(await asyncio.gather(*(_download_one(session, u, resolver, cfg, gate, decoder) for u in urls)))


def download_urls(urls: Sequence[str], cfg: DownloadConfig) -> list[DownloadResult]:
    """Download ``urls`` concurrently (``cfg.concurrency_per_actor`` in flight); one result each, in order.

    At most ``decode_threads(cfg.pool.num_cpus)`` images decode at once: the pool's actors are
    started with those CPUs.
    """
    if not urls:
        return []
    with ThreadPoolExecutor(decode_threads(cfg.pool.num_cpus), thread_name_prefix="decode") as decoder:
        return asyncio.run(_download_all(list(urls), cfg, decoder))


def results_table(results: Sequence[DownloadResult]) -> pa.Table:
    """Results as a ``schema.DOWNLOADS`` table."""
    return schema.to_table([r.row() for r in results], schema.DOWNLOADS)


class DownloadWorker:
    """Downloads URL lists inside a download actor (:class:`DownloadPool`); a plain class, usable in-process."""

    def __init__(self, cfg: DownloadConfig):
        import aiohttp  # noqa: F401  (imported when the actor starts, not in its first round)

        self.cfg = cfg

    def download(self, urls: Sequence[str]) -> pa.Table:
        """``urls`` -> one ``schema.DOWNLOADS`` row each, in order."""
        t0 = time.perf_counter()
        table = results_table(download_urls([str(u) for u in urls], self.cfg))
        log.debug("downloaded %d URLs in %.2f s", len(urls), time.perf_counter() - t0)
        return table


class DownloadPool:
    """Download actors (resources from ``cfg.pool``) started once and reused for every URL list.

    Retrieval downloads once per k round; a Ray Data job per round would start (and stop) its
    actor pool every time, so these actors live until :meth:`close` (a context manager). Ray must
    be initialised (``cluster.init_ray``). Downloading is CPU and network work: no GPU is asked for.
    """

    def __init__(self, cfg: DownloadConfig):
        from raugment.runtime.cluster import ActorGroup

        self.cfg = cfg
        self.group = ActorGroup(DownloadWorker, cfg.pool, cfg, num_gpus=0.0, name="download")

    def download(self, urls: Sequence[str]) -> Iterator[pa.Table]:
        """Download ``urls`` on the actors; yields ``schema.DOWNLOADS`` tables as they finish."""
        urls = list(urls)
        if not urls:
            return
        # Small lists still spread over every actor: no batch larger than an even share.
        size = max(1, min(self.cfg.pool.batch_size, math.ceil(len(urls) / self.cfg.pool.concurrency)))
        batches = [urls[i:i + size] for i in range(0, len(urls), size)]
        for table in self.group.map("download", batches, ordered=False):
            yield schema.conform(table, schema.DOWNLOADS)

    def close(self) -> None:
        """Stop the actors."""
        self.group.close()

    def __enter__(self) -> DownloadPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
