"""notebooks/quickstart.ipynb: stored without outputs, and run top to bottom by a Jupyter kernel on a quick demo."""
import os
import re
import sys
from typing import Tuple

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'quickstart.ipynb')
ENLARGE, PAD = 4, 2            # a grid shows the demo's 16 px digits 4x, 2 px apart (utils/sample/image_io.py)
CELL = 16 * ENLARGE + PAD


def grid_size(n: int, nrow: int) -> Tuple[int, int]:
    """(width, height) of a grid of n digits, nrow a row."""
    return PAD + min(n, nrow) * CELL, PAD + -(-n // nrow) * CELL


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert('RGB'))


def test_the_stored_notebook_is_valid_and_has_no_outputs():
    """What is committed is the notebook without results: no outputs, no execution counts, the python3 kernel."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == 'code']
    run = [i for i in code if nb.cells[i].outputs or nb.cells[i].execution_count is not None]
    assert code and not run, f'cells {run} of {NOTEBOOK} hold outputs: clear all outputs before committing it'
    assert nb.metadata.kernelspec.name == 'python3'


@pytest.mark.slow
def test_the_notebook_runs_on_a_quick_demo(quick_demo):
    """Every cell runs in a python3 kernel on this interpreter with DEMO_OUT pointing at a quick demo; it prints the
    demo's recorded settings and both schedules with their times, displays five grids and writes them at the sizes
    of their layouts; the knob's two grids differ, and the edit starts from the held-out digit itself."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell('import sys\nprint(sys.executable)'))   # which interpreter ran it
    client = NotebookClient(nb, timeout=300, kernel_name='python3',
                            resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
    try:
        client.execute(env=dict(os.environ, DEMO_OUT=str(quick_demo), OMP_NUM_THREADS='1'))
    except CellExecutionError as e:   # the headline first, then the cell and IPython's traceback without colours
        pytest.fail(f'{NOTEBOOK}: a cell raised {e.ename}: {e.evalue}\n' + re.sub(r'\x1b\[[0-9;]*m', '', str(e)),
                    pytrace=False)
    outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
    assert not [o for o in outputs if o.output_type == 'error']
    stdout = ''.join(o.text for o in outputs if o.output_type == 'stream' and o.name == 'stdout')
    kernel_python = stdout.strip().splitlines()[-1]
    assert os.path.realpath(kernel_python) == os.path.realpath(sys.executable), (
        f"the python3 kernel ran {kernel_python}, not {sys.executable}: a kernelspec named python3 outside this "
        f"environment shadows ipykernel's own (see `{sys.executable} -m jupyter kernelspec list`)")
    assert 'sampling defaults from the file: cfg 0, top_k 0, top_p 0, iter_left 4, iter_right 4' in stdout
    for line in ('viar: 40 images', 'var: 40 images', 'Con.(1,1): 1,1,1,1 iterations per scale: 16 images',
                 'Con.(8,8): 8,8,8,8 iterations per scale: 16 images', '4 edits'):
        assert re.search(re.escape(line) + r' in \d+\.\d\d s', stdout), (line, stdout)
    assert sum('image/png' in o.get('data', {}) for o in outputs) == 5
    out = quick_demo / 'notebook'
    sizes = {'samples_viar.png': grid_size(40, 4), 'samples_var.png': grid_size(40, 4),
             'knob_con1.png': grid_size(16, 8), 'knob_con8.png': grid_size(16, 8), 'edit.png': grid_size(6, 6)}
    for name, size in sizes.items():
        assert Image.open(out / name).size == size, name
    assert not np.array_equal(pixels(out / 'knob_con1.png'), pixels(out / 'knob_con8.png')), \
        'Con.(1,1) and Con.(8,8) drew the same grid: the schedule did not reach the sampler'
    digit = pixels(sorted((quick_demo / 'digits' / 'val' / '3').glob('*.png'))[0])
    enlarged = digit.repeat(ENLARGE, axis=0).repeat(ENLARGE, axis=1)
    assert np.array_equal(pixels(out / 'edit.png')[PAD:PAD + 16 * ENLARGE, PAD:PAD + 16 * ENLARGE], enlarged), \
        "the edit grid's first cell is not the first held-out 3"
