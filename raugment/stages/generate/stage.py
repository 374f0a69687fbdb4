"""The generation stage: prompts (or original images) -> Stable Diffusion images (paper 3.1).

Dataflow of ``run(cfg, dataset, finetune=None)`` (stage ``generate``)::

    pool of ClassGenerator actors started first (pipeline loaded once per actor, while the driver plans)
    classes table ──method.plan()──> prompts.parquet  (one row per image slot: class, index,
                                                       prompt, seed; deterministic)
    missing slots, one call per class, next class to the next free actor (ActorPool, ray.wait) ──>
        images/part-c<label>-*.parquet   (schema.IMAGES, source "generated", split "added")
        failures/part-c<label>-*.parquet (flagged samples "nsfw", exhausted slots "nsfw_unfillable")

* **One pool per stage run.** ``generate.pool.concurrency`` actors (at most one per class) serve
  every class of the method; start-up (process, torch/diffusers import, pipeline load) is paid
  once per actor and overlaps planning. Plain Ray actors, not a Ray Data job: the work is a
  handful of long calls, so a streaming executor would only add its own start-up.
* **Sharded by class.** Each call holds one class's missing slots, so one actor owns a class's
  quota: N GPUs work on N classes at once and NSFW replacement is decided in one place.
* **Deterministic.** A slot is (class, method, index) with seed ``slot_seed(cfg.seed, method,
  class_id, index)``; its id is ``item_id("gen-<method>", class_id, index, seed)``. A sample the
  safety checker flags is dropped and the slot is retried with the next attempt's seed (attempt
  ``k`` -> ``slot_seed(..., k)``) up to ``max_attempts_per_image`` times; a slot still unfilled is
  recorded ("nsfw_unfillable") and its class reported in ``stats.json`` (``unfilled_classes``).
* **Resumable, and the same after a resume.** A class's slots are cut into chunks of
  ``generate.shard_images`` by slot index; an actor makes a whole chunk (NSFW replacements
  included) and writes it as one ``images`` shard and then one ``failures`` shard (the chunk's
  done marker, empty when nothing was flagged), both named by class and chunk. A killed run keeps
  its finished chunks; a re-run (or a retried call after an actor restart) skips them and redoes
  an unfinished chunk from its first slot, with the same batches and seeds, so a resumed study
  trains on exactly the shards an uninterrupted one writes (shard boundaries never depend on
  timing or on where a kill landed). Failure rows have ids ``<slot id>#<attempt>``.
* **Provenance.** Every image row has method, prompt, seed, model id/revision, NSFW score and
  ``params`` (scheduler, steps, guidance, size, dtype, attempt, base seed, conditioning, and the
  method's own fields).

Generation methods are plug-ins, one module each in ``raugment/stages/generate/methods/``
(:data:`~raugment.stages.generate.methods.GENERATORS`; the contract is
:class:`~raugment.stages.generate.methods.GenerationMethod`). A ``generate.method`` that is not
one of them is a fine-tuned method's name: given a fine-tuning artifact, the stage samples from it
with :class:`~raugment.stages.generate.finetuned.FinetunedGeneration` (:func:`check_config`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from raugment.config import Config
from raugment.core import schema
from raugment.core.config import DIFFUSERS_HINT, ConfigError, check_local_model, to_dict
from raugment.core.imageio import encode_image
from raugment.core.storage import Artifact, StageRun, run_stage, write_parquet_atomic
from raugment.stages.generate.config import GenerateConfig
from raugment.stages.generate.finetuned import NEEDS_ARTIFACT, FinetunedGeneration
from raugment.stages.generate.methods import GENERATORS, GenerationMethod, Row, slot_seed

log = logging.getLogger(__name__)

STAGE = "generate"
SOURCE = "generated"
SPLIT = "added"
IMAGES = "images"
FAILURES = "failures"
PROMPTS = "prompts"
NSFW = "nsfw"
NSFW_UNFILLABLE = "nsfw_unfillable"


# --------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------


def attempt_id(slot: str, attempt: int) -> str:
    """Id of one flagged sample of a slot (failures table)."""
    return f"{slot}#{attempt}"


# --------------------------------------------------------------------------------------------
# Core: one class's missing slots -> image rows and failure rows
# --------------------------------------------------------------------------------------------


def image_params(cfg: GenerateConfig, row: Row, attempt: int, conditioning: str | None) -> dict[str, Any]:
    """Provenance of one generated image (stored as the ``params`` JSON)."""
    params = {"scheduler": cfg.scheduler, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
              "height": cfg.height, "width": cfg.width, "dtype": cfg.dtype, "attempt": attempt,
              "base_seed": row[schema.SEED], "conditioning": conditioning}
    params.update(row.get(schema.PARAMS) or {})
    return params


def generate_batch(pipe: Any, method: GenerationMethod, rows: Sequence[Row], seeds: Sequence[int],
                   cfg: GenerateConfig, scores: Any = None) -> list[tuple[Any, bool, float | None]]:
    """One pipeline call for ``rows`` with one seed each -> [(PIL image, flagged, NSFW score)]."""
    import torch

    # CPU generators: the same seed gives the same noise on any device (diffusers draws on the
    # generator's device and moves the latents).
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    kwargs = method.call_kwargs(rows, cfg)
    with torch.inference_mode():
        out = pipe(**kwargs, num_inference_steps=cfg.steps, generator=generators, output_type="pil")
    flags = out.nsfw_content_detected or [False] * len(rows)
    nsfw = scores.pop(len(rows)) if scores is not None else [None] * len(rows)
    return [(method.postprocess(img, row), bool(flag), score)
            for img, row, flag, score in zip(out.images, rows, flags, nsfw)]


def generate_class(pipe: Any, method: GenerationMethod, rows: Sequence[Row], cfg: GenerateConfig, *,
                   scores: Any = None, conditioning: str | None = None) -> Iterator[tuple[list[Row], list[Row]]]:
    """Fill slots of one class, replacing flagged samples; yields (image rows, failure rows) per batch.

    A flagged sample's slot goes back to the queue with its next attempt, so later batches stay
    full; a slot flagged ``cfg.max_attempts_per_image`` times yields a ``nsfw_unfillable`` row.

    Args:
        pipe: a loaded pipeline of ``method.kind`` (``method.setup`` already called).
        rows: the slots to make (planned rows, see :class:`GenerationMethod`), in slot order.
    """
    queue = deque((row, 0) for row in rows)
    while queue:
        items = [queue.popleft() for _ in range(min(cfg.pool.batch_size, len(queue)))]
        rows_now = [row for row, _ in items]
        seeds = [slot_seed(cfg.seed, method.name, row[schema.CLASS_ID], row[schema.INDEX], attempt)
                 for row, attempt in items]
        images: list[Row] = []
        failures: list[Row] = []
        results = generate_batch(pipe, method, rows_now, seeds, cfg, scores)
        for (row, attempt), seed, (img, flagged, score) in zip(items, seeds, results):
            if flagged:
                failures.append({schema.ID: attempt_id(row[schema.ID], attempt), schema.LABEL: row[schema.LABEL],
                                 schema.REASON: NSFW,
                                 schema.DETAIL: json.dumps({"seed": seed, "nsfw_score": score})})
                if attempt + 1 < cfg.max_attempts_per_image:
                    queue.append((row, attempt + 1))
                else:
                    failures.append({schema.ID: row[schema.ID], schema.LABEL: row[schema.LABEL],
                                     schema.REASON: NSFW_UNFILLABLE,
                                     schema.DETAIL: f"flagged {attempt + 1} times"})
                continue
            images.append({
                schema.ID: row[schema.ID], schema.LABEL: row[schema.LABEL],
                schema.CLASS_ID: row[schema.CLASS_ID], schema.CLASS_NAME: row[schema.CLASS_NAME],
                schema.SPLIT: SPLIT, schema.SOURCE: SOURCE, schema.METHOD: method.name,
                schema.PROMPT: row[schema.PROMPT], schema.SEED: seed, schema.MODEL_ID: cfg.model,
                schema.MODEL_REVISION: cfg.revision, schema.RANK: row[schema.INDEX],
                schema.NSFW_SCORE: score, schema.IMAGE: encode_image(img, cfg.image_format, cfg.quality),
                schema.WIDTH: img.width, schema.HEIGHT: img.height,
                schema.PARAMS: image_params(cfg, row, attempt, conditioning)})
        yield images, failures


# --------------------------------------------------------------------------------------------
# Progress on disk: one images shard and one failures shard per (class, chunk of slots)
# --------------------------------------------------------------------------------------------


def chunk_of(row: Row, shard_images: int) -> int:
    """The chunk of a planned slot: its index within the class // ``generate.shard_images``."""
    return int(row[schema.INDEX]) // shard_images


def shard_name(label: int, chunk: int) -> str:
    """File name of a (class, chunk) shard, the same in ``images/`` and ``failures/``."""
    return f"part-c{int(label):06d}-k{int(chunk):06d}.parquet"


def done_chunks(stage_dir: str | Path) -> set[tuple[int, int]]:
    """(label, chunk) of every finished chunk: its ``failures`` shard (written last, possibly
    empty) exists."""
    done = set()
    for f in (Path(stage_dir) / FAILURES).glob("part-c*-k*.parquet"):
        label, chunk = f.stem[len("part-c"):].split("-k")
        done.add((int(label), int(chunk)))
    return done


def write_chunk(stage_dir: str | Path, label: int, chunk: int, images: list[Row], failures: list[Row]) -> None:
    """Write a finished chunk atomically: its images (when there are any), then its failures, whose
    shard (empty when nothing was flagged) marks the chunk done; a rewrite after a crash between
    the two replaces the images shard with identical content."""
    if images:
        write_parquet_atomic(schema.to_table(images, schema.IMAGES),
                             Path(stage_dir) / IMAGES / shard_name(label, chunk))
    write_parquet_atomic(schema.to_table(failures, schema.FAILURES),
                         Path(stage_dir) / FAILURES / shard_name(label, chunk))


# --------------------------------------------------------------------------------------------
# Ray wrapper: one persistent actor pool per stage run
# --------------------------------------------------------------------------------------------


# The pipeline a stateless method (one that leaves ``setup`` alone) last loaded in this process:
# a pooled actor that serves the next stage run with the same model keeps it (no second load).
_PIPELINE: dict[str, Any] = {}


def pipeline_key(cfg: GenerateConfig, kind: str) -> tuple:
    """What ``load_pipeline`` is called with: equal keys load equal pipelines."""
    return (cfg.model, cfg.revision, kind, cfg.dtype, cfg.device, cfg.scheduler, cfg.safety_checker, cfg.sdpa,
            cfg.channels_last, cfg.compile, cfg.vae_slicing)


def changes_pipeline(method: GenerationMethod) -> bool:
    """True when ``method.setup`` changes the pipeline (fine-tuned weights): it needs its own load."""
    return type(method).setup is not GenerationMethod.setup


class ClassGenerator:
    """One generation actor's object: the pipeline is loaded once, in ``__init__``, then serves classes.

    The stage leases a pool of these (:func:`generation_pool`) before it plans, so start-up
    (process, torch/diffusers import, pipeline load) overlaps the driver's planning and is paid
    once per actor for the whole stage run, whatever the number of classes; inside a study the
    processes serve the next generation run too, and a method that leaves the pipeline as loaded
    (the prompt methods) keeps the loaded pipeline when the model settings are equal.
    """

    def __init__(self, cfg: GenerateConfig, method: GenerationMethod, stage_dir: str,
                 finetune_path: str | None = None):
        t0 = time.perf_counter()
        from raugment.models.diffusion import SafetyScores, load_pipeline
        from raugment.runtime.cluster import pick_device

        self.cfg, self.method, self.stage_dir = cfg, method, stage_dir
        self.device = pick_device(cfg.device)
        key = (*pipeline_key(cfg, method.kind), self.device)
        shared = not changes_pipeline(method)
        self.loads = 0  # pipeline loads of this object (0: the process's pipeline was reused)
        if shared and _PIPELINE.get("key") == key:
            self.pipe = _PIPELINE["pipe"]
        else:
            _PIPELINE.clear()  # one pipeline per process: free the last before loading the next
            if not isinstance(cfg.channels_last, bool):
                raise ValueError(f"generate.channels_last={cfg.channels_last!r}: ClassGenerator takes a "
                                 "GenerateConfig.resolved() section (auto options made concrete)")
            self.pipe = load_pipeline(cfg.model, revision=cfg.revision, kind=method.kind, dtype=cfg.dtype,
                                      device=self.device, scheduler=cfg.scheduler,
                                      safety_checker=cfg.safety_checker, sdpa=cfg.sdpa,
                                      channels_last=cfg.channels_last, compile=cfg.compile,
                                      vae_slicing=cfg.vae_slicing)
            self.loads = 1
            if shared:
                _PIPELINE.update(key=key, pipe=self.pipe)
        method.setup(self.pipe, cfg, finetune_path)
        self.scores = SafetyScores(self.pipe.safety_checker) if self.pipe.safety_checker is not None else None
        # provenance names an input artifact as "<stage>/<key>", like manifests do
        self.conditioning = (f"{Path(finetune_path).parent.name}/{Path(finetune_path).name}" if finetune_path
                             else cfg.conditioning)
        self.start_s = time.perf_counter() - t0

    def __del__(self) -> None:
        # the safety-score hook stays on a shared pipeline's checker otherwise
        scores = getattr(self, "scores", None)
        if scores is not None:
            scores.close()

    def info(self) -> dict[str, float]:
        """Seconds to build this object (pipeline load; imports too in a fresh process) and its pipeline loads."""
        return {"start_s": self.start_s, "loads": self.loads}

    def generate(self, work: tuple[int, list[Row]]) -> dict[str, Any]:
        """Make one class's unfinished chunks (``work`` = label, planned rows); a summary of the class.

        Chunks already on disk are skipped first: a retried call (actor restart) or a re-run never
        redoes them; an unfinished chunk is made again from its first slot.
        """
        label, rows = work
        done = done_chunks(self.stage_dir)
        size = self.cfg.shard_images
        chunks: dict[int, list[Row]] = defaultdict(list)
        for row in sorted(rows, key=lambda r: int(r[schema.INDEX])):
            if (label, chunk_of(row, size)) not in done:
                chunks[chunk_of(row, size)].append(row)
        counts: Counter = Counter()
        t0 = time.perf_counter()
        for chunk, chunk_rows in sorted(chunks.items()):
            images: list[Row] = []
            failures: list[Row] = []
            for batch_images, batch_failures in generate_class(
                    self.pipe, self.method, chunk_rows, self.cfg, scores=self.scores,
                    conditioning=self.conditioning):
                images += batch_images
                failures += batch_failures
            write_chunk(self.stage_dir, label, chunk, images, failures)
            counts["images"] += len(images)
            counts.update(f[schema.REASON] for f in failures)
        log.info("generate: class %d done (%d images, %d flagged)", label, counts["images"], counts[NSFW])
        return {schema.LABEL: label, "images": counts["images"], NSFW: counts[NSFW],
                NSFW_UNFILLABLE: counts[NSFW_UNFILLABLE], "seconds": time.perf_counter() - t0}


def class_work(rows: Sequence[Row]) -> list[tuple[int, list[Row]]]:
    """Missing slots grouped by class, classes in label order: one pool call each."""
    by_class: dict[int, list[Row]] = defaultdict(list)
    for row in rows:
        by_class[int(row[schema.LABEL])].append(row)
    return sorted(by_class.items())


def generation_pool(cfg: GenerateConfig, method: GenerationMethod, stage_dir: str, finetune_path: str | None,
                    size: int):
    """Lease ``size`` actors hosting a :class:`ClassGenerator` (``cluster.POOLS``; returns at once).

    Resources come from ``cfg.pool`` (a GPU request with no GPU here is an error, not a wait);
    an actor that dies is restarted and its call retried (the call skips what the dead attempt
    finished). Inside a study scope the processes come from (and go back to) the study's idle
    pools.
    """
    from raugment.runtime.cluster import POOLS

    return POOLS.lease(ClassGenerator, cfg.pool, cfg, method, stage_dir, finetune_path, size=size,
                       name=f"generate-{method.name}", key="generate.pool")


def generate_on_pool(group: Any, rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Run every class's missing slots on the pool: each actor takes the next class as soon as it
    is free (``ray.wait``, no polling); one summary per class."""
    return list(group.map("generate", class_work(rows), ordered=False))


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------


def key_section(cfg: GenerateConfig) -> dict[str, Any]:
    """What keys the stage output: everything but where it runs (actor count, CPUs, GPUs, device).

    A resumed run on a bigger cluster continues in the same directory; the diffusion batch size
    stays in the key because it changes floating-point results.
    """
    data = to_dict(cfg)
    data["pool"] = {"batch_size": cfg.pool.batch_size}
    data.pop("device")
    return data


def method_for(g: GenerateConfig, finetune: Artifact | None = None) -> GenerationMethod:
    """The method instance of ``g.method``: a registered generation method, or, given a
    fine-tuning artifact (``finetune`` or ``g.conditioning``), :class:`FinetunedGeneration` sampling from it.

    Raises:
        ConfigError: a name that is neither, naming the generation methods.
    """
    if g.method in GENERATORS:
        return GENERATORS.get(g.method)()
    if finetune is not None or g.conditioning:
        return FinetunedGeneration(g.method)
    raise ConfigError(f"generate.method: {g.method!r} is not a generation method (known: "
                      f"{', '.join(GENERATORS.names())}); a fine-tuned method such as ft_conditioning "
                      f"{NEEDS_ARTIFACT}")


def check_config(cfg: Config, finetune: Artifact | None = None) -> GenerationMethod:
    """The method instance (:func:`method_for`) once the model reference is checked.

    Everything else in ``cfg.generate`` is validated when the config is loaded.
    """
    method = method_for(cfg.generate, finetune)
    check_local_model(cfg.generate.model, "generate.model", "model_index.json", DIFFUSERS_HINT)
    return method


def preflight(cfg: Config) -> None:
    """Checks before a study starts Ray: the model reference, and the method when it is a
    generation method. Any other name is a fine-tuned method's, whose artifact arrives as the
    stage's ``finetune`` input (the study checks its methods' names before planning;
    :func:`run` refuses a name without an artifact)."""
    if cfg.generate.method in GENERATORS or cfg.generate.conditioning:
        check_config(cfg)
    else:
        check_local_model(cfg.generate.model, "generate.model", "model_index.json", DIFFUSERS_HINT)


def read_classes(dataset: Artifact) -> list[Row]:
    return dataset.read("classes", schema=schema.CLASSES).to_pylist()


def summarize(run: StageRun, planned: Sequence[Row], max_attempts: int) -> None:
    """Stats from what is on disk (covers earlier attempts of a resumed run)."""
    images = run.artifact.read(IMAGES, columns=[schema.ID, schema.LABEL], schema=schema.IMAGES)
    failures = run.artifact.read(FAILURES, columns=[schema.ID, schema.REASON], schema=schema.FAILURES)
    reasons = dict(zip(failures.column(schema.ID).to_pylist(), failures.column(schema.REASON).to_pylist()))
    for reason in reasons.values():
        run.stats.fail(reason)
    have = Counter(images.column(schema.LABEL).to_pylist())
    quota = Counter(int(r[schema.LABEL]) for r in planned)
    names = {int(r[schema.LABEL]): r[schema.CLASS_ID] for r in planned}
    run.stats.add("images", images.num_rows)
    run.stats.add("planned", len(planned))
    run.stats.add("classes", len(quota))
    unfilled = {names[label]: need - have.get(label, 0) for label, need in quota.items()
                if have.get(label, 0) < need}
    run.stats.extra["unfilled_classes"] = unfilled
    if unfilled:
        log.warning("generate: %d classes are short of their quota after %d attempts per image: %s",
                    len(unfilled), max_attempts, dict(list(unfilled.items())[:10]))


def run(cfg: Config, dataset: Artifact, finetune: Artifact | None = None) -> Artifact:
    """The ``generate`` stage: ``cfg.generate.images_per_class`` images per class of ``dataset``.

    Args:
        cfg: the whole config; reads ``generate`` (and ``run.root``, ``cluster``).
        dataset: the dataset stage's artifact (classes table; train images for Boomerang).
        finetune: a fine-tuning (or select) artifact for a fine-tuned method, or None.

    Returns:
        The artifact with tables ``images``, ``failures`` and ``prompts.parquet``.
    """
    from raugment.runtime.cluster import init_ray

    # "auto" options resolved for the device the actors will use; the key holds resolved values
    g = cfg.generate.resolved()
    method = check_config(cfg, finetune)
    classes = read_classes(dataset)
    if not classes:
        raise ValueError(f"dataset {dataset.path} has no classes")
    inputs: dict[str, Artifact] = {"dataset": dataset}
    if finetune is not None:
        inputs["finetune"] = finetune
    finetune_path = str(finetune.path) if finetune is not None else None

    def body(stage: StageRun) -> None:
        done = done_chunks(stage.path)
        with contextlib.ExitStack() as scope:
            group: Any = None

            def pool() -> Any:
                nonlocal group
                if group is None:
                    init_ray(cfg.cluster, progress=cfg.run.progress)
                    group = scope.enter_context(generation_pool(g, method, str(stage.path), finetune_path,
                                                                min(g.pool.concurrency, len(classes))))
                return group

            chunks = {(int(c[schema.LABEL]), k) for c in classes
                      for k in range(-(-g.images_per_class // g.shard_images))}
            if not chunks <= done:
                # Lease the pool before planning: actor start-up (process, torch/diffusers import,
                # pipeline load) runs while the driver plans and writes the prompts table.
                pool()

            t0 = time.perf_counter()
            planned = method.plan(classes, g, dataset=dataset, finetune=finetune)
            prompts = [{k: r[k] for k in schema.PROMPTS.names if k in r} for r in planned]
            stage.write_single(schema.to_table(prompts, schema.PROMPTS), PROMPTS)
            missing = [r for r in planned if (int(r[schema.LABEL]), chunk_of(r, g.shard_images)) not in done]
            stage.stats.extra["plan_s"] = round(time.perf_counter() - t0, 3)
            log.info("generate: %s, %d classes x %d images; %d slots already done, %d to make",
                     method.name, len(classes), g.images_per_class, len(planned) - len(missing), len(missing))
            if missing:
                summary = generate_on_pool(pool(), missing)
                info = group.info()
                seconds = float(sum(s["seconds"] for s in summary))
                start_s = float(sum(i["start_s"] for i in info))
                if g.pool.num_gpus > 0:  # the GPUs are held from actor start to the last class
                    stage.stats.gpu_s += (seconds + start_s) * g.pool.num_gpus
                stage.stats.extra.update(actor_s=round(seconds, 3), actor_start_s=round(start_s, 3),
                                         actors=len(info), actors_reused=group.leases > 1,
                                         pipeline_loads=int(sum(i["loads"] for i in info)),
                                         pids=sorted(i["pid"] for i in info))
        summarize(stage, planned, g.max_attempts_per_image)

    return run_stage(cfg.run.root, STAGE, key_section(g), inputs, body, resumable=True)
