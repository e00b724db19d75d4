"""Task metrics: the argmax-free accuracy agrees with argmax, ties included."""

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel import tasks


def test_is_argmax_agrees_with_argmax_including_ties():
    logits = jax.random.normal(jax.random.key(0), (6, 50, 11))
    logits = jnp.round(logits * 2) / 2  # many ties between classes
    labels = jax.random.randint(jax.random.key(1), (6, 50), 0, 11)
    labels = labels.at[0].set(jnp.argmax(logits[0], -1))  # a row of correct predictions
    want = jnp.argmax(logits, -1) == labels
    got = tasks.is_argmax(logits, labels)
    np.testing.assert_array_equal(got, want)
    assert 0 < int(want.sum()) < want.size and bool(got[0].all())
    # A label tied with an earlier class is not the argmax; tied with a later one, it is.
    tie = jnp.array([[1.0, 3.0, 3.0]])
    np.testing.assert_array_equal(tasks.is_argmax(tie, jnp.array([1])), [True])
    np.testing.assert_array_equal(tasks.is_argmax(tie, jnp.array([2])), [False])
