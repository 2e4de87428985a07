"""TensorFlow collectives (the first piece of the TF engine, issue 17):
2 ranks on 127.0.0.1 through TensorFlow's own collective runtime; f, g
and an uneven gather against the math they stand for, eagerly and inside
`tf.function`."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest


def _rel(got, want) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def worker(out_path: str) -> None:
    import tensorflow as tf

    from keras_tensor_parallel.backends import tensorflow_collectives as tc

    assert tc.ensure_cluster()
    rank, n = tc.rank(), tc.world_size()
    rng = np.random.RandomState(0)
    full_x = rng.randn(3, 4).astype("float32")
    full_w = rng.randn(4, 6).astype("float32")  # column split: 3 + 3
    local_w = tf.constant(full_w[:, 3 * rank : 3 * rank + 3])
    res = {"rank": rank, "n": n}
    res["sum"] = float(tc.all_reduce(tf.constant(float(rank + 1))).numpy())

    def column_then_row(x):
        h = tf.matmul(tc.f(x), local_w)  # local columns
        return tc.g(tf.matmul(h, tf.transpose(local_w)))  # row: reduce

    for mode, fn in (
        ("eager", column_then_row),
        ("function", tf.function(column_then_row)),
    ):
        for _ in range(2):  # a traced function reuses its instance keys
            x = tf.constant(full_x)
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = fn(x)
                loss = tf.reduce_sum(out**2)
            dx = tape.gradient(loss, x)
        want_out = full_x @ full_w @ full_w.T
        want_dx = 2 * want_out @ full_w @ full_w.T
        res[f"{mode}_out"] = _rel(out.numpy(), want_out)
        res[f"{mode}_dx"] = _rel(dx.numpy(), want_dx)
    sizes = [3, 2]  # an odd width: 5 columns on 2 ranks
    local = tf.constant(np.arange(6 * 5, dtype="float32").reshape(6, 5))
    local = local[:, sum(sizes[:rank]) : sum(sizes[: rank + 1])]
    gathered = tc.gather_last(local, sizes).numpy()
    res["gather"] = gathered.tolist()
    with open(f"{out_path}.{rank}", "w") as fh:
        json.dump(res, fh)


@pytest.mark.torch  # runs subprocesses of another backend, like torch's
def test_tf_collectives_match_the_math(tf_run):
    # `worker` runs in test_tensorflow_engine's launch (`tf_run`), first.
    proc, out = tf_run
    paths = [out / f"collectives.{r}" for r in (0, 1)]
    assert all(p.exists() for p in paths), proc.stderr[-4000:]
    full = np.arange(30, dtype="float32").reshape(6, 5)
    for r in (0, 1):
        res = json.loads(paths[r].read_text())
        assert res["n"] == 2 and res["sum"] == 3.0, res
        for mode in ("eager", "function"):
            assert res[f"{mode}_out"] <= 1e-5, res
            assert res[f"{mode}_dx"] <= 1e-5, res
        np.testing.assert_array_equal(np.array(res["gather"]), full)


if __name__ == "__main__":
    worker(*sys.argv[1:])
