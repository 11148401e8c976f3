"""utils/compile_util: the eager fp32 sampler is the model's own sampler; compiled and autocast samplers agree with it."""
import pytest
import torch

from models import schedules as S
from tests.conftest import needs_c_compiler
from tests.tiny import tiny_vae_var
from utils.sample.compile_util import SamplingError, prepare_for_sampling

KW = dict(g_seed=3, cfg=1.5, top_k=1)   # greedy, so small float differences cannot flip a token


def _sample_with_tokens(fn, var, vae, B=2, **kw):
    """Images and the token maps sampled at every scale (recorded at the VQVAE embedding lookup)."""
    toks = []
    h = vae.quantize.embedding.register_forward_pre_hook(lambda m, a: toks.append(a[0].clone()))
    try:
        out = fn(B, torch.tensor([0, 3]), **kw)
    finally:
        h.remove()
    return out, toks


def test_eager_fp32_sampler_is_bit_identical_to_the_model():
    vae, var = tiny_vae_var(True)
    kw = dict(KW, schedule=S.explicit([2, 3, 1, 2], 4), return_stats=True)
    (ref, st_ref), _ = _sample_with_tokens(var.autoregressive_infer_cfg, var, vae, **kw)
    sampler = prepare_for_sampling(var, compile=False, dtype='fp32')
    (out, st), _ = _sample_with_tokens(sampler, var, vae, **kw)
    assert torch.equal(out, ref) and st.iters == st_ref.iters
    assert not sampler.compiled and sampler.mode is None


def test_bad_dtype_is_a_clear_error():
    _, var = tiny_vae_var(False)
    with pytest.raises(SamplingError, match='dtype'):
        prepare_for_sampling(var, dtype='fp8')
    assert prepare_for_sampling(var, dtype='auto').dtype == 'fp32'   # CPU: auto is fp32 (fp16 on CUDA)


def test_compile_targets_cover_the_scale_loop():
    _, viar = tiny_vae_var(True)
    names = {type(m).__name__ for m in viar.scale_loop_modules()}
    assert names == {'AdaLNSelfAttn', 'AdaLNBeforeHead', 'Sequential'}
    assert len([m for m in viar.scale_loop_modules() if type(m).__name__ == 'AdaLNSelfAttn']) == len(viar.backbone_blocks())


def _compiled_matches_eager(use_implicit: bool, backend: str, compile_vae: bool = True):
    vae, var = tiny_vae_var(use_implicit)
    kw = dict(KW, schedule=S.explicit([2, 3, 1, 2], 4))
    ref, ref_toks = _sample_with_tokens(prepare_for_sampling(var), var, vae, **kw)
    sampler = prepare_for_sampling(var, compile=True, backend=backend, compile_vae=compile_vae)
    out, toks = _sample_with_tokens(sampler, var, vae, **kw)
    assert sampler.compiled
    assert all(torch.equal(a, b) for a, b in zip(toks, ref_toks))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    out2, _ = _sample_with_tokens(sampler, var, vae, **kw)   # second call reuses the compiled graphs
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


@pytest.mark.slow
@needs_c_compiler
def test_compiled_viar_sampling_matches_eager_inductor():
    _compiled_matches_eager(True, 'inductor')


@pytest.mark.slow
def test_compiled_var_sampling_matches_eager_graph_capture():
    _compiled_matches_eager(False, 'aot_eager', compile_vae=False)   # the decoder is covered above
