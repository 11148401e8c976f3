"""utils/train/args.py: train.py's flags (official names), their parsing and the values derived from them."""
import os
import re

import pytest

from models.config import ModelSpec
from tests.hooked_train import parse_steps
from utils.arch_flags import given_fields
from utils.train import args as arg_util


RECIPE = ('--data_path=/x --depth=30 --bs=512 --ep=550 --tblr=8e-5 --fp16=1 --alng=1e-5 --wpe=0.01 '
          '--twde=0.08 --use_implicit=True --p_depth=5').split()


def test_official_recipe_flags_and_derived_values():
    args = arg_util.parse_args(RECIPE)
    assert args.arch.use_implicit is True and args.arch.p_depth == 5 and args.optim.fp16 == 1
    der = arg_util.derive(args, world_size=8)
    assert der.batch_size == 64 and der.glb_batch_size == 512
    assert der.lr == pytest.approx(8e-5 * 512 / 256)
    assert der.wd == 0.05 and der.wd_end == 0.08 and der.wp_ep == pytest.approx(550 / 50)
    assert der.final_reso == 256 and der.mid_reso_px == 288 and der.precision == 'fp16'
    spec = ModelSpec(**given_fields(args.arch))
    assert spec.width == 1920 and spec.heads == 30 and der.sche == 'lin0'
    assert der.jfb_no_grad == (0, 10) and der.jfb_with_grad == (1, 12)


def test_scripts_train_sh_is_the_official_recipe():
    text = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'scripts', 'train.sh')).read()
    flags = re.findall(r'^\s+(--\w+=[^\s"$]+)', text.split('train.py \\')[1], flags=re.M)
    assert set(RECIPE[1:]) <= set(flags)
    assert 'torch.distributed.run' in text and '--nproc_per_node="$NPROC"' in text and 'NPROC=${NPROC:-8}' in text
    der = arg_util.derive(arg_util.parse_args(['--data_path=/x'] + flags), world_size=8)
    assert der.batch_size == 64 and der.precision == 'fp16'


def test_derived_batch_lr_and_resolution_rules():
    a = arg_util.parse_args(['--bs', '48', '--ac', '2', '--tblr', '1e-4', '--pn', '1_2_4', '--patch_size', '4',
                             '--vae_ch_mult', '1_2_4', '--mid_reso', '1.5', '--twde', '0'])
    der = arg_util.derive(a, world_size=3)
    assert der.batch_size == 8 and der.glb_batch_size == 24
    assert der.lr == pytest.approx(1e-4 * 48 / 256) and der.wd_end == der.wd
    assert der.final_reso == 16 and der.mid_reso_px == 24 and der.resos == (4, 8, 16)
    assert arg_util.derive(arg_util.parse_args(['--tlr', '3e-3']), 1).lr == 3e-3
    assert arg_util.derive(arg_util.parse_args(['--pn', '512']), 1).final_reso == 512
    assert arg_util.derive(arg_util.parse_args(['--bf16']), 1).precision == 'bf16'
    assert arg_util.derive(arg_util.parse_args(['--pg', '0.5']), 1).sche == 'lin0.5'


@pytest.mark.parametrize('argv,world,match', [
    (['--bs', '10'], 4, '--bs 10 cannot be split over 4 rank'),
    (['--bs', '12', '--ac', '5'], 1, 'multiple of 5'),
    (['--patch_size', '8'], 1, 'must equal the tokenizer downsampling'),
    (['--fp16', '1', '--bf16'], 1, 'pick one'),
    (['--jfb_n', '3_1'], 1, '--jfb_n must be two integers'),
    (['--jfb_m', '0_4'], 1, '--jfb_m must be two integers'),
    (['--use_implicit', '--depth', '8', '--p_depth', '4'], 1, '2 \\* --p_depth < --depth'),
])
def test_bad_flag_combinations_are_one_line_errors(argv, world, match):
    with pytest.raises(SystemExit, match=match) as e:
        arg_util.derive(arg_util.parse_args(argv), world)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('text,want', [('True', True), ('False', False), ('1', True), ('0', False),
                                       ('true', True), ('false', False)])
def test_booleans_parse_words_digits_and_bare_flags(text, want):
    assert arg_util.parse_args([f'--use_implicit={text}']).arch.use_implicit is want
    assert arg_util.parse_args(['--hflip', text]).data.hflip is want
    assert arg_util.parse_args(['--hflip']).data.hflip is True


def test_jfb_ranges_as_pairs_or_four_ints_and_round_trip():
    a = arg_util.parse_args(['--jfb_n', '2_5', '--jfb_m', '1,3'])
    assert (a.model.jfb_n, a.model.jfb_m) == ((2, 5), (1, 3))
    b = arg_util.parse_args(['--jfb', '0', '4', '2', '6'])
    assert (b.model.jfb_n, b.model.jfb_m) == ((0, 4), (2, 6))
    assert arg_util.args_from_dict(b.to_dict()) == b
    assert parse_steps('3-5') == (3, 4, 5) and parse_steps('1_7') == (1, 7)


def test_every_official_training_flag_exists():
    flags = {s[2:] for a in arg_util.build_parser()._actions for s in a.option_strings}
    official = ('depth ini hd aln alng fp16 tblr tlr twd twde tclip ls bs ac ep wp wp0 wpe sche opt saln anorm pn '
                'patch_size mid_reso hflip workers pg pg0 pgwp seed use_implicit p_depth save_freq data_path '
                'exp_name local_out_dir_path').split()
    assert set(official) <= flags
