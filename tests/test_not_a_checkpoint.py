"""A file given as a checkpoint that is none (an image, a saved web page, an empty file, a Git LFS pointer, a .npz)
is named for what it is, with what to do; a truncated checkpoint is called damaged. The message never repeats the
loader's advice to retry with weights_only=False (that runs the file's code)."""
import os
import subprocess
import sys

import numpy as np
import PIL.Image as PImage
import pytest
import torch

from tests.tiny import write_tiny_export
from utils.checkpoint import CheckpointError, read_checkpoint, save_atomic
from utils.file_kind import describe, first_zip_entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(kind: str, folder) -> str:
    """A file of `kind` named like a checkpoint; returns its path."""
    path = str(folder / f'{kind}.pth')
    if kind == 'png':
        PImage.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path, format='PNG')
    elif kind == 'jpeg':
        PImage.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path, format='JPEG')
    elif kind == 'html':
        with open(path, 'w') as f:
            f.write('\n<!DOCTYPE html>\n<html lang="en"><head><title>viar.pth · mobiushy/VIAR at main</title>')
    elif kind == 'empty':
        open(path, 'wb').close()
    elif kind == 'lfs':
        with open(path, 'w') as f:
            f.write('version https://git-lfs.github.com/spec/v1\noid sha256:4f61\nsize 1234\n')
    elif kind == 'npz':
        with open(path, 'wb') as f:
            np.savez(f, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    elif kind == 'text':
        with open(path, 'w') as f:
            f.write('depth: 16\n')
    elif kind == 'truncated':
        write_tiny_export(folder / 'whole.pth')
        data = open(folder / 'whole.pth', 'rb').read()
        with open(path, 'wb') as f:
            f.write(data[:len(data) // 2])
    return path


SAYS = {'png': 'is a PNG image, not a checkpoint: pass the .pth or .safetensors file of a model.',
        'jpeg': 'is a JPEG image, not a checkpoint',
        'html': 'is an HTML page, not a checkpoint: a web page (a login, error or file-view page) was saved instead '
                'of the file. Download the file itself (on the Hugging Face hub: the .../resolve/main/NAME link',
        'empty': 'is empty (0 bytes): an interrupted download or copy. Download or export it again.',
        'lfs': 'is a Git LFS pointer, not the file it points to: run `git lfs pull`',
        'npz': 'is a NumPy .npz archive (arrays such as sampled images), not a checkpoint',
        'text': "is a text file (it begins 'depth: 16'), not a checkpoint",
        'truncated': 'cannot be read: it begins like a checkpoint but is truncated or damaged ('}


def assert_names_it(message: str, path: str, kind: str):
    assert '\n' not in message and 'weights_only' not in message and 'weights only' not in message.lower(), message
    assert f'{path} {SAYS[kind]}' in message, message


@pytest.mark.parametrize('kind', list(SAYS))
def test_read_checkpoint_says_what_the_file_is(kind, tmp_path):
    path = make(kind, tmp_path)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert_names_it(str(e.value), path, kind)


@pytest.mark.parametrize('kind', ['png', 'html', 'truncated'])
def test_a_safetensors_name_gets_the_same_answer(kind, tmp_path):
    path = make(kind, tmp_path)
    named = path[:-len('.pth')] + '.safetensors'
    os.rename(path, named)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(named)
    assert_names_it(str(e.value), named, kind)


def test_checkpoints_and_their_damaged_forms_are_not_called_something_else(tmp_path):
    """The heads of a torch zip, a legacy pickle and a safetensors file (whole or cut) describe as None."""
    save_atomic({'w': torch.ones(3)}, str(tmp_path / 'a.pth'))
    head = open(tmp_path / 'a.pth', 'rb').read()[:64]
    assert first_zip_entry(head).endswith('/data.pkl') and describe(head, first_zip_entry(head)) is None
    torch.save({'w': torch.ones(3)}, str(tmp_path / 'legacy.pth'), _use_new_zipfile_serialization=False)
    assert describe(open(tmp_path / 'legacy.pth', 'rb').read()[:64], '') is None
    from utils.safetensors_io import write_safetensors
    write_safetensors({'model': {'w': torch.ones(3)}, 'config': {}}, str(tmp_path / 'a.safetensors'))
    assert describe(open(tmp_path / 'a.safetensors', 'rb').read()[:20], '') is None


def test_a_zip_that_is_not_a_checkpoint(tmp_path):
    import zipfile
    with zipfile.ZipFile(tmp_path / 'model.zip', 'w') as z:
        z.writestr('README.md', 'weights inside')
    head = open(tmp_path / 'model.zip', 'rb').read()
    assert describe(head, first_zip_entry(head)) == ("is a ZIP archive but not a PyTorch checkpoint (its first entry "
                                                     "is 'README.md'): pass the .pth or .safetensors file of a model.")


GEN_KINDS = ['png', 'html', 'empty', 'truncated']
FAST = ['--device', 'cpu', '--top_k', '0', '--top_p', '0', '--iter_left', '2', '--iter_right', '2',
        '--progress', 'False']


@pytest.mark.parametrize('kind', GEN_KINDS)
def test_gen_img_var_ckpt_names_the_file_in_one_line(kind, tmp_path):
    import gen_img
    path = make(kind, tmp_path)
    with pytest.raises(SystemExit) as e:
        gen_img.main(['--var_ckpt', path, '--output_dir', str(tmp_path / 'out'), *FAST])
    assert str(e.value).startswith('error: ')
    assert_names_it(str(e.value), path, kind)


@pytest.mark.slow
@pytest.mark.parametrize('kind', GEN_KINDS)
def test_gen_img_command_line_exits_1_with_one_line_and_no_weights_only_advice(kind, tmp_path):
    """As a user runs it: exit code 1, one stderr line naming the file and what it is, no traceback, and no
    mention of weights_only anywhere in the output."""
    path = make(kind, tmp_path)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'gen_img.py'), '--var_ckpt', path, '--output_dir',
                           str(tmp_path / 'out'), *FAST], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert 'weights_only' not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert_names_it(lines[0], path, kind)
