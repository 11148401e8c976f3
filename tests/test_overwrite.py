"""gen_img.py writes output_dir/<checkpoint name>/ and records there which model wrote it: a second model whose file
has the same name is refused in one line instead of silently replacing the first one's images; the same model (or
its .safetensors twin) writes again. train.py names its exports by kind, so the demo's VIAR and VAR differ."""
import os

import pytest

import gen_img
from tests.tiny import tiny_spec, tiny_vae_var
from tests.train_helpers import tiny_flags
from utils.arch_flags import describe_spec
from utils.model_io import save_slim, slim_export

FAST = ['--device', 'cpu', '--vae_ckpt', '', '--top_k', '0', '--top_p', '0', '--iter_left', '2', '--iter_right', '2',
        '--progress', 'False', '--class_label', '1', '--seeds', '3', '4']


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    """A tiny VIAR and a tiny VAR exported under the same file name (model.pth, and its .safetensors twin) in two
    folders, as two training runs' exports were."""
    root = tmp_path_factory.mktemp('exports')
    out = {}
    for kind, implicit in (('viar', True), ('var', False)):
        vae, var = tiny_vae_var(implicit)
        os.makedirs(root / kind)
        out[kind] = str(root / kind / 'model.pth')
        save_slim(slim_export(var, tiny_spec(implicit), vae=vae), out[kind])
    return out


def run(ckpt: str, out_dir, *extra) -> list:
    return gen_img.main(['--var_ckpt', ckpt, '--output_dir', str(out_dir), *FAST, *extra])


def pngs(folder) -> dict:
    return {n: open(os.path.join(folder, n), 'rb').read() for n in sorted(os.listdir(folder)) if n.endswith('.png')}


def test_another_model_with_the_same_file_name_is_refused_in_one_line(exports, tmp_path):
    run(exports['viar'], tmp_path)
    folder = tmp_path / 'model'
    before = pngs(folder)
    with pytest.raises(SystemExit) as e:
        run(exports['var'], tmp_path)
    viar = describe_spec(tiny_spec(True))
    var = describe_spec(tiny_spec(False))
    assert str(e.value) == (f'error: {folder} holds the images of {exports["viar"]} ({viar}); this run samples '
                            f'{exports["var"]} ({var}) and would replace them. Pass another --output_dir, or remove '
                            f'{folder} first.')
    assert pngs(folder) == before   # the VIAR images are untouched
    run(exports['var'], tmp_path / 'other')   # the fix the line names
    assert set(pngs(tmp_path / 'other' / 'model')) == set(before)


def test_the_same_model_writes_again_and_its_twin_counts_as_the_same(exports, tmp_path):
    first = pngs_after(exports['viar'], tmp_path)
    again = pngs_after(exports['viar'], tmp_path)
    twin = pngs_after(exports['viar'][:-len('.pth')] + '.safetensors', tmp_path)
    assert first == again == twin


def pngs_after(ckpt: str, out_dir) -> dict:
    run(ckpt, out_dir)
    return pngs(out_dir / 'model')


def test_ema_weights_of_the_same_file_are_another_model():
    spec = tiny_spec(True)
    a = gen_img.model_record('/x/model.pth', False, spec)
    assert gen_img.same_model(a, gen_img.model_record('/x/model.safetensors', False, spec))
    assert not gen_img.same_model(a, gen_img.model_record('/x/model.pth', True, spec))
    assert not gen_img.same_model(a, gen_img.model_record('/y/model.pth', False, spec))
    assert not gen_img.same_model(a, gen_img.model_record('/x/model.pth', False, tiny_spec(False)))
    assert gen_img.record_text(gen_img.model_record('/x/model.pth', True, spec)).endswith(', EMA weights)')


def test_random_weights_of_other_sizes_are_another_model(tmp_path):
    sizes = ['--var_ckpt', 'random', '--width', '32', '--heads', '2', '--patch_nums', '1,2,3,4', '--V', '48',
             '--Cvae', '8', '--vae_ch', '32', '--vae_ch_mult', '1,1', '--vae_num_res_blocks', '1', '--num_classes', '5']
    gen_img.main(['--output_dir', str(tmp_path), '--depth', '2', *sizes, *FAST])
    gen_img.main(['--output_dir', str(tmp_path), '--depth', '2', *sizes, *FAST])
    with pytest.raises(SystemExit, match=r'holds the images of random \(VAR depth 2.*this run samples random '
                                         r'\(VAR depth 3'):
        gen_img.main(['--output_dir', str(tmp_path), '--depth', '3', *sizes, *FAST])


def test_training_names_its_export_by_kind():
    """The demo trains a VIAR and a VAR in two folders: their exports (and so gen_img's folders) differ."""
    from utils.train.args import derive, parse_args
    viar, var = (derive(parse_args(tiny_flags('/data', '/out', implicit)), 1, 1) for implicit in (True, False))
    assert (os.path.basename(viar.slim_path), os.path.basename(var.slim_path)) == ('viar-slim.pth', 'var-slim.pth')


def test_the_demo_samples_the_two_exports():
    script = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts',
                               'demo.sh')).read()
    assert '--var_ckpt "$OUT/viar/viar-slim.pth"' in script and '--var_ckpt "$OUT/var/var-slim.pth"' in script
