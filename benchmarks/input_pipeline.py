"""Throughput of the BEiT-3 pretraining input pipeline per CPU core, and the cores a TPU host needs.

What it measures

  The real pretraining mixture (`beit3_jax.data.pretraining.make_mixture`: the 'image', 'text'
  and 'pair' streams, each a `pipeline.Stream` over a random-access TFDS source, shuffled and
  transformed by grain with `read_threads` threads, then batched) is drawn batch after batch
  and timed. Batch sizes are image:text:pair = 1:1:1 (`--batch`, default 32 each; the paper
  uses 2048 each). One "example" is one row of any stream; "images" are the rows of the image
  and pair streams (2/3 of the examples).

  Per example, exactly what training gets (see `pretraining.py`): the image streams read the
  image (a PNG decoded by TFDS for the built-in data, JPEG bytes decoded by PIL for the JPEG
  case), draw a random resized crop (scale 0.08-1), resize it bicubic to `image_size` and
  lanczos to `tokenizer_image_size`, flip both, apply colour jitter 0.4 and (image stream) a
  block-wise 40% patch mask; outputs stay uint8 (normalisation happens on the device). The
  text streams tokenize with sentencepiece into `text_len` ids and mask 15% (text) or 50%
  (pair) of the tokens.

  Cases (`--cases`):
    world64  - the built-in synthetic world at the demo size: PretrainInputs(image_size=64,
               tokenizer_image_size=64, patch_size=16, text_len=32); image and pair streams
               read `beit3_synthetic_world/64px_<n>_0_0`, the text stream
               `beit3_synthetic_world_text/default_<m>_0_0`.
    world224 - the same at 224 px: PretrainInputs(224, 224, 16, text_len=64).
    jpeg224  - realistic images: `--num_jpegs` synthetic photo-like JPEGs (gradients, octave
               noise, shapes, sensor noise; q90, 4:2:0; `--jpeg_sizes`, default 500x375) with
               one caption each, written to a JSONL and built with
               `local_files.build_image_text`; they feed the image and pair streams (JPEG
               bytes decoded per example), the synthetic sentences the text stream. This is
               the case to compare with an earlier measurement of ours on an AMD Zen 5
               machine (which decoded ~0.28 MP COCO-like JPEGs of 97 KB mean).
  The tokenizer is a unigram sentencepiece model trained on `--num_sentences`
  `synthetic_world.text_corpus_sentence` sentences (`--vocab_size` 500, or the largest size
  below it that trains).

  Each (case, cores, read_threads) row runs in its own child process that first pins itself
  with `os.sched_setaffinity` to the first `cores` CPUs (so nothing leaks to the next run),
  builds the mixture, draws `--warmup` batches untimed and keeps warming up for
  `--warmup_seconds` (each stream prefetches up to 4 batches ahead; timed windows that start
  before the buffers settle read high: 2 s windows gave up to +30%), then draws batches for
  `--seconds` s. Every row is run `--repeats` times, the repeats rotating through all rows.
  Columns: ex/s = examples of all three streams per second, the median over the quiet runs;
  img/s = image + pair rows per second (2/3 of ex/s); /core = divided by the pinned cores;
  ex/s range = min-max over all runs; quiet = runs kept / runs (a run is dropped when other
  processes used more than `--quiet_cpu` cores meanwhile, unless all were busy; a busy run is
  re-run up to `--retries` times, and `--wait_quiet` waits for a quiet machine before each
  run); cpu/wall =
  the child's CPU time over the timed wall time (1.0 per fully used core); others = the most
  CPU other processes used during a kept run, in cores (from /proc/stat); first s = the first
  warm-up batch (start-up of the thread pools). Each run's load average and steal time are
  printed as it finishes (the load average lags and counts the benchmark's own threads, so
  `others` is the better check). A second table gives the cost of one example of each stream
  read and transformed in a plain loop on one thread (no grain, no batching).

  Finally, the v4-8 arithmetic: training FLOPs of one BEiT-3 base example of each stream
  (6 x matmul params per token x tokens + attention + the MLM / MIM heads on the masked
  positions), their 1:1:1 mean, the examples/s a v4-8 host (4 chips x 275 TFLOP/s bf16) must
  supply at 50% MFU, and the cores that takes at the measured 224 px per-core rates.

Run (from the repository root). With the defaults (3 cases x 2 core counts x 2 thread counts
x 2 repeats of 10 s, plus ~20 s of data building) it takes about 6.5 minutes on a quiet 2-core
machine; data go to a temporary folder unless `--data_dir` is given (builds there are reused):

    .venv/bin/python benchmarks/input_pipeline.py
    .venv/bin/python benchmarks/input_pipeline.py --wait_quiet 300 --retries 2   # shared machine
    .venv/bin/python benchmarks/input_pipeline.py --cases jpeg224 --repeats 1 --seconds 5  # quick
    .venv/bin/python benchmarks/input_pipeline.py --cases jpeg224 \\
        --jpeg_sizes 500x375,640x427,480x640,640x480   # the Zen 5 run's ~0.28 MP mix

Other processes on the cores change the numbers a lot: the load average is printed at the start
and end, each run prints the CPU other processes used meanwhile (`others`) and is marked BUSY
above `--quiet_cpu`; busy runs are re-run (`--retries`) and left out of the medians.

Measured 2026-11-28 on a 2-core Intel Xeon KVM guest (family 6 model 207, AVX-512), Pillow 13.0
(libjpeg-turbo), grain 0.2.18, sentencepiece 0.2.3 (107-piece unigram model: 2000 synthetic
sentences cannot fill 500), JPEGs 500x375, 64.5 KB mean; `--wait_quiet 300 --retries 2`,
medians of 2 quiet runs of 10 s (ex/s = all three streams; img/s = image + pair rows):

    case      cores thr   ex/s  img/s  ex/s/core  img/s/core  cpu/wall
    world64       1   1  647.7  431.8      647.7       431.8      1.00
    world64       2   1  509.2  339.4      254.6       169.7      1.19
    world224      1   2  187.4  124.9      187.4       124.9      1.00
    world224      2   1  267.3  178.2      133.6        89.1      1.70
    jpeg224       1   1  159.8  106.5      159.8       106.5      1.00
    jpeg224       2   1  252.9  168.6      126.4        84.3      1.80
    (the faster read_threads of each pair; 2 threads helped only once, within the noise;
    all rows in benchmarks/README.md)

  v4-8 arithmetic: 97.68 GFLOP per example (1:1:1 mean of image 107.63, text 35.72, pair
  149.69), so 50% MFU of 4 x 275 TFLOP/s needs 5,631 examples/s (3,754 img/s). At jpeg224's
  126.4 examples/s per core (2 cores / 2) that is 44.5 cores of this machine, 89 TPU-host vCPUs
  with an assumed 0.5 derating (a TPU-host vCPU, an SMT thread of an older EPYC, counted as half
  a core; 37% of a 240-vCPU v4 host) -- 2.2x the ~20 cores that an earlier measurement of ours
  on an AMD Zen 5 machine gave (a demand of 3,533 img/s at 176 img/s/core). Run-to-run spread of
  one row: up to +-15%.
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


def worker(spec: dict) -> dict:
  """Runs in a child: pin, build the mixture, warm up, time. Returns the measurements."""
  os.sched_setaffinity(0, set(spec['cpus']))  # before any thread pool exists
  import resource
  import numpy as np
  import tensorflow_datasets as tfds
  from beit3_jax.data import pretraining
  from beit3_jax.data import text as text_lib

  load_start = os.getloadavg()[0]
  cfg = pretraining.PretrainInputs(**spec['inputs'])
  tokenizer = text_lib.TextTokenizer.from_file(spec['spm'])
  sources = {k: tfds.data_source(v['name'], split='train', data_dir=v['data_dir'],
                                 download=False)
             for k, v in spec['sources'].items()}
  out = {'cpus': sorted(os.sched_getaffinity(0)), 'load_start': load_start}

  if spec['mode'] == 'transform':  # one thread, no grain: read, then transform
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
      out[name] = {'n': n - 2, 'read_ms': 1e3 * read_s / (n - 2),
                   'transform_ms': 1e3 * tf_s / (n - 2)}
    return out

  batch = spec['batch']
  sizes = {'image': batch, 'text': batch, 'pair': batch}
  mixture = pretraining.make_mixture(cfg, tokenizer, sources, sizes, seed=0, process_index=0,
                                     process_count=1, read_threads=spec['read_threads'])
  t0 = time.perf_counter()
  next(mixture)
  out['first_s'] = time.perf_counter() - t0
  warm = 1  # at least `warmup` batches and `warmup_seconds`, so the prefetch buffers (4 batches
  while warm < spec['warmup'] or time.perf_counter() - t0 < spec['warmup_seconds']:
    next(mixture)  # a stream) are in their steady state when the clock starts
    warm += 1
  out['warmup_batches'] = warm
  usage0 = resource.getrusage(resource.RUSAGE_SELF)
  busy0, steal0 = _busy_seconds()
  t0 = time.perf_counter()
  steps = 0
  while True:
    b = next(mixture)
    steps += 1
    wall = time.perf_counter() - t0
    if wall >= spec['seconds']:
      break
  usage1 = resource.getrusage(resource.RUSAGE_SELF)
  busy1, steal1 = _busy_seconds()
  cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
  out['other_cpu'] = max(0.0, (busy1 - busy0) - cpu) / wall  # other processes, in cores
  out['steal'] = (steal1 - steal0) / wall
  shapes = {k: tuple(v['image'].shape) for k, v in b.items() if 'image' in v}
  out.update(steps=steps, wall_s=wall, cpu_s=cpu, examples=3 * batch * steps,
             images=2 * batch * steps, shapes={k: list(v) for k, v in shapes.items()},
             skipped=mixture.skipped(), load_end=os.getloadavg()[0])
  return out


def run_child(spec: dict, timeout: float) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONUNBUFFERED='1')
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--_worker', json.dumps(spec)],
                        capture_output=True, text=True, timeout=timeout, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not lines:
    raise RuntimeError(f'worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n'
                       f'{proc.stderr[-3000:]}')
  return json.loads(lines[-1])


# ---------------------------------------------------------------------------------- FLOPs


def v4_8_arithmetic(per_core: dict, derate: float, host_vcpus: int) -> dict:
  """Prints and returns the FLOPs-per-example and cores-needed arithmetic for base on a v4-8."""
  from beit3_jax.data import masking
  D, F, L = 768, 3072, 12          # base
  V_TEXT, V_IMAGE = 64010, 8192    # MLM vocabulary, VQ-KD codebook
  N = L * (4 * D * D + 2 * D * F)  # matmul params a token uses (one expert per Multiway module)
  patches, text_len = (224 // 16) ** 2, 64
  mim = masking.BlockMaskConfig().num_masked(patches)           # 78 of 196
  cand = text_len - 2                                            # a full-length text: 62 pieces
  mlm_text = masking.num_text_masked(cand, 0.15)                 # 9
  mlm_pair = masking.num_text_masked(cand, 0.5)                  # 31
  streams = {'image': (1 + patches, 0, mim), 'text': (text_len, mlm_text, 0),
             'pair': (1 + patches + text_len, mlm_pair, 0)}
  print('\n== Cores to feed BEiT-3 base on a TPU v4-8 host at 50% MFU ==')
  print(f'base: D={D}, F={F}, L={L}; matmul params per token N = L(4D^2 + 2DF) = {N:,} '
        f'({N / 1e6:.1f}M)')
  print(f'training FLOPs per token = 6N + 12*L*S*D (attention: QK^T and AV, x3 for fwd+bwd); '
        f'6N = {6 * N / 1e6:.1f} MFLOP')
  print(f'heads: MLM 6*D*{V_TEXT} = {6 * D * V_TEXT / 1e6:.1f} MFLOP per masked text token; '
        f'MIM 6*D*{V_IMAGE} = {6 * D * V_IMAGE / 1e6:.1f} MFLOP per masked patch')
  print(f'masked: image {mim}/{patches} patches (40% block-wise); text {mlm_text} and pair '
        f'{mlm_pair} of {cand} pieces (15% / 50% of a full {text_len}-token text)')
  print(f'{"stream":<7} {"S":>4} {"MFLOP/token":>12} {"backbone GF":>12} {"head GF":>8} '
        f'{"total GF":>9}')
  flops = {}
  for name, (S, n_mlm, n_mim) in streams.items():
    per_token = 6 * N + 12 * L * S * D
    backbone = per_token * S
    head = n_mlm * 6 * D * V_TEXT + n_mim * 6 * D * V_IMAGE
    flops[name] = backbone + head
    print(f'{name:<7} {S:>4} {per_token / 1e6:>12.1f} {backbone / 1e9:>12.2f} {head / 1e9:>8.2f} '
          f'{flops[name] / 1e9:>9.2f}')
  mean = sum(flops.values()) / 3
  supply = 0.5 * 4 * 275e12
  demand = supply / mean
  images = demand * 2 / 3
  print(f'1:1:1 mean: {mean / 1e9:.2f} GFLOP/example')
  print(f'v4-8 host: 4 chips x 275 TFLOP/s bf16 = {4 * 275e12 / 1e15:.2f} PFLOP/s; at 50% MFU '
        f'{supply / 1e12:.0f} TFLOP/s of model FLOPs')
  print(f'demand = {supply:.3g} / {mean:.4g} = {demand:,.0f} examples/s '
        f'({demand / 3:,.0f} per stream; images = 2/3 = {images:,.0f} img/s; anchor: 5.3k '
        f'samples/s, 3,533 img/s)')
  tok_view = 2 * 86e6 * 197  # a VQ-KD ViT-B forward per image (not model FLOPs, not counted)
  print(f'(not counted: the VQ-KD tokenizer forward, ~{tok_view / 1e9:.0f} GFLOP per image-stream '
        f'example; counting it would lower the demand by '
        f'{100 * (1 - mean / (mean + tok_view / 3)):.0f}%)')
  result = {'flops': flops, 'mean_flops': mean, 'demand_examples_s': demand,
            'demand_images_s': images, 'cores': {}}
  if per_core:
    print(f'cores = demand / measured examples/s per core (224 px rows); x{1 / derate:.0f} for a '
          f'TPU-host vCPU (SMT thread of an older EPYC, assumed derating {derate}); '
          f'v4 host = {host_vcpus} vCPU')
    print(f'{"per-core rate used":<40} {"ex/s/core":>9} {"img/s/core":>10} {"cores":>6} '
          f'{"vCPU derated":>12} {"% of host":>9}')
    for label, rate in per_core.items():
      cores = demand / rate
      vcpus = cores / derate
      result['cores'][label] = {'ex_per_core': rate, 'cores': cores, 'vcpus': vcpus}
      print(f'{label:<40} {rate:>9.1f} {rate * 2 / 3:>10.1f} {cores:>6.1f} {vcpus:>12.1f} '
            f'{100 * vcpus / host_vcpus:>8.1f}%')
    print('earlier AMD Zen 5 anchor: 3,533 img/s / 176 img/s/core = ~20 cores (40 vCPU '
          'derated, 17% of the host) for the reference-faithful transform with grain w2')
  return result


# -------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--cases', default=','.join(CASES),
                      help=f'comma-separated subset of {",".join(CASES)}')
  parser.add_argument('--cores', default='1,2', help='core counts to pin to (first k CPUs)')
  parser.add_argument('--read_threads', default='1,2', help='grain read threads per stream')
  parser.add_argument('--batch', type=int, default=32, help='batch of each of the 3 streams')
  parser.add_argument('--seconds', type=float, default=10.0, help='timed seconds per row')
  parser.add_argument('--warmup', type=int, default=2, help='untimed batches first')
  parser.add_argument('--warmup_seconds', type=float, default=2.0,
                      help='... and warm up for at least this long')
  parser.add_argument('--repeats', type=int, default=2,
                      help='runs of every row, in rotation; the table gives the median')
  parser.add_argument('--quiet_cpu', type=float, default=0.1,
                      help='runs where other processes used more cores than this are dropped '
                           '(unless all are)')
  parser.add_argument('--retries', type=int, default=1,
                      help='re-runs of a run that was busy (other processes > --quiet_cpu)')
  parser.add_argument('--wait_quiet', type=float, default=0.0,
                      help='before each run, wait up to this many seconds for a quiet 3 s '
                           '(for shared machines; 0: do not wait)')
  parser.add_argument('--transform_seconds', type=float, default=2.0,
                      help='seconds per stream of the one-thread cost table (0: skip it)')
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
  parser.add_argument('--host_vcpus', type=int, default=240, help='vCPUs of a v4 TPU host')
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
  core_counts = [k for k in _csv_ints(args.cores) if k <= len(available)]
  thread_counts = _csv_ints(args.read_threads)
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
  print(f'data ready in {time.perf_counter() - started:.1f} s\n', flush=True)

  costs, runs = {}, {}
  child_timeout = 120 + 4 * args.seconds + args.warmup_seconds
  configs = [(case, cores, threads) for case in specs for cores in core_counts
             for threads in thread_counts]
  for case, spec in specs.items():
    if args.transform_seconds > 0:
      costs[case] = run_child({**spec, 'mode': 'transform', 'cpus': available[:1],
                               'seconds': args.transform_seconds}, child_timeout)
  for rep in range(args.repeats):  # repeats rotate through all rows, so drifts hit every row
    for case, cores, threads in configs:
      for attempt in range(1 + args.retries):
        if args.wait_quiet > 0:
          _wait_quiet(args.quiet_cpu, args.wait_quiet)
        r = run_child({**specs[case], 'mode': 'mixture', 'cpus': available[:cores],
                       'batch': args.batch, 'read_threads': threads, 'warmup': args.warmup,
                       'warmup_seconds': args.warmup_seconds, 'seconds': args.seconds},
                      child_timeout)
        r.update(ex_s=r['examples'] / r['wall_s'], img_s=r['images'] / r['wall_s'])
        runs.setdefault((case, cores, threads), []).append(r)
        busy = r['other_cpu'] > args.quiet_cpu
        print(f'  [{rep + 1}/{args.repeats}] {case} cores={cores} read_threads={threads}: '
              f'{r["ex_s"]:.1f} ex/s, {r["img_s"]:.1f} img/s, cpu/wall '
              f'{r["cpu_s"] / r["wall_s"]:.2f}, others {r["other_cpu"]:.2f}, steal '
              f'{r["steal"]:.2f}, load {r["load_start"]:.2f}{"  BUSY" if busy else ""}',
              flush=True)
        if not busy:
          break

  rows = []
  for (case, cores, threads), rs in runs.items():
    quiet = [r for r in rs if r['other_cpu'] <= args.quiet_cpu] or rs
    ex_s = statistics.median(r['ex_s'] for r in quiet)
    rows.append({'case': case, 'cores': cores, 'read_threads': threads, 'ex_s': ex_s,
                 'img_s': ex_s * 2 / 3, 'n': len(quiet), 'of': len(rs),
                 'lo': min(r['ex_s'] for r in rs), 'hi': max(r['ex_s'] for r in rs),
                 'cpu_wall': statistics.median(r['cpu_s'] / r['wall_s'] for r in quiet),
                 'others': max(r['other_cpu'] for r in quiet),
                 'first_s': statistics.median(r['first_s'] for r in rs),
                 'skipped': rs[-1]['skipped'], 'runs': rs})

  print(f'\n== Pretraining mixture throughput (batch {args.batch} per stream, 1:1:1; '
        f'{args.seconds:g} s a run after >= {args.warmup} warm-up batches and '
        f'>= {args.warmup_seconds:g} s; median of the quiet runs of {args.repeats}) ==')
  head = (f'{"case":<9} {"cores":>5} {"thr":>3} {"ex/s":>7} {"img/s":>7} {"ex/s/core":>9} '
          f'{"img/s/core":>10} {"ex/s range":>13} {"quiet":>5} {"cpu/wall":>8} {"others":>6} '
          f'{"first s":>7}')
  print(head)
  print('-' * len(head))
  for r in rows:
    print(f'{r["case"]:<9} {r["cores"]:>5} {r["read_threads"]:>3} {r["ex_s"]:>7.1f} '
          f'{r["img_s"]:>7.1f} {r["ex_s"] / r["cores"]:>9.1f} {r["img_s"] / r["cores"]:>10.1f} '
          f'{r["lo"]:>6.1f}-{r["hi"]:<6.1f} {r["n"]:>2}/{r["of"]:<2} {r["cpu_wall"]:>8.2f} '
          f'{r["others"]:>6.2f} {r["first_s"]:>7.2f}')
  skipped = {r['case']: r['skipped'] for r in rows if any(r['skipped'].values())}
  if skipped:
    print(f'skipped examples: {skipped}')

  if costs:
    print('\n== One example, read + transformed in a plain loop on 1 core (ms) ==')
    print(f'{"case":<9} {"stream":<6} {"read":>6} {"transform":>9} {"total":>6} {"n":>5}')
    for case, c in costs.items():
      for name in ('image', 'text', 'pair'):
        s = c[name]
        print(f'{case:<9} {name:<6} {s["read_ms"]:>6.2f} {s["transform_ms"]:>9.2f} '
              f'{s["read_ms"] + s["transform_ms"]:>6.2f} {s["n"]:>5}')
      total = sum(c[n]['read_ms'] + c[n]['transform_ms'] for n in ('image', 'text', 'pair'))
      print(f'{case:<9} {"1:1:1":<6} -> {1e3 * 3 / total:.0f} ex/s/core without grain or batching')

  per_core = {}
  for case in ('jpeg224', 'world224'):
    case_rows = [r for r in rows if r['case'] == case]
    for cores in sorted({r['cores'] for r in case_rows}):
      best = max((r for r in case_rows if r['cores'] == cores), key=lambda r: r['ex_s'])
      label = f'{case}, {cores} core{"s" * (cores > 1)}, thr {best["read_threads"]}' + \
              (' (2c/2)' if cores == 2 else '')
      per_core[label] = best['ex_s'] / cores
  arithmetic = v4_8_arithmetic(per_core, args.derate, args.host_vcpus)

  load1 = os.getloadavg()
  print(f'\nload average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; '
        f'total {time.perf_counter() - started:.0f} s')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': {k: v for k, v in vars(args).items() if k != '_worker'},
                 'load_start': load0, 'load_end': load1, 'rows': rows, 'costs': costs,
                 'jpeg': specs.get('jpeg224', {}).get('extra'), 'arithmetic': arithmetic},
                f, indent=1, default=str)
  if tmp is not None:
    tmp.cleanup()
  return 0


if __name__ == '__main__':
  sys.exit(main())
