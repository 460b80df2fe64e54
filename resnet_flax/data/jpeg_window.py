"""Decode only a crop's window of a JPEG, as tf.data's decode_and_crop_jpeg does.

An Inception crop covers 8-100% of the image (about half on average). simplejpeg, PIL and
OpenCV decode every pixel; libjpeg-turbo can skip the rows above the window, skip the
inverse DCT and colour conversion of the columns beside it, and stop at its last row. No
Python package exposes that, so jpeg_window.c (a short C file against libjpeg's own API) is
compiled here on first use with the system's C compiler and libjpeg headers, cached under
$RESNET_FLAX_CACHE (default ~/.cache/resnet_flax), and called through ctypes, which releases
the GIL as simplejpeg does.

The cache is trusted only as far as it can be:
- the file name is a hash of everything that makes the binary: the source, the compiler
  command ($CC, which may carry arguments: `CC='ccache gcc'`) and its --version, the flags,
  the libjpeg headers it compiles against (their bytes), the machine and OS. A home shared
  by machines of another architecture or libjpeg gets its own file, not a foreign one. (No
  Python ABI: the library is plain C, loaded by ctypes.)
- only a folder owned by this user that no one else can write is used (it is made 0700);
  one that others can write is refused in one line (set RESNET_FLAX_CACHE elsewhere),
  since whoever writes there runs code in the trainer.
- a cached file that is not ours, others can write, or does not load (truncated, another
  architecture) is rebuilt in place, once.

Where it cannot be built (no compiler, no jpeglib.h: Debian's libjpeg62-turbo-dev), data.
decoder='auto' decodes the whole image as before; data.decoder='libjpeg_window' stops with
one line that says what is missing.
"""

from __future__ import annotations

import _ctypes
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import stat
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from absl import logging

SOURCE = Path(__file__).with_name('jpeg_window.c')
FLAGS = ('-O2', '-shared', '-fPIC')
LIBS = ('-ljpeg',)
MESSAGE_BYTES = 200  # libjpeg's JMSG_LENGTH_MAX
CHANNELS = 3
OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
PROBE_TIMEOUT_S = 60
# What the key hashes of the libjpeg the source compiles against: the headers it includes.
HEADER_PROBE = '#include <stddef.h>\n#include <stdio.h>\n#include <jpeglib.h>\n'


class BuildError(RuntimeError):
    """The decoder could not be compiled or loaded here; the message says why in one line."""


class UnsafeCacheError(BuildError):
    """The cache folder is not this user's alone: loading from it would run others' code."""


def cache_dir() -> Path:
    """Where the compiled library lives: $RESNET_FLAX_CACHE, else ~/.cache/resnet_flax."""
    found = os.environ.get('RESNET_FLAX_CACHE') or Path.home() / '.cache' / 'resnet_flax'
    return Path(found)


def compiler() -> list[str]:
    """$CC split as a shell would (`ccache gcc`, `gcc -m64`), else `cc`."""
    return shlex.split(os.environ.get('CC') or 'cc')


def _run(command: list[str], stdin: str = '') -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, input=stdin, capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f'no C compiler to build the JPEG window decoder ({error}): '
                         'install gcc, or set CC.') from None


def _headers(cc: list[str]) -> bytes:
    """The bytes of every header jpeglib.h pulls in, as this compiler finds them (empty when
    it finds none: the compile then fails and says so)."""
    done = _run([*cc, '-M', '-x', 'c', '-'], HEADER_PROBE)
    if done.returncode != 0:
        return b''
    names = done.stdout.replace('\\\n', ' ').split(':', 1)[-1].split()
    return b''.join(Path(name).read_bytes() for name in sorted(set(names)) if name != '-'
                    and Path(name).is_file())


def build_key() -> str:
    """A hash of everything that makes the binary (see the module docstring)."""
    cc = compiler()
    version = _run([*cc, '--version'])
    parts = [SOURCE.read_bytes(), repr((cc, FLAGS, LIBS)).encode(),
             version.stdout.encode(), _headers(cc),
             repr((platform.machine(), platform.system())).encode()]
    digest = hashlib.sha256()
    for part in parts:  # length-prefixed, so no two different inputs hash alike
        digest.update(len(part).to_bytes(8, 'little') + part)
    return digest.hexdigest()[:20]


def _library_path() -> Path:
    return cache_dir() / f'jpeg_window-{build_key()}.so'


def _private_folder(folder: Path) -> None:
    """Makes `folder` (0700) if missing; UnsafeCacheError unless it is ours and no one else
    can write it."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        found = folder.stat()
    except OSError as error:  # not a folder, not writable, full
        raise BuildError(f'cannot write the JPEG window decoder to {folder} ({error}): '
                         'set RESNET_FLAX_CACHE to a writable folder.') from None
    if found.st_uid != os.getuid() or found.st_mode & OTHERS_WRITE:
        raise UnsafeCacheError(
            f'the JPEG window decoder cache {folder} is owned by uid {found.st_uid} with mode '
            f'{stat.filemode(found.st_mode)}, and others who can write it could run code in '
            f'the trainer: `chmod go-w {folder}` if it is yours, or set RESNET_FLAX_CACHE to '
            'a folder only you can write.')


def _trusted(path: Path) -> bool:
    """Whether `path` is a file of ours that no one else can write."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        return False
    return (stat.S_ISREG(found.st_mode) and found.st_uid == os.getuid()
            and not found.st_mode & OTHERS_WRITE)


def build(rebuild: bool = False) -> Path:
    """The compiled jpeg_window.c: compiled once per build key (later calls find the file),
    again when `rebuild` or when the cached file is not one to trust. Writes a temporary
    file and renames it, so processes building at once do not collide."""
    target = _library_path()
    _private_folder(target.parent)
    if _trusted(target) and not rebuild:
        return target
    try:
        return _compile_into(target)
    except OSError as error:  # not writable, full
        raise BuildError(f'cannot write the JPEG window decoder to {target.parent} ({error}): '
                         'set RESNET_FLAX_CACHE to a writable folder.') from None


def _compile_into(target: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [*compiler(), *FLAGS, '-o', str(built), str(SOURCE), *LIBS]
        done = _run(command)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ['(no message)'])[0]
            raise BuildError(f'could not compile the JPEG window decoder: {first} (it needs '
                             "libjpeg-turbo's headers: apt install libjpeg62-turbo-dev).")
        built.chmod(0o755)
        os.replace(built, target)
    return target


def _load(path: Path) -> ctypes.CDLL:
    loaded = ctypes.CDLL(str(path))
    try:
        function = loaded.jpeg_window_decode
    except AttributeError:  # not our library: unload it, or dlopen would hand it back
        _ctypes.dlclose(loaded._handle)  # noqa: SLF001 - ctypes has no public close
        raise
    function.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int,
                         ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                         ctypes.c_char_p]
    function.restype = ctypes.c_int
    return loaded


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled decoder, built on the first call of each process (and rebuilt once if the
    cached file does not load); BuildError if it can't be."""
    path = build()
    try:
        return _load(path)
    except (OSError, AttributeError) as error:
        logging.warning('Rebuilding the JPEG window decoder: %s did not load (%s).', path,
                        error)
    try:
        return _load(build(rebuild=True))
    except (OSError, AttributeError) as error:
        raise BuildError(f'could not load the JPEG window decoder: {error}') from None


@functools.cache
def available() -> bool:
    """Whether the decoder builds and loads here (once per process); an unsafe cache is said
    in one warning, since 'auto' then quietly decodes whole images."""
    try:
        library()
    except UnsafeCacheError as error:
        logging.warning('%s Decoding whole images instead.', error)
        return False
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
