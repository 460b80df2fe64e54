"""What the one-process scripts of a test's multi-process job share: joining the job."""

from __future__ import annotations

import argparse


def join(*extra_flags: str) -> argparse.Namespace:
    """Parses --coordinator_address, --num_processes, --process_id and the required string
    flags `extra_flags`, then joins the job through jax.distributed as train.py does."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--coordinator_address', required=True)
    parser.add_argument('--num_processes', type=int, required=True)
    parser.add_argument('--process_id', type=int, required=True)
    for flag in extra_flags:
        parser.add_argument(f'--{flag}', required=True)
    args = parser.parse_args()

    from resnet_flax import sharding

    sharding.initialize_distributed(args.coordinator_address, args.num_processes,
                                    args.process_id)
    return args
