"""Class dropout and drop path drawn for the whole global batch from (seed, step): the rows a sample meets do not
depend on how many ranks share the batch (models/draws.py, VARBase.training_draws); the official per-rank draw
(draws=None) is unchanged."""
import pytest
import torch
import torch.nn.functional as F

from models.draws import global_uniform, keep_scale, step_draws
from tests.tiny import tiny_tokens, tiny_vae_var


def rank_rows(global_rows: int, world_size: int, rank: int):
    """(offset, rows) of rank `rank` in a global batch split evenly, as the trainer splits it."""
    if global_rows % world_size:
        raise ValueError(f'a global batch of {global_rows} does not split over {world_size} ranks')
    rows = global_rows // world_size
    return rank * rows, rows


def test_rank_rows_tile_the_global_batch():
    for world in (1, 2, 4, 8):
        rows = [rank_rows(16, world, r) for r in range(world)]
        covered = [i for off, n in rows for i in range(off, off + n)]
        assert covered == list(range(16))
    with pytest.raises(ValueError, match='does not split'):
        rank_rows(10, 4, 0)


@pytest.mark.parametrize('world', [2, 4])
def test_rank_slices_concatenate_to_the_single_rank_draw(world):
    G, probs = 8, [0.0, 0.3, 0.5, 0.3]
    whole = step_draws(3, 17, 0, G, G, 0.25, probs)
    parts = [step_draws(3, 17, *rank_rows(G, world, r), G, 0.25, probs) for r in range(world)]
    assert torch.equal(torch.cat([p.cond_drop_B for p in parts]), whole.cond_drop_B)
    assert torch.equal(torch.cat([p.path_keep_K2B for p in parts], dim=2), whole.path_keep_K2B)


def test_draws_are_keyed_by_seed_step_and_call():
    a = step_draws(0, 5, 0, 64, 64, 0.5, [0.5, 0.5])
    assert torch.equal(a.path_keep_K2B, step_draws(0, 5, 0, 64, 64, 0.5, [0.5, 0.5]).path_keep_K2B)
    assert not torch.equal(a.cond_drop_B, step_draws(0, 6, 0, 64, 64, 0.5, [0.5, 0.5]).cond_drop_B)
    assert not torch.equal(a.cond_drop_B, step_draws(1, 5, 0, 64, 64, 0.5, [0.5, 0.5]).cond_drop_B)
    assert not torch.equal(a.path_keep_K2B[0], a.path_keep_K2B[1])          # every call its own masks
    # call k's masks do not depend on how many calls follow (n + m varies from step to step)
    longer = step_draws(0, 5, 0, 64, 64, 0.5, [0.5, 0.5, 0.5])
    assert torch.equal(longer.path_keep_K2B[:2], a.path_keep_K2B)


def test_keep_scales_have_the_drop_rate():
    u = global_uniform(0, 0, 1, (20000,))
    k = keep_scale(u, 0.3)
    assert torch.isclose(k[k > 0], torch.tensor(1 / 0.7)).all() and (k >= 0).all()
    assert abs((k == 0).float().mean().item() - 0.3) < 0.02
    assert abs(k.mean().item() - 1.0) < 0.03                                   # unbiased, as drop path
    assert torch.equal(keep_scale(u, 0.0), torch.ones_like(u))
    cond = step_draws(0, 1, 0, 20000, 20000, 0.1, []).cond_drop_B
    assert abs(cond.float().mean().item() - 0.1) < 0.01


def _train_model(implicit: bool):
    vae, var = tiny_vae_var(implicit, depth=4, drop_path_rate=0.6, cond_drop_rate=0.5)
    return vae, var.train()


@pytest.mark.parametrize('implicit', [False, True])
def test_split_batch_forward_equals_whole_batch(implicit):
    """Two ranks' halves with their slices of the draws give the rows the whole batch gives on one rank."""
    vae, var = _train_model(implicit)
    G = 6
    _, x_BLCv = tiny_tokens(vae, var, G, seed=2)
    label_B = torch.arange(G) % var.num_classes
    plan = (2, 2) if implicit else None
    whole = var(label_B, x_BLCv, jfb_iters=plan, draws=var.training_draws(7, 11, 0, G, G, plan))
    halves = []
    for r in range(2):
        off, n = rank_rows(G, 2, r)
        torch.manual_seed(100 + r)   # the global generator must not matter
        d = var.training_draws(7, 11, off, n, G, plan)
        halves.append(var(label_B[off:off + n], x_BLCv[off:off + n], jfb_iters=plan, draws=d))
    torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-5, atol=1e-5)
    # the draws matter: another step draws other masks
    other = var(label_B, x_BLCv, jfb_iters=plan, draws=var.training_draws(7, 12, 0, G, G, plan))
    assert not torch.allclose(other, whole)


def test_official_draw_stays_on_the_global_generator():
    vae, var = _train_model(True)
    _, x_BLCv = tiny_tokens(vae, var, 4)
    label_B = torch.arange(4) % var.num_classes
    out = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        out.append(var(label_B, x_BLCv, jfb_iters=(1, 1)))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    assert not torch.allclose(out[0], out[2])


def test_grad_ckpt_recomputes_with_the_same_masks():
    vae, var = _train_model(True)
    _, x_BLCv = tiny_tokens(vae, var, 4)
    label_B = torch.arange(4) % var.num_classes
    grads = []
    for ckpt in (False, True):
        var.grad_ckpt = ckpt
        var.zero_grad(set_to_none=True)
        d = var.training_draws(0, 3, 0, 4, 4, (1, 2))
        torch.manual_seed(ckpt)   # a recomputation that drew from the global generator would differ
        F.cross_entropy(var(label_B, x_BLCv, jfb_iters=(1, 2), draws=d).flatten(0, 1), torch.zeros(4 * var.L, dtype=torch.long)).backward()
        grads.append({n: p.grad.clone() for n, p in var.named_parameters() if p.grad is not None})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_draws_of_another_plan_are_refused():
    vae, var = _train_model(True)
    _, x_BLCv = tiny_tokens(vae, var, 2)
    d = var.training_draws(0, 0, 0, 2, 2, (1, 1))
    with pytest.raises(ValueError, match='same \\(n, m\\)'):
        var(torch.zeros(2, dtype=torch.long), x_BLCv, jfb_iters=(2, 1), draws=d)
    with pytest.raises(ValueError, match='rows'):
        var(torch.zeros(2, dtype=torch.long), x_BLCv[:1], jfb_iters=(1, 1), draws=d)
