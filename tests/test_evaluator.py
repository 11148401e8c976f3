"""The evaluator end to end on tiny inputs with a stand-in Inception graph (ADM's tensor names),
so the real graph-loading path runs; plus every bad-input message."""
import os
import re
import zipfile

import numpy as np
import pytest

import evaluator
from utils.eval import fid_math
from utils.eval.inception_tf import (InceptionExtractor, TFDistanceKernel, load_graph_def, resolve_graph_path,
                                write_standin_graph)
from utils.eval.npz_io import EvalInputError, open_image_source

METRIC_LINE = re.compile(r'^(Inception Score|FID|sFID|Precision|Recall): (\S+)$')


def _images(n, seed, shift=0.0, side=12):
    """Structured uint8 images: a class colour plus a stripe pattern and noise."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 6, n)
    colours = np.random.default_rng(99).uniform(40, 215, (6, 1, 1, 3))
    xx = np.arange(side)[None, None, :, None] / side
    stripes = 40 * np.sin(2 * np.pi * rng.uniform(1, 3, (n, 1, 1, 1)) * xx)
    x = colours[cls] + stripes + rng.normal(0, 20, (n, side, side, 3)) + shift
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


@pytest.fixture(scope='session')
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp('graphs')
    return {name: write_standin_graph(str(d / f'{name}.pb'), perturb_channel=ch)
            for name, ch in [('base', None), ('ch8', 8), ('ch0', 0)]}


class CountingExtractor(InceptionExtractor):
    """An InceptionExtractor that counts the images it ran: how a test sees that a cache was used."""
    images_seen = 0

    def run(self, images_NHWC):
        self.images_seen += len(images_NHWC)
        return super().run(images_NHWC)


@pytest.fixture(scope='session')
def extractor(graphs):
    return CountingExtractor(graphs['base'])


@pytest.fixture
def pair(tmp_path):
    ref, sample = str(tmp_path / 'ref.npz'), str(tmp_path / 'sample.npz')
    np.savez(ref, arr_0=_images(40, 1))
    np.savez_compressed(sample, arr_0=_images(30, 2, shift=15.0))
    return ref, sample


def _cfg(ref, sample, graph, **kw):
    kw.setdefault('progress', False)
    return evaluator.EvalConfig(ref, sample, inception_pb=graph, batch_size=kw.pop('batch_size', 16), **kw)


def _run_main(capsys, args):
    evaluator.main(args + ['--no_progress'])
    lines = [METRIC_LINE.match(l) for l in capsys.readouterr().out.splitlines()]
    return {m.group(1): float(m.group(2)) for m in lines if m}


def _error(capsys, args):
    with pytest.raises(SystemExit) as e:
        evaluator.main(args + ['--no_progress'])
    return str(e.value.code)


# ----------------------------------------------------------------------------- end to end

def test_main_prints_the_five_adm_lines(pair, graphs, tmp_path, capsys):
    out_json = str(tmp_path / 'm.json')
    vals = _run_main(capsys, [*pair, '--inception_pb', graphs['base'], '--json', out_json])
    assert list(vals) == ['Inception Score', 'FID', 'sFID', 'Precision', 'Recall']
    assert vals['Inception Score'] >= 1.0 and vals['FID'] > 0 and vals['sFID'] > 0
    assert 0.0 <= vals['Precision'] <= 1.0 and 0.0 <= vals['Recall'] <= 1.0
    import json
    with open(out_json) as f:
        saved = json.load(f)
    assert saved['fid'] == vals['FID'] and saved['is_mode'] == 'shuffled'


def test_identical_batches_give_zero_fid_and_full_precision_recall(tmp_path, graphs, extractor):
    ref, sample = str(tmp_path / 'a.npz'), str(tmp_path / 'b.npz')
    x = _images(24, 3)
    np.savez(ref, arr_0=x)
    np.savez_compressed(sample, arr_0=x)
    m = evaluator.evaluate(_cfg(ref, sample, graphs['base']), extractor, graphs['base'])
    assert m.fid == pytest.approx(0.0, abs=1e-6)
    assert m.sfid == pytest.approx(0.0, abs=1e-3)         # 252-dim covariance of 24 rows: rank-deficient
    assert (m.precision, m.recall) == (1.0, 1.0)


def test_batch_size_does_not_change_results(pair, graphs, extractor):
    a = evaluator.evaluate(_cfg(*pair, graphs['base'], batch_size=7, cache=False), extractor, graphs['base'])
    b = evaluator.evaluate(_cfg(*pair, graphs['base'], batch_size=64, cache=False), extractor, graphs['base'])
    assert a.fid == pytest.approx(b.fid, rel=1e-5) and a.precision == b.precision and a.recall == b.recall


def test_sfid_uses_only_the_first_seven_spatial_channels(pair, graphs):
    def run(name):
        return evaluator.evaluate(_cfg(*pair, graphs[name], cache=False), InceptionExtractor(graphs[name]),
                                  graphs[name])
    base, ch8, ch0 = run('base'), run('ch8'), run('ch0')
    assert ch8.fid != pytest.approx(base.fid, rel=1e-3)      # channel 8 does feed the pool features
    assert ch8.sfid == pytest.approx(base.sfid, rel=1e-9)    # ... but not sFID
    assert ch0.sfid != pytest.approx(base.sfid, rel=1e-3)


def test_png_folder_equals_npz(pair, graphs, extractor, tmp_path):
    from PIL import Image
    ref, sample = pair
    folder = tmp_path / 'pngs'
    folder.mkdir()
    for i, im in enumerate(np.load(sample)['arr_0']):
        Image.fromarray(im).save(folder / f'{i}.png')             # natural order: 2.png before 10.png
    a = evaluator.evaluate(_cfg(ref, sample, graphs['base']), extractor, graphs['base'])
    b = evaluator.evaluate(_cfg(ref, str(folder), graphs['base']), extractor, graphs['base'])
    assert a == b


def test_reference_cache_written_once_reused_and_invalidated(pair, graphs, extractor):
    ref, sample = pair
    cfg = _cfg(ref, sample, graphs['base'])
    start = extractor.images_seen
    first = evaluator.evaluate(cfg, extractor, graphs['base'])
    assert extractor.images_seen - start == 40 + 30
    cache = evaluator.stats_cache_path(ref)
    assert cache.endswith('ref.stats.npz') and os.path.isfile(cache)
    mtime = os.stat(cache).st_mtime_ns
    second = evaluator.evaluate(cfg, extractor, graphs['base'])
    assert extractor.images_seen - start == 40 + 30 + 30         # reference not recomputed
    assert os.stat(cache).st_mtime_ns == mtime and second == first
    np.savez(ref, arr_0=_images(40, 5))                           # a changed reference
    evaluator.evaluate(cfg, extractor, graphs['base'])
    assert extractor.images_seen - start == 40 + 30 + 30 + 40 + 30


def test_cache_is_tied_to_the_graph(pair, graphs, extractor):
    ref, sample = pair
    evaluator.evaluate(_cfg(ref, sample, graphs['base']), extractor, graphs['base'])
    other = CountingExtractor(graphs['ch0'])
    evaluator.evaluate(_cfg(ref, sample, graphs['ch0']), other, graphs['ch0'])
    assert other.images_seen == 40 + 30


def test_precomputed_reference_stats_are_used(tmp_path, graphs, extractor):
    ref, sample = str(tmp_path / 'ref.npz'), str(tmp_path / 'sample.npz')
    x_ref, x_sample = _images(30, 1), _images(30, 2, shift=20.0)
    np.savez(sample, arr_0=x_sample)
    pool, spatial = extractor.run(x_sample)                          # stats of the *sample*
    (mu, sigma), (mu_s, sigma_s) = fid_math.gaussian_stats(pool), fid_math.gaussian_stats(spatial)
    np.savez(ref, arr_0=x_ref, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    m = evaluator.evaluate(_cfg(ref, sample, graphs['base']), extractor, graphs['base'])
    assert m.fid == pytest.approx(0.0, abs=1e-6) and m.sfid == pytest.approx(0.0, abs=1e-3)
    assert m.precision < 1.0                                          # P/R still use the images


def test_adm_is_keeps_order_and_default_shuffles_with_seed():
    rng = np.random.default_rng(0)
    n = 2 * fid_math.IS_SPLIT_SIZE
    w = np.eye(4) * 30.0
    pool = np.eye(4)[np.sort(rng.integers(0, 4, n))]                 # class-sorted samples
    adm = evaluator.inception_score_of(pool, w, None)
    shuffled = evaluator.inception_score_of(pool, w, 0)
    probs = np.exp(fid_math.log_softmax(pool @ w))
    assert adm == pytest.approx(fid_math.inception_score(probs))
    assert shuffled == pytest.approx(fid_math.inception_score(probs[fid_math.split_order(n, 0)]))
    assert adm < 3.0 < shuffled                                       # splits of sorted data see ~2 classes
    assert evaluator.inception_score_of(pool, w, 0) == shuffled


def test_adm_is_flag_reaches_the_metric(pair, graphs, extractor):
    a = evaluator.evaluate(_cfg(*pair, graphs['base'], adm_is=True), extractor, graphs['base'])
    b = evaluator.evaluate(_cfg(*pair, graphs['base']), extractor, graphs['base'])
    assert a.fid == b.fid and a.precision == b.precision            # only IS depends on the order
    assert a.inception_score == pytest.approx(b.inception_score, rel=1e-9)   # one split: order-free


# ----------------------------------------------------------------------------- the ADM distance block

def test_tf_distance_kernel_matches_exact_arithmetic_on_representable_data():
    rng = np.random.default_rng(1)
    u = rng.integers(0, 4, (9, 5)).astype(np.float32)     # distances small integers: exact in float16
    v = rng.integers(0, 4, (7, 5)).astype(np.float32)
    kernel, exact = TFDistanceKernel(), fid_math.NumpyDistanceKernel('float64')
    np.testing.assert_array_equal(np.sort(kernel.smallest(u, v, 3), 1), np.sort(exact.smallest(u, v, 3), 1))
    ru, rv = rng.integers(1, 6, 9).astype(np.float32), rng.integers(1, 6, 7).astype(np.float32)
    for got, want in zip(kernel.coverage(u, ru, v, rv), exact.coverage(u, ru, v, rv)):
        np.testing.assert_array_equal(got, want)


def test_tf_distance_kernel_falls_back_to_float32_on_overflow():
    rng = np.random.default_rng(2)
    u = 300.0 + rng.integers(0, 4, (6, 4)).astype(np.float32)   # |u|^2 > 65504: float16 overflows
    got = TFDistanceKernel().smallest(u, u, 4)
    want = fid_math.NumpyDistanceKernel('float64').smallest(u, u, 4)
    np.testing.assert_array_equal(np.sort(got, 1), np.sort(want, 1))


def test_tf_kernel_ties_differ_from_exact_arithmetic():
    """ADM rounds distances to float16, so near-ties count as inside; exact arithmetic does not."""
    u = np.array([[0.0, 0.0]], np.float32)
    v = np.array([[30.0, 0.25]], np.float32)                 # |v|^2 = 900.0625: 900 in float16
    radius = np.array([900.0], np.float32)
    assert TFDistanceKernel().coverage(u, radius, v, radius)[0][0]
    assert not fid_math.NumpyDistanceKernel('float64').coverage(u, radius, v, radius)[0][0]


# ----------------------------------------------------------------------------- bad inputs

def test_missing_file(graphs, pair, capsys, tmp_path):
    msg = _error(capsys, [str(tmp_path / 'nope.npz'), pair[1], '--inception_pb', graphs['base']])
    assert 'nope.npz: no such file' in msg


def test_not_an_npz(graphs, pair, capsys, tmp_path):
    bad = tmp_path / 'bad.npz'
    bad.write_text('hello')
    assert 'not an .npz (zip) or .npy file' in _error(capsys, [pair[0], str(bad), '--inception_pb', graphs['base']])


def test_npz_without_arr_0(graphs, pair, capsys, tmp_path):
    bad = str(tmp_path / 'bad.npz')
    np.savez(bad, images=_images(5, 0))
    msg = _error(capsys, [pair[0], bad, '--inception_pb', graphs['base']])
    assert "no 'arr_0' array (found: images)" in msg


def test_float_images(graphs, pair, capsys, tmp_path):
    bad = str(tmp_path / 'bad.npz')
    np.savez(bad, arr_0=_images(5, 0).astype(np.float32) / 255)
    msg = _error(capsys, [pair[0], bad, '--inception_pb', graphs['base']])
    assert 'arr_0 is float32 but must be uint8 in 0..255' in msg


def test_integer_values_outside_0_255(graphs, pair, capsys, tmp_path):
    bad = str(tmp_path / 'bad.npz')
    x = _images(6, 0).astype(np.int16)
    x[3, 0, 0, 0], x[3, 0, 0, 1] = -5, 300
    np.savez(bad, arr_0=x)
    msg = _error(capsys, [pair[0], bad, '--inception_pb', graphs['base']])
    assert 'pixel values must lie in 0..255, found values from -5 to 300' in msg


def test_integer_values_inside_0_255_are_accepted(graphs, pair, extractor, tmp_path):
    ok = str(tmp_path / 'ok.npz')
    np.savez(ok, arr_0=np.load(pair[1])['arr_0'].astype(np.int64))
    a = evaluator.evaluate(_cfg(pair[0], ok, graphs['base']), extractor, graphs['base'])
    b = evaluator.evaluate(_cfg(*pair, graphs['base']), extractor, graphs['base'])
    assert a == b


@pytest.mark.parametrize('shape,text', [
    ((5, 3, 12, 12), 'expected NHWC with 3 channels (N, H, W, 3) (it looks like NCHW'),
    ((5, 12, 12), 'has shape (5, 12, 12), expected NHWC with 3 channels'),
    ((5, 12, 12, 4), 'has shape (5, 12, 12, 4), expected NHWC with 3 channels'),
])
def test_wrong_shape(graphs, pair, capsys, tmp_path, shape, text):
    bad = str(tmp_path / 'bad.npz')
    np.savez(bad, arr_0=np.zeros(shape, np.uint8))
    assert text in _error(capsys, [pair[0], bad, '--inception_pb', graphs['base']])


def test_too_few_images(graphs, pair, capsys, tmp_path):
    bad = str(tmp_path / 'bad.npz')
    np.savez(bad, arr_0=_images(3, 0))
    msg = _error(capsys, [pair[0], bad, '--inception_pb', graphs['base']])
    assert '3 images, but at least 4 are needed' in msg


def test_truncated_file(graphs, pair, capsys, tmp_path):
    bad = tmp_path / 'bad.npz'
    data = open(pair[1], 'rb').read()
    bad.write_bytes(data[:len(data) // 2])
    msg = _error(capsys, [pair[0], str(bad), '--inception_pb', graphs['base']])
    assert 'cannot read it as .npz' in msg and 'corrupt or truncated' in msg


def _stored_npz_with_payload(path, header_array, payload):
    """An uncompressed npz whose arr_0 header describes header_array but holds payload bytes."""
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(header_array))
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
        zf.writestr('arr_0.npy', buf.getvalue() + payload)


def test_array_shorter_than_its_header_streams_then_fails(tmp_path):
    x = _images(10, 0)
    bad = str(tmp_path / 'short.npz')
    _stored_npz_with_payload(bad, x, x[:6].tobytes())
    src = open_image_source(bad)
    batches = src.batches(4)
    np.testing.assert_array_equal(next(batches), x[:4])            # streamed before the end is read
    with pytest.raises(EvalInputError, match='arr_0 is truncated: expected 4320 bytes'):
        next(batches)


def test_corrupt_member_bytes(graphs, pair, capsys, tmp_path):
    bad = tmp_path / 'bad.npz'
    x = _images(8, 0)
    np.savez(str(bad), arr_0=x)
    data = bytearray(bad.read_bytes())
    data[data.index(x[7].tobytes()[:32]) + 5] ^= 0xFF              # flip a pixel byte; CRC now wrong
    bad.write_bytes(bytes(data))
    msg = _error(capsys, [pair[0], str(bad), '--inception_pb', graphs['base']])
    assert 'arr_0 is corrupt' in msg and 'CRC' in msg


def test_streaming_equals_np_load_for_compressed_and_stored(pair):
    for path in pair:
        want = np.load(path)['arr_0']
        got = np.concatenate(list(open_image_source(path).batches(7)))
        np.testing.assert_array_equal(got, want)


def test_missing_graph_says_where_to_get_it(tmp_path, pair, capsys):
    with pytest.raises(EvalInputError) as e:
        resolve_graph_path(None, search_dir=str(tmp_path), url=None)
    assert 'classify_image_graph_def.pb not found' in str(e.value)
    assert 'https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb' \
        in str(e.value)
    msg = _error(capsys, [*pair, '--inception_pb', str(tmp_path / 'missing.pb')])
    assert 'missing.pb: no such file; download the graph from https://' in msg


def test_graph_is_downloaded_into_the_search_dir(tmp_path, graphs):
    url = 'file://' + os.path.abspath(graphs['base'])                 # a local URL: no network in tests
    got = resolve_graph_path(None, search_dir=str(tmp_path), url=url)
    assert got == str(tmp_path / 'classify_image_graph_def.pb')
    assert open(got, 'rb').read() == open(graphs['base'], 'rb').read()
    assert resolve_graph_path(None, search_dir=str(tmp_path), url=None) == got   # found locally next time


def test_failed_download_leaves_nothing_and_explains(tmp_path):
    with pytest.raises(EvalInputError, match='download from file:///nonexistent/x.pb failed'):
        resolve_graph_path(None, search_dir=str(tmp_path), url='file:///nonexistent/x.pb')
    assert os.listdir(tmp_path) == []


def test_graph_that_is_not_a_graph(tmp_path):
    bad = tmp_path / 'bad.pb'
    bad.write_bytes(b'\xff' * 40)
    with pytest.raises(EvalInputError, match='not a TensorFlow GraphDef'):
        load_graph_def(str(bad))


def test_png_folder_errors(graphs, pair, capsys, tmp_path):
    from PIL import Image
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert 'folder holds no .png images' in _error(capsys, [pair[0], str(empty), '--inception_pb', graphs['base']])
    mixed = tmp_path / 'mixed'
    mixed.mkdir()
    for i in range(5):
        Image.fromarray(_images(1, i, side=12 if i != 3 else 10)[0]).save(mixed / f'{i}.png')
    msg = _error(capsys, [pair[0], str(mixed), '--inception_pb', graphs['base']])
    assert '3.png: size (10, 10, 3) differs from (12, 12, 3)' in msg
    gray = tmp_path / 'gray'
    gray.mkdir()
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(gray / '0.png')
    assert 'image mode is L, expected RGB' in _error(capsys, [pair[0], str(gray), '--inception_pb', graphs['base']])
