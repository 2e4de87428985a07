"""A `fit` callback that writes sharded checkpoints."""

from __future__ import annotations

import keras

from keras_tensor_parallel.checkpoint import store


class ShardedCheckpoint(keras.callbacks.Callback):
    """Save a `TensorParallelKeras`'s full training state during `fit`.

    Weights, optimizer slots, the iteration counter and RNG state are
    written shard by shard (`tp.save_checkpoint`); resume with
    `tp.load_checkpoint(directory)` on a model compiled the same way.

    Args:
        directory: Where the `step_XXXXXXXX` checkpoints go.
        save_freq: `"epoch"` or a number of batches.
        keep: How many recent checkpoints to keep (`None`: all).

    Example:

    ```python
    tp.fit(x, y, epochs=3, callbacks=[ShardedCheckpoint("ckpt")])
    tp2.load_checkpoint("ckpt")
    ```
    """

    def __init__(self, directory, *, save_freq="epoch", keep: int | None = 2):
        super().__init__()
        if save_freq != "epoch" and (
            not isinstance(save_freq, int) or save_freq < 1
        ):
            raise ValueError(
                "save_freq must be 'epoch' or a positive number of batches. "
                f"Received: save_freq={save_freq!r}"
            )
        self.directory = directory
        self.save_freq = save_freq
        self.keep = keep
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq == "epoch":
            return
        self._batches += 1
        if self._batches % self.save_freq == 0:
            store.save(self.model, self.directory, keep=self.keep)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            store.save(self.model, self.directory, keep=self.keep)
