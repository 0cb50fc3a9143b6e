"""``features.engine: ray``: the features stage's photos featurised by actors on a Ray cluster.

The driver (the ``python -m pipeline features`` process) does what it does locally: it scans and
hashes, reads what is cached, and commits finished rows to part files every
``features.commit_every`` photos, so an interrupted driver resumes exactly as locally. Only the
featurising moves: the photos still to do, in content-hash order, are cut into shards of ``SHARD``;
each shard is a task of a ``FeatureWorker`` actor, which loads the backbone once (the converted
LiteRT file, shipped as bytes through the object store) and decodes, resizes and featurises
exactly as ``pipeline.runtime`` does. At most two shards per actor are in flight.

No shared filesystem is assumed: the driver reads each photo and ships its bytes with its shard,
and the package's code goes to the cluster as a ``py_modules`` runtime environment when joining
a cluster (worker nodes need the project's dependencies installed, as ``docs/scale.md``'s cluster
recipe does).

Faults: a worker process that dies mid-task is restarted and its task retried (``max_restarts``,
``max_task_retries``); a photo that cannot be decoded comes back as a bad row with the same reason
as locally; a driver that dies keeps its committed parts. An address that cannot be reached is a
one-line error before anything is written.

Why plain actors rather than Ray Data: the driver needs each finished row back, in its hands, to
commit it into the part files that make the run resumable, and needs to submit only what is not
committed yet; ``ray.wait`` over actor tasks gives exactly that, while a Ray Data pipeline would
add a conversion of every activation to Arrow blocks and its own notion of progress that a killed
driver cannot resume from.
"""
from __future__ import annotations

import io
import logging
import os
import socket
import tempfile
from pathlib import Path

import numpy as np

from pipeline.backbones.registry import BackboneError
from pipeline.params import FeaturesParams, as_dict

log = logging.getLogger("pipeline.features")

SHARD = 32  # photos per task
IN_FLIGHT = 2  # tasks per actor at once: one running, one waiting with its bytes already shipped


def _ray():
    try:
        import ray
    except ImportError:
        raise BackboneError("features.engine: ray needs Ray, which is not installed; run 'make setup-ray'") from None
    return ray


def connect(f: FeaturesParams) -> None:
    """Join the cluster at ``features.ray_address`` (``null``: start a local Ray for this run)."""
    ray = _ray()
    if ray.is_initialized():
        return
    address = f.ray_address
    if address and address != "auto":
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as error:
            raise BackboneError(f"features.ray_address {address}: no Ray cluster answers there ({error}); start one "
                               "with 'ray start --head' or set features.ray_address: null") from None
    runtime_env = None
    if address:  # joining a cluster: its nodes get this package's code, not a shared filesystem
        runtime_env = {"py_modules": [str(Path(__file__).resolve().parent)],
                       "env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}}
    try:
        context = ray.init(address=address, logging_level="ERROR", log_to_driver=True, runtime_env=runtime_env,
                           namespace="pipeline")
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise BackboneError(f"features.ray_address {address}: cannot join a Ray cluster ({' '.join(str(error).split())[:160]}); "
                           "set features.ray_address: null to start one here") from None
    resources = ray.cluster_resources()
    log.info("features: Ray cluster with %g CPU(s), %g GPU(s) (%s)%s", resources.get("CPU", 0), resources.get("GPU", 0),
             "started here" if address is None else address,
             f"; dashboard at http://{context.dashboard_url}" if context.dashboard_url else "")


class FeatureWorker:
    """One Ray actor: the backbone loaded once, then shard after shard of photos."""

    def __init__(self, model: bytes, settings: dict, layer: str, keras_weights: bytes | None):
        from pipeline import runtime

        self.f = FeaturesParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
        self.size = runtime.input_size(self.f)
        self.folder = tempfile.mkdtemp(prefix="pipeline-worker-")
        gpu = keras_weights is not None and runtime.resolve_runtime(self.f) == "keras"
        if gpu:  # a GPU here: the TensorFlow backbone, whole batches at a time
            path = Path(self.folder) / "backbone.weights.h5"
            path.write_bytes(keras_weights)
            from pipeline.backbones import keras_models

            self.runner = keras_models.build(self.f.backbone, str(path), layer, self.f.image_size, Path(self.folder))
        else:
            from pipeline.backbones.litert import LiteRTBackbone

            path = Path(self.folder) / "backbone.tflite"
            path.write_bytes(model)
            self.runner = LiteRTBackbone(path)
        self.resize = runtime.resizer(self.f, self.size)
        self.draft = runtime.draft_size(self.f)
        # in the actor's log (the dashboard's Logs tab, and the driver's console with a worker prefix)
        print(f"FeatureWorker: {self.f.backbone} {layer} on {'TensorFlow' if gpu else 'LiteRT'}, "
              f"input {self.size} px, ready", flush=True)

    def featurise(self, shard: list[tuple[str, bytes]], views: tuple[str, ...]) -> list:
        """``[(sha256, (len(views), *shape) float32 or None, error or None)]`` for ``[(sha256, bytes)]``."""
        from pipeline import runtime

        decoded = [(sha, *runtime.decode_file(io.BytesIO(data), self.draft, self.resize, self.f.max_pixels))
                   for sha, data in shard]
        images = [image for _, image, _ in decoded if image is not None]
        outputs = iter([])
        if images:
            batch = np.stack([runtime.VIEWS[view](image) for image in images for view in views])
            activations = self.runner.predict(batch)
            outputs = iter(activations.reshape(len(images), len(views), *activations.shape[1:]))
        return [(sha, next(outputs), None) if image is not None else (sha, None, error)
                for sha, image, error in decoded]

    def pid(self) -> int:
        return os.getpid()


def featurise(records, root: Path, f: FeaturesParams, views: tuple[str, ...], model_file: Path,
              keras_weights: Path | None = None):
    """Yield ``(record, (len(views), *shape) activations or None, error or None)`` as shards finish."""
    ray = _ray()
    cpus = 2 if not f.ray_gpus_per_worker else 1
    actor = ray.remote(max_restarts=4, max_task_retries=4)(FeatureWorker).options(
        num_cpus=cpus, num_gpus=f.ray_gpus_per_worker or 0)
    available = ray.cluster_resources()
    n_actors = f.ray_workers or max(1, int(available.get("CPU", cpus) // cpus))
    if f.ray_gpus_per_worker:
        n_actors = min(n_actors, max(1, int(available.get("GPU", 0) // f.ray_gpus_per_worker)))
    model = ray.put(model_file.read_bytes())
    weights = ray.put(keras_weights.read_bytes()) if keras_weights is not None and keras_weights.is_file() else None
    settings = as_dict(f)
    from pipeline.tf_import import quiet

    with quiet():  # Ray warns that actor arguments live in the object store: this run holds them to the end
        workers = [actor.remote(model, settings, settings["layer"], weights) for _ in range(n_actors)]
    log.info("features: %d Ray worker(s), shards of %d photos", n_actors, SHARD)
    shards = [records[i:i + SHARD] for i in range(0, len(records), SHARD)]
    queue = list(reversed(shards))
    pending: dict = {}  # object ref -> (shard, actor, unreadable rows)

    def submit(worker) -> None:
        if not queue:
            return
        shard = queue.pop()
        payload, unreadable = [], []
        for record in shard:
            try:
                payload.append((record.sha256, (root / record.path).read_bytes()))
            except OSError as error:
                unreadable.append((record, f"cannot read: {error.strerror or error}"))
        pending[worker.featurise.remote(payload, views)] = (shard, worker, unreadable)

    for worker in workers:
        for _ in range(IN_FLIGHT):
            submit(worker)
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            shard, worker, unreadable = pending.pop(ref)
            by_sha = {sha: (rows, error) for sha, rows, error in ray.get(ref)}
            submit(worker)
            for record in shard:
                if record.sha256 in by_sha:
                    yield (record, *by_sha[record.sha256])
            for record, error in unreadable:
                yield record, None, error
    finally:
        for worker in workers:
            ray.kill(worker)
