"""`keras-tp train`: train a catalogue model (or a saved causal LM) as a
byte-level causal LM under tensor parallelism, with validation, a `.keras`
checkpoint and a loss plot."""

from __future__ import annotations

import dataclasses
import json
import os

from keras_tensor_parallel import catalogue
from keras_tensor_parallel.catalogue import ModelSpec


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train (the CLI's flags).

    Attributes:
        steps: Optimizer steps.
        data_path: Text file or directory; `None`: the Python standard
            library's sources.
        batch_size, seq_len: Windows per step and bytes per window.
        learning_rate: Adam's.
        val_every: Steps between validations (`None`: steps / 5).
        out_dir: Where `model.keras`, `loss.png`, `train.json` go.
        size: `auto`, `full` or `tiny` (see `catalogue.sized`).
        seed: Weights and batch order.
        verbose: Show a progress bar of the steps.
        tensor_parallel_size: The model axis (`None`: the world size); the
            rest of the devices are data parallel, each taking
            `batch_size / data` windows per step.
    """

    steps: int
    out_dir: str
    data_path: str | None = None
    batch_size: int = 4
    seq_len: int = 64
    learning_rate: float = 1e-3
    val_every: int | None = None
    size: str = "auto"
    seed: int = 0
    verbose: bool = True
    tensor_parallel_size: int | None = None


def read_text(path: str | None, max_bytes: int = 20_000_000) -> bytes:
    """Bytes of a file, or of the files under a directory (sorted); the
    Python standard library sources when `path` is None.

    Example:

    ```python
    text = read_text(None, max_bytes=10_000)
    ```
    """
    from keras_tensor_parallel.verify import data

    if path is None:
        return data.stdlib_corpus(max_bytes=max_bytes)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read(max_bytes)
    if not os.path.isdir(path):
        raise ValueError(f"--data: no such file or directory: {path!r}")
    chunks, total = [], 0
    for root, _, names in sorted(os.walk(path)):
        for n in sorted(names):
            with open(os.path.join(root, n), "rb") as f:
                chunks.append(f.read(max_bytes - total))
            total += len(chunks[-1])
            if total >= max_bytes:
                return b"".join(chunks)
    return b"".join(chunks)


def _batches(config: TrainConfig, vocab: int):
    """Training and validation `(inputs, targets)` from the text."""
    from keras_tensor_parallel.verify import data

    text = read_text(config.data_path)
    cut = int(len(text) * 0.95)
    if cut < config.seq_len + 2 or len(text) - cut < config.seq_len + 2:
        raise ValueError(
            f"--data has {len(text)} bytes: need at least "
            f"{40 * (config.seq_len + 2)} for training and validation "
            "windows."
        )
    kw = dict(batch_size=config.batch_size, seq_len=config.seq_len)
    train = data.lm_batches(
        text[:cut], steps=config.steps, seed=config.seed, **kw
    )
    val = data.lm_batches(text[cut:], steps=4, seed=config.seed + 1, **kw)
    # Bytes are the token ids; a vocabulary under 256 folds them in.
    fold = (lambda a: a % vocab) if 0 < vocab < 256 else (lambda a: a)
    return [(catalogue.lm_inputs(fold(x)), fold(y)) for x, y in (train, val)]


def train_lm(spec: ModelSpec, world_size: int, config: TrainConfig) -> dict:
    """Train `spec` as a byte-level causal LM on `world_size` devices.

    Returns:
        A summary (also written to `out_dir/train.json`): per-step losses,
        validation losses, the checkpoint and plot paths.

    Raises:
        ValueError: when `spec` is not a causal LM, or the text is short.

    Example:

    ```python
    summary = train_lm(catalogue.get("opt-125m:tiny"), 2,
                       TrainConfig(steps=4, out_dir="runs/tiny"))
    ```
    """
    import keras

    trained = catalogue.sized(spec, size=config.size)
    build = catalogue.lm_builder(trained)
    (x, y), (vx, vy) = _batches(config, trained.vocab)
    keras.utils.set_random_seed(config.seed)
    tp = _compiled_tp(build(), world_size, config)
    val_every = config.val_every or max(1, config.steps // 5)
    progress = _progress_callback(config.steps, config.verbose)
    history = tp.fit(
        x,
        y,
        batch_size=config.batch_size,
        epochs=-(-config.steps // val_every),
        steps_per_epoch=val_every,
        validation_data=(vx, vy),
        shuffle=False,
        callbacks=[progress],
        verbose=0,
    )
    val = [float(v) for v in history.history.get("val_loss", [])]
    val_steps = [
        min(config.steps, (i + 1) * val_every) for i in range(len(val))
    ]
    return _finish(
        tp, spec, trained, world_size, config,
        losses=progress.losses[: config.steps], val=val, val_steps=val_steps,
    )  # fmt: skip


def _compiled_tp(model, world_size: int, config: TrainConfig):
    import keras

    from keras_tensor_parallel.model import TensorParallelKeras

    tp = TensorParallelKeras(
        model,
        world_size=world_size,
        tensor_parallel_size=config.tensor_parallel_size,
    )
    tp.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return tp


def _finish(tp, spec, trained, world_size, config, *, losses, val, val_steps):
    """Save the checkpoint, the plot and train.json; the summary."""
    from keras_tensor_parallel.verify import plots

    os.makedirs(config.out_dir, exist_ok=True)
    checkpoint = os.path.join(config.out_dir, "model.keras")
    tp.save(checkpoint)
    plot = plots.train_curve(
        os.path.join(config.out_dir, "loss.png"),
        losses,
        val_steps,
        val,
        title=f"keras-tp train {spec.name}, world size {world_size}: "
        f"byte-level LM\n{trained.description}",
    )
    summary = {
        "model": trained.description,
        "world_size": world_size,
        "tensor_parallel_size": tp.tensor_parallel_size,
        "data_parallel_size": tp.data_parallel_size,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "data": config.data_path or "Python standard library sources",
        "losses": losses,
        "val_steps": val_steps,
        "val_losses": val,
        "final_loss": losses[-1] if losses else float("nan"),
        "final_val_loss": val[-1] if val else float("nan"),
        "checkpoint": checkpoint,
        "plot": plot,
    }
    with open(os.path.join(config.out_dir, "train.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _progress_callback(steps: int, verbose: bool):
    """A callback recording each step's loss and showing one progress bar
    over all `steps` (Keras's own counts epochs of `val_every` steps)."""
    import keras

    class StepProgress(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.losses: list[float] = []
            self.val: list[tuple[str, float]] = []
            self.bar = keras.utils.Progbar(
                steps, stateful_metrics=["loss", "val_loss"]
            )

        def on_epoch_begin(self, epoch, logs=None):
            self._mean, self._k = 0.0, 0

        def on_train_batch_end(self, batch, logs=None):
            # Keras logs the epoch's running mean: recover this step's loss.
            mean = float((logs or {}).get("loss", float("nan")))
            self._k += 1
            self.losses.append(mean * self._k - self._mean * (self._k - 1))
            self._mean = mean
            if verbose and len(self.losses) <= steps:
                values = [("loss", self.losses[-1])] + self.val
                self.bar.update(len(self.losses), values)

        def on_epoch_end(self, epoch, logs=None):
            if "val_loss" in (logs or {}):
                self.val = [("val_loss", float(logs["val_loss"]))]

    return StepProgress()
