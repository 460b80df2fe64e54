"""A tiny, fast experiment for tests: the digits data at 16x16 and a two-stage ResNet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_collections

from configs import digits

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**overrides: Any) -> ml_collections.ConfigDict:
    config = digits.get_config()
    config.data.image_size = 16
    config.data.train_crop = 'none'
    config.label_smoothing = 0.0
    config.ema_decay = 0.0
    config.model.stage_sizes = (1, 1)
    config.model.stage_widths = (8, 16)
    config.model.stem_width = 8
    config.batch_size = 32
    config.num_train_steps = 6
    config.log_every_steps = 1
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 3
    config.optimizer.learning_rate = 0.8
    config.optimizer.warmup_steps = 1
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split('.')
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def override_flags(config_overrides: dict[str, Any]) -> list[str]:
    """`--config.a.b=value` flags for train.py / eval.py."""
    return [f'--config.{k}={v}' for k, v in config_overrides.items()]


# The overrides that turn configs/digits.py into tiny_config(), as command-line flags.
TINY_FLAGS = {
    'data.image_size': 16,
    'data.train_crop': 'none',
    'label_smoothing': 0.0,
    'ema_decay': 0.0,
    'model.stage_sizes': '(1,1)',
    'model.stage_widths': '(8,16)',
    'model.stem_width': 8,
    'batch_size': 32,
    'num_train_steps': 6,
    'log_every_steps': 1,
    'eval_every_steps': 3,
    'checkpoint_every_steps': 3,
    'optimizer.learning_rate': 0.8,
    'optimizer.warmup_steps': 1,
}


def cpu_env(num_devices: int = 1, **extra: str) -> dict[str, str]:
    """Environment for a subprocess with `num_devices` simulated CPU devices."""
    env = dict(os.environ)
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
    env['JAX_PLATFORMS'] = 'cpu'
    env['PYTHONUNBUFFERED'] = '1'
    env.update(extra)
    return env


def run_script(script: str, args: list[str], env: dict[str, str] | None = None,
               timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Runs train.py / eval.py from the repository root as a real subprocess."""
    result = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f'{script} failed ({result.returncode}):\n{result.stderr[-4000:]}')
    return result


def train_losses(workdir: Path) -> dict[int, float]:
    """step -> logged training loss; a re-logged step (after a resume) keeps its latest value."""
    losses = {}
    for line in (Path(workdir) / 'metrics.jsonl').read_text().splitlines():
        record = json.loads(line)
        if record['split'] == 'train':
            losses[record['step']] = float(record['loss'])
    return losses


def grain_recipe(**overrides: Any):
    """A grain_source.Recipe of the Inception train recipe at 64 px, simplejpeg, PIL resize."""
    from resnet_flax.data import grain_source

    fields = dict(decoder='simplejpeg', train_crop='inception', eval_crop='center',
                  image_size=64, eval_image_size=64, area_range=(0.08, 1.0),
                  aspect_range=(3 / 4, 4 / 3), crop_padding=0, eval_crop_fraction=0.875,
                  resize_method='bilinear', train_resizer='pil')
    return grain_source.Recipe(**{**fields, **overrides})
