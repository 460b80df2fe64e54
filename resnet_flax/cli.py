"""What `train.py` and `eval.py` share: distributed flags, startup, one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

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


def setup(flag_values: flags.FlagValues) -> None:
    """Distributed runtime first (before any device is touched), then the compilation cache."""
    if not flag_values['verbosity'].present:
        logging.set_verbosity(logging.WARNING)  # orbax and XLA are chatty at INFO; -v 0 restores
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


def run(main: Callable[[list[str]], None]) -> None:
    """absl's app.run, with user errors shown as one line instead of a traceback."""
    check_config_path(sys.argv)

    def guarded(argv):
        try:
            main(argv)
        except _USER_ERRORS as error:
            logging.vlog(1, 'Stopped by error', exc_info=True)
            print(f'Error: {error}', file=sys.stderr, flush=True)
            sys.exit(1)

    app.run(guarded)
