"""A local Google Cloud Storage for tests: gcp-storage-emulator, run in its own process.

    python tests/gcs_emulator.py --port=PORT --dir=DIR --bucket=NAME

Objects live on disk under DIR, so the server can be killed and started again (an outage) and
the bucket is still there. Two patches: a deep accept queue (see `_serve`), and the object
generation headers: real GCS sends `x-goog-generation` and `x-goog-metageneration` on every
download, and orbax's OCDBT (through tensorstore) refuses a read without them; the emulator
keeps both in each object's metadata but does not send them.

`Emulator` (used by the pytest fixtures in test_gcs.py) starts, stops and restarts it and gives
the environment that points tensorstore, google-cloud-storage and gcsfs at it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def _serve(port: int, directory: str, bucket: str) -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    original = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
            response['x-goog-generation'] = str(obj['generation'])
            response['x-goog-metageneration'] = str(obj['metageneration'])
        except Exception:  # noqa: BLE001 - a missing object is answered 404 by the original
            pass
        return original(request, response, storage, *args, **kwargs)

    # One request at a time (as the emulator is written), but a deep accept queue: with the
    # default of 5, clients that open many connections at once (gcsfs, tensorstore) see
    # refused connects and back off for seconds.
    server.server.HTTPServer.request_queue_size = 1024
    objects.download = download_with_generation  # objects.get(alt=media) calls it by this name
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is original:
                handlers[method] = download_with_generation
    emulator = server.create_server('127.0.0.1', port, in_memory=False, data_dir=directory)
    if bucket:
        from gcp_storage_emulator.handlers import buckets

        with contextlib.suppress(Exception):  # the bucket is already there after a restart
            buckets.create_bucket(bucket, emulator._storage)
    emulator.run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Emulator:
    """The emulator process: start, stop (an outage) and start again on the same port."""

    def __init__(self, directory: str, bucket: str = 'test-bucket', port: int | None = None):
        self.directory, self.bucket = directory, bucket
        self.port = port or free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """What points every client at this server, for this process and its children."""
        return {
            'STORAGE_EMULATOR_HOST': self.url,  # google-cloud-storage, gcsfs
            'TENSORSTORE_GCS_HTTP_URL': self.url,  # tensorstore (orbax)
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'dummy',  # tensorstore: no credential lookup
            'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',  # else gcsfs waits ~60 s per call
            'EPATH_USE_TF': 'false',
            'NO_GCE_CHECK': 'True',  # google-auth: no probe of a GCE metadata server
        }

    def start(self, timeout: float = 30.0) -> None:
        with open(f'{self.directory}/emulator.log', 'ab') as log:
            self.process = subprocess.Popen(
                [sys.executable, __file__, f'--port={self.port}', f'--dir={self.directory}',
                 f'--bucket={self.bucket}'],
                stdout=subprocess.DEVNULL, stderr=log,
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + '/', timeout=1).read()
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError('The GCS emulator exited at start.') from None
                time.sleep(0.1)
        raise RuntimeError(f'The GCS emulator did not answer on {self.url} in {timeout} s.')

    def stop(self) -> None:
        """An outage: the server stops answering; its objects stay on disk.

        SIGINT, not SIGKILL: the emulator rewrites its whole index file on every change, and a
        kill in the middle of that write would lose the bucket (real GCS has no such file).
        """
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


if __name__ == '__main__':
    parser = argparse.ArgumentParser()
    parser.add_argument('--port', type=int, required=True)
    parser.add_argument('--dir', required=True)
    parser.add_argument('--bucket', default='')
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    _serve(args.port, os.path.abspath(args.dir), args.bucket)
