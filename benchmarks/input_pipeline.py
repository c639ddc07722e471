"""Throughput of the BEiT-3 pretraining input pipeline per CPU core, and the share of a TPU
host's CPUs each shipped recipe needs.

What it measures

  The real pretraining mixture (`beit3_jax.data.pretraining.make_mixture`: the 'image', 'text'
  and 'pair' streams over random-access TFDS sources), drawn step after step and timed; host
  batches of `--batch` per stream (default 128: base pretraining on v5p-128 is 2048 per stream
  over 16 hosts). One "example" is one row of any stream; "images" are the image and pair rows
  (2/3 of the examples).

  Two pipelines, in the same run:
    today - the pipeline as of git revision `--baseline_rev` (default the last one before
            worker processes and the device half), run from a `git archive` of it: one
            process, reader threads per stream, both views (bicubic model view, lanczos
            tokenizer view) and the colour jitter on the host. Without git it falls back to
            this checkout's host reference, `PretrainInputs(views_on_device=False)`.
    new   - this checkout: W worker processes (`--new_rows WxC`: W workers pinned to C cores),
            each making whole steps; the host makes one uint8 view (the tokenizer's, JPEG
            draft-decoded when the crop allows) and draws the flip and jitter, which the jitted
            step applies (`device_augment.finish_images`); the device half is timed apart (one
            core of this CPU, jitted; in training it runs on the accelerator).
  Per example, what training gets: random resized crop 0.08-1, flip, colour jitter 0.4, a 40%
  block mask on the image stream; SentencePiece and 15% / 50% text masking.

  Cases (`--cases`): world64 / world224 (the built-in world at 64 / 224 px) and jpeg224
  (`--num_jpegs` photo-like JPEGs, `--jpeg_sizes` default 500x375, q90, with one caption each,
  built with `local_files.build_image_text`; the text stream reads synthetic sentences).

  Each row runs in a child process pinned with `os.sched_setaffinity` to its cores (worker
  processes inherit it; checked), warms up, then draws steps for `--seconds`; `--repeats` runs
  per row rotate through the rows; medians over the quiet runs (a run is dropped when other
  processes used more than `--quiet_cpu` cores; `--wait_quiet` and `--retries` help on a shared
  machine). Host CPU per example sums the child and its workers over the timed window. Printed:
  ex/s, img/s, per core, CPU ms per example, cpu/wall; the scaling of the new pipeline from 1
  worker on 1 core to 2 on 2; the new pipeline's img/s per core at 2 workers on 2 cores over
  today's on 2 cores; one example of each stream in a plain loop on one thread; and the demand
  table: for each shipped recipe and TPU generation (v4, v5p, v6e), the examples/s a host must
  supply (at the planner's step time where it has one, else 50% MFU) and the share of the
  host's vCPUs that takes (formula and derating in docs/performance.md). `--json PATH` writes
  rows with `case, pipeline, workers, cores, ex_per_s, img_per_s_per_core,
  cpu_s_per_example`, the device timing, the one-thread costs and the demand table.

Run (from the repository root; about 8 minutes on a quiet 2-core machine for the default
`--cases jpeg224`; data go to a temporary folder unless `--data_dir` is given):

    .venv/bin/python benchmarks/input_pipeline.py
    .venv/bin/python benchmarks/input_pipeline.py --wait_quiet 60 --retries 2   # shared machine
    .venv/bin/python benchmarks/input_pipeline.py --repeats 1 --seconds 3       # quick

Figures and the machine they came from: benchmarks/README.md and docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from backbone_speed import cpu_name   # (this folder is on sys.path when a script runs)

# The last revision before worker processes and the device half: "today's pipeline".
BASELINE_REV = 'd091b52'
CASES = ('world64', 'world224', 'jpeg224')
CASE_INPUTS = {  # PretrainInputs kwargs per case
    'world64': dict(image_size=64, tokenizer_image_size=64, patch_size=16, text_len=32),
    'world224': dict(image_size=224, tokenizer_image_size=224, patch_size=16, text_len=64),
    'jpeg224': dict(image_size=224, tokenizer_image_size=224, patch_size=16, text_len=64),
}
JPEG_NAME = 'bench_jpeg_pairs'

# ------------------------------------------------------------------------------------- setup


def _csv_ints(text: str) -> list[int]:
  return [int(x) for x in text.split(',') if x.strip()]


def _sizes(text: str) -> list[tuple[int, int]]:
  out = []
  for item in text.split(','):
    w, h = item.lower().split('x')
    out.append((int(w), int(h)))
  return out


def synthetic_photo(rng, width: int, height: int):
  """A photo-like uint8 (H, W, 3) image: a colour gradient, octave noise, a few soft shapes and
  sensor noise. At q90 4:2:0 it takes ~0.34 byte/pixel (~64 KB at 500x375), like the
  photo-like files of an earlier AMD Zen 5 measurement (97 KB at 0.28 MP), not the few KB of
  flat synthetic art."""
  import numpy as np
  from PIL import Image, ImageDraw, ImageFilter
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi)
  t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
  t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
  c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
  img = c0 + t[..., None] * (c1 - c0)
  detail = rng.uniform(0.5, 1.6)  # texture strength varies from image to image
  for cells in (3, 6, 12, 24, 48, 96, 192):  # octave noise, amplitude falling with frequency
    amp = 38.0 * detail * (3.0 / cells) ** 0.25
    for ch in range(3):
      grid = rng.normal(size=(max(2, cells * height // width), cells)).astype(np.float32)
      up = Image.fromarray(grid, mode='F').resize((width, height), Image.Resampling.BICUBIC)
      img[..., ch] += amp * np.asarray(up)
  pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(pil)
  for _ in range(int(rng.integers(3, 9))):
    x0, y0 = rng.uniform(-0.1, 0.9) * width, rng.uniform(-0.1, 0.9) * height
    w, h = rng.uniform(0.05, 0.5) * width, rng.uniform(0.05, 0.5) * height
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
      draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
    else:
      draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
  pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.9)))
  out = np.asarray(pil).astype(np.float32) + rng.normal(0, rng.uniform(3.0, 10.0),
                                                        (height, width, 3))
  return np.clip(out, 0, 255).astype(np.uint8)


def build_jpegs(data_dir: str, num: int, sizes, seed: int = 0) -> dict:
  """Writes `num` JPEGs + a JSONL of captions and builds them with build_image_text."""
  import numpy as np
  from PIL import Image
  from beit3_jax.data import local_files, paths, synthetic_world
  tfds_dir = paths.tfds_dir(data_dir)
  tag = f'{num}_' + '_'.join(f'{w}x{h}' for w, h in sizes)
  name = f'{JPEG_NAME}_{tag}'.replace('x', 'by')
  ready = os.path.isdir(os.path.join(tfds_dir, name))
  folder = os.path.join(data_dir, 'bench_jpegs', tag)
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  nbytes, pixels, lines = [], [], []
  started = time.perf_counter()
  for i in range(num):
    w, h = sizes[i % len(sizes)]
    path = os.path.join(folder, f'{i:05d}.jpg')
    if not os.path.isfile(path):
      Image.fromarray(synthetic_photo(rng, w, h)).save(path, quality=90, subsampling='4:2:0')
    nbytes.append(os.path.getsize(path))
    pixels.append(w * h)
    caption = synthetic_world.captions(synthetic_world.sample_scene(rng), rng, n=1)[0]
    lines.append(json.dumps({'image': os.path.basename(path), 'caption': caption}))
  ann = os.path.join(folder, 'train.jsonl')
  with open(ann, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  if not ready:
    local_files.build_image_text(name, {'train': ann}, data_dir=data_dir)
  print(f'JPEGs: {num} files in {folder}, mean {np.mean(nbytes) / 1e3:.1f} KB '
        f'(median {np.median(nbytes) / 1e3:.1f}, {min(nbytes) / 1e3:.0f}-{max(nbytes) / 1e3:.0f}), '
        f'{np.mean(pixels) / 1e6:.3f} MP mean; {"reused" if ready else "built"} {name} in '
        f'{time.perf_counter() - started:.1f} s', flush=True)
  return {'name': name, 'kb_mean': float(np.mean(nbytes) / 1e3),
          'mp_mean': float(np.mean(pixels) / 1e6)}


def train_tokenizer(data_dir: str, num_sentences: int, vocab_size: int) -> str:
  """A unigram .spm on synthetic sentences: `vocab_size`, or the largest smaller one that trains."""
  import numpy as np
  from beit3_jax.data import synthetic_world
  from beit3_jax.data import text as text_lib
  rng = np.random.default_rng(0)
  corpus = [synthetic_world.text_corpus_sentence(rng) for _ in range(num_sentences)]
  size, proto = vocab_size, None
  while proto is None:
    try:
      proto = text_lib.train_spm(corpus, vocab_size=size)
    except ValueError as e:  # sentencepiece: '... Please set it to a value <= 107.'
      found = re.search(r'value <= (\d+)', str(e))
      if size <= 16 or not found or int(found.group(1)) >= size:
        raise
      size = int(found.group(1))
  path = os.path.join(data_dir, 'spm', f'bench_{num_sentences}_{size}.spm')
  text_lib.save_spm(proto, path, overwrite=True)
  tok = text_lib.TextTokenizer.from_proto(proto)
  print(f'Tokenizer: unigram, {tok.spm_size} pieces (asked {vocab_size}) from {num_sentences} '
        f'sentences -> {path}', flush=True)
  return path


def prepare_data(args, data_dir: str) -> dict:
  """Builds what the cases need; returns {case: spec for the worker}."""
  from beit3_jax.data import paths
  from beit3_jax.data.builders import synthetic_world_builder as swb
  tfds_dir = paths.tfds_dir(data_dir)
  spm_path = train_tokenizer(data_dir, args.num_sentences, args.vocab_size)
  text_sizes = {'train': args.num_text, 'validation': 0, 'test': 0}
  swb.prepare(data_dir=data_dir, which=('text',), num_examples=text_sizes)
  text_source = {'name': swb.dataset_name('text', num_examples=text_sizes), 'data_dir': tfds_dir}
  specs = {}
  for case in args.cases:
    inputs = CASE_INPUTS[case]
    if case.startswith('world'):
      sizes = {'train': args.num_train, 'validation': 0, 'test': 0}
      swb.prepare(data_dir=data_dir, image_size=inputs['image_size'], which=('images',),
                  num_examples=sizes)
      image_source = {'name': swb.dataset_name('images', inputs['image_size'], sizes),
                      'data_dir': tfds_dir}
      extra = {}
    else:
      info = build_jpegs(data_dir, args.num_jpegs, _sizes(args.jpeg_sizes))
      image_source = {'name': info['name'], 'data_dir': tfds_dir}
      extra = info
    specs[case] = {'case': case, 'inputs': inputs, 'spm': spm_path, 'extra': extra,
                   'sources': {'image': image_source, 'text': text_source,
                               'pair': image_source}}
  return specs


# ------------------------------------------------------------------------------------ worker


def _busy_seconds() -> tuple[float, float]:
  """(busy CPU seconds of the whole machine, steal seconds) from /proc/stat, or (nan, nan)."""
  try:
    with open('/proc/stat') as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return math.nan, math.nan
  hz = os.sysconf('SC_CLK_TCK')
  user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
  return (user + nice + system + irq + softirq) / hz, steal / hz


def _wait_quiet(max_cores: float, timeout: float, window: float = 3.0) -> bool:
  """Waits (up to `timeout` s) for a `window` during which the machine used <= max_cores."""
  deadline = time.monotonic() + timeout
  while True:
    b0, _ = _busy_seconds()
    time.sleep(window)
    b1, _ = _busy_seconds()
    if not (b1 - b0) / window > max_cores:  # also True when /proc/stat is unreadable
      return True
    if time.monotonic() > deadline:
      print(f'  (still busy after waiting {timeout:.0f} s; running anyway)', flush=True)
      return False


def _descendants(root: int) -> list[int]:
  """Pids of every live descendant of `root` (children, grandchildren, ...), from /proc."""
  parent = {}
  for name in os.listdir('/proc'):
    if not name.isdigit():
      continue
    try:
      with open(f'/proc/{name}/stat') as f:
        rest = f.read().rsplit(')', 1)[1].split()
      parent[int(name)] = int(rest[1])
    except (OSError, IndexError, ValueError):
      continue
  out, frontier = [], [root]
  while frontier:
    kids = [pid for pid, ppid in parent.items() if ppid in frontier]
    out += kids
    frontier = kids
  return out


def _tree_cpu(root: int) -> tuple[float, dict[int, float]]:
  """CPU seconds (user + system) used so far by `root` and its live descendants, and per
  descendant, from /proc/<pid>/stat (clock ticks, 10 ms)."""
  hz = os.sysconf('SC_CLK_TCK')
  per = {}
  for pid in [root] + _descendants(root):
    try:
      with open(f'/proc/{pid}/stat') as f:
        rest = f.read().rsplit(')', 1)[1].split()
      per[pid] = (int(rest[11]) + int(rest[12])) / hz  # utime, stime
    except (OSError, IndexError, ValueError):
      continue
  return sum(per.values()), per


def _open_sources(spec: dict) -> dict:
  import tensorflow_datasets as tfds
  return {k: tfds.data_source(v['name'], split='train', data_dir=v['data_dir'], download=False)
          for k, v in spec['sources'].items()}


def _transform_costs(spec: dict, cfg_today, cfg_new, tokenizer, sources) -> dict:
  """ms per example of each stream's read + transform in a plain loop on one thread (no grain),
  for today's transforms and the new ones; and ms per image of the fine-tuning views."""
  import numpy as np
  from beit3_jax.data import finetuning, image_ops, pretraining
  out = {}
  for label, cfg in (('today', cfg_today), ('new', cfg_new)):
    transforms = {'image': pretraining.image_transform(cfg),
                  'text': pretraining.text_transform(cfg, tokenizer),
                  'pair': pretraining.pair_transform(cfg, tokenizer)}
    rng = np.random.default_rng(0)
    for name, fn in transforms.items():
      src = sources[name]
      n, read_s, tf_s = 0, 0.0, 0.0
      deadline = time.perf_counter() + spec['seconds']
      while time.perf_counter() < deadline or n < 8:
        t0 = time.perf_counter()
        example = src[n % len(src)]
        t1 = time.perf_counter()
        fn(example, rng)
        t2 = time.perf_counter()
        if n >= 2:  # the first reads open files
          read_s += t1 - t0
          tf_s += t2 - t1
        n += 1
      out[f'{label}/{name}'] = {'n': n - 2, 'read_ms': 1e3 * read_s / (n - 2),
                                'transform_ms': 1e3 * tf_s / (n - 2)}
  # Fine-tuning and tokenizer-training views: decode + random resized crop (+ flip) at size S.
  src = sources['image']
  for view in spec.get('views', []):
    rng = np.random.default_rng(0)
    if view['kind'] == 'finetune':
      fcfg = finetuning.FinetuneInputs(image_size=view['size'], train=True,
                                       crop_scale=tuple(view['scale']))
      fn = lambda ex, r: finetuning.view(fcfg, pretraining.load_image(ex, 'image'), r)  # noqa
    else:  # the VQ-KD tokenizer job: one bicubic view, no jitter
      acfg = image_ops.ImageAugConfig(size=view['size'], scale=tuple(view['scale']),
                                      color_jitter=0.0, second_size=None)
      fn = lambda ex, r: image_ops.augment(r, pretraining.load_image(ex, 'image'), acfg)  # noqa
    n, total = 0, 0.0
    deadline = time.perf_counter() + spec['view_seconds']
    while time.perf_counter() < deadline or n < 8:
      t0 = time.perf_counter()
      fn(src[n % len(src)], rng)
      if n >= 2:
        total += time.perf_counter() - t0
      n += 1
    out[f'view/{view["kind"]}/{view["size"]}/{view["scale"][0]}'] = {
        'n': n - 2, 'ms': 1e3 * total / (n - 2), **view}
  return out


def _device_cost(spec: dict, cfg_new, tokenizer, sources) -> dict:
  """ms per image of the device half (`device_augment.finish_images`: colour jitter, the
  normalised model view and the tokenizer view), jitted, on this CPU (the child's cores)."""
  import jax
  import numpy as np
  from beit3_jax.data import device_augment, pretraining
  batch = spec['device_batch']
  mixture = pretraining.make_mixture(cfg_new, tokenizer, {'image': sources['image']},
                                     {'image': batch}, seed=0, process_index=0,
                                     process_count=1, read_threads=1)
  stream_batch = next(mixture)['image']
  mixture.close()
  stream_batch = {k: stream_batch[k] for k in ('image', 'jitter', 'jitter_order')}
  size = cfg_new.tokenizer_image_size
  fn = jax.jit(lambda b: device_augment.finish_images(b, tokenizer_size=size))
  on_device = jax.device_put(stream_batch)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(on_device))
  compile_s = time.perf_counter() - t0
  times = []
  deadline = time.perf_counter() + spec['seconds']
  while time.perf_counter() < deadline or len(times) < 5:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(on_device))
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  return {'batch': batch, 'image_size': cfg_new.image_size, 'tokenizer_size': size,
          'compile_s': compile_s, 'calls': len(times), 'ms_per_batch': 1e3 * med,
          'ms_per_image': 1e3 * med / batch, 'device': str(jax.devices()[0].device_kind)}


def worker(spec: dict) -> dict:
  """Runs in a child: pin, build the mixture, warm up, time. Returns the measurements."""
  os.sched_setaffinity(0, set(spec['cpus']))  # before any thread pool or worker exists
  baseline = spec.get('mode') == 'mixture' and spec.get('pipeline') == 'today' and \
      spec.get('baseline_dir')
  if baseline:  # today's rows run the code of the baseline revision, unchanged
    sys.path.insert(0, spec['baseline_dir'])
  import dataclasses
  import resource
  from beit3_jax.data import pretraining
  from beit3_jax.data import text as text_lib

  load_start = os.getloadavg()[0]
  cfg = pretraining.PretrainInputs(**spec['inputs'])
  if baseline:
    assert pretraining.__file__.startswith(spec['baseline_dir']), pretraining.__file__
    cfg_today = cfg_new = cfg
  else:
    cfg_today = dataclasses.replace(cfg, views_on_device=False)
    cfg_new = dataclasses.replace(cfg, views_on_device=True)
  tokenizer = text_lib.TextTokenizer.from_file(spec['spm'])
  sources = _open_sources(spec)
  out = {'cpus': sorted(os.sched_getaffinity(0)), 'load_start': load_start}

  if spec['mode'] == 'transform':
    out.update(_transform_costs(spec, cfg_today, cfg_new, tokenizer, sources))
    return out
  if spec['mode'] == 'device':
    out.update(_device_cost(spec, cfg_new, tokenizer, sources))
    return out

  batch, workers = spec['batch'], spec['workers']
  sizes = {'image': batch, 'text': batch, 'pair': batch}
  if baseline:   # the baseline's API: reader threads per stream, no workers
    mixture = pretraining.make_mixture(cfg, tokenizer, sources, sizes, seed=0,
                                       process_index=0, process_count=1,
                                       read_threads=spec['read_threads'])
  else:
    mixture = pretraining.make_mixture(
        cfg_new if spec['pipeline'] == 'new' else cfg_today, tokenizer, sources, sizes, seed=0,
        process_index=0, process_count=1, read_threads=spec['read_threads'], workers=workers)
  me = os.getpid()
  t0 = time.perf_counter()
  next(mixture)
  out['first_s'] = time.perf_counter() - t0
  warm = 1  # at least `warmup` batches and `warmup_seconds`, so the prefetch buffers are in
  while warm < spec['warmup'] or time.perf_counter() - t0 < spec['warmup_seconds']:
    next(mixture)  # their steady state when the clock starts
    warm += 1
  out['warmup_batches'] = warm
  kids = _descendants(me)
  affinity = {}
  for pid in kids:  # worker processes inherit the child's pinning (checked, not assumed)
    try:
      affinity[pid] = sorted(os.sched_getaffinity(pid))
    except OSError:
      pass
  out['processes'] = 1 + len(kids)
  out['affinity_ok'] = all(a == out['cpus'] for a in affinity.values())
  out['worker_affinity'] = sorted({tuple(a) for a in affinity.values()})
  cpu0, _ = _tree_cpu(me)
  self0 = resource.getrusage(resource.RUSAGE_SELF)
  busy0, steal0 = _busy_seconds()
  t0 = time.perf_counter()
  steps = 0
  while True:
    b = next(mixture)
    steps += 1
    wall = time.perf_counter() - t0
    if wall >= spec['seconds']:
      break
  cpu1, per = _tree_cpu(me)
  self1 = resource.getrusage(resource.RUSAGE_SELF)
  busy1, steal1 = _busy_seconds()
  cpu = cpu1 - cpu0  # this process and every worker process, over the timed window
  main_cpu = (self1.ru_utime - self0.ru_utime) + (self1.ru_stime - self0.ru_stime)
  out['other_cpu'] = max(0.0, (busy1 - busy0) - cpu) / wall  # other processes, in cores
  out['steal'] = (steal1 - steal0) / wall
  shapes = {k: list(v['image'].shape) for k, v in b.items() if 'image' in v}
  skipped = mixture.skipped()
  if hasattr(mixture, 'close'):   # (the baseline revision's mixture has no workers to stop)
    mixture.close()  # stops the workers; their whole life's CPU then shows in RUSAGE_CHILDREN
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  out.update(steps=steps, wall_s=wall, cpu_s=cpu, main_cpu_s=main_cpu,
             examples=3 * batch * steps, images=2 * batch * steps, shapes=shapes,
             skipped=skipped, load_end=os.getloadavg()[0],
             children_cpu_total_s=children.ru_utime + children.ru_stime)
  return out


def _baseline_code(rev: str) -> str:
  """A folder holding beit3_jax as of git revision `rev` (today's rows run it), or '' (then
  they run this checkout's host reference, `PretrainInputs(views_on_device=False)`)."""
  if not rev:
    return ''
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  folder = tempfile.mkdtemp(prefix=f'baseline_{rev}_')
  try:
    archive = subprocess.run(['git', '-C', repo, 'archive', rev, 'beit3_jax'],
                             capture_output=True, check=True).stdout
    subprocess.run(['tar', '-x', '-C', folder], input=archive, check=True)
  except (OSError, subprocess.CalledProcessError) as e:
    print(f'Baseline revision {rev} not available ({e}); today\'s rows run this checkout\'s '
          'host reference (views_on_device=False) instead.', flush=True)
    return ''
  print(f"today's rows run beit3_jax as of git revision {rev} (from {folder})", flush=True)
  return folder


def run_child(spec: dict, timeout: float) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONUNBUFFERED='1')
  env.setdefault('JAX_PLATFORMS', 'cpu')  # the device half is timed on this CPU
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--_worker', json.dumps(spec)],
                        capture_output=True, text=True, timeout=timeout, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not lines:
    raise RuntimeError(f'worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n'
                       f'{proc.stderr[-3000:]}')
  return json.loads(lines[-1])


# --------------------------------------------------------------------------------- demand

# TPU VM hosts: (chips per host, vCPUs per host, Google Cloud machine type). Sources: the
# machine-type tables of cloud.google.com/tpu/docs/v4 (ct4p-hightpu-4t: 4 chips, 240 vCPU),
# /v5p (ct5p-hightpu-4t: 4 chips, 208 vCPU) and /v6e (ct6e-standard-8t: 8 chips, 180 vCPU, the
# single-host v6e-8; multi-host v6e slices use ct6e-standard-4t, 4 chips and 180 vCPU).
HOSTS = {'v4': (4, 240, 'ct4p-hightpu-4t'), 'v5p': (4, 208, 'ct5p-hightpu-4t'),
         'v6e': (8, 180, 'ct6e-standard-8t')}
V6E_MULTI_HOST = (4, 180, 'ct6e-standard-4t')
# A recipe made for more chips than one host holds (the pretraining recipes: 64-256 chips) runs
# on a multi-host v6e slice, 4 chips a host; a single-host recipe (fine-tuning, the tokenizer:
# 4-8 chips) on the single-host v6e-8, 8 chips a host (the most chips per vCPU).
SINGLE_HOST_MAX_CHIPS = 8
RECIPES = ('pretrain/base', 'pretrain/large', 'pretrain/giant', 'pretrain/tokenizer_base',
           'finetune/vqa_base', 'finetune/vqa_large', 'finetune/classification_base',
           'finetune/classification_large', 'finetune/nlvr2_base', 'finetune/nlvr2_large',
           'finetune/retrieval_base', 'finetune/retrieval_large', 'finetune/captioning_base',
           'finetune/captioning_large')
# The planner's roofline step time (s) of a recipe as shipped on a slice: docs/performance.md
# "Plans for TPU slices" (planned 2026-12-07, libtpu 0.0.42.1). A lower bound on the step, so
# the demand it gives is an upper bound.
PLANNED_STEP_S = {
    ('pretrain/base', 'v5p-128'): 0.071, ('pretrain/large', 'v5p-256'): 0.108,
    ('pretrain/giant', 'v5p-512'): 0.183, ('pretrain/giant', 'v4-512'): 0.364,
    ('pretrain/tokenizer_base', 'v5p-8'): 0.090,
    ('finetune/vqa_base', 'v5p-8'): 0.120, ('finetune/vqa_large', 'v5p-8'): 0.324,
    ('finetune/vqa_large', 'v4-8'): 0.816,
    ('finetune/classification_base', 'v5p-8'): 0.094,
    ('finetune/classification_large', 'v5p-8'): 0.320,
    ('finetune/nlvr2_base', 'v5p-8'): 0.093, ('finetune/nlvr2_large', 'v5p-8'): 0.287,
    ('finetune/retrieval_base', 'v5p-8'): 1.823, ('finetune/retrieval_large', 'v5p-16'): 2.425,
    ('finetune/captioning_base', 'v5p-8'): 0.235, ('finetune/captioning_large', 'v5p-8'): 0.620,
}
IMAGES_PER_EXAMPLE = {'nlvr2': 2}   # fine-tuning tasks; the others have one image an example
NO_TEXT = ('classification',)       # fine-tuning tasks without a text per example


def recipe_facts(names=RECIPES) -> list[dict]:
  """Per recipe: its job, batch, analytic training FLOPs per example (the job's own count,
  `beit3_jax.models.flops`, from `plan_job` on a one-CPU mesh), image rows, and the host view
  it makes (size, crop scale)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if repo not in sys.path:
    sys.path.insert(0, repo)
  import importlib
  import logging
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # FLOP counts only; no accelerator wanted
  import jax
  from beit3_jax import sharding as sharding_lib
  from beit3_jax.planning import planner
  logging.getLogger().setLevel(logging.ERROR)  # VQA's missing answer vocabulary: irrelevant
  mesh = sharding_lib.make_mesh((1, 1, 1), jax.devices('cpu')[:1])
  out = []
  for name in names:
    config = importlib.import_module('configs.' + name.replace('/', '.')).get_config()
    config.mesh_shape = (1, 1, 1)
    job = planner.PLANNABLE[config.job].plan_job(config, mesh)
    f = {'recipe': name, 'job': config.job, 'slice': config.get('tpu_slice', ''),
         'examples_per_step': int(job.examples_per_step),
         'flops_per_example': float(job.flops_per_step) / int(job.examples_per_step)}
    if config.job == 'pretrain':
      b = {k: int(v) for k, v in config.batch_size.items()}
      f.update(images_per_example=(b.get('image', 0) + b.get('pair', 0)) / sum(b.values()),
               view=None, text_per_example=None, image_size=int(config.model.img_size))
    elif config.job == 'tokenizer':
      f.update(images_per_example=1.0, text_per_example=0.0,
               image_size=int(config.tokenizer.input_size),
               view={'kind': 'tokenizer', 'size': int(config.tokenizer.input_size),
                     'scale': [float(x) for x in config.data.crop_scale]})
    else:
      f.update(images_per_example=float(IMAGES_PER_EXAMPLE.get(config.task, 1)),
               text_per_example=0.0 if config.task in NO_TEXT else 1.0,
               image_size=int(config.model.img_size),
               view={'kind': 'finetune', 'size': int(config.model.img_size),
                     'scale': [float(x) for x in config.data.crop_scale]})
    out.append(f)
  return out


def _view_key(view: dict) -> str:
  return f'view/{view["kind"]}/{view["size"]}/{view["scale"][0]}'


def demand_table(facts: list[dict], cpu_s_per_example: float, costs: dict | None,
                 derate: float) -> list[dict]:
  """Prints and returns, per recipe and TPU generation, the examples/s a host must supply and
  the share of its vCPUs that takes.

  Args:
    facts: from `recipe_facts`.
    cpu_s_per_example: host CPU seconds per pretraining example (1:1:1 mixture), measured.
    costs: the one-thread cost table (fine-tuning views, ms per image), or None.
    derate: speed of one TPU-host vCPU in cores of this machine (0.5).
  """
  from beit3_jax.chips import CHIPS
  from beit3_jax.planning import slices
  overhead, text_ms = 1.0, 0.0
  if costs:  # the pipeline's CPU per example over the plain loop's, for the new transforms
    loop_ms = sum(costs[f'new/{s}']['read_ms'] + costs[f'new/{s}']['transform_ms']
                  for s in ('image', 'text', 'pair')) / 3
    overhead = 1e3 * cpu_s_per_example / loop_ms
    text_ms = costs['new/text']['read_ms'] + costs['new/text']['transform_ms']
  print('\n== What a TPU host must supply, per shipped recipe ==')
  print('demand (ex/s per host) = examples per step / planned step s / hosts of the slice, where '
        'the planner has the recipe on that generation (roofline bound: demand is an upper '
        'bound); else chips per host x 0.5 x peak FLOP/s / training FLOPs per example '
        '(50% MFU)')
  print(f'share of the host = demand x host CPU s per example / {derate} (a TPU-host vCPU = '
        f'{derate} core of this machine) / vCPUs per host')
  print(f'host CPU per example: pretraining = the measured mixture, {1e3 * cpu_s_per_example:.2f} '
        'ms (image + text + pair rows 1:1:1, worker processes included); tokenizer and '
        'fine-tuning = (images x view ms + texts x text ms) x pipeline overhead '
        f'{overhead:.2f} (the mixture\'s CPU per example over its plain one-thread loop), '
        f'text {text_ms:.2f} ms')
  print('hosts: ' + '; '.join(f'{g} {c} chips, {v} vCPU ({m})' for g, (c, v, m) in HOSTS.items())
        + f'; recipes made for more than {SINGLE_HOST_MAX_CHIPS} chips (pretraining) run on '
        f'multi-host v6e slices: {V6E_MULTI_HOST[0]} chips, {V6E_MULTI_HOST[1]} vCPU a host '
        f'({V6E_MULTI_HOST[2]})')
  head = (f'{"recipe":<30} {"gen":<4} {"chips":>5} {"step from":<22} {"GF/ex":>7} '
          f'{"ex/s/host":>9} {"img/s/host":>10} {"ms/ex":>6} {"vCPU":>6} {"% host":>7}')
  print(head)
  print('-' * len(head))
  rows = []
  for f in facts:
    if f['job'] == 'pretrain' or not costs:
      ms = 1e3 * cpu_s_per_example
      how = 'measured mixture'
    else:
      view = costs.get(_view_key(f['view']))
      ms = (f['images_per_example'] * view['ms'] + f['text_per_example'] * text_ms) * overhead
      how = f'{f["images_per_example"]:g} x {view["ms"]:.2f} ms view at {f["image_size"]} px'
    multi_host = slices.parse(f['slice']).chips > SINGLE_HOST_MAX_CHIPS
    for gen, (chips_per_host, vcpus, machine) in HOSTS.items():
      if gen == 'v6e' and multi_host:
        chips_per_host, vcpus, machine = V6E_MULTI_HOST
      planned = [(s, t) for (r, s), t in PLANNED_STEP_S.items()
                 if r == f['recipe'] and slices.parse(s).generation == gen]
      mfu_demand = chips_per_host * 0.5 * CHIPS[gen].peak_flops / f['flops_per_example']
      if planned:
        name, step_s = planned[0]
        hosts = max(1.0, slices.parse(name).chips / chips_per_host)
        demand = f['examples_per_step'] / step_s / hosts
        source = f'plan {name} {1e3 * step_s:.0f} ms'
      else:
        demand, source = mfu_demand, '50% MFU'
      vcpu = demand * ms / 1e3 / derate
      row = {'recipe': f['recipe'], 'generation': gen, 'machine_type': machine,
             'chips_per_host': chips_per_host, 'host_vcpus': vcpus, 'step_from': source,
             'flops_per_example': f['flops_per_example'], 'demand_ex_per_s': demand,
             'demand_ex_per_s_at_50pct_mfu': mfu_demand,
             'demand_img_per_s': demand * f['images_per_example'],
             'cpu_ms_per_example': ms, 'cpu_from': how, 'vcpus_needed': vcpu,
             'host_fraction': vcpu / vcpus}
      rows.append(row)
      print(f'{f["recipe"]:<30} {gen:<4} {chips_per_host:>5} {source:<22} '
            f'{f["flops_per_example"] / 1e9:>7.1f} {demand:>9,.0f} '
            f'{row["demand_img_per_s"]:>10,.0f} {ms:>6.2f} {vcpu:>6.1f} '
            f'{100 * row["host_fraction"]:>6.1f}%')
  return rows


# -------------------------------------------------------------------------------------- main


def _parse_new_rows(text: str) -> list[tuple[int, int]]:
  """'1x1,2x2' -> [(workers, cores), ...]."""
  out = []
  for item in text.split(','):
    if item.strip():
      w, c = item.lower().split('x')
      out.append((int(w), int(c)))
  return out


def summarize(runs: dict, quiet_cpu: float) -> list[dict]:
  """Medians over the quiet runs of every row (all runs when none was quiet)."""
  rows = []
  for (case, pipeline, workers, cores, threads), rs in runs.items():
    quiet = [r for r in rs if r['other_cpu'] <= quiet_cpu] or rs
    ex_s = statistics.median(r['ex_s'] for r in quiet)
    img_s = ex_s * 2 / 3
    rows.append({
        'case': case, 'pipeline': pipeline, 'workers': workers, 'cores': cores,
        'read_threads': threads, 'ex_per_s': ex_s, 'img_per_s': img_s,
        'ex_per_s_per_core': ex_s / cores, 'img_per_s_per_core': img_s / cores,
        'cpu_s_per_example': statistics.median(r['cpu_s'] / r['examples'] for r in quiet),
        'cpu_s_per_image': statistics.median(r['cpu_s'] / r['images'] for r in quiet),
        'cpu_per_wall': statistics.median(r['cpu_s'] / r['wall_s'] for r in quiet),
        'main_cpu_share': statistics.median(r['main_cpu_s'] / max(r['cpu_s'], 1e-9)
                                            for r in quiet),
        'processes': rs[-1]['processes'], 'affinity_ok': all(r['affinity_ok'] for r in rs),
        'quiet_runs': len(quiet), 'runs': len(rs), 'ex_per_s_min': min(r['ex_s'] for r in rs),
        'ex_per_s_max': max(r['ex_s'] for r in rs),
        'others_max': max(r['other_cpu'] for r in quiet),
        'first_s': statistics.median(r['first_s'] for r in rs),
        'skipped': rs[-1]['skipped'], 'all_runs': rs})
  return rows


def case_summary(rows: list[dict], case: str) -> dict:
  """The scaling of the new pipeline (2 workers / 2 cores over 1 / 1) and its img/s per core
  at 2 workers / 2 cores over today's best at 2 cores."""
  get = lambda p, w, c: [r for r in rows if (r['case'], r['pipeline'], r['workers'],  # noqa
                                             r['cores']) == (case, p, w, c)]
  out = {}
  n11, n22 = get('new', 1, 1), get('new', 2, 2)
  today2 = get('today', 0, 2)
  if n11 and n22:
    out['scaling_new_2w2c_over_1w1c'] = n22[0]['ex_per_s'] / n11[0]['ex_per_s']
  if n22 and today2:
    best = max(today2, key=lambda r: r['ex_per_s'])
    out['new_2w2c_over_today_2c_img_per_s_per_core'] = (n22[0]['img_per_s_per_core']
                                                        / best['img_per_s_per_core'])
    out['today_2c_read_threads'] = best['read_threads']
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--cases', default='jpeg224',
                      help=f'comma-separated subset of {",".join(CASES)}')
  parser.add_argument('--today_cores', default='1,2',
                      help="core counts of today's pipeline (views on the host, no workers)")
  parser.add_argument('--baseline_rev', default=BASELINE_REV,
                      help="git revision whose pipeline today's rows run ('' = this "
                           "checkout's host reference, views_on_device=False)")
  parser.add_argument('--read_threads', default='1',
                      help="grain read threads per stream of today's rows (1 was the faster "
                           'in the earlier measurement; 1,2 runs both)')
  parser.add_argument('--new_rows', default='1x1,2x2',
                      help='WORKERSxCORES of the new pipeline (views on the device): W worker '
                           'processes, each making whole steps, pinned to the first CORES CPUs')
  parser.add_argument('--new_read_threads', type=int, default=0,
                      help='read threads in each worker of the new rows')
  parser.add_argument('--batch', type=int, default=128,
                      help='host batch of each of the 3 streams (128: pretrain/base on '
                           'v5p-128, 2048 per stream over 16 hosts)')
  parser.add_argument('--seconds', type=float, default=10.0, help='timed seconds per run')
  parser.add_argument('--warmup', type=int, default=2, help='untimed batches first')
  parser.add_argument('--warmup_seconds', type=float, default=3.0,
                      help='... and warm up for at least this long')
  parser.add_argument('--repeats', type=int, default=3,
                      help='runs of every row, in rotation; the table gives the median')
  parser.add_argument('--quiet_cpu', type=float, default=0.1,
                      help='runs where other processes used more cores than this are dropped '
                           '(unless all are)')
  parser.add_argument('--retries', type=int, default=1,
                      help='re-runs of a run that was busy (other processes > --quiet_cpu)')
  parser.add_argument('--wait_quiet', type=float, default=0.0,
                      help='before each run, wait up to this many seconds for a quiet 3 s '
                           '(for shared machines; 0: do not wait)')
  parser.add_argument('--transform_seconds', type=float, default=1.5,
                      help='seconds per stream of the one-thread cost table (0: skip it and '
                           'the fine-tuning view costs)')
  parser.add_argument('--view_seconds', type=float, default=1.0,
                      help='seconds per fine-tuning / tokenizer view size in that table')
  parser.add_argument('--device_seconds', type=float, default=2.0,
                      help='seconds of timed finish_images calls per case (0: skip)')
  parser.add_argument('--no_demand', action='store_true', help='skip the per-recipe table')
  parser.add_argument('--data_dir', default=None,
                      help='where to build the data (reused); default: a temporary folder')
  parser.add_argument('--num_train', type=int, default=256, help='synthetic-world images built')
  parser.add_argument('--num_text', type=int, default=2048, help='text-stream sentences built')
  parser.add_argument('--num_jpegs', type=int, default=128)
  parser.add_argument('--jpeg_sizes', default='500x375', help='WxH[,WxH...], used in turn')
  parser.add_argument('--num_sentences', type=int, default=2000, help='tokenizer training text')
  parser.add_argument('--vocab_size', type=int, default=500)
  parser.add_argument('--derate', type=float, default=0.5,
                      help='speed of a TPU-host vCPU relative to a core here (assumed: 0.5)')
  parser.add_argument('--json', default=None, help='also write all results to this file')
  parser.add_argument('--_worker', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args._worker:
    print(json.dumps(worker(json.loads(args._worker))))
    return 0

  args.cases = [c for c in args.cases.split(',') if c]
  unknown = set(args.cases) - set(CASES)
  if unknown:
    parser.error(f'unknown cases {sorted(unknown)}')
  available = sorted(os.sched_getaffinity(0))
  today_cores = [k for k in _csv_ints(args.today_cores) if k <= len(available)]
  new_rows = [(w, c) for w, c in _parse_new_rows(args.new_rows) if c <= len(available)]
  started = time.perf_counter()
  load0 = os.getloadavg()
  print(f'load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} '
        f'({len(available)} CPUs available)', flush=True)

  tmp = None
  if args.data_dir is None:
    tmp = tempfile.TemporaryDirectory(prefix='beit3_input_bench_')
    data_dir = tmp.name
  else:
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  specs = prepare_data(args, data_dir)
  facts = []
  if not args.no_demand:
    facts = recipe_facts()
  views = []
  for f in facts:
    if f['view'] and f['view'] not in views:
      views.append(f['view'])
  print(f'data ready in {time.perf_counter() - started:.1f} s\n', flush=True)

  child_timeout = 180 + 4 * args.seconds + args.warmup_seconds
  costs, device = {}, {}
  for i, (case, spec) in enumerate(specs.items()):
    if args.transform_seconds > 0:
      print(f'one-thread costs of {case} ...', flush=True)
      costs[case] = run_child({**spec, 'mode': 'transform', 'cpus': available[:1],
                               'seconds': args.transform_seconds,
                               'views': views if case == 'jpeg224' else [],
                               'view_seconds': args.view_seconds}, child_timeout)
    if args.device_seconds > 0:
      print(f'device half of {case} (jit finish_images on 1 CPU core) ...', flush=True)
      device[case] = run_child({**spec, 'mode': 'device', 'cpus': available[:1],
                                'seconds': args.device_seconds, 'device_batch': args.batch},
                               child_timeout)

  baseline_dir = _baseline_code(args.baseline_rev)
  configs = []
  for case in specs:
    for cores in today_cores:
      for threads in _csv_ints(args.read_threads):
        configs.append((case, 'today', 0, cores, threads))
    for workers, cores in new_rows:
      configs.append((case, 'new', workers, cores, args.new_read_threads))
  runs = {}
  total = args.repeats * len(configs)
  done = 0
  for rep in range(args.repeats):  # repeats rotate through all rows, so drifts hit every row
    for key in configs:
      case, pipeline, workers, cores, threads = key
      done += 1
      for attempt in range(1 + args.retries):
        if args.wait_quiet > 0:
          _wait_quiet(args.quiet_cpu, args.wait_quiet)
        r = run_child({**specs[case], 'mode': 'mixture', 'pipeline': pipeline,
                       'baseline_dir': baseline_dir,
                       'workers': workers, 'cpus': available[:cores], 'batch': args.batch,
                       'read_threads': threads, 'warmup': args.warmup,
                       'warmup_seconds': args.warmup_seconds, 'seconds': args.seconds},
                      child_timeout)
        r.update(ex_s=r['examples'] / r['wall_s'], img_s=r['images'] / r['wall_s'])
        runs.setdefault(key, []).append(r)
        busy = r['other_cpu'] > args.quiet_cpu
        print(f'  [{done}/{total}] {case} {pipeline} workers={workers} cores={cores} '
              f'thr={threads}: {r["ex_s"]:.1f} ex/s, {r["img_s"]:.1f} img/s, '
              f'{1e3 * r["cpu_s"] / r["examples"]:.2f} CPU ms/ex, cpu/wall '
              f'{r["cpu_s"] / r["wall_s"]:.2f}, {r["processes"]} proc'
              f'{"" if r["affinity_ok"] else " (AFFINITY NOT INHERITED)"}, others '
              f'{r["other_cpu"]:.2f}, steal {r["steal"]:.2f}, load {r["load_start"]:.2f}'
              f'{"  BUSY" if busy else ""}', flush=True)
        if not busy:
          break

  rows = summarize(runs, args.quiet_cpu)
  print(f'\n== Pretraining mixture throughput (batch {args.batch} per stream, 1:1:1; '
        f'{args.seconds:g} s a run after >= {args.warmup} warm-up batches and '
        f'>= {args.warmup_seconds:g} s; medians of the quiet runs of {args.repeats}) ==')
  head = (f'{"case":<9} {"pipeline":<8} {"wk":>2} {"cores":>5} {"thr":>3} {"ex/s":>7} '
          f'{"img/s":>7} {"ex/s/core":>9} {"img/s/core":>10} {"CPU ms/ex":>9} '
          f'{"CPU ms/img":>10} {"cpu/wall":>8} {"proc":>4} {"ex/s range":>13} {"quiet":>5} '
          f'{"others":>6}')
  summaries = {}
  for case in specs:
    print()
    print(head)
    print('-' * len(head))
    for r in (r for r in rows if r['case'] == case):
      print(f'{case:<9} {r["pipeline"]:<8} {r["workers"]:>2} {r["cores"]:>5} '
            f'{r["read_threads"]:>3} {r["ex_per_s"]:>7.1f} {r["img_per_s"]:>7.1f} '
            f'{r["ex_per_s_per_core"]:>9.1f} {r["img_per_s_per_core"]:>10.1f} '
            f'{1e3 * r["cpu_s_per_example"]:>9.2f} {1e3 * r["cpu_s_per_image"]:>10.2f} '
            f'{r["cpu_per_wall"]:>8.2f} {r["processes"]:>4} '
            f'{r["ex_per_s_min"]:>6.1f}-{r["ex_per_s_max"]:<6.1f} '
            f'{r["quiet_runs"]:>2}/{r["runs"]:<2} {r["others_max"]:>6.2f}')
    s = summaries[case] = case_summary(rows, case)
    if 'scaling_new_2w2c_over_1w1c' in s:
      print(f'{case}: new pipeline, 2 workers / 2 cores over 1 worker / 1 core: '
            f'x{s["scaling_new_2w2c_over_1w1c"]:.2f} ex/s')
    if 'new_2w2c_over_today_2c_img_per_s_per_core' in s:
      print(f'{case}: img/s per core, new at 2 workers / 2 cores over today at 2 cores: '
            f'x{s["new_2w2c_over_today_2c_img_per_s_per_core"]:.2f}')
    if case in device:
      d = device[case]
      print(f'{case}: device half (finish_images: jitter + normalise + {d["tokenizer_size"]} px '
            f'tokenizer view of {d["image_size"]} px images), jitted on 1 core of this CPU: '
            f'{d["ms_per_image"]:.3f} ms per image ({d["ms_per_batch"]:.1f} ms a batch of '
            f'{d["batch"]}; compile {d["compile_s"]:.1f} s). On the accelerator in training; '
            'an upper bound for reference, not host work.')
  print('\nCPU ms/ex = CPU time of the child and all its worker processes over the timed '
        'window (/proc/<pid>/stat) / examples; CPU ms/img = the same / image + pair rows; '
        'proc = processes (the row, its workers and the multiprocessing resource tracker)')
  if not all(r['affinity_ok'] for r in rows):
    print('WARNING: some worker processes did not run on the pinned cores')
  skipped = {r['case']: r['skipped'] for r in rows if any(r['skipped'].values())}
  if skipped:
    print(f'skipped examples: {skipped}')

  if costs:
    print('\n== One example, read + transformed in a plain loop on 1 core (ms) ==')
    print(f'{"case":<9} {"pipeline":<8} {"stream":<6} {"read":>6} {"transform":>9} {"total":>6}'
          f' {"n":>5}')
    for case, c in costs.items():
      for label in ('today', 'new'):
        for name in ('image', 'text', 'pair'):
          s = c[f'{label}/{name}']
          print(f'{case:<9} {label:<8} {name:<6} {s["read_ms"]:>6.2f} {s["transform_ms"]:>9.2f} '
                f'{s["read_ms"] + s["transform_ms"]:>6.2f} {s["n"]:>5}')
      view_rows = [v for k, v in c.items() if k.startswith('view/')]
      for v in view_rows:
        print(f'{case:<9} {v["kind"]:<8} view {v["size"]} px, crop {v["scale"][0]}-1: '
              f'{v["ms"]:.2f} ms per image (decode + crop + resize + flip), n {v["n"]}')

  demand = []
  ref = [r for r in rows if (r['case'], r['pipeline'], r['workers'], r['cores'])
         == ('jpeg224', 'new', 2, 2)]
  if facts and ref:
    demand = demand_table(facts, ref[0]['cpu_s_per_example'], costs.get('jpeg224'),
                          args.derate)
    base = [d for d in demand if d['recipe'] == 'pretrain/base' and d['generation'] == 'v5p']
    if base:
      print(f'\nacceptance: base pretraining on v5p needs {100 * base[0]["host_fraction"]:.1f}% '
            f'of the host ({base[0]["vcpus_needed"]:.1f} of {base[0]["host_vcpus"]} vCPU; '
            f'target < 25%)')
  elif facts:
    print('\n(no per-recipe table: it needs the jpeg224 new-pipeline row at 2 workers / 2 cores)')

  load1 = os.getloadavg()
  print(f'\nload average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; '
        f'total {time.perf_counter() - started:.0f} s')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': {k: v for k, v in vars(args).items() if k != '_worker'},
                 'cpu': cpu_name(), 'load_start': load0, 'load_end': load1,
                 'rows': [{k: v for k, v in r.items()} for r in rows],
                 'summaries': summaries, 'device': device, 'costs': costs,
                 'jpeg': specs.get('jpeg224', {}).get('extra'), 'recipes': facts,
                 'demand': demand}, f, indent=1, default=str)
  if tmp is not None:
    tmp.cleanup()
  return 0


if __name__ == '__main__':
  sys.exit(main())
