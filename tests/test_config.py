"""One way in: the dataclass-generated command lines, the model's answers, and the one loader's policy
(the checkpoint sets the architecture; a typed flag it contradicts is reported, a default is replaced)."""
import argparse
import dataclasses
from typing import Optional, Tuple

import pytest
import torch

from models.config import ModelSpec, pyramid_for, spec_from_state_dict, vae_arch_from_state_dict
from models.layout import PYRAMIDS
from tests.tiny import tiny_vae_var
from utils import cli
from utils.arch_flags import flags_to_build
from utils.checkpoint import save_atomic
from utils.model_io import load_models, load_or_build, slim_export
from utils.sample.config import add_model_source_args, add_sample_args, parse

TINY = dict(depth=4, pre_depth=1, post_depth=1, embed_dim=32, num_heads=2, patch_nums=(1, 2, 3, 4), V=48, Cvae=8,
            vae_ch=32, vae_ch_mult=(1, 1), vae_num_res_blocks=1, num_classes=5)


# ---------------------------------------------------------------- utils/cli.py

@dataclasses.dataclass
class _Demo:
    """demo flags"""
    n: int = cli.flag(3, 'an int')
    on: bool = cli.flag(False, 'a bool', aliases=('--enable',))
    pn: Tuple[int, ...] = cli.flag((1, 2), 'a tuple')
    lr: Optional[float] = cli.flag(None, 'an optional float')
    hidden: int = dataclasses.field(default=7, metadata=dict(cli=False))


def test_dataclass_cli_types_aliases_and_explicit_flags():
    p = argparse.ArgumentParser()
    cli.add_dataclass_args(p, _Demo)
    ns, typed = cli.parse_explicit(p, ['--enable', '--pn', '4_5_6', '--lr', '1e-3'])
    d = cli.from_namespace(_Demo, ns)
    assert d == _Demo(n=3, on=True, pn=(4, 5, 6), lr=1e-3, hidden=7)
    assert typed == {'on', 'pn', 'lr'}                      # n was left at its default
    assert not hasattr(ns, 'hidden')                        # cli=False fields get no flag
    assert cli.from_dict(_Demo, dataclasses.asdict(d) | {'pn': [4, 5, 6], 'other': 1}) == d
    assert cli.explicit_dests(p, ['--n', '3']) == {'n'}     # typed, even when equal to the default


# ---------------------------------------------------------------- the model answers

@pytest.mark.parametrize('use_implicit', [False, True])
def test_the_model_answers_every_var_viar_question(use_implicit):
    from models import schedules as S
    from models.config import spec_of_model
    from utils.arch_flags import describe_spec
    from sampling import run_name_head
    from utils.sample.schedule_flags import schedule_note, schedule_settings
    _, var = tiny_vae_var(use_implicit)
    sched = S.constant(2, 4)
    head = run_name_head(var.kind, var.depth)
    if use_implicit:
        n, m = var.draw_jfb_iters(5, seed=1)
        assert (n, m) == var.draw_jfb_iters(5, seed=1) and 0 <= n <= 10 and 1 <= m <= 12   # rank-identical per step
        assert var.eval_jfb_iters() == (5, 6) and head == 'implicit'
        assert var.implicit_block_projection in var.scale_loop_modules()
        assert schedule_settings(var.kind, sched, True)['counts'] == [2] * 4
        assert 'Con.(2,2)' in schedule_note(var.kind, sched)
    else:
        assert var.draw_jfb_iters(5) is None and var.eval_jfb_iters() is None and head == 'd4'
        assert schedule_settings(var.kind, sched, True) == {} and 'do nothing' in schedule_note(var.kind, sched)
        with pytest.raises(ValueError, match='no implicit block'):
            var.register_iterate_hook(lambda z, z_next: None)
    assert var.head_nm in var.scale_loop_modules() and describe_spec(spec_of_model(var)).startswith(var.kind)


def test_iterate_hook_sees_every_implicit_iteration():
    from models import schedules as S
    _, var = tiny_vae_var(True)
    seen = []
    handle = var.register_iterate_hook(lambda z, z_next: seen.append((z.shape, z_next.shape)))
    with torch.no_grad():
        var.autoregressive_infer_cfg(2, 1, g_seed=0, schedule=S.explicit([1, 2, 3, 1], 4))
    handle.remove()
    assert [s[1][1] for s in seen] == [1, 4, 4, 9, 9, 9, 16]   # tokens of the scale, once per iteration
    assert all(a == b for a, b in seen)
    with torch.no_grad():
        var.autoregressive_infer_cfg(2, 1, g_seed=0, schedule=S.constant(1, 4))
    assert len(seen) == 7   # removed


# ---------------------------------------------------------------- reading the architecture off the weights

def test_spec_from_state_dict_reads_sizes_pyramid_and_tokenizer():
    vae, var = tiny_vae_var(True, depth=4, width=32, heads=2, pre=1, post=1)
    spec = spec_from_state_dict(var.state_dict(), ModelSpec(**TINY, use_implicit=False))
    assert (spec.kind, spec.width, spec.heads, spec.pre_depth, spec.post_depth) == ('VIAR', 32, 2, 1, 1)
    assert (spec.num_classes, spec.V, spec.Cvae, spec.patch_nums) == (5, 48, 8, (1, 2, 3, 4))
    assert pyramid_for(680, 10, (1, 2, 3)) == PYRAMIDS[256] and pyramid_for(2240, 10, ()) == PYRAMIDS[512]
    assert vae_arch_from_state_dict(vae.state_dict()) == dict(V=48, Cvae=8, vae_ch=32, vae_ch_mult=(1, 1),
                                                            vae_num_res_blocks=1)


def test_a_bad_size_is_caught_by_the_spec():
    from utils.arch_flags import check_spec
    viar = ModelSpec(depth=4, use_implicit=True, pre_depth=2, post_depth=2)
    with pytest.raises(ValueError, match='pre_depth \\+ post_depth < depth'):
        viar.validate()   # in field names: the model layer knows no flags
    with pytest.raises(ValueError, match='2 \\* --p_depth < --depth'):
        check_spec(viar)  # the same check in flags
    with pytest.raises(ValueError, match='divisible by heads'):
        ModelSpec(depth=4, embed_dim=30, num_heads=4).validate()
    with pytest.raises(ValueError, match='--width, --heads'):
        check_spec(ModelSpec(depth=4, embed_dim=30, num_heads=4))


# ---------------------------------------------------------------- the one loader's policy

@pytest.fixture(scope='module')
def var_export(tmp_path_factory):
    vae, var = tiny_vae_var(False, depth=2)
    path = str(tmp_path_factory.mktemp('x') / 'var_tiny.pth')
    save_atomic(slim_export(var, ModelSpec(**dict(TINY, depth=2)), vae=vae), path)
    return path


def _source(argv):
    p = argparse.ArgumentParser()
    add_model_source_args(p)
    add_sample_args(p)
    return parse(p, argv)[1]


def test_file_sets_the_architecture_and_names_each_typed_flag_it_overrides(var_export):
    lines = []
    loaded = load_or_build(_source(['--var_ckpt', var_export, '--use_implicit', 'True', '--depth', '30']),
                           log=lines.append)
    assert loaded.spec.kind == 'VAR' and loaded.var.depth == 2 and loaded.tag == 'var_tiny'
    assert len(lines) == 1 and '\n' not in lines[0]
    assert '--use_implicit True (file: False)' in lines[0] and '--depth 30 (file: 2)' in lines[0]
    lines.clear()
    load_or_build(_source(['--var_ckpt', var_export]), log=lines.append)   # defaults differ too: silent
    assert lines == []


def test_python_loader_needs_no_flags_and_the_mismatch_hint_builds_the_file(var_export):
    from utils.checkpoint import CheckpointError, load_var_weights
    vae, var, spec = load_models(var_export)
    assert spec.depth == 2 and spec.width == 32 and var.C == 32
    _, other = ModelSpec(**dict(TINY, depth=3, embed_dim=64)).build()
    with pytest.raises(CheckpointError) as e:
        load_var_weights(other, var_export)
    msg = str(e.value)
    assert '--depth 2 --use_implicit False --width 32' in msg and 'load_models(' in msg
    assert '--heads' not in msg and '--patch_nums' not in msg   # equal to the model built: nothing to change
    # a width and head count off the official sizing are both named, from the file's stored config
    _, var3 = tiny_vae_var(True, depth=3, width=32, heads=2)
    path3 = var_export.replace('var_tiny', 'viar_d3')
    save_atomic(slim_export(var3, ModelSpec(**dict(TINY, depth=3, use_implicit=True))), path3)
    _, built = ModelSpec(**dict(TINY, depth=3, num_heads=None, embed_dim=None, use_implicit=True)).build()
    with pytest.raises(CheckpointError) as e:
        load_var_weights(built, path3)
    hint = str(e.value)
    assert '--depth 3 --use_implicit True --pre_depth 1 --post_depth 1 --width 32 --heads 2' in hint
    # the hinted flags really build a model the file loads into
    built_spec = ModelSpec(**dict(TINY, depth=3, num_heads=None, embed_dim=None, use_implicit=True))
    hinted = hint.split('Build it with ')[1].split(', or ')[0].split()
    rebuilt = _source(flags_to_build(built_spec).split() + hinted).spec().build()[1]   # parsed as a user types them
    load_var_weights(rebuilt, path3)


def test_schedule_flags_on_a_var_say_they_do_nothing(var_export):
    p = argparse.ArgumentParser()
    add_model_source_args(p)
    add_sample_args(p)
    _, source, sample = parse(p, ['--var_ckpt', var_export, '--iter_left', '4', '--iter_right', '4'])
    var = load_or_build(source).var
    lines = []
    sample.check_model(var, log=lines.append)
    assert len(lines) == 1 and '--iter_left, --iter_right ignored' in lines[0] and 'do nothing' in lines[0]
