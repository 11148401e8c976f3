"""app.py when a model does not load: a checkpoint the user named (or demo models none of which loads) ends the
server with the reason in one line (exit 1), instead of a page without endpoints that a gradio_client caller
would meet as 'Cannot find a function'; a page is served only when it has a model to serve."""
import os
import sys

import numpy as np
import PIL.Image as PImage
import pytest

from tests.proc_util import run_group
from tests.tiny import write_tiny_export
from utils.app import loading

gr = pytest.importorskip('gradio')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def pillow_limit(monkeypatch):
    """build_app lowers Pillow's pixel limit for the serving process: the next test files get it back."""
    monkeypatch.setattr(PImage, 'MAX_IMAGE_PIXELS', PImage.MAX_IMAGE_PIXELS)


def png(path) -> str:
    PImage.fromarray(np.zeros((4, 4, 3), np.uint8)).save(str(path), format='PNG')
    return str(path)


def endpoints(demo) -> set:
    return {f.api_name for f in demo.fns.values() if getattr(f, 'api_name', None)}


def test_fatal_load_error_rule():
    line = '/x/a.pth: cannot load: /x/a.pth is empty (0 bytes)'
    assert loading.fatal_load_error(True, [], [line]) == f'error: {line}'
    assert loading.fatal_load_error(True, ['served'], [line]) == f'error: {line}'   # --compare_ckpt failed
    assert loading.fatal_load_error(False, ['served'], [line]) is None               # one demo model failed
    both = loading.fatal_load_error(False, [], [line, line])
    assert both.startswith(f'error: {line}; {line}') and 'bash scripts/demo.sh' in both and '\n' not in both
    assert loading.fatal_load_error(False, [], []) is None                          # no weights: the page says how


def test_a_named_checkpoint_that_does_not_load_ends_the_app_in_one_line(tmp_path):
    import app
    bad = png(tmp_path / 'viar.pth')
    with pytest.raises(SystemExit) as e:
        app.make_app(['--var_ckpt', bad, '--device', 'cpu'])
    assert str(e.value) == (f'error: {bad}: cannot load: {bad} is a PNG image, not a checkpoint: pass the .pth or '
                            f'.safetensors file of a model.')


def test_a_compare_checkpoint_that_does_not_load_ends_the_app(tmp_path):
    import app
    good = write_tiny_export(tmp_path / 'good.pth')
    bad = str(tmp_path / 'var.pth')
    open(bad, 'wb').close()
    with pytest.raises(SystemExit, match=rf'^error: {bad}: cannot load: {bad} is empty \(0 bytes\)'):
        app.make_app(['--var_ckpt', good, '--compare_ckpt', bad, '--device', 'cpu'])


def test_demo_models_none_of_which_loads_end_the_app_one_that_loads_is_served(tmp_path):
    import app
    for rel in ('viar/viar-slim.pth', 'var/var-slim.pth'):
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        png(tmp_path / rel)
    with pytest.raises(SystemExit) as e:
        app.make_app(['--demo_dir', str(tmp_path), '--device', 'cpu'])
    assert '\n' not in str(e.value) and 'viar-slim.pth is a PNG image' in str(e.value)
    assert 'var-slim.pth is a PNG image' in str(e.value) and 'Run `bash scripts/demo.sh` again' in str(e.value)
    write_tiny_export(tmp_path / 'viar' / 'viar-slim.pth')
    demo, _ = app.make_app(['--demo_dir', str(tmp_path), '--device', 'cpu'])
    shown = [str(b.value) for b in demo.blocks.values() if isinstance(b, gr.Markdown)]
    assert any('Model failed to load' in t and 'var-slim.pth is a PNG image' in t for t in shown)
    assert {'generate', 'compare', 'edit'} <= endpoints(demo)


def test_without_weights_the_page_still_says_how_to_get_them(tmp_path):
    import app
    demo, _ = app.make_app(['--demo_dir', str(tmp_path / 'nothing')])
    assert any('bash scripts/demo.sh' in str(b.value) for b in demo.blocks.values() if isinstance(b, gr.Markdown))


@pytest.mark.slow
def test_command_line_app_exits_1_with_one_line(tmp_path):
    """python app.py --var_ckpt broken: exit code 1, the one line on stderr, no traceback, nothing served."""
    bad = png(tmp_path / 'viar.pth')
    # a server that started would never exit: the timeout then fails the test
    proc = run_group([sys.executable, os.path.join(ROOT, 'app.py'), '--var_ckpt', bad, '--device', 'cpu'], 120,
                     cwd=ROOT)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f'error: {bad}: cannot load: {bad} is a PNG image'), proc.stderr
    assert 'open http' not in proc.stdout
