"""One process of a 2-process job that restores the newest checkpoint of its own view of a
workdir, as hosts of a pod do through their own mounts.

    python -m tests.pod_restore --coordinator_address=127.0.0.1:PORT --num_processes=2 \
        --process_id=I --views=DIR

Started by tests/test_pod.py with real `jax.distributed` on localhost. Process I restores from
its own copy of the checkpoints, DIR/process-I/checkpoints: a copy whose newest step lacks a
file is a host whose view lags (an NFS attribute cache, gcsfuse's stat cache).
$POD_RESTORE_PUT_BACK=SRC:DST:SECONDS moves SRC to DST that long after the start, as such a
cache catching up. Writes DIR/process-I.json: the restored step, or the error and its message.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from tests import pod_process


def _put_back_later(source: str, destination: str, seconds: float) -> None:
    def move():
        time.sleep(seconds)
        Path(source).rename(destination)

    threading.Thread(target=move, daemon=True).start()


def restore(checkpoints: str) -> dict:
    import jax
    import numpy as np

    from resnet_flax import checkpoint, sharding

    checkpoint.READ_FIRST_WAIT_SECONDS = 0.5  # 0.5, 1, 2, 4 s: what matters is the count
    mesh = sharding.create_mesh()
    target = {'step': jax.ShapeDtypeStruct((), np.int32, sharding=sharding.replicated(mesh)),
              'w': jax.ShapeDtypeStruct((4096,), np.float32, sharding=sharding.replicated(mesh))}
    manager = checkpoint.create_manager(checkpoints, keep=10, keep_best=False)
    try:
        state = checkpoint.restore_latest(manager, target)
        return {'step': int(state['step'])}
    except (checkpoint.CheckpointReadError, checkpoint.CheckpointRestoreError) as error:
        return {'error': type(error).__name__, 'message': str(error)}
    finally:
        manager.close()


def main() -> None:
    args = pod_process.join('views')
    put_back = os.environ.get('POD_RESTORE_PUT_BACK')
    if put_back:
        source, destination, seconds = put_back.split(':')
        _put_back_later(source, destination, float(seconds))
    view = Path(args.views, f'process-{args.process_id}')
    result = restore(str(view / 'checkpoints'))
    Path(args.views, f'process-{args.process_id}.json').write_text(json.dumps(result))


if __name__ == '__main__':
    main()
