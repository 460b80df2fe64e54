"""The wheels bench/gpu.sh carries to the GPU machine, and their installation there.

The GPU machine's image has JAX (with CUDA), Flax, optax, orbax-checkpoint, PyTorch,
torchvision, NumPy, absl-py and etils, and nothing else this project needs; it cannot reach a
package index, and what travels with the repository is at most 64 MiB. So the rest comes as
wheels in bench/.whl/ (git-ignored), filled here, on a machine with an index:

    python -m bench.gpu_wheels download                         # for this machine's Python
    python -m bench.gpu_wheels download --python_version=3.10,3.11,3.12   # for several

and installed on the GPU machine by bench/gpu.sh (`python -m bench.gpu_wheels install`): the
wheels that fit its Python and platform and whose distribution is not installed already, into
one directory that goes on PYTHONPATH, with pip where there is one, else unpacked with the
standard library (a wheel is a zip archive laid out as site-packages). Standard library only:
this runs before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIRS = (REPO / 'bench' / '.whl', REPO / '.whl')
MAX_BYTES = 64 * 2**20  # what the device tool carries of git-ignored paths
# What the GPU image has: never downloaded, never replaced from a wheel.
ON_THE_IMAGE = frozenset({
    'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'torch', 'torchvision', 'numpy',
    'absl-py', 'etils'})
PACKAGES = (
    'ml-collections>=1.1', 'pyyaml',  # the configs
    'tqdm>=4.66',  # the loop's progress bar (the loop-overhead and end-to-end items)
    'tensorboardX>=2.6', 'packaging', 'protobuf>=5.28.3',  # TensorBoard event files
    # The TensorFlow-free loader and its requirements.
    'grain>=0.2.12', 'array-record>=0.8.1', 'cloudpickle', 'portpicker', 'psutil',
    'dm-tree', 'attrs', 'wrapt', 'more-itertools',  # grain's on Python 3.10 (grain 0.2.13)
    'simplejpeg>=1.8',  # libjpeg-turbo decoding (PIL comes with torchvision)
    # The loader's train resize (~5x PIL's). One abi3 wheel for every Python; 4.12 on are
    # 52-59 MiB, too large for the 64 MiB with the rest, 4.11 is 48 MiB.
    'opencv-python-headless>=4.10,<4.12',
)
# manylinux tags of x86_64, newest first (pip does not widen a given --platform by itself).
PLATFORMS = ('manylinux_2_28_x86_64', 'manylinux_2_27_x86_64', 'manylinux_2_24_x86_64',
             'manylinux_2_17_x86_64', 'manylinux2014_x86_64', 'manylinux_2_12_x86_64',
             'manylinux2010_x86_64', 'manylinux_2_5_x86_64', 'manylinux1_x86_64')
LEGACY_MANYLINUX = {'manylinux1': (2, 5), 'manylinux2010': (2, 12), 'manylinux2014': (2, 17)}
MARKER = '.resnet_flax_wheels'  # marks a target directory as this script's to replace


def canonical(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


# ---------------------------------------------------------------------------------------------
# Which wheel fits this interpreter


def wheel_tags(filename: str) -> tuple[str, str, list[str], list[str], list[str]]:
    """(distribution, version, python tags, abi tags, platform tags) of a wheel's file name."""
    parts = Path(filename).name[:-len('.whl')].split('-')
    if len(parts) not in (5, 6):
        raise ValueError(f'{filename}: not a wheel file name (name-version-py-abi-platform.whl).')
    python, abi, plat = parts[-3:]
    return canonical(parts[0]), parts[1], python.split('.'), abi.split('.'), plat.split('.')


def _glibc() -> tuple[int, int] | None:
    name, version = platform.libc_ver()
    found = re.match(r'(\d+)\.(\d+)', version)
    return (int(found[1]), int(found[2])) if name == 'glibc' and found else None


def _platform_fits(tag: str, machine: str, glibc: tuple[int, int] | None) -> bool:
    if tag == 'any':
        return True
    if not tag.endswith('_' + machine) or sys.platform != 'linux':
        return False
    family = tag[:-len(machine) - 1]
    if family == 'linux':
        return True
    found = re.fullmatch(r'manylinux_(\d+)_(\d+)', family)
    needed = (int(found[1]), int(found[2])) if found else LEGACY_MANYLINUX.get(family)
    return needed is not None and glibc is not None and needed <= glibc


def fits(filename: str, version: tuple[int, int] | None = None) -> bool:
    """Whether this interpreter (or Python `version` on this platform) can import the wheel."""
    major, minor = version or sys.version_info[:2]
    _, _, pythons, abis, plats = wheel_tags(filename)
    exact = f'cp{major}{minor}'

    def python_fits(tag: str) -> bool:
        if tag in (f'py{major}', f'py{major}{minor}', exact):
            return True
        found = re.fullmatch(rf'cp{major}(\d+)', tag)  # abi3: built for 3.x, runs on later
        return bool(found) and 'abi3' in abis and int(found[1]) <= minor

    machine, glibc = platform.machine(), _glibc()
    return (any(map(python_fits, pythons)) and any(a in ('none', 'abi3', exact) for a in abis)
            and any(_platform_fits(p, machine, glibc) for p in plats))


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else 0 for part in re.split(r'[.+!-]', version))


def is_installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def wheels_to_install(directories: list[Path]) -> list[Path]:
    """Per distribution that is neither installed nor on the image: its newest wheel that fits."""
    best: dict[str, Path] = {}
    for directory in directories:
        for wheel in sorted(directory.glob('*.whl')):
            name, version = wheel_tags(wheel.name)[:2]
            if name in ON_THE_IMAGE or not fits(wheel.name) or is_installed(name):
                continue
            if name not in best or _version_key(version) > _version_key(
                    wheel_tags(best[name].name)[1]):
                best[name] = wheel
    return [best[name] for name in sorted(best)]


def unfit(directories: list[Path]) -> list[str]:
    """Distributions with wheels here, none of which fits, that are not installed either."""
    names = {wheel_tags(w.name)[0]: w for d in directories for w in d.glob('*.whl')}
    fitting = {wheel_tags(w.name)[0] for d in directories for w in d.glob('*.whl')
               if fits(w.name)}
    return sorted(n for n in names
                  if n not in fitting and n not in ON_THE_IMAGE and not is_installed(n))


# ---------------------------------------------------------------------------------------------
# Installing


def unpack_wheel(wheel: Path, target: Path) -> None:
    """Installs a wheel into `target` the way pip --target lays it out, without pip: the archive
    is site-packages, except `NAME.data/purelib|platlib/` (moved to the top) and the rest of
    `NAME.data/` (scripts, headers: not needed on PYTHONPATH)."""
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            parts = Path(member.filename).parts
            if member.is_dir() or not parts:
                continue
            if Path(member.filename).is_absolute() or '..' in parts:
                raise ValueError(f'{wheel.name}: unsafe path {member.filename!r} in the archive.')
            if parts[0].endswith('.data'):
                if len(parts) < 3 or parts[1] not in ('purelib', 'platlib'):
                    continue
                parts = parts[2:]
            destination = target.joinpath(*parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(destination, 'wb') as sink:
                shutil.copyfileobj(source, sink)


def fresh_target(target: Path) -> None:
    """An empty `target`; one left by an earlier run (marked) is replaced, anything else kept."""
    if target.exists():
        if not (target / MARKER).exists() and any(target.iterdir()):
            raise SystemExit(f'{target} exists and was not made by bench/gpu_wheels.py: remove '
                             'it or choose another directory (SITE=... for bench/gpu.sh).')
        shutil.rmtree(target)
    target.mkdir(parents=True)
    (target / MARKER).write_text('Wheels unpacked by bench/gpu_wheels.py; replaced each run.\n')


def install(wheels: list[Path], target: Path, use_pip: bool) -> str:
    """Installs `wheels` into a fresh `target`; returns how ('pip' or 'unpacked')."""
    fresh_target(target)
    if use_pip:
        subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps',
                        '--no-compile', '--no-cache-dir', '--target', str(target),
                        *map(str, wheels)], check=True, stdout=sys.stderr)
        return 'pip'
    for wheel in wheels:
        unpack_wheel(wheel, target)
    return 'unpacked'


# ---------------------------------------------------------------------------------------------
# Downloading


def requirements(wheel: Path) -> list[str]:
    """Distributions a wheel requires unconditionally on Linux (extras and other OSes left out)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith('.dist-info/METADATA'))
        metadata = archive.read(name).decode('utf-8', 'replace')
    needed = []
    for line in metadata.splitlines():
        if not line.startswith('Requires-Dist:'):
            continue
        requirement, _, marker = line[len('Requires-Dist:'):].partition(';')
        if re.search(r'extra\s*==|win32|Windows|darwin|Darwin', marker):
            continue
        needed.append(canonical(re.match(r'\s*([A-Za-z0-9._-]+)', requirement)[1]))
    return needed


def download(dest: Path, python_versions: list[str], platforms: list[str],
             skip: frozenset[str] = frozenset()) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    packages = [p for p in PACKAGES if canonical(re.match(r'[A-Za-z0-9._-]+', p)[0]) not in skip]
    for version in python_versions:
        command = [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps',
                   '--only-binary=:all:', '--dest', str(dest), '--python-version', version,
                   '--implementation', 'cp', *(f'--platform={p}' for p in platforms), *packages]
        print(f'[gpu_wheels] Python {version}: pip download {" ".join(packages)}',
              file=sys.stderr)
        subprocess.run(command, check=True)
    wheels = sorted(dest.glob('*.whl'))
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f'{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}')
    print(f'{total / 2**20:8.2f} MiB  in all, in {dest} (at most {MAX_BYTES / 2**20:.0f} MiB)')
    have = {wheel_tags(w.name)[0] for w in wheels}
    missing = sorted({r for w in wheels for r in requirements(w)} - have - ON_THE_IMAGE - skip)
    if missing:
        print(f'[gpu_wheels] required but neither among the wheels nor on the GPU image: '
              f'{", ".join(missing)}: add them to PACKAGES in bench/gpu_wheels.py.',
              file=sys.stderr)
        return 1
    if total > MAX_BYTES:
        print(f'[gpu_wheels] {total / 2**20:.1f} MiB is over the {MAX_BYTES / 2**20:.0f} MiB the '
              f'device tool carries: download for fewer Python versions (or --skip='
              f'opencv-python-headless: the loader then resizes with PIL).', file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    get = commands.add_parser('download', help='Fill the wheel folder (needs a package index).')
    get.add_argument('--dest', type=Path, default=WHEEL_DIRS[0])
    get.add_argument('--python_version', '--python-version', default='{}.{}'.format(
        *sys.version_info[:2]), help='Target Python(s), comma-separated, e.g. 3.10,3.11,3.12.')
    get.add_argument('--platform', action='append', default=None,
                     help=f'Target platform tag(s), repeatable; default: {PLATFORMS[0]} and '
                          'older manylinux x86_64 tags.')
    get.add_argument('--skip', default='',
                     help='Distributions to leave out, comma-separated (e.g. '
                          'opencv-python-headless, 48 MiB: the loader falls back to PIL).')
    put = commands.add_parser('install', help='Install the missing ones (no index needed).')
    put.add_argument('--wheels', type=Path, action='append', default=None,
                     help='Wheel folder(s); default: bench/.whl and .whl.')
    put.add_argument('--target', type=Path, default=Path('/tmp/site'))
    put.add_argument('--unpack', action='store_true',
                     help='Unpack with the standard library even where pip is installed.')
    args = parser.parse_args(argv)
    if args.command == 'download':
        return download(args.dest, args.python_version.split(','),
                        args.platform or list(PLATFORMS),
                        frozenset(canonical(n) for n in args.skip.split(',') if n))
    directories = [d for d in args.wheels or WHEEL_DIRS if d.is_dir()]
    wheels = wheels_to_install(directories)
    missing = unfit(directories)
    if missing:
        print(f'[gpu_wheels] no wheel here fits Python {sys.version_info[0]}.'
              f'{sys.version_info[1]} on {platform.machine()} for: {", ".join(missing)}: run '
              f'`python -m bench.gpu_wheels download --python_version={sys.version_info[0]}.'
              f'{sys.version_info[1]}` where there is an index.', file=sys.stderr)
    if not wheels:
        print('[gpu_wheels] nothing to install', file=sys.stderr)
        return 0
    use_pip = not args.unpack and importlib.util.find_spec('pip') is not None
    how = install(wheels, args.target, use_pip)
    print(f'[gpu_wheels] {how} into {args.target}: {" ".join(w.name for w in wheels)}',
          file=sys.stderr)
    print(args.target)  # the directory for PYTHONPATH
    return 0


if __name__ == '__main__':
    sys.exit(main())
