"""The Gradio page of `app.py`: Generate, Compare and Edit tabs over the served models.

The controls are built from `SampleConfig`'s fields (label = the CLI flag, info = its help), so the page and the
command line name the same values. Handlers turn errors into one-line `gr.Error`s; requests queue one at a time.
A `gradio_client` caller sees inputs under the handler's parameter names and outputs under their labels
(docs/APP.md, "Calling it from Python"), so every output has one.
"""
import dataclasses
import functools
import os
from typing import List, Optional, Sequence

os.environ['GRADIO_ANALYTICS_ENABLED'] = 'False'   # before gradio is imported: no telemetry, whatever the shell says
import gradio as gr   # noqa: E402

from utils.app import present, requests   # noqa: E402
from utils.app.loading import HOW_TO_GET_WEIGHTS, AppModel   # noqa: E402
from utils.app.requests import ADAPTIVE, CONDEC, PER_SCALE, SCHEDULE_MODES, RequestError, ScheduleRequest   # noqa
from models.schedules import DEFAULT_CAP   # noqa: E402
from utils.logging_util import get_logger   # noqa: E402
from utils.sample import image_io   # noqa: E402
from utils.sample.config import SampleConfig   # noqa: E402

log = get_logger('app')
SYSTEM_FONTS = ['ui-sans-serif', 'system-ui', 'sans-serif']
SYSTEM_MONO = ['ui-monospace', 'monospace']
CSS = '.pixelated img { image-rendering: pixelated; }'   # tiny demo images stay sharp when the page enlarges them
MODELS_COMPARE, SCHEDULES_COMPARE = 'the two models', 'two schedules'
ONE_AT_A_TIME = dict(concurrency_limit=1, concurrency_id='sampling')   # every model request queues behind the others


def theme() -> gr.themes.Base:
    """A theme on system fonts only: the page loads no web font and nothing from a CDN."""
    return gr.themes.Base(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO)


def field_help(name: str) -> str:
    """SampleConfig's help text of a field (the CLI's --help line)."""
    return next(f for f in dataclasses.fields(SampleConfig) if f.name == name).metadata.get('help', '')


def number(name: str, value, integer: bool = True, label: str = '', info: str = '', **kw) -> gr.Number:
    """A SampleConfig field as a number box; no bounds here: SampleConfig.validate rejects bad values in CLI words."""
    return gr.Number(value=value, label=label or name, info=info or field_help(name), precision=0 if integer else None,
                     **kw)


# the page's adaptive mode sets tau and tau_cap only, so a cap of 0 is always the default cap (the CLI's help adds
# the case of a typed --iter_left / --iter_right, which the page never passes)
TAU_CAP_LABEL = f'tau_cap (0 = {DEFAULT_CAP})'
TAU_CAP_INFO = f'adaptive: at most this many iterations per scale; 0 = the default cap, {DEFAULT_CAP}'


def sampling_controls(defaults: SampleConfig):
    """cfg, top_k, top_p: the SampleConfig fields every request sets."""
    with gr.Row():
        cfg = number('cfg', defaults.cfg, integer=False)
        top_k = number('top_k', defaults.top_k)
        top_p = number('top_p', defaults.top_p, integer=False)
    return [cfg, top_k, top_p]


def schedule_controls(defaults: SampleConfig, num_scales: int, title: str = 'iteration schedule', key: str = ''):
    """The schedule as Con./Dec., a per-scale list or adaptive: [mode, iter_left, iter_right, iters, tau, tau_cap]."""
    with gr.Group():
        mode = gr.Radio(list(SCHEDULE_MODES), value=CONDEC, label=f'{title} (VIAR; {num_scales} scales)',
                        elem_id=f'{key}mode')
        with gr.Row():
            left = number('iter_left', defaults.iter_left, elem_id=f'{key}iter_left')
            right = number('iter_right', defaults.iter_right, elem_id=f'{key}iter_right')
        iters = gr.Textbox(value=','.join([str(defaults.iter_left)] * num_scales), label='iters',
                           info=field_help('iters'), visible=False, elem_id=f'{key}iters')
        with gr.Row(visible=False) as ada_row:
            tau = gr.Textbox(value='0.01', label='tau', info=field_help('tau'), elem_id=f'{key}tau')
            cap = number('tau_cap', defaults.tau_cap, label=TAU_CAP_LABEL, info=TAU_CAP_INFO, elem_id=f'{key}tau_cap')

    def show(m):
        return (gr.update(visible=m == CONDEC), gr.update(visible=m == CONDEC), gr.update(visible=m == PER_SCALE),
                gr.update(visible=m == ADAPTIVE))
    mode.change(show, mode, [left, right, iters, ada_row], queue=False, api_visibility='private')
    return [mode, left, right, iters, tau, cap]


def config_of(model: AppModel, base: SampleConfig, cfg, top_k, top_p, *schedule) -> SampleConfig:
    """A request's SampleConfig from the sampling and schedule controls' values (`requests.sample_config`)."""
    return requests.sample_config(cfg, top_k, top_p, ScheduleRequest(*schedule), model.num_scales, base)


def class_dropdown(model: AppModel, label: str, value: int = 0) -> gr.Dropdown:
    """The model's classes by 'id: name'; a typed value reaches the handler, which checks it as gen_img.py does."""
    return gr.Dropdown([(f'{i}: {n}', i) for i, n in enumerate(model.class_names)], value=value, label=label,
                       allow_custom_value=True)


def gallery(label: str, columns: int, elem_id: Optional[str] = None) -> gr.Gallery:
    """Images at the model's resolution as lossless PNG (Gallery's default is lossy WebP)."""
    return gr.Gallery(label=label, columns=columns, object_fit='contain', format='png', elem_id=elem_id,
                      elem_classes='pixelated')


def chart(elem_id: str, runs: int = 1) -> gr.BarPlot:
    """Implicit iterations per scale (present.chart_table), runs side by side; API name `iterations`."""
    return gr.BarPlot(x='scale', y='iterations', color='run' if runs > 1 else None, label='iterations',
                      elem_id=elem_id, x_title='scale (index: side)',
                      y_title='implicit iterations each scale ran' + (', A and B' if runs > 1 else ''), height=260)


def summary_text(label: str = 'summary', elem_id: Optional[str] = None) -> gr.Markdown:
    """A run's summary (present.summary); the label is not shown, it names the output for API callers."""
    return gr.Markdown(label=label, elem_id=elem_id)


def api_figures(suffix: str = '') -> List[gr.Number]:
    """kv_mib and seconds_per_image as hidden numbers for API callers (the page shows them in the summary)."""
    return [gr.Number(label=f'{name}{suffix}', visible=False) for name in ('kv_mib', 'seconds_per_image')]


def handler(fn):
    """Run a request: any error becomes a one-line gr.Error (an unexpected one's traceback goes to the console)."""
    @functools.wraps(fn)   # Gradio reads the parameter names (the API's keywords) through __wrapped__
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RequestError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as e:   # noqa: BLE001 - the page gets one line, the console the traceback
            log.exception('request failed')
            raise gr.Error(f'the request failed: {type(e).__name__}: {e}', print_exception=False) from None
    return wrapped


def progress_cb(progress: gr.Progress):
    """A `requests` progress callback, (fraction, text), that drives the page's progress bar."""
    return lambda frac, text: progress(frac, desc=text)


def build_app(models: Sequence[AppModel], defaults: Optional[SampleConfig] = None, errors: Sequence[str] = (),
              base: Optional[SampleConfig] = None) -> gr.Blocks:
    """The page for the served models (models[1], if any, is compared with models[0]); defaults: the controls'
    starting values; base: the server's SampleConfig every request starts from; errors: shown at the top."""
    defaults = defaults or SampleConfig()
    base = base or SampleConfig()
    image_io.limit_decoding()   # uploads are decoded by Gradio before our checks: cap what Pillow will decode
    with gr.Blocks(title='VIAR: iterations per scale', analytics_enabled=False) as demo:
        gr.Markdown('# VIAR: the iteration knob\nOne trained model; turn the implicit iterations per scale and '
                    'watch quality, time and KV-cache memory.')
        for line in errors:
            gr.Markdown(f'**Model failed to load.** {line}', elem_classes='load-error')
        if not models:
            gr.Markdown(f'**{HOW_TO_GET_WEIGHTS}**', elem_id='no-model')
            return demo
        main = models[0]
        gr.Markdown('Serving: ' + '; '.join(m.describe() for m in models), elem_id='serving')
        _generate_tab(main, defaults, base)
        _compare_tab(models, defaults, base)
        _edit_tab(main, defaults, base)
    return demo


def _generate_tab(model: AppModel, defaults: SampleConfig, base: SampleConfig):
    with gr.Tab('Generate'):
        with gr.Row():
            with gr.Column(scale=1):
                cls = class_dropdown(model, 'class')
                with gr.Row():
                    seeds = gr.Textbox('0,1,2,3', label='seeds', info="a list '0,1,2,3' or a range '0-7'")
                    batch = gr.Number(8, label='batch size', precision=0,
                                      info='images per forward pass; the images do not depend on it')
                sample = sampling_controls(defaults)
                schedule = schedule_controls(defaults, model.num_scales, key='gen_')
                go = gr.Button('Generate', variant='primary', elem_id='generate')
            with gr.Column(scale=1):
                images = gallery('images', 4, elem_id='gen_images')
                plot = chart('gen_chart')
                text = summary_text(elem_id='gen_summary')
                figures = api_figures()

        @handler
        def generate(class_id, seeds, batch_size, cfg, top_k, top_p, mode, iter_left, iter_right, iters, tau,
                     tau_cap, progress=gr.Progress()):
            """Images of one class at the given seeds and schedule; the iterations each scale ran."""
            config = config_of(model, base, cfg, top_k, top_p, mode, iter_left, iter_right, iters, tau, tau_cap)
            r = requests.generate(model, class_id, seeds, config, batch_size, progress=progress_cb(progress))
            table = present.chart_table([(r.model, r)], model.var.patch_nums)
            return (present.gallery(r, model.class_names), table, present.summary(r), *present.figures(r))
        go.click(generate, [cls, seeds, batch, *sample, *schedule], [images, plot, text, *figures], api_name='generate',
                 **ONE_AT_A_TIME)


def _compare_tab(models: Sequence[AppModel], defaults: SampleConfig, base: SampleConfig):
    main = models[0]
    choices = [SCHEDULES_COMPARE] + ([MODELS_COMPARE] if len(models) > 1 else [])
    with gr.Tab('Compare'):
        beside = f', or {main.name} (schedule A) beside {models[1].name} (schedule B)' if len(models) > 1 else ''
        gr.Markdown(f'The same seeds side by side: at two schedules of {main.name}{beside}')
        with gr.Row():
            what = gr.Radio(choices, value=MODELS_COMPARE if len(models) > 1 else SCHEDULES_COMPARE, label='compare')
            cls = class_dropdown(main, 'class')
            seeds = gr.Textbox('0,1,2,3', label='seeds', info="a list '0,1,2,3' or a range '0-7'")
        sample = sampling_controls(defaults)
        with gr.Row():
            with gr.Column():
                sched_a = schedule_controls(defaults, main.num_scales, 'schedule A', key='a_')
                images_a = gallery('images A', 4)
                text_a = summary_text('summary A')
            with gr.Column():
                right = dataclasses.replace(defaults, iter_left=max(1, defaults.iter_left // 2),
                                            iter_right=max(1, defaults.iter_right // 2))
                sched_b = schedule_controls(right, main.num_scales, 'schedule B', key='b_')
                images_b = gallery('images B', 4)
                text_b = summary_text('summary B')
        go = gr.Button('Compare', variant='primary', elem_id='compare')
        plot = chart('cmp_chart', runs=2)
        figures = api_figures(' A') + api_figures(' B')

        @handler
        def compare(what, class_id, seeds, cfg, top_k, top_p, a_mode, a_iter_left, a_iter_right, a_iters, a_tau,
                    a_tau_cap, b_mode, b_iter_left, b_iter_right, b_iters, b_tau, b_tau_cap, progress=gr.Progress()):
            """The same seeds at schedules A and B (one model), or model A beside model B."""
            sample_v = (cfg, top_k, top_p)
            a_v = (a_mode, a_iter_left, a_iter_right, a_iters, a_tau, a_tau_cap)
            b_v = (b_mode, b_iter_left, b_iter_right, b_iters, b_tau, b_tau_cap)
            second = models[1] if what == MODELS_COMPARE and len(models) > 1 else main
            if what not in choices:
                raise RequestError(f'compare must be one of {choices}, got {what!r}')
            runs = []
            for tag, model, sched in (('A', main, a_v), ('B', second, b_v)):
                config = config_of(model, base, *sample_v, *sched)
                r = requests.generate(model, class_id, seeds, config, batch_size=8, progress=progress_cb(progress))
                runs.append((f'{tag}: {model.name}, {r.schedule.split(":")[0]}', r))
            table = present.chart_table(runs, main.var.patch_nums)
            (la, ra), (lb, rb) = runs
            return (present.gallery(ra, main.class_names), present.summary(ra, la),
                    present.gallery(rb, second.class_names), present.summary(rb, lb), table,
                    *present.figures(ra), *present.figures(rb))
        go.click(compare, [what, cls, seeds, *sample, *sched_a, *sched_b],
                 [images_a, text_a, images_b, text_b, plot, *figures], api_name='compare', **ONE_AT_A_TIME)


def _edit_tab(model: AppModel, defaults: SampleConfig, base: SampleConfig):
    with gr.Tab('Edit'):
        gr.Markdown(f'Zero-shot editing: tokens outside the mask are kept at every scale, those inside are sampled '
                    f'(under the chosen class). Images are centre-cropped and resized to {model.resolution} px; '
                    f'draw the region in white, or give a box.')
        with gr.Row():
            with gr.Column():
                editor = gr.ImageEditor(type='filepath', label='image (draw the region to regenerate)',
                                        sources=('upload', 'clipboard'), layers=False,
                                        brush=gr.Brush(colors=['#ffffff'], color_mode='fixed'),
                                        eraser=gr.Eraser(), elem_id='edit_image')
                with gr.Row():
                    box = gr.Textbox('', label='box (instead of drawing)',
                                     info='x0,y0,x1,y1 as fractions of width / height, e.g. 0.25,0.25,0.75,0.75')
                    mode = gr.Radio(['inpaint', 'outpaint'], value='inpaint', label='mode',
                                    info='inpaint: regenerate the region; outpaint: keep it, regenerate the rest')
                with gr.Row():
                    cls = class_dropdown(model, 'regenerate as class')
                    seeds = gr.Textbox('0,1,2,3', label='seeds')
                sample = sampling_controls(defaults)
                schedule = schedule_controls(defaults, model.num_scales, key='edit_')
                go = gr.Button('Edit', variant='primary', elem_id='edit')
            with gr.Column():
                inputs = gallery('inputs', 3, elem_id='edit_inputs')   # captions: input, mask, reconstruction
                images = gallery('edited', 4)
                text = summary_text()
                figures = api_figures()

        @handler
        def edit(image, box, edit_mode, class_id, seeds, cfg, top_k, top_p, mode, iter_left, iter_right, iters, tau,
                 tau_cap, progress=gr.Progress()):
            """Regenerate the drawn region (or the box; outpaint: everything else) of the image under a class."""
            config = config_of(model, base, cfg, top_k, top_p, mode, iter_left, iter_right, iters, tau, tau_cap)
            image_path, mask_paths = editor_paths(image)
            r = requests.edit(model, image_path, mask_paths, box, edit_mode, class_id, seeds, config, batch_size=8,
                              progress=progress_cb(progress))
            shown = [(image_io.to_uint8_HWC(img), name) for name, img in r.extra_images.items()]
            return shown, present.gallery(r, model.class_names), present.summary(r), *present.figures(r)
        go.click(edit, [editor, box, mode, cls, seeds, *sample, *schedule], [inputs, images, text, *figures],
                 api_name='edit', **ONE_AT_A_TIME)


def editor_paths(value) -> tuple:
    """(background image path, drawn layer paths) of an ImageEditor value (type='filepath')."""
    if not value:
        return '', []
    if isinstance(value, str):
        return value, []
    background = value.get('background') or ''
    layers: List[str] = [p for p in (value.get('layers') or []) if p]
    return background, layers
