"""The edges a new user meets, through the real command line: Ctrl-C, typos, bad workdirs, a
finished run re-run, a changed config on resume, eval.py without --config, quiet logs.

Each test asserts the exit status, the message, and what is left in the workdir.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny import REPO, TINY_FLAGS, cpu_env, override_flags, run_script

# Six steps, EMA on, an eval at 3 and 6 and checkpoints at 2, 3, 4, 6: the checkpoints at 2 and
# 4 have no eval metrics (orbax's 'tracked_metric' warning, when not filtered).
FLAGS = {**TINY_FLAGS, 'ema_decay': 0.9, 'checkpoint_every_steps': 2, 'keep_checkpoints': 5}


def _train(workdir: Path, *extra: str, check: bool = True, **env: str):
    return run_script('train.py', [f'--workdir={workdir}', '--config=configs/digits.py',
                                   *override_flags(FLAGS), *extra],
                      env=cpu_env(**env), timeout=600, check=check)


def _files(workdir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob('*'))
            if p.is_file() and 'tensorboard' not in p.parts}


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert lines and lines[-1].startswith('Error: '), result.stderr[-3000:]
    return lines[-1]


def _evals(workdir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    return {r['step']: r for r in records if r['split'] == 'eval'}


@pytest.fixture(scope='module')
def finished(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    workdir = tmp_path_factory.mktemp('finished') / 'run'
    return workdir, _train(workdir)


@pytest.mark.slow
def test_default_logs_hold_no_known_noise(finished):
    _, result = finished
    for noise in ('tracked_metric', "Unable to initialize backend 'tpu'", 'oneDNN'):
        assert noise not in result.stderr
    assert 'eval @ step 6' in result.stderr


@pytest.mark.slow
def test_rerunning_a_finished_run_reports_its_final_eval_without_compiling(finished):
    workdir, first = finished
    assert 'wall_time_sec=' in first.stdout  # the run that trained reports its time
    before = _files(workdir)
    events = sorted((workdir / 'tensorboard').iterdir())
    result = _train(workdir, '--verbosity=0', JAX_LOG_COMPILES='1')
    assert 'is already complete: step 6 of 6' in result.stderr
    final = _evals(workdir)[6]
    line = next(x for x in result.stderr.splitlines() if x.startswith('Final eval @ step 6'))
    assert f"top1 {final['top1']:.4f}" in line
    assert f"EMA weights: loss {final['ema_loss']:.4f}" in line
    assert 'jit(train_step)' not in result.stderr  # JAX_LOG_COMPILES names every compile
    assert 'tracked_metric' not in result.stderr  # nothing saved
    assert _files(workdir) == before
    assert sorted((workdir / 'tensorboard').iterdir()) == events  # no empty event file added
    done = next(x for x in result.stdout.splitlines() if x.startswith('Done: '))
    assert 'already_complete=True' in done and 'wall_time_sec' not in done  # nothing trained


@pytest.mark.slow
def test_eval_py_without_config_uses_the_workdirs_config(finished):
    workdir, _ = finished
    result = run_script('eval.py', [f'--workdir={workdir}', '--ema', '--json'])
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output['step'] == 6
    assert output['top1'] == pytest.approx(_evals(workdir)[6]['ema_top1'], abs=1e-6)


@pytest.mark.slow
def test_eval_py_with_another_network_is_refused_in_one_line(finished):
    workdir, _ = finished
    # Same array shapes, another network: only the saved config can tell.
    flags = override_flags({**FLAGS, 'model.bn_epsilon': 0.001})
    result = run_script('eval.py', [f'--workdir={workdir}', '--config=configs/digits.py',
                                    *flags], check=False)
    assert result.returncode == 1
    line = _one_error_line(result)
    assert 'another network (model.bn_epsilon 1e-05 -> 0.001 here)' in line


def _set_checkpoint_metrics(workdir: Path, step: int, **metrics: float) -> None:
    path = workdir / 'checkpoints' / str(step) / 'metrics' / 'metrics'
    path.write_text(json.dumps({**json.loads(path.read_text()), **metrics}))


@pytest.mark.slow
def test_best_with_ema_ranks_by_the_ema_metric(finished, tmp_path):
    source, _ = finished
    workdir = tmp_path / 'run'
    shutil.copytree(source, workdir)
    # Raw weights best at step 3, their EMA best at step 6.
    _set_checkpoint_metrics(workdir, 3, top1=0.9, ema_top1=0.1)
    _set_checkpoint_metrics(workdir, 6, top1=0.2, ema_top1=0.8)
    for flags, step in ((['--json'], 3), (['--json', '--ema'], 6)):
        result = run_script('eval.py', [f'--workdir={workdir}', '--checkpoint_step=best', *flags])
        assert json.loads(result.stdout.strip().splitlines()[-1])['step'] == step


@pytest.mark.slow
def test_changed_config_on_resume(finished, tmp_path):
    source, _ = finished
    workdir = tmp_path / 'run'
    shutil.copytree(source, workdir)
    before = _files(workdir)
    # The network: refused, whatever the flag says.
    result = _train(workdir, '--config.model.bn_epsilon=0.001',
                    '--config.allow_config_change=True', check=False)
    assert result.returncode == 1
    line = _one_error_line(result)
    assert 'another network' in line and 'model.bn_epsilon 1e-05 -> 0.001' in line
    # The schedule: refused without the flag ...
    result = _train(workdir, '--config.num_train_steps=8', check=False)
    assert result.returncode == 1
    line = _one_error_line(result)
    assert 'num_train_steps 6 -> 8' in line and '--config.allow_config_change=True' in line
    assert _files(workdir) == before  # nothing written by a refused start
    # ... and resumes with it, keeping the earlier config.
    result = _train(workdir, '--config.num_train_steps=8', '--config.allow_config_change=True')
    assert 'Config changed since step 6: num_train_steps 6 -> 8' in result.stderr
    assert 'Resumed from step 6' in result.stderr
    assert json.loads((workdir / 'config.json').read_text())['num_train_steps'] == 8
    assert json.loads((workdir / 'config.until-step-6.json').read_text())['num_train_steps'] == 6
    assert (workdir / 'checkpoints' / '8').is_dir()
    assert not list(workdir.glob('*.tmp'))


def test_mistyped_override_is_one_line_naming_the_field(tmp_path):
    workdir = tmp_path / 'run'
    result = _train(workdir, '--config.optimizer.learnin_rate=0.1', check=False)
    assert result.returncode == 1
    line = _one_error_line(result)
    assert "no field 'optimizer.learnin_rate'" in line
    assert 'did you mean --config.optimizer.learning_rate' in line
    assert not workdir.exists()


@pytest.mark.parametrize('where', ['file', pytest.param('under_file', marks=pytest.mark.slow)])
def test_workdir_that_cannot_be_a_directory_is_one_line_naming_it(tmp_path, where):
    blocker = tmp_path / 'notes.txt'
    blocker.write_text('keep me\n')
    workdir = blocker if where == 'file' else blocker / 'run'
    result = _train(workdir, check=False)
    assert result.returncode == 1
    line = _one_error_line(result)
    assert f'--workdir={workdir}' in line
    assert blocker.read_text() == 'keep me\n'


def _start(workdir: Path, *extra: str) -> subprocess.Popen:
    flags = override_flags({**FLAGS, 'num_train_steps': 400, 'eval_every_steps': 1000,
                            'checkpoint_every_steps': 1000, 'ema_decay': 0.0})
    return subprocess.Popen(
        [sys.executable, str(REPO / 'train.py'), f'--workdir={workdir}',
         '--config=configs/digits.py', *flags, *extra],
        cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_steps(workdir: Path) -> list[int]:
    path = workdir / 'metrics.jsonl'
    if not path.exists():
        return []
    return [json.loads(line)['step'] for line in path.read_text().splitlines()
            if line.endswith('}') and '"train"' in line]


def _wait_for_steps(proc: subprocess.Popen, workdir: Path, count: int) -> None:
    deadline = time.time() + 500
    while len(_train_steps(workdir)) < count:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, 'the run did not start'
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_saves_the_step_and_a_second_one_stops_at_once(tmp_path):
    workdir = tmp_path / 'run'
    proc = _start(workdir)
    _wait_for_steps(proc, workdir, 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert 'Traceback' not in stderr
    saved = int(stderr.split('Interrupted: saved a checkpoint at step ')[1].split(';')[0])
    assert 'run the same command to resume' in stderr
    assert saved == max(_train_steps(workdir))
    assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [saved]

    # Resumed, then two Ctrl-C: stops without waiting for the step boundary's save.
    proc = _start(workdir)
    _wait_for_steps(proc, workdir, len(_train_steps(workdir)) + 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert f'Resumed from step {saved}' in stderr
    assert 'Traceback' not in stderr
    assert 'Interrupted again: stopped at once' in stderr or 'Interrupted: saved' in stderr
    # Whatever the moment, the workdir resumes: the next start restores a complete checkpoint.
    steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
    assert steps[0] == saved
    result = _train(workdir, f'--config.num_train_steps={steps[-1] + 1}',
                    '--config.allow_config_change=True', '--config.eval_every_steps=1000',
                    '--config.checkpoint_every_steps=1000', '--config.ema_decay=0.0')
    assert f'Resumed from step {steps[-1]}' in result.stderr


def test_every_config_problem_is_one_error_before_the_workdir_is_made(tmp_path):
    # A warmup as long as the run, and a network rule (option A cannot widen a bottleneck):
    # both in one error, and nothing on disk.
    workdir = tmp_path / 'run'
    result = _train(workdir, '--config.optimizer.warmup_steps=6', '--config.model.block=bottleneck',
                    '--config.model.shortcut=A', check=False)
    line = _one_error_line(result)
    assert line.startswith('Error: 2 config problems: (1) ')
    assert "model.shortcut='A' (zero-padded identity) works with basic blocks only" in line
    assert 'optimizer.warmup_steps=6 means 6 warmup steps' in line
    assert not workdir.exists()


def test_plain_net_from_a_zero_init_recipe_is_announced_and_built_without_it():
    from configs import imagenet
    from resnet_flax import config_checks, models

    config = imagenet.get_config()  # the ImageNet recipe: zero_init_last_bn=True
    assert config.model.zero_init_last_bn
    config.model.shortcut = 'none'
    config.model.depth = 34
    notes: list[str] = []
    problems: list[str] = []
    config_checks._check_model(config, problems, notes)  # noqa: SLF001
    assert problems == [] and len(notes) == 1 and 'nothing to act on' in notes[0]
    model = models.from_config(config.model)
    assert model.shortcut == 'none' and not model.zero_init_last_bn
    # Named explicitly in one call, the two settings still contradict each other.
    with pytest.raises(ValueError, match='zero_init_last_bn=True with shortcut'):
        models.create('plain34', zero_init_last_bn=True)


def test_synthetic_smoke_run_says_how_long_its_eval_is():
    from configs import resnet18
    from resnet_flax import config_checks

    config = resnet18.get_config()
    config.data.dataset = 'synthetic'
    config.batch_size = 8
    config.num_train_steps = 2
    config.optimizer.warmup_epochs = 0.0
    _, info, notes = config_checks.resolve(config)
    assert info.num_eval_examples == 50_000
    assert any('each eval reads 50,000 synthetic examples (6,250 batches of 8), more steps '
               'than the whole run (2)' in note for note in notes), notes
    config.data.synthetic_num_eval_examples = 16
    assert not any('synthetic' in n for n in config_checks.resolve(config)[2])


def test_auto_loader_is_the_one_the_readme_names():
    import importlib.util

    from configs import base
    from resnet_flax import data

    config = base.get_config().data
    config.dataset = 'image_folder'
    has_tensorflow = importlib.util.find_spec('tensorflow') is not None
    assert data.loader(config) == ('tf' if has_tensorflow else 'grain')
    readme = ' '.join((REPO / 'README.md').read_text().split())
    assert ('`loader=auto` (the default) is tf.data wherever TensorFlow is installed' in readme)


def test_pytest_says_how_many_parity_tests_skipped_without_torch(tmp_path):
    # torch made absent for one pytest run, as on a machine without the [torch] extra.
    (tmp_path / 'no_torch.py').write_text("import sys\nsys.modules['torch'] = None\n")
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-n', '0', '-p', 'no_torch', '-p',
         'no:cacheprovider', 'tests/test_convert.py'], cwd=REPO, capture_output=True, text=True,
        env=cpu_env(PYTHONPATH=str(tmp_path)), timeout=300)
    assert result.returncode in (0, 5), result.stdout[-3000:]  # 5: every test skipped
    assert ('PyTorch parity checks not run: 1 test file(s) (tests/test_convert.py) skipped '
            'because torch is not installed') in result.stdout


def test_an_empty_class_folder_is_named_not_counted_as_a_class(tmp_path):
    import numpy as np
    from PIL import Image

    from configs import base
    from resnet_flax import data

    for name in ('cat', 'dog', 'empty'):
        (tmp_path / name).mkdir()
    for name in ('cat', 'dog'):
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / name / f'{i}.png')
    config = base.get_config().data
    config.update(dict(dataset='image_folder', data_dir=str(tmp_path), holdout_fraction=0.5,
                       image_size=8))
    with pytest.raises(ValueError, match=r"class folder\(s\) with no readable image: \['empty'\]"
                       ) as error:
        data.get_info(config)
    assert '\n' not in str(error.value)
    (tmp_path / 'empty').rmdir()
    assert data.get_info(config).num_classes == 2
