"""Files the project writes get the mode the umask gives (0644 under umask 0022, 0640 under 0027), as any file the
user makes: teammates on a shared cluster can read checkpoints, .npz files and reports."""
import os
import stat

import pytest
import torch

from utils.atomic import atomic_path, write_json_atomic
from utils.checkpoint import save_atomic

MODES = [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)]


@pytest.fixture
def umask():
    """umask(value): set the process umask for this test; the old one comes back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize('mask, want', MODES)
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, want):
    umask(mask)
    with atomic_path(str(tmp_path / 'a.bin')) as tmp, open(tmp, 'wb') as f:
        f.write(b'x')
    write_json_atomic({'a': 1}, str(tmp_path / 'report.json'))
    assert mode(tmp_path / 'a.bin') == mode(tmp_path / 'report.json') == want


def test_a_file_replaced_in_place_keeps_the_umask_mode(tmp_path, umask):
    """A writer that swaps in a file of its own (safetensors writes a 0600 temporary file and renames it) and an
    older file with another mode: the result still has the umask's mode."""
    from utils.safetensors_io import write_safetensors
    umask(0o022)
    path = tmp_path / 'viar-slim.safetensors'
    path.write_bytes(b'old')
    path.chmod(0o600)
    write_safetensors({'model': {'w': torch.ones(2)}, 'config': {}}, str(path))
    assert mode(path) == 0o644


@pytest.mark.parametrize('mask, want', MODES[:2])
def test_a_checkpoint_follows_the_umask(tmp_path, umask, mask, want):
    umask(mask)
    save_atomic({'w': torch.ones(2)}, str(tmp_path / 'ar-ckpt-last.pth'))
    assert mode(tmp_path / 'ar-ckpt-last.pth') == want


def test_sampling_npz_pngs_and_report_follow_the_umask(tmp_path, umask):
    """sampling.py end to end on a tiny export under umask 0027: PNGs, .npz and the JSON report are 0640."""
    import sampling
    from tests.tiny import write_tiny_export
    umask(0o027)
    ckpt = write_tiny_export(tmp_path / 'tiny.pth')
    npz = sampling.main(['--ckpt_path', ckpt, '--vae_ckpt', '', '--num_classes', '2', '--per_class', '1',
                         '--batch_size', '1', '--sample_dir', str(tmp_path / 's'), '--device', 'cpu', '--top_k', '0',
                         '--top_p', '0', '--iter_left', '2', '--iter_right', '2', '--progress', 'False'])
    folder = npz[:-len('.npz')]
    files = [npz, folder + '.json'] + [os.path.join(folder, n) for n in os.listdir(folder)]
    assert len(files) == 5 and {mode(p) for p in files} == {0o640}
