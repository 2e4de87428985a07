"""Model families of the catalogue: the seeds' four small models and
KerasHub backbones built from config (random weights, nothing downloaded).

Frameworks are imported when a model is built, not when this module is.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class HubBackbone:
    """Builds `keras_hub.models.<class_name>(**config)`.

    Example:

    ```python
    backbone = HubBackbone("OPTBackbone")(
        vocabulary_size=1000, num_layers=2, num_heads=4, hidden_dim=64,
        intermediate_dim=128, max_sequence_length=64)
    ```
    """

    class_name: str

    def __call__(self, **config):
        import keras_hub

        return getattr(keras_hub.models, self.class_name)(**config)


def seed_mlp():
    """MLP 64 -> 128 -> 256 -> 128 -> 32 (shared/seeds/001)."""
    import keras

    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(32),
        ],
        name="seed_mlp",
    )


def seed_attention():
    """Self-attention (8 heads of 8) + feed-forward 256, head to 16."""
    import keras

    inp = keras.Input((32, 64))
    x = keras.layers.MultiHeadAttention(num_heads=8, key_dim=8)(inp, inp)
    x = keras.layers.LayerNormalization()(x + inp)
    h = keras.layers.Dense(256, activation="relu")(x)
    h = keras.layers.Dense(64)(h)
    x = keras.layers.LayerNormalization()(x + h)
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(16)(x)
    return keras.Model(inp, out, name="seed_attention")


def seed_einsum():
    """EinsumDense 48 -> 96 -> 64 -> 24."""
    import keras

    inp = keras.Input((48,))
    x = keras.layers.EinsumDense("ab,bc->ac", 96, bias_axes="c")(inp)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.EinsumDense("ab,bc->ac", 64, bias_axes="c")(x)
    x = keras.layers.Activation("relu")(x)
    out = keras.layers.EinsumDense("ab,bc->ac", 24, bias_axes="c")(x)
    return keras.Model(inp, out, name="seed_einsum")


def seed_embedding():
    """Embedding(1000, 64) -> mean pool -> Dense 32 -> Dense 5."""
    import keras

    return keras.Sequential(
        [
            keras.Input((16,), dtype="int32"),
            keras.layers.Embedding(1000, 64),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(5),
        ],
        name="seed_embedding",
    )
