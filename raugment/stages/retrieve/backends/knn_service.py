"""``knn_service`` backend: clip-retrieval's HTTP protocol (``POST /knn-service``), remote or a local ``clip back``.

clip-retrieval itself cannot be installed beside Ray 2.60 (clip-retrieval 2.45 pins pyarrow<16, Ray
needs pyarrow>=17; ``tools/clip_retrieval/`` runs it from a side environment), so this is a small client
of its protocol. Every field is sent explicitly because the client and server defaults differ;
``num_result_ids`` is larger than ``num_images`` because the server de-duplicates and safety-filters
*after* the top-``num_result_ids`` search and then cuts to ``num_images`` (its own client asks for
exactly ``num_images`` and comes back short). ``aesthetic_score``/``aesthetic_weight`` move the
query embedding toward "aesthetic" images; they do not filter — the >= 5 threshold is applied by
raugment afterwards.

Keys (section ``retrieve``, declared by :class:`Settings`): ``service_url`` (required with this
backend), ``indice_name``, ``result_ids_factor``, ``service_aesthetic_score`` and
``service_aesthetic_weight``; the shared ``retrieve.timeout_s``/``retries`` bound each request and
``deduplicate``/``drop_nsfw`` are sent to the service too.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raugment.core import schema
from raugment.core.config import ConfigError, PluginSettings
from raugment.stages.retrieve.backends import RETRIEVERS, RetrievalBackend

if TYPE_CHECKING:
    from raugment.config import Config

log = logging.getLogger(__name__)

NAME = "knn_service"


@dataclass
class Settings(PluginSettings):
    """Keys of the ``knn_service`` backend (section ``retrieve``)."""

    service_url: str | None = None    # e.g. http://127.0.0.1:1234/knn-service
    indice_name: str = "laion5B-L-14"
    result_ids_factor: float = 3.0       # num_result_ids = factor * num_images
    service_aesthetic_score: int | None = None   # query steering only, not a filter
    service_aesthetic_weight: float | None = None

    def validate(self, key: str) -> None:
        """``self`` is the whole ``retrieve`` section (its ``backend`` included)."""
        if self.result_ids_factor < 1:
            raise ConfigError(f"{key}.result_ids_factor must be >= 1 (ask for more ids than images)")
        if getattr(self, "backend", None) == NAME and not self.service_url:
            raise ConfigError(f"{key}.service_url is required when {key}.backend='{NAME}'")

_NSFW_TAGS = {"UNLIKELY": 0.0, "UNSURE": 0.5, "NSFW": 1.0}


class KnnServiceError(RuntimeError):
    """The service could not answer (after retries) or answered with something unusable."""


def build_request(cfg: Config, prompt: str, k: int) -> dict[str, Any]:
    """The JSON body of one ``/knn-service`` query for ``k`` images."""
    rcfg = cfg.retrieve
    keys = Settings.of(rcfg)
    return {
        "text": prompt,
        "image": None,
        "image_url": None,
        "embedding_input": None,
        "modality": "image",
        "indice_name": keys.indice_name,
        "num_images": int(k),
        "num_result_ids": math.ceil(k * keys.result_ids_factor),
        "use_mclip": False,
        "deduplicate": bool(rcfg.deduplicate),
        "use_safety_model": bool(rcfg.drop_nsfw),
        "use_violence_detector": False,
        # The server reads "" as "no steering".
        "aesthetic_score": "" if keys.service_aesthetic_score is None else int(keys.service_aesthetic_score),
        "aesthetic_weight": "" if keys.service_aesthetic_weight is None else float(keys.service_aesthetic_weight),
    }


def _field(item: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` present in ``item`` with a value; NaN counts as missing.

    ``clip back`` reads metadata with pandas, so a null float (or a null in a string column that
    pandas widened) comes back as NaN, which its JSON writer emits as the bare token ``NaN``.
    """
    for name in names:
        value = item.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        return value
    return None


def _nsfw(item: dict[str, Any]) -> float | None:
    tag = _field(item, "punsafe", schema.NSFW_SCORE, "NSFW", "nsfw")
    return _NSFW_TAGS.get(tag) if isinstance(tag, str) else (None if tag is None else float(tag))


def parse_response(items: Any) -> list[dict[str, Any]]:
    """Service results -> backend hit dicts, most similar first.

    Rows without a url are skipped: ``clip back`` returns up to ``num_result_ids`` rows but fills
    metadata only for the first ``num_images``; the rest carry just ``id`` and ``similarity``.
    Metadata is read under LAION's spellings or raugment's own (an index exported with
    ``raugment index export-clip-back`` serves ``aesthetic_score``/``nsfw_score``/``pool_label``).
    """
    if isinstance(items, dict) and "error" in items:
        raise KnnServiceError(f"knn service error: {items['error']}")
    if not isinstance(items, list):
        raise KnnServiceError(f"knn service answered {type(items).__name__}, expected a list of results")
    hits: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict) or not _field(item, "url"):
            continue
        aesthetic = _field(item, "aesthetic", schema.AESTHETIC_SCORE, "AESTHETIC_SCORE")
        label = _field(item, schema.POOL_LABEL)
        caption = _field(item, "caption")
        hits.append({schema.URL: str(item["url"]), schema.CAPTION: None if caption is None else str(caption),
                     schema.CLIP_SIMILARITY: float(item.get("similarity", float("nan"))),
                     schema.AESTHETIC_SCORE: None if aesthetic is None else float(aesthetic),
                     schema.NSFW_SCORE: _nsfw(item), schema.POOL_LABEL: None if label is None else str(label),
                     "embedding": None})
    hits.sort(key=lambda h: math.inf if math.isnan(h[schema.CLIP_SIMILARITY]) else -h[schema.CLIP_SIMILARITY])
    return hits


@RETRIEVERS.register(NAME)
class KnnServiceRetriever(RetrievalBackend):
    """Queries a clip-retrieval ``/knn-service`` endpoint with timeouts and retries."""

    settings = Settings

    def __init__(self, cfg: Config, index_path: str | None = None):
        import requests

        self.cfg = cfg
        url = Settings.of(cfg.retrieve).service_url
        if not url:  # the section's validate() requires it with this backend
            raise ConfigError(f"retrieve.service_url is required when retrieve.backend='{NAME}'")
        self.url: str = url
        self.session = requests.Session()
        # Images were embedded by the service's model; name it to score downloads (aesthetics).
        self.clip_model = cfg.retrieve.clip_model or "ViT-L-14"
        self.clip_pretrained = cfg.retrieve.clip_pretrained if cfg.retrieve.clip_model else "openai"
        self._encoder: Any = None

    def encoder(self) -> Any:
        if self._encoder is None:
            from raugment.models.clip import load_clip
            from raugment.runtime.cluster import pick_device

            self._encoder = load_clip(self.clip_model, self.clip_pretrained, pick_device(self.cfg.retrieve.device))
        return self._encoder

    def _post(self, body: dict[str, Any]) -> Any:
        import requests

        rcfg = self.cfg.retrieve
        last = ""
        for attempt in range(rcfg.retries + 1):
            try:
                resp = self.session.post(self.url, json=body, timeout=rcfg.timeout_s)
                if resp.status_code < 500 and resp.status_code != 429:
                    if resp.status_code != 200:
                        raise KnnServiceError(f"{self.url} answered HTTP {resp.status_code}: {resp.text[:200]}")
                    return resp.json()
                last = f"HTTP {resp.status_code}"
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
            except ValueError as exc:  # JSON decoding
                raise KnnServiceError(f"{self.url} did not answer JSON: {exc}") from None
            if attempt < rcfg.retries:
                time.sleep(min(0.5 * 2 ** attempt, 10.0))
        raise KnnServiceError(f"{self.url} failed after {rcfg.retries + 1} attempts: {last}")

    def query(self, prompts: list[str], k: int) -> list[list[dict[str, Any]]]:
        """Up to ``k`` hits per prompt, most similar first (one request per prompt)."""
        return [parse_response(self._post(build_request(self.cfg, p, k)))[:k] for p in prompts]
