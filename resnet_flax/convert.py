"""Pretrained PyTorch ResNets (torchvision, timm) as this project's weights.

    variables = convert.from_torch_state_dict(state_dict, 'resnet50')   # {'params', 'batch_stats'}
    python -m resnet_flax.convert --name resnet50 --weights resnet50.pth --out /tmp/resnet50

The state dict is keyed as torchvision and timm key it (`conv1.weight`,
`layer1.0.bn1.running_mean`, `fc.weight`, ...) and holds numpy arrays or torch tensors.
The key table is in `models.py`; timm's ResNet-D (`resnet50d`) keys its deep stem
`conv1.{0,1,3,4,6}` + `bn1` and its average-pool shortcut `downsample.{1,2}`. Convolution
kernels go from OIHW to HWIO, the dense head from [out, in] to [in, out]. BN running statistics
are copied as they are; `num_batches_tracked` has no counterpart and is ignored.

Files: `.safetensors` and `.npz` load without torch; `.pth` / `.pt` / `.bin` need torch and
are read with `torch.load(weights_only=True)`, which refuses pickled code.

The CLI writes a checkpoint (see `weights.py`) that `eval.py --checkpoint=DIR` evaluates and
`--config.init_from=DIR` fine-tunes from; its `meta` item records the model name and fields.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import jax
import numpy as np
from etils import epath

from resnet_flax import checkpoint, models, weights

PyTree = Any
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')
NUMPY_SUFFIXES = ('.safetensors', '.npz')
IGNORED_SUFFIX = 'num_batches_tracked'
SUPPORTED = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnet200',
             'wide_resnet50_2', 'wide_resnet101_2', 'resnext50_32x4d', 'resnext101_32x8d',
             'resnet50d')
META_FORMAT = 'resnet_flax.convert/1'

# Our module names -> torch module prefixes, for the parts outside the residual stages.
_STEM = {'stem_conv': 'conv1', 'stem_bn': 'bn1', 'head': 'fc',
         # ResNet-C/D deep stem (timm): conv1 = Sequential(conv, bn, act, conv, bn, act, conv)
         'stem_conv1': 'conv1.0', 'stem_bn1': 'conv1.1', 'stem_conv2': 'conv1.3',
         'stem_bn2': 'conv1.4', 'stem_conv3': 'conv1.6', 'stem_bn3': 'bn1'}
_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
           'var': 'running_var'}
_BLOCK = re.compile(r'stage(\d+)_block(\d+)')


def _module_prefix(path: tuple[str, ...], avg_down: bool) -> str:
    """The torch prefix of our module at `path` (without the leaf name)."""
    if len(path) == 1 and path[0] in _STEM:
        return _STEM[path[0]]
    match = _BLOCK.fullmatch(path[0])
    if match is None:
        raise ValueError(f'{"/".join(path)} has no torchvision/timm counterpart; only '
                         f'post-activation ResNets convert ({", ".join(SUPPORTED)}).')
    block = f'layer{match[1]}.{int(match[2]) - 1}'
    inner = '.'.join(path[1:])
    # timm's avg-down shortcut is Sequential(pool, conv, bn); torchvision's is (conv, bn).
    offset = 1 if avg_down else 0
    inner = {'proj_conv': f'downsample.{offset}', 'proj_bn': f'downsample.{offset + 1}',
             'se.reduce': 'se.fc1', 'se.expand': 'se.fc2'}.get(inner, inner)
    return f'{block}.{inner}'


def torch_key(name: str, avg_down: bool = False) -> str:
    """'params/stage1_block1/conv1/kernel' -> 'layer1.0.conv1.weight'."""
    _, *path, leaf = name.split('/')
    return f'{_module_prefix(tuple(path), avg_down)}.{_LEAVES[leaf]}'


def _to_flax(value: np.ndarray, leaf: str, ndim: int) -> np.ndarray:
    """A torch array laid out as our leaf of rank `ndim` wants it."""
    if leaf != 'kernel':
        return value
    if ndim == 4:  # conv: [O, I/groups, kh, kw] -> [kh, kw, I/groups, O]
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 4:  # SE as 1x1 convs [O, I, 1, 1] -> dense [I, O]
        value = value.reshape(value.shape[:2])
    return value.T  # dense: [out, in] -> [in, out]


def _torch_shape(shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """The torch layout of one of our shapes, for messages."""
    if not name.endswith('/kernel'):
        return tuple(shape)
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return (shape[1], shape[0])


def as_numpy(value: Any) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor (without importing torch)."""
    if hasattr(value, 'detach'):  # a torch tensor; bfloat16 has no numpy type, so widen it
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.dtype.itemsize >= 4:
            return value.numpy()
        return value.float().numpy()
    return np.asarray(value)


def _shorten(names: list[str], limit: int = 5) -> str:
    shown = ', '.join(names[:limit])
    return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')


def model_fields(state_dict: Mapping[str, Any], name: str, num_classes: int | None = None,
                 **overrides: Any) -> dict[str, Any]:
    """The `model` config fields of the named net that fits `state_dict`; the number of
    classes comes from `fc.weight` unless given."""
    if name not in models.REGISTRY:
        raise ValueError(f'unknown model {name!r}; the converter knows {", ".join(SUPPORTED)}.')
    if num_classes is None and 'fc.weight' in state_dict:
        num_classes = int(as_numpy(state_dict['fc.weight']).shape[0])
    return models.config_for(name, num_classes, **overrides)


def from_torch_state_dict(state_dict: Mapping[str, Any], name: str,
                          num_classes: int | None = None, dtype: Any = None,
                          **overrides: Any) -> PyTree:
    """{'params', 'batch_stats'} of numpy arrays for `models.create(name, ...)`.

    `overrides` are `model` config fields (e.g. stage_widths=(8, 16, 32, 64) for a small
    net of the same layout). The arrays take the model's param_dtype, or `dtype` (float64 for
    the numerics checks against PyTorch). A key the model lacks, a key it needs that is
    absent, or an array of the wrong shape is a one-line ValueError naming the keys.
    """
    state_dict = {key: value for key, value in state_dict.items()
                  if not key.endswith(IGNORED_SUFFIX)}
    fields = model_fields(state_dict, name, num_classes, **overrides)
    model = models.ResNet(**models.resolve(fields))
    if model.preactivation:
        raise ValueError(f'{name} with preactivation=True has no torchvision/timm counterpart; '
                         'only post-activation ResNets convert.')
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32),
                           train=False))
    flat = {f'{collection}/{path}': leaf for collection in ('params', 'batch_stats')
            for path, leaf in flax.traverse_util.flatten_dict(shapes[collection],
                                                               sep='/').items()}
    keys = {ours: torch_key(ours, model.avg_down) for ours in flat}

    missing = [key for key in keys.values() if key not in state_dict]
    unexpected = sorted(set(state_dict) - set(keys.values()))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f'missing {len(missing)} key(s) {_shorten(missing)}')
        if unexpected:
            parts.append(f'unexpected {len(unexpected)} key(s) {_shorten(unexpected)}')
        raise ValueError(f'The state dict does not fit {_describe(name, overrides)}: '
                         f'{"; ".join(parts)}. Check --name (and the model overrides).')

    out: dict[str, dict[str, np.ndarray]] = {'params': {}, 'batch_stats': {}}
    position = {key: i for i, key in enumerate(state_dict)}
    for ours, leaf in sorted(flat.items(), key=lambda item: position[keys[item[0]]]):
        collection, path = ours.split('/', 1)
        key = keys[ours]
        value = _to_flax(as_numpy(state_dict[key]), ours.rsplit('/', 1)[1], len(leaf.shape))
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(
                f'{key} has shape {tuple(as_numpy(state_dict[key]).shape)} but '
                f'{_describe(name, overrides)} needs {_torch_shape(leaf.shape, ours)} there. '
                'Check --name (and the model overrides).')
        out[collection][path] = value.astype(dtype or leaf.dtype)
    return {collection: flax.traverse_util.unflatten_dict(tree, sep='/')
            for collection, tree in out.items()}


def _describe(name: str, overrides: Mapping[str, Any]) -> str:
    if not overrides:
        return name
    return f'{name} with {", ".join(f"{k}={v}" for k, v in overrides.items())}'


# ---------------------------------------------------------------------------------------------
# Files


def _unwrap(loaded: Any, path: str) -> dict[str, Any]:
    """The tensor dict inside a training checkpoint ({'state_dict': ...}, {'model': ...})."""
    for key in ('state_dict', 'model', 'model_state_dict'):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping):
        raise ValueError(f'{path} holds a {type(loaded).__name__}, not a state dict of tensors.')
    arrays = {key: value for key, value in loaded.items()
              if hasattr(value, 'shape') or hasattr(value, 'detach')}
    if not arrays:
        raise ValueError(f'{path} holds no tensors; expected a ResNet state dict.')
    return arrays


def _strip_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drops the `module.` that DataParallel / DistributedDataParallel put before every key."""
    prefix = 'module.'
    if all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Tensors of a weights file as numpy arrays, keyed as the file keys them."""
    file = epath.Path(path)
    if not file.exists():
        raise FileNotFoundError(f'No weights file at {path}.')
    suffix = file.suffix.lower()
    if suffix == '.safetensors':
        from safetensors.numpy import load

        try:
            loaded = load(file.read_bytes())
        except Exception as error:  # noqa: BLE001 - safetensors raises several types
            raise ValueError(f'{path} is not a readable .safetensors file '
                             f'({_first_line(error)}).') from None
    elif suffix == '.npz':
        with np.load(file.open('rb'), allow_pickle=False) as archive:
            loaded = {key: archive[key] for key in archive.files}
    elif suffix in TORCH_SUFFIXES:
        loaded = _torch_load(file)
    else:
        raise ValueError(f'{path}: unknown weights format {suffix!r}; use one of '
                         f'{", ".join(NUMPY_SUFFIXES + TORCH_SUFFIXES)}.')
    arrays = _unwrap(loaded, path)
    return _strip_prefix({key: as_numpy(value) for key, value in arrays.items()})


def _torch_load(file) -> Any:
    try:
        import torch
    except ImportError:
        raise ValueError(f'Reading {file} needs PyTorch: pip install "resnet-flax[torch]" '
                         '(or save the weights as .safetensors, which loads without it).'
                         ) from None
    import pickle

    try:
        with file.open('rb') as stream:
            return torch.load(stream, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _refusal_reason(str(error))
        raise ValueError(f'{file} is not a plain tensor state dict: torch.load(weights_only='
                         f'True) refused it ({reason}). It is not unpickled with code; save '
                         'model.state_dict() (or .safetensors) instead.') from None
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        raise ValueError(f'{file} is not a readable PyTorch file ({type(error).__name__}: '
                         f'{_first_line(error)}).') from None


def _refusal_reason(message: str) -> str:
    """The line of torch's long refusal message that says what was refused."""
    for line in message.splitlines():
        if 'WeightsUnpickler error:' in line:
            return line.split('WeightsUnpickler error:', 1)[1].split('. ')[0].strip()
    return 'it holds pickled objects other than tensors'


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def convert_file(weights_file: str, out: str, name: str, num_classes: int | None = None,
                 **overrides: Any) -> dict[str, Any]:
    """Converts a weights file and writes the checkpoint; returns its `meta`."""
    state_dict = load_state_dict(weights_file)
    variables = from_torch_state_dict(state_dict, name, num_classes, **overrides)
    fields = model_fields(state_dict, name, num_classes, **overrides)
    meta = {
        'format': META_FORMAT,
        'name': name,
        'model': {key: list(v) if isinstance(v, tuple) else v for key, v in fields.items()},
        'source': str(weights_file),
        # Weights trained on torchvision's preprocessing are evaluated with it (eval.py reads
        # this; data.eval_preset='native' overrides it).
        'eval_preset': 'torchvision',
        'code_version': checkpoint.code_version(),
    }
    weights.save_converted(out, variables, meta)
    return meta


def parse_override(text: str) -> tuple[str, Any]:
    """'stage_widths=(8,16)' -> ('stage_widths', (8, 16)); values are Python literals or
    plain strings."""
    key, sep, raw = text.partition('=')
    if not sep or key.strip() not in models.CONFIG_DEFAULTS:
        raise ValueError(f'--override {text!r} must be FIELD=VALUE with FIELD one of '
                         f'{", ".join(models.CONFIG_DEFAULTS)}.')
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key.strip(), value


def _main(argv: list[str]) -> None:
    from absl import flags, logging

    if len(argv) > 1:
        raise ValueError(f'Unexpected arguments: {argv[1:]}')
    values = flags.FLAGS
    if not values['verbosity'].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    overrides = dict(parse_override(text) for text in values.override)
    meta = convert_file(values.weights, values.out, values.name, values.num_classes,
                        **overrides)
    print(f'Wrote {values.out}: {meta["name"]} with {meta["model"]["num_classes"]} classes '
          f'from {values.weights}.')
    print('Evaluate it:  python eval.py --config=CONFIG --checkpoint=' + str(values.out) + ' '
          + ' '.join(weights.model_flags(meta['model'], models.CONFIG_DEFAULTS)))
    print(f'Fine-tune from it:  python train.py --config=CONFIG --workdir=DIR '
          f'--config.init_from={values.out} (same model fields; the head may differ)')


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string('name', None, f'Architecture: {", ".join(SUPPORTED)}.')
    flags.DEFINE_string('weights', None, 'State dict file: .safetensors, .npz, .pth, .pt, .bin.')
    flags.DEFINE_string('out', None, 'New directory for the checkpoint (local or gs://).')
    flags.DEFINE_integer('num_classes', None, 'Classes of the head; default: from fc.weight.')
    flags.DEFINE_multi_string('override', [], 'model config FIELD=VALUE, e.g. stem_width=32.')
    flags.mark_flags_as_required(['name', 'weights', 'out'])


if __name__ == '__main__':
    from resnet_flax import cli

    _define_flags()
    cli.run(_main)
