"""grain input pipelines for training and evaluation over any random-access source.

A source has `__len__` and `__getitem__(i) -> dict` of cheap fields (a path, a label, targets); a task's
transform turns one such example into arrays: `train_transform(example, rng) -> dict` (decoding and
augmenting; it may raise `ImageLoadError`) and `eval_transform(example) -> dict`. The pipeline adds `bad`
(train: 1 where an unreadable example was replaced) or `mask` / `index` (eval: padding and unreadable rows
have mask False and index -1).

Sample addressing (what makes everything deterministic and worker-count independent):
  local stream index k -> step = k // local_b, j = k % local_b
  epoch, s = divmod(step, steps_per_epoch)
  position  = s * global_batch + process_index * local_b + j        (slot within the epoch)
  example   = order(seed, epoch)[position]
  augmentation rng = f(seed, epoch, position)
`order` is a permutation of the dataset (or, with `class_balanced`, n draws with replacement,
weights ~ 1 / class frequency), derived from (seed, epoch) only. Processes therefore read disjoint
slices of each global batch, the remainder of each epoch is dropped, and the content of step t is a
pure function of (seed, t), whatever the number of worker processes.

Checkpointing: `TrainIterator` is a `grain.DatasetIterator` whose state is just the step count
(JSON), so save/restore it with orbax through grain's handler:

  ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(train_it))      # save
  ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointRestore(train_it))   # restore

(`iterator_save_args` / `iterator_restore_args` below return exactly these). The state does not
depend on `num_workers` / `prefetch`, so those may change between runs.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable

import grain
import ml_collections
from absl import flags
import numpy as np

from jaxvit.data.sources import ImageLoadError
from jaxvit.errors import DataError

log = logging.getLogger(__name__)

# Tags keeping the random streams of different purposes apart.
_ORDER, _AUGMENT, _REPLACE, _BATCH = 0x0D, 0xA6, 0x5E, 0xBA
_MAX_REPLACEMENT_TRIES = 16


def default_data_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.data_dir = ""  # data root; its layout depends on data.source and the task (docs/training.md)
    cfg.source = "folder"  # folder | csv | npz | tfds:NAME (jaxvit.data.labelled) | jump (ssl: jaxvit.data.jump)
    cfg.tfds_data_dir = ""  # where tfds datasets are prepared ("" = ~/tensorflow_datasets)
    cfg.manual_dir = ""  # a tfds dataset's downloaded archive(s): jaxvit builds the dataset from them once
    cfg.train_split = "train"  # the split trained on (tfds / hf slices work: "train[:90%]")
    cfg.val_fraction = 0.0  # > 0: split "val" = this fraction of train_split, held out by example (and removed from it)
    cfg.hf_image_column = ""  # data.source=hf:NAME: the image column ("" = the first Image feature)
    cfg.hf_label_column = ""  # data.source=hf:NAME: the label column ("" = the first ClassLabel feature)
    cfg.image_size = 224  # side of the square model input (train crops, eval resize + centre crop)
    cfg.crop_ratio = 0.875  # eval: resize shorter side to image_size / crop_ratio, centre crop
    cfg.mean = (0.485, 0.456, 0.406)  # normalisation per channel (ImageNet)
    cfg.std = (0.229, 0.224, 0.225)
    cfg.num_workers = 2  # grain worker processes; 0 = in-process (threads)
    cfg.prefetch = 2  # batches prepared ahead (per worker)
    cfg.class_balanced = False  # sample training examples inversely to their class frequency
    cfg.train_limit = 0  # > 0: train on the first N examples of the train split only (overfit checks)
    cfg.skip_bad_images = True  # an unreadable training image is logged and replaced; False: fatal
    cfg.preflight = "auto"  # full (decode every file) | sample (headers + a decoded sample) | auto | off
    cfg.preflight_sample = 1000  # files decoded by the sample check
    cfg.allow_changed = False  # resume on splits that changed since the run started (data order restarts there)
    cfg.cache_dir = ""  # per-file arrays computed once (jaxvit/data/cache.py: biomass, JUMP, DINOCell); "" = off
    cfg.aug = ml_collections.ConfigDict()
    cfg.aug.crop_scale = (0.8, 1.0)  # random resized crop: area fraction range
    cfg.aug.crop_ratio = (3 / 4, 4 / 3)  # random resized crop: aspect ratio range
    cfg.aug.hflip = True  # random horizontal / vertical flips, quarter turns
    cfg.aug.vflip = True
    cfg.aug.rot90 = True
    cfg.aug.rotate_degrees = 180.0  # 0 disables
    cfg.aug.color_jitter = (0.2, 0.2, 0.1, 0.0)  # brightness, contrast, saturation, hue
    cfg.aug.color_jitter_prob = 0.8  # probability of applying color_jitter
    cfg.aug.erasing_prob = 0.0  # random erasing probability; erasing_area: its area fraction range
    cfg.aug.erasing_area = (0.02, 0.33)
    return cfg


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Training steps per epoch (the remainder of each epoch is dropped)."""
    return n // global_batch


def _resolve_processes(
    global_batch: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    if process_index is None or process_count is None:
        import jax  # imported lazily: grain worker processes never need it

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}")
    if global_batch % process_count:
        raise ValueError(
            f"global_batch={global_batch} is not divisible by process_count={process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    return process_index, process_count, global_batch // process_count


def _cfg(cfg: Any, name: str, default: Any) -> Any:
    return getattr(cfg, name, default)


# ----------------------------------------------------------------------------- per-example maps


class _TrainExample:
    """Maps a local stream index to one transformed example (picklable, runs in workers)."""

    def __init__(self, source: Any, transform: Callable, cfg: Any, *, seed: int, global_batch: int,
                 process_index: int, local_batch: int):
        self.source, self.transform = source, transform
        self.seed, self.global_batch = seed, global_batch
        self.process_index, self.local_batch = process_index, local_batch
        self.steps = steps_per_epoch(len(source), global_batch)
        self.skip_bad = bool(_cfg(cfg, "skip_bad_images", True))
        self.weights = None
        if _cfg(cfg, "class_balanced", False):
            counts = np.bincount(source.labels)
            w = 1.0 / counts[source.labels]
            self.weights = w / w.sum()
        self._orders: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_orders": {}}

    def order(self, epoch: int) -> np.ndarray:
        """Example indices for every slot of `epoch` (deterministic in (seed, epoch))."""
        order = self._orders.get(epoch)
        if order is None:
            rng = np.random.default_rng([_ORDER, self.seed, epoch])
            n = len(self.source)
            order = rng.permutation(n) if self.weights is None else rng.choice(n, n, p=self.weights)
            if len(self._orders) >= 2:  # only the current and next epoch are ever needed
                self._orders.pop(min(self._orders))
            self._orders[epoch] = order
        return order

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        step, j = divmod(int(k), self.local_batch)
        epoch, s = divmod(step, self.steps)
        position = s * self.global_batch + self.process_index * self.local_batch + j
        index = int(self.order(epoch)[position])
        rng = np.random.default_rng([_AUGMENT, self.seed, epoch, position])
        try:
            return {**self.transform(self.source[index], rng), "bad": np.int32(0)}
        except ImageLoadError as e:
            if not self.skip_bad:
                raise
            return {**self._replacement(epoch, position, e), "bad": np.int32(1)}

    def _replacement(self, epoch: int, position: int, err: ImageLoadError) -> dict[str, np.ndarray]:
        log.warning("replacing unreadable training example %s (%s)", err.path, err.reason)
        rng = np.random.default_rng([_REPLACE, self.seed, epoch, position])
        for _ in range(_MAX_REPLACEMENT_TRIES):
            index = int(rng.integers(len(self.source)))
            try:
                return self.transform(self.source[index],
                                      np.random.default_rng([_AUGMENT, self.seed, epoch, position]))
            except ImageLoadError as e:
                log.warning("replacement also unreadable: %s (%s)", e.path, e.reason)
        raise RuntimeError(f"{_MAX_REPLACEMENT_TRIES} replacement examples in a row were unreadable")


class _EvalExample:
    """Maps a local stream index to one eval example or padding (picklable). Padding and unreadable rows are
    zeros shaped like a readable example, with mask False and index -1."""

    def __init__(self, source: Any, transform: Callable, *, global_batch: int, process_index: int,
                 local_batch: int):
        self.source, self.transform = source, transform
        self.global_batch, self.process_index, self.local_batch = (
            global_batch, process_index, local_batch)
        self._blank: dict[str, np.ndarray] | None = None

    def blank(self) -> dict[str, np.ndarray]:
        if self._blank is None:
            for i in range(len(self.source)):
                try:
                    example = self.transform(self.source[i])
                    break
                except ImageLoadError:
                    continue
            else:
                raise DataError(f"no readable example at all in {self.source!r}: check the files of this split")
            self._blank = {k: np.zeros_like(v) for k, v in example.items()}
        return {**self._blank, "mask": np.bool_(False), "index": np.int32(-1)}

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        step, j = divmod(int(k), self.local_batch)
        index = step * self.global_batch + self.process_index * self.local_batch + j
        if index >= len(self.source):
            return self.blank()
        try:
            example = self.transform(self.source[index])
        except ImageLoadError as e:
            log.warning("skipping unreadable eval example %s (%s)", e.path, e.reason)
            return self.blank()
        return {**example, "mask": np.bool_(True), "index": np.int32(index)}


def _to_iterator(ds: grain.MapDataset, cfg: Any) -> grain.DatasetIterator:
    """Batched MapDataset -> iterator with thread (in-process) or worker-process prefetch."""
    workers = int(_cfg(cfg, "num_workers", 2))
    prefetch = int(_cfg(cfg, "prefetch", 2))
    if workers > 0:  # workers stack batches straight into shared memory (saves a copy)
        ds.enable_shared_memory_output()
    # In-process: `prefetch` threads build batches concurrently (PIL releases the GIL). In workers:
    # no thread buffer (the worker's output queue already holds `prefetch` batches, and grain
    # unlinks the shared memory of queued batches on close).
    threads = 0 if workers > 0 else prefetch
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
    if workers > 0:  # each worker produces whole batches: element i goes to worker i % workers
        if not flags.FLAGS.is_parsed():  # grain's worker code reads absl flags (defaults suffice)
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(1, prefetch)))
    return iter(it_ds)


# ----------------------------------------------------------------------------- train


class TrainIterator(grain.DatasetIterator):
    """Infinite iterator of local training batches; checkpointable via `get_state`/`set_state`.

    Yields the transform's fields batched over [local_b, ...] plus "bad": int32 [local_b].
    The grain pipeline underneath is (re)built lazily from the current step.
    """

    def __init__(self, example: _TrainExample, cfg: Any, batch_transform: Callable | None = None):
        super().__init__()
        self._example, self._cfg, self._batch_transform = example, cfg, batch_transform
        self.step = 0
        self.bad_count = 0  # replaced samples seen by this process so far
        self._inner: grain.DatasetIterator | None = None

    @property
    def local_batch(self) -> int:
        return self._example.local_batch

    @property
    def steps_per_epoch(self) -> int:
        return self._example.steps

    @property
    def epoch(self) -> int:
        return self.step // self._example.steps

    def _build(self) -> grain.DatasetIterator:
        b = self.local_batch
        end = (sys.maxsize // b) * b  # effectively infinite
        ds = grain.MapDataset.range(self.step * b, end).map(self._example)
        return _to_iterator(ds.batch(b, drop_remainder=True), self._cfg)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise ValueError("TrainIterator is closed")
        if self._inner is None:
            self._inner = self._build()
        batch = next(self._inner)
        if self._batch_transform is not None:
            ex = self._example
            batch = self._batch_transform(batch, np.random.default_rng([_BATCH, ex.seed, self.step, ex.process_index]))
        self.step += 1
        self.bad_count += int(np.sum(batch["bad"]))
        return batch

    def get_state(self) -> dict[str, Any]:
        ex = self._example
        return {"step": self.step, "bad_count": self.bad_count, "seed": ex.seed,
                "global_batch": ex.global_batch, "num_examples": len(ex.source)}

    def set_state(self, state: dict[str, Any]) -> None:
        ex = self._example
        for key, mine in (("seed", ex.seed), ("global_batch", ex.global_batch),
                          ("num_examples", len(ex.source))):
            if key in state and state[key] != mine:
                log.warning("restoring iterator state with %s=%s into one with %s=%s; "
                            "the sample order will differ", key, state[key], key, mine)
        self._close_inner()
        self.step = int(state["step"])
        self.bad_count = int(state.get("bad_count", 0))

    def start_prefetch(self) -> None:
        if self._inner is None:
            self._inner = self._build()
        self._inner.start_prefetch()

    def _close_inner(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None

    def close(self) -> None:
        self._close_inner()
        super().close()

    def __str__(self) -> str:
        return f"TrainIterator(step={self.step}, local_batch={self.local_batch})"


def train_iterator(
    source: Any,
    transform: Callable,
    cfg: Any,
    *,
    global_batch: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    batch_transform: Callable | None = None,
) -> TrainIterator:
    """Infinite, deterministic, per-process-sharded training iterator (see module docstring).

    `batch_transform(local batch, rng)` runs on each batch in this process (not in the workers), with an rng
    that is a function of (seed, step, process_index) only.

    `process_index` / `process_count` default to `jax.process_index()` / `jax.process_count()`.
    """
    process_index, process_count, local_b = _resolve_processes(
        global_batch, process_index, process_count)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if steps_per_epoch(len(source), global_batch) == 0:
        raise DataError(f"the training set has {len(source)} examples, fewer than train.batch_size="
                        f"{global_batch}: use a smaller batch")
    example = _TrainExample(source, transform, cfg, seed=seed, global_batch=global_batch,
                            process_index=process_index, local_batch=local_b)
    return TrainIterator(example, cfg, batch_transform)


def iterator_save_args(it: grain.DatasetIterator) -> Any:
    """orbax args saving a grain iterator (put it in `ocp.args.Composite`)."""
    return grain.checkpoint.CheckpointSave(it)


def iterator_restore_args(it: grain.DatasetIterator) -> Any:
    """orbax args restoring into `it` in place (put it in `ocp.args.Composite`)."""
    return grain.checkpoint.CheckpointRestore(it)


# ----------------------------------------------------------------------------- eval


def eval_steps(n: int, global_batch: int) -> int:
    """Eval batches per pass: the last one is padded."""
    return -(-n // global_batch)


def eval_iterator(
    source: Any,
    transform: Callable,
    cfg: Any,
    *,
    global_batch: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """One pass over `source`, each example exactly once across processes, no shuffling.

    Every process yields `eval_steps(n, global_batch)` batches of exactly `global_batch //
    process_count` rows: the transform's fields, "mask" bool (False for padding and unreadable
    files) and "index" int32 (dataset index, -1 for padding and unreadable files).
    """
    process_index, process_count, local_b = _resolve_processes(
        global_batch, process_index, process_count)
    example = _EvalExample(source, transform, global_batch=global_batch,
                           process_index=process_index, local_batch=local_b)
    n_steps = eval_steps(len(source), global_batch)
    ds = grain.MapDataset.range(n_steps * local_b).map(example).batch(local_b)
    return _to_iterator(ds, cfg)


# ----------------------------------------------------------------------------- benchmarking


def measure_throughput(source: Any, transform: Callable, cfg: Any, n_batches: int, global_batch: int,
                       seed: int = 0) -> float:
    """Training-pipeline examples/s (single process), after warm-up batches: one per worker (or one), so the
    workers' start-up and the batches they made side by side before the first one arrived are not timed."""
    it = train_iterator(source, transform, cfg, global_batch=global_batch, seed=seed,
                        process_index=0, process_count=1)
    try:
        for _ in range(max(1, int(_cfg(cfg, "num_workers", 0)))):
            next(it)
        start = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        elapsed = time.perf_counter() - start
    finally:
        it.close()
    return n_batches * global_batch / elapsed


class FirstN:
    """The first `n` examples of a source (other attributes are the source's)."""

    def __init__(self, source: Any, n: int):
        self.source, self.n = source, min(n, len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]

    def __getattr__(self, name: str) -> Any:
        if name == "source":  # while unpickling in a grain worker, before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.source, name)
