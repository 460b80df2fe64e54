"""Per-process input budgets: the host's cores and shuffle buffer divided among its processes."""

import pytest

import configs.base
from resnet_flax.data import budget


def data_config(**overrides):
    cfg = configs.base.get_config().data
    cfg.update(overrides)
    return cfg


def test_one_process_gets_the_whole_host():
    found = budget.compute(data_config(), environ={}, cores=(16, 16))
    assert found == budget.Budget(processes_per_host=1, cores=16, threads=16, workers=15,
                                  shuffle_buffer=16_384)


@pytest.mark.parametrize('variable, value', [
    ('LOCAL_WORLD_SIZE', '8'), ('SLURM_NTASKS_PER_NODE', '8'),
    ('SLURM_NTASKS_PER_NODE', '8(x2),4'), ('OMPI_COMM_WORLD_LOCAL_SIZE', '8'),
    ('MPI_LOCALNRANKS', '8')])
def test_launcher_local_size_divides_cores_and_buffer(variable, value):
    found = budget.compute(data_config(), environ={variable: value}, cores=(96, 96))
    assert (found.processes_per_host, found.cores, found.threads) == (8, 12, 12)
    assert found.workers == 11 and found.shuffle_buffer == 16_384 // 8


def test_config_overrides_the_launcher_and_the_cores():
    cfg = data_config(processes_per_host=4, threadpool_size=3, num_workers=2)
    found = budget.compute(cfg, environ={'LOCAL_WORLD_SIZE': '8'}, cores=(64, 64))
    assert (found.processes_per_host, found.cores) == (4, 16)
    assert (found.threads, found.workers, found.shuffle_buffer) == (3, 2, 4096)


def test_a_pinned_process_keeps_its_affinity_share():
    """SLURM binding already gave this process 12 of 96 cores: not divided again."""
    found = budget.compute(data_config(), environ={'SLURM_NTASKS_PER_NODE': '8'},
                           cores=(12, 96))
    assert (found.cores, found.threads) == (12, 12)


def test_small_shares_decode_on_threads_and_never_get_zero():
    found = budget.compute(data_config(), environ={'LOCAL_WORLD_SIZE': '8'}, cores=(2, 2))
    assert (found.cores, found.threads, found.workers) == (1, 1, 0)
    tiny = budget.compute(data_config(shuffle_buffer_size=4), environ={'LOCAL_WORLD_SIZE': '8'},
                          cores=(2, 2))
    assert tiny.shuffle_buffer == 1


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match='data.processes_per_host=-1'):
        budget.compute(data_config(processes_per_host=-1), environ={}, cores=(4, 4))
    with pytest.raises(ValueError, match='data.num_workers=-2'):
        budget.compute(data_config(num_workers=-2), environ={}, cores=(4, 4))


@pytest.mark.slow  # imports TensorFlow
def test_the_tf_pipeline_uses_the_budget(monkeypatch):
    tf_pipeline = pytest.importorskip('resnet_flax.data.tf_pipeline')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    cores = budget.compute(data_config()).cores
    assert tf_pipeline.options(data_config()).threading.private_threadpool_size == cores
