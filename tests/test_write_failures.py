"""Writes that fail for a reason the user has to fix: a full disk ends every writer (checkpoints, slim exports,
.npz, PNGs, token shards) with one line naming the folder, the bytes needed and that the previous file is intact;
a folder that cannot be written says so in one line. Entry points exit 1 with that line and no traceback."""
import errno
import os
import re
import sys

import numpy as np
import pytest
import torch

import utils.atomic as atomic
from tests.proc_util import run_group
from tests.train_helpers import env_one_thread, make_image_folder, tiny_flags
from tests.write_doubles import HAS_DEV_FULL, full_disk, read_only
from utils.atomic import WriteError, atomic_path, human_bytes
from utils.checkpoint import payload_bytes, read_checkpoint, save_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_dev_full = pytest.mark.skipif(not HAS_DEV_FULL, reason='no /dev/full on this system')
FAST = ['--device', 'cpu', '--top_k', '0', '--top_p', '0', '--iter_left', '2', '--iter_right', '2',
        '--progress', 'False']


@pytest.fixture
def disk_full_for(monkeypatch):
    """disk_full_for(pattern): from now on, atomic writes of files named like `pattern` meet ENOSPC."""
    def install(pattern: str):
        monkeypatch.setattr(atomic, '_new_temp', full_disk(pattern, atomic._new_temp))
    return install


@pytest.fixture
def read_only_for(monkeypatch):
    """read_only_for(pattern): from now on, files named like `pattern` cannot be created (EROFS)."""
    def install(pattern: str):
        monkeypatch.setattr(atomic, '_new_temp', read_only(pattern, atomic._new_temp))
    return install


def full_disk_line(message: str, path: str, existed: bool) -> str:
    """The need figure of the one-line full-disk message about `path`, after checking the rest of the line."""
    folder, name = os.path.split(os.path.abspath(path))
    assert '\n' not in message and 'Traceback' not in message, message
    m = re.fullmatch(rf'(?:error: )?no space left on the device in {re.escape(folder)}: writing {re.escape(name)} '
                     rf'needs about (.+?), .+ free there; '
                     + (rf'the previous {re.escape(name)} is intact' if existed else rf'no partial {re.escape(name)} '
                        'was left') + r'\. Free some space \(or write to another folder\) and run the command again\.',
                     message)
    assert m, message
    return m.group(1)


def temp_files(folder) -> list:
    return [n for n in os.listdir(folder) if atomic.is_temp_name(n)]


# ---------------------------------------------------------------- the atomic writer

@needs_dev_full
def test_a_full_disk_during_torch_save_is_one_line_and_keeps_the_old_checkpoint(tmp_path, disk_full_for):
    """torch.save meets the kernel's ENOSPC (its error says only 'unexpected pos'): one line with the folder, the
    tensors' bytes, and the previous file untouched; no temporary file left."""
    path = str(tmp_path / 'ar-ckpt-last.pth')
    save_atomic({'w': torch.ones(3)}, path)
    before = open(path, 'rb').read()
    state = {'model': {'w': torch.zeros(300, 100), 'b': torch.zeros(7, dtype=torch.float16)}, 'step': 4,
             'rng': [np.zeros(624, np.uint32)]}
    disk_full_for('ar-ckpt-last.pth')
    with pytest.raises(WriteError) as e:
        save_atomic(state, path)
    assert e.value.errno == errno.ENOSPC
    assert full_disk_line(str(e.value), path, existed=True) == human_bytes(300 * 100 * 4 + 7 * 2 + 624 * 4)
    assert open(path, 'rb').read() == before and temp_files(tmp_path) == []
    with pytest.raises(WriteError) as e:
        save_atomic(state, str(tmp_path / 'sub' / 'ar-ckpt-last.pth'))
    full_disk_line(str(e.value), str(tmp_path / 'sub' / 'ar-ckpt-last.pth'), existed=False)


def test_payload_bytes_counts_every_tensor_and_array():
    obj = {'a': torch.zeros(10, 3), 'b': [torch.zeros(5, dtype=torch.bfloat16), (np.zeros(4, np.int64),)], 'c': 'x'}
    assert payload_bytes(obj) == 10 * 3 * 4 + 5 * 2 + 4 * 8


@needs_dev_full
def test_numpy_pillow_and_json_writers_meet_a_full_disk_in_one_line(tmp_path, disk_full_for):
    """np.save, np.savez (through a file object), Pillow and json: each writer's own ENOSPC becomes the line."""
    from utils.sample import image_io
    disk_full_for('*')
    arr = np.zeros((5, 4, 3), np.uint8)
    writes = [('img.png', lambda p: image_io.write_png(arr, p), arr.nbytes),
              ('edit_input.png', lambda p: image_io.save_png(torch.zeros(3, 4, 5), p), 4 * 5 * 3),
              ('report.json', lambda p: atomic.write_json_atomic({'a': 1}, p), len('{\n  "a": 1\n}'))]
    for name, write, need in writes:
        with pytest.raises(WriteError) as e:
            write(str(tmp_path / name))
        assert full_disk_line(str(e.value), str(tmp_path / name), existed=False) == human_bytes(need)
    assert temp_files(tmp_path) == []


def test_a_writer_that_reports_the_os_error_in_its_text_is_understood(tmp_path, monkeypatch):
    """safetensors wraps the OS error in its own exception ('... (os error 28)')."""
    import safetensors.torch
    from utils.safetensors_io import write_safetensors

    def no_space(tensors, path, metadata=None):
        raise Exception('Error while serializing: I/O error: No space left on device (os error 28)')
    monkeypatch.setattr(safetensors.torch, 'save_file', no_space)
    path = str(tmp_path / 'viar-slim.safetensors')
    with pytest.raises(WriteError) as e:
        write_safetensors({'model': {'w': torch.zeros(10)}, 'config': {}}, path)
    assert full_disk_line(str(e.value), path, existed=False) == human_bytes(40)


def test_other_failures_pass_through_unchanged(tmp_path, monkeypatch):
    """A torch writer error on a disk with room (the probe's megabyte fits), or any other error, is not called a
    full disk; the temporary file still goes."""
    def broken(obj, f, *a, **k):
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')
    monkeypatch.setattr(torch, 'save', broken)
    with pytest.raises(RuntimeError, match='unexpected pos'):
        save_atomic({'w': torch.ones(2)}, str(tmp_path / 'a.pth'))
    with pytest.raises(ValueError, match='bad'):
        with atomic_path(str(tmp_path / 'b.json')):
            raise ValueError('bad')
    assert os.listdir(tmp_path) == []


def test_a_read_only_folder_is_one_line(tmp_path, read_only_for):
    read_only_for('*')
    with pytest.raises(WriteError) as e:
        save_atomic({'w': torch.ones(2)}, str(tmp_path / 'out' / 'a.pth'))
    assert str(e.value) == (f'cannot write into {tmp_path / "out"}: read-only file system. Make it writable or pass '
                            f'another output folder.')


def test_a_path_through_a_file_is_one_line(tmp_path):
    (tmp_path / 'file').write_text('x')
    with pytest.raises(WriteError, match=r'^cannot write into .*file/out: a part of the path is a file, not a folder'):
        atomic.check_writable(str(tmp_path / 'file' / 'out'))


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into a read-only folder')
def test_a_folder_without_write_permission_is_one_line(tmp_path):
    folder = tmp_path / 'ro'
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(WriteError, match=r'^cannot write into .*ro: permission denied\. Make it writable'):
            save_atomic({'w': torch.ones(2)}, str(folder / 'a.pth'))
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------- entry points

@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    """An image folder of 16 px images, a tokenizer file of tiny_flags' sizes, and a tiny VIAR slim export."""
    from models.vqvae import VQVAE
    from tests.tiny import write_tiny_export
    root = tmp_path_factory.mktemp('inputs')
    data = make_image_folder(str(root / 'imgs'), classes=2, per_class=4, val_per_class=1, size=16)
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=32, z_channels=8, ch=32, test_mode=True, share_quant_resi=4, v_patch_nums=(1, 2, 3, 4),
                ch_mult=(1, 2, 4), num_res_blocks=1)
    save_atomic(vae.state_dict(), str(root / 'vae.pth'))
    return dict(data=data, vae=str(root / 'vae.pth'), slim=write_tiny_export(root / 'tiny-slim.pth'))


def entry_case(script: str, inputs: dict, out: str):
    """(argv, the file that meets the full disk, its folder) of a short run of `script` writing into `out`."""
    if script == 'train.py':
        return tiny_flags(inputs['data'], out, True, '--max_steps=2'), 'ar-ckpt-last.pth', out
    if script == 'train_tokenizer.py':
        return (['--data_path', inputs['data'], '--out_dir', out, '--reso', '8', '--patch_nums', '1,2,4', '--ch_mult',
                 '1,2', '--num_res_blocks', '1', '--ch', '32', '--V', '16', '--Cvae', '4', '--bs', '4',
                 '--max_steps', '2', '--tensorboard', 'False'], 'vae-ckpt-last.pth', out)
    if script == 'sampling.py':
        return (['--ckpt_path', inputs['slim'], '--vae_ckpt', '', '--num_classes', '2', '--per_class', '1',
                 '--batch_size', '1', '--sample_dir', out, *FAST], 'implicit-tiny-slim.pth-cfg-1.5-seed-1.npz', out)
    if script == 'scripts/extract_tokens.py':
        return (['--data_path', inputs['data'], '--vae_ckpt', inputs['vae'], '--pn', '1_2_3_4', '--out', out,
                 '--device', 'cpu', '--progress', 'False'], 'train-00000.tokens.npy', out)
    return (['--var_ckpt', inputs['slim'], '--vae_ckpt', '', '--output_dir', out, '--class_label', '1', '--seeds', '3',
             *FAST], 'class1_seed3.png', os.path.join(out, 'tiny-slim'))


def run_in_process(script: str, argv: list):
    import importlib
    module = importlib.import_module(script.removesuffix('.py').replace('/', '.'))
    return module.main(argv)


SCRIPTS = ['train.py', 'train_tokenizer.py', 'sampling.py', 'scripts/extract_tokens.py', 'gen_img.py']


@needs_dev_full
@pytest.mark.parametrize('script', SCRIPTS)
def test_entry_points_end_a_full_disk_in_one_line(script, inputs, tmp_path, disk_full_for):
    argv, name, folder = entry_case(script, inputs, str(tmp_path / 'out'))
    disk_full_for(name)
    with pytest.raises(SystemExit) as e:
        run_in_process(script, argv)
    full_disk_line(str(e.value), os.path.join(folder, name), existed=False)
    assert not os.path.exists(os.path.join(folder, name)) and temp_files(folder) == []


@needs_dev_full
def test_training_keeps_its_last_checkpoint_and_resumes_after_a_full_disk(inputs, tmp_path, monkeypatch):
    """A run saved at step 2; continuing to step 4 meets a full disk: the line says the step-2 checkpoint is
    intact (its bytes are), and once there is room again the same command resumes from step 2."""
    import train
    out = str(tmp_path / 'run')
    train.main(tiny_flags(inputs['data'], out, True, '--max_steps=2'))
    last = os.path.join(out, 'ar-ckpt-last.pth')
    before = open(last, 'rb').read()
    real = atomic._new_temp
    monkeypatch.setattr(atomic, '_new_temp', full_disk('ar-ckpt-last.pth', real))
    with pytest.raises(SystemExit) as e:
        train.main(tiny_flags(inputs['data'], out, True, '--max_steps=4'))
    need = full_disk_line(str(e.value), last, existed=True)
    assert need == human_bytes(payload_bytes(read_checkpoint(last)))   # the same tensors as the step-2 state
    assert open(last, 'rb').read() == before
    monkeypatch.setattr(atomic, '_new_temp', real)
    train.main(tiny_flags(inputs['data'], out, True, '--max_steps=4'))
    log = open(os.path.join(out, 'log.txt')).read()
    assert '[resume]' in log and read_checkpoint(last)['g_it'] == 4


@pytest.mark.parametrize('script', SCRIPTS)
def test_entry_points_refuse_a_read_only_output_folder_in_one_line(script, inputs, tmp_path, read_only_for):
    argv, _, _ = entry_case(script, inputs, str(tmp_path / 'out'))
    read_only_for('*')
    with pytest.raises(SystemExit) as e:
        run_in_process(script, argv)
    assert re.fullmatch(r'error: cannot write into \S+: read-only file system\. Make it writable or pass another '
                        r'output folder\.', str(e.value)), str(e.value)


@pytest.mark.slow
@needs_dev_full
@pytest.mark.parametrize('script', SCRIPTS)
def test_command_line_full_disk_exits_1_with_one_stderr_line(script, inputs, tmp_path):
    """As a user runs it: exit code 1, exactly the one line on stderr, no traceback."""
    argv, name, folder = entry_case(script, inputs, str(tmp_path / 'out'))
    proc = run_group([sys.executable, '-m', 'tests.write_doubles', 'full', name, script, *argv], 300, cwd=ROOT,
                     env=env_one_thread())
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    full_disk_line(lines[0], os.path.join(folder, name), existed=False)


@pytest.mark.slow
@pytest.mark.parametrize('script', ['gen_img.py', 'train.py'])
def test_command_line_read_only_folder_exits_1_with_one_stderr_line(script, inputs, tmp_path):
    argv, _, _ = entry_case(script, inputs, str(tmp_path / 'out'))
    proc = run_group([sys.executable, '-m', 'tests.write_doubles', 'read_only', '*', script, *argv], 300,
                     cwd=ROOT, env=env_one_thread())
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: cannot write into '), proc.stderr
