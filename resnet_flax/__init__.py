"""resnet-flax: residual networks in JAX/Flax."""

import os as _os

__version__ = "0.1.0"

# Object storage (gs://, s3://) goes through etils.epath -> fsspec (gcsfs) on every process,
# also where TensorFlow is installed: one route, the one the emulator tests exercise.
# EPATH_USE_TF=true in the environment selects tf.io.gfile instead. See storage.py.
_os.environ.setdefault('EPATH_USE_TF', 'false')
