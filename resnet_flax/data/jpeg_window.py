"""Decode only a crop's window of a JPEG, as tf.data's decode_and_crop_jpeg does.

An Inception crop covers 8-100% of the image (about half on average). simplejpeg, PIL and
OpenCV decode every pixel; libjpeg-turbo can skip the rows above the window, skip the
inverse DCT and colour conversion of the columns beside it, and stop at its last row. No
Python package exposes that, so jpeg_window.c (a short C file against libjpeg's own API) is
compiled here on first use with the system's C compiler and libjpeg headers, cached under
$RESNET_FLAX_CACHE (default ~/.cache/resnet_flax), and called through ctypes, which releases
the GIL as simplejpeg does.

Where it cannot be built (no compiler, no jpeglib.h: Debian's libjpeg62-turbo-dev), data.
decoder='auto' decodes the whole image as before; data.decoder='libjpeg_window' stops with
one line that says what is missing.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name('jpeg_window.c')
MESSAGE_BYTES = 200  # libjpeg's JMSG_LENGTH_MAX
CHANNELS = 3


class BuildError(RuntimeError):
    """The decoder could not be compiled or loaded here; the message says why in one line."""


def cache_dir() -> Path:
    """Where the compiled library lives: $RESNET_FLAX_CACHE, else ~/.cache/resnet_flax."""
    found = os.environ.get('RESNET_FLAX_CACHE') or Path.home() / '.cache' / 'resnet_flax'
    return Path(found)


def _compiler() -> str:
    return os.environ.get('CC', 'cc')


def _library_path() -> Path:
    """Named by the source and the compiler, so an edited source or a new compiler rebuilds."""
    key = hashlib.sha256(SOURCE.read_bytes() + _compiler().encode()).hexdigest()[:16]
    return cache_dir() / f'jpeg_window-{key}.so'


def build() -> Path:
    """Compiles jpeg_window.c (once per source and compiler: later calls find the file).
    Writes a temporary file and renames it, so processes building at once do not collide."""
    target = _library_path()
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return _compile_into(target)
    except OSError as error:  # not a folder, not writable, full
        raise BuildError(f'cannot write the JPEG window decoder to {target.parent} ({error}): '
                         'set RESNET_FLAX_CACHE to a writable folder.') from None


def _compile_into(target: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [_compiler(), '-O2', '-shared', '-fPIC', '-o', str(built), str(SOURCE),
                   '-ljpeg']
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise BuildError(f'no C compiler to build the JPEG window decoder ({error}): '
                             'install gcc, or set CC.') from None
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ['(no message)'])[0]
            raise BuildError(f'could not compile the JPEG window decoder: {first} (it needs '
                             "libjpeg-turbo's headers: apt install libjpeg62-turbo-dev).")
        os.replace(built, target)
    return target


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled decoder, built on the first call of each process; BuildError if it can't."""
    try:
        loaded = ctypes.CDLL(str(build()))
    except OSError as error:
        raise BuildError(f'could not load the JPEG window decoder: {error}') from None
    function = loaded.jpeg_window_decode
    function.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int,
                         ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                         ctypes.c_char_p]
    function.restype = ctypes.c_int
    return loaded


@functools.cache
def available() -> bool:
    """Whether the decoder builds and loads here (once per process)."""
    try:
        library()
    except BuildError:
        return False
    return True


def decode(encoded: bytes, window: tuple[int, int, int, int],
           scale_denom: int = 1) -> np.ndarray | None:
    """uint8 [height, width, 3]: the (left, top, width, height) window of the image decoded at
    scale 1/scale_denom (1, 2, 4 or 8); None where libjpeg refuses it (corrupt, CMYK...), for
    the caller to decode the whole image instead."""
    left, top, width, height = window
    out = np.empty((height, width, CHANNELS), np.uint8)
    message = ctypes.create_string_buffer(MESSAGE_BYTES)
    status = library().jpeg_window_decode(bytes(encoded), len(encoded), scale_denom, left, top,
                                          width, height, out.ctypes.data, message)
    return out if status == 0 else None
