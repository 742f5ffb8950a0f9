"""Stand-in for TensorFlow on the GPU machine (not installed there, too large to carry).

kauldron.typing names tf.Tensor in its array aliases at import time and clu/tensorboard build a few
protos with TensorBoard's own TF stub; nothing on the benchmark path runs TensorFlow. Any other use
fails loudly.
"""

import types as _types

from tensorboard.compat import tensorflow_stub as _stub
from tensorboard.compat.tensorflow_stub import *  # noqa: F403
from tensorboard.util.tensor_util import make_tensor_proto  # noqa: F401


class Tensor:
  pass


keras = _types.SimpleNamespace(callbacks=_types.SimpleNamespace(Callback=type('Callback', (), {})))


def __getattr__(name):
  try:
    return getattr(_stub, name)
  except AttributeError:
    raise ImportError(f"tensorflow stand-in: tf.{name} is not available on the GPU machine") from None
