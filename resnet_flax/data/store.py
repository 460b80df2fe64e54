"""The prepared store: a pre-resized copy of a data set as ArrayRecord shards.

Written by `python -m resnet_flax.data.prepare`, read by the grain loader
(data.dataset='prepared', data.data_dir=ROOT). Layout:

    ROOT/store.json                      classes, splits, sizes, how it was made
    ROOT/<split>/<split>-00003-of-00016.array_record
    ROOT/<split>/<split>-00003-of-00016.array_record.json   its count, and how it was made

A record is the label as 4 little-endian bytes (uint32) followed by the encoded image (JPEG
at the store's quality, longest side at most max_side). Shards hold contiguous runs of the
split in its source order, so record i of a split is found by counting through the shards.

ArrayRecord files are read through their own C++ file layer: ROOT must be a local or
mounted path (gcsfuse) for reading; `prepare` can write to gs:// too.
"""

from __future__ import annotations

import dataclasses
import json
import struct

from etils import epath

METADATA = 'store.json'
FORMAT_VERSION = 1
_LABEL = struct.Struct('<I')


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    num_examples: int
    shards: tuple[str, ...]  # file names under ROOT/<split>/


@dataclasses.dataclass(frozen=True)
class StoreInfo:
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    max_side: int
    quality: int
    source: str  # what it was prepared from, for the record
    # The median larger side of the stored images (they keep their size up to max_side):
    # picks the default recipe (info.crops). None in stores written before it was recorded.
    image_side: int | None = None

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields['format_version'] = FORMAT_VERSION
        return json.dumps(fields, indent=1)

    @classmethod
    def from_json(cls, text: str) -> StoreInfo:
        fields = json.loads(text)
        version = fields.pop('format_version', None)
        if version != FORMAT_VERSION:
            raise ValueError(f'Prepared store format {version} is not {FORMAT_VERSION}: '
                             're-run python -m resnet_flax.data.prepare.')
        splits = {name: SplitInfo(split['num_examples'], tuple(split['shards']))
                  for name, split in fields.pop('splits').items()}
        return cls(classes=tuple(fields.pop('classes')), splits=splits, **fields)


def shard_name(split: str, index: int, count: int) -> str:
    return f'{split}-{index:05d}-of-{count:05d}.array_record'


def encode_record(label: int, encoded_image: bytes) -> bytes:
    return _LABEL.pack(label) + encoded_image


def decode_record(record: bytes) -> tuple[bytes, int]:
    """(encoded image, label)."""
    return record[_LABEL.size:], _LABEL.unpack_from(record)[0]


def read_info(root: str | epath.Path) -> StoreInfo:
    path = epath.Path(root) / METADATA
    if not path.exists():
        raise FileNotFoundError(
            f'{path} does not exist: data.data_dir must be a store written by '
            'python -m resnet_flax.data.prepare --out=DIR (run it, or point data_dir there).')
    return StoreInfo.from_json(path.read_text())


def shard_paths(root: str | epath.Path, split: str, info: StoreInfo) -> list[str]:
    if split not in info.splits:
        raise ValueError(f'The prepared store {root} has no split {split!r}; its splits: '
                         f'{sorted(info.splits)}.')
    return [str(epath.Path(root) / split / name) for name in info.splits[split].shards]
