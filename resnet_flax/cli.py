"""What `train.py` and `eval.py` share: distributed flags, startup, one-line errors."""

from __future__ import annotations

import difflib
import importlib.util
import logging as std_logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import app, flags, logging

# Errors a user can fix from the message alone; anything else keeps its traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)


def define_distributed_flags() -> None:
    flags.DEFINE_string('coordinator_address', None,
                        'host:port of process 0, for multi-process runs launched by hand.')
    flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
    flags.DEFINE_integer('process_id', None, 'This process (0 .. num_processes-1).')
    flags.DEFINE_string('compilation_cache_dir', None,
                        'Persistent XLA compilation cache, so a second run starts fast.')


class _DropKnownNoise(std_logging.Filter):
    """Warnings that are expected here and read as trouble to a newcomer."""

    NOISE = ('Requested `tracked_metric`',  # orbax: a checkpoint saved between evals
             "Unable to initialize backend 'tpu'")

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in self.NOISE)


class _ShortStorageTracebacks(std_logging.Filter):
    """A storage outage, or any save that fails, ends the run with one line of ours
    (checkpoint.CheckpointWriteError); the clients' own reports of it (orbax's save threads,
    gcsfs's retries) keep their message and the error's first line, without the 30-line
    traceback."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        from resnet_flax import storage

        error = record.exc_info[1] if record.exc_info else None
        from_orbax = '/orbax/checkpoint/' in record.pathname.replace('\\', '/')
        if error is not None and (storage.is_storage_error(error) or from_orbax):
            first = (str(error).splitlines() or [type(error).__name__])[0][:200]
            if first not in record.getMessage():
                suffix = first.replace('%', '%%') if record.args else first  # %-formatted
                record.msg = f'{record.msg}: {suffix}'
            record.exc_info, record.exc_text = None, None
        return True


def quiet_logs() -> None:
    """The project's own lines and real warnings only; --verbosity brings the rest back."""
    logging.set_verbosity(logging.WARNING)  # orbax and XLA are chatty at INFO
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # TensorFlow's oneDNN notice is INFO
    for name in ('absl', 'jax._src.xla_bridge'):
        std_logging.getLogger(name).addFilter(_DropKnownNoise())
    # On the handler, so that it sees every library's records (gcsfs, fsspec, orbax's threads).
    logging.get_absl_handler().addFilter(_ShortStorageTracebacks())


def setup(flag_values: flags.FlagValues) -> None:
    """Distributed runtime first (before any device is touched), then the compilation cache."""
    if not flag_values['verbosity'].present:
        quiet_logs()
    from resnet_flax import sharding

    sharding.initialize_distributed(
        flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id
    )
    if flag_values.compilation_cache_dir:
        import jax

        jax.config.update('jax_compilation_cache_dir', flag_values.compilation_cache_dir)


def check_config_path(argv: list[str]) -> None:
    """An unknown --config file is a one-line error naming the configs there are."""
    for arg in argv[1:]:
        if arg.startswith('--config='):
            path = Path(arg.split('=', 1)[1].split(':', 1)[0])
            if not path.is_file():
                known = sorted(p.name for p in path.parent.glob('*.py') if p.stem != '__init__')
                where = f'{path.parent}/' if path.parent != Path('.') else ''
                raise SystemExit(
                    f'Error: no config file {path}; choose one of {where}'
                    f'{{{", ".join(known)}}} or pass the path of your own.'
                    if known else f'Error: no config file {path}.'
                )


def _load_config(spec: str) -> Any:
    """The ConfigDict of `--config=path.py[:arg]`, loaded as ml_collections loads it."""
    path, _, arg = spec.partition(':')
    module_spec = importlib.util.spec_from_file_location('_config_to_check', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _dotted_names(config: Any, prefix: str = '') -> list[str]:
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if hasattr(value, 'items'):
            names.extend(_dotted_names(value, f'{prefix}{key}.'))
    return names


def check_config_overrides(argv: list[str], default_config: str | Path | None = None) -> None:
    """A mistyped `--config.a.b=v` is a one-line error naming the nearest valid fields."""
    overrides = [arg[len('--config.'):].split('=', 1)[0] for arg in argv[1:]
                 if arg.startswith('--config.')]
    spec = next((arg.split('=', 1)[1] for arg in argv[1:] if arg.startswith('--config=')),
                str(default_config) if default_config else None)
    if not overrides:
        return
    if spec is None:
        raise SystemExit(f'Error: --config.{overrides[0]} overrides a field of --config, so '
                         'pass --config=FILE too.')
    try:
        config = _load_config(spec)
    except Exception:  # noqa: BLE001 - ml_collections reports a broken config file itself
        return
    names = _dotted_names(config)
    for name in overrides:
        if name not in names:
            leaf = name.rsplit('.', 1)[-1]
            near = difflib.get_close_matches(name, names, 3, 0.6) or [
                n for n in names if n.rsplit('.', 1)[-1] == leaf] or difflib.get_close_matches(
                    leaf, names, 3, 0.6)
            hint = (f'; did you mean {" or ".join("--config." + n for n in near)}?' if near
                    else f'; see {spec.partition(":")[0]} and configs/base.py for the fields.')
            raise SystemExit(f'Error: --config.{name}: the config has no field {name!r}{hint}')


def run(main: Callable[[list[str]], None], default_config: str | Path | None = None) -> None:
    """absl's app.run, with user errors shown as one line instead of a traceback.
    `default_config`: the --config file a CLI reads when none is given (summary's base.py)."""
    check_config_path(sys.argv)
    check_config_overrides(sys.argv, default_config)

    def guarded(argv):
        try:
            main(argv)
        except _USER_ERRORS as error:
            logging.vlog(1, 'Stopped by error', exc_info=True)
            print(f'Error: {error}', file=sys.stderr, flush=True)
            _exit(1)
        except OSError as error:  # storage or disk, once the clients' own retries gave up
            logging.vlog(1, 'Stopped by error', exc_info=True)
            reason = (str(error).splitlines() or [type(error).__name__])[0][:300]
            print(f'Error: a storage error stopped it ({reason}); what was written before is '
                  'kept. Check the storage (network, credentials, free space), then run the '
                  'same command again.', file=sys.stderr, flush=True)
            _exit(1)
        except KeyboardInterrupt:  # before or after the loop, which saves on Ctrl-C itself
            print('\nInterrupted (Ctrl-C); the checkpoints already written are kept.',
                  file=sys.stderr, flush=True)
            _exit(130)

    app.run(guarded)


def _exit(code: int) -> None:
    from resnet_flax import peer_watch  # imports jax: not before the flags are read

    peer_watch.exit(code)
