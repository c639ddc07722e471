"""The plans of the shipped recipes on their TPU slices: the table in docs/performance.md.

    .venv/bin/python benchmarks/plan_table.py [--out plans.json] [--only giant]

runs `python -m beit3_jax.plan --json` for every row of `ROWS`, one at a time (each in its own
process: a plan can take minutes and over 10 GB of host memory), prints each plan as it
finishes, then the Markdown table, and writes every plan to --out as JSON. Needs libtpu (the
`test` or `tpu` extra); no TPU. Compile times are measured with the compilation cache off.

Columns: peak / HBM = the compiled step's peak bytes per chip against the chip's HBM; compile s
= XLA's TPU compile of the step (lowering not counted); HLO TFLOP = FLOPs per chip per step
counted by XLA; step >= = the roofline lower bound max(FLOPs / peak, bytes / HBM bandwidth);
MFU <= = the analytic model FLOPs over that bound.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (row name, config, slice, slices, overrides)
ROWS = (
    ('pretrain base', 'configs/pretrain/base.py', 'v5p-128', 1, ()),
    ('pretrain base, depth 24', 'configs/pretrain/base.py', 'v5p-128', 1,
     ('--config.model.depth=24',)),
    ('pretrain base, loop layout', 'configs/pretrain/base.py', 'v5p-128', 1,
     ('--config.model.scan_layers=False',)),
    ('pretrain base, depth 24, loop layout', 'configs/pretrain/base.py', 'v5p-128', 1,
     ('--config.model.depth=24', '--config.model.scan_layers=False')),
    ('pretrain large', 'configs/pretrain/large.py', 'v5p-256', 1, ()),
    ('pretrain giant', 'configs/pretrain/giant.py', 'v5p-512', 1, ()),
    ('pretrain giant', 'configs/pretrain/giant.py', 'v4-512', 1, ()),
    ('pretrain giant, 2 slices', 'configs/pretrain/giant.py', 'v5p-512', 2, ()),
    ('pretrain giant, no remat', 'configs/pretrain/giant.py', 'v5p-512', 1,
     ('--config.model.remat=False',)),
    ('VQA base 480 px', 'configs/finetune/vqa_base.py', 'v5p-8', 1, ()),
    ('VQA base 480 px', 'configs/finetune/vqa_base.py', 'v4-8', 1, ()),
    ('VQA large 480 px', 'configs/finetune/vqa_large.py', 'v5p-8', 1, ()),
    ('VQA large 480 px', 'configs/finetune/vqa_large.py', 'v4-8', 1, ()),
    ('VQA large 480 px, splash attention', 'configs/finetune/vqa_large.py', 'v4-8', 1,
     ('--config.model.attention=splash',)),
    # VQA base is made for v5p-8; on v4-8's 32 GiB it needs remat (large has it already).
    ('VQA base 480 px, full remat', 'configs/finetune/vqa_base.py', 'v4-8', 1,
     ('--config.model.remat=True',)),
    ('classification base', 'configs/finetune/classification_base.py', 'v5p-8', 1, ()),
    ('classification large', 'configs/finetune/classification_large.py', 'v5p-8', 1, ()),
    ('NLVR2 base', 'configs/finetune/nlvr2_base.py', 'v5p-8', 1, ()),
    ('NLVR2 large', 'configs/finetune/nlvr2_large.py', 'v5p-8', 1, ()),
    ('retrieval base 384 px', 'configs/finetune/retrieval_base.py', 'v5p-8', 1, ()),
    # Retrieval large is made for v5p-16: its batch of 3072 does not fit v5p-8.
    ('retrieval large 384 px', 'configs/finetune/retrieval_large.py', 'v5p-8', 1, ()),
    ('retrieval large 384 px', 'configs/finetune/retrieval_large.py', 'v5p-16', 1, ()),
    ('captioning base 480 px', 'configs/finetune/captioning_base.py', 'v5p-8', 1, ()),
    ('captioning large 480 px', 'configs/finetune/captioning_large.py', 'v5p-8', 1, ()),
    ('VQ-KD tokenizer base', 'configs/pretrain/tokenizer_base.py', 'v5p-8', 1, ()),
    ('VQ-KD tokenizer base, CLIP teacher', 'configs/pretrain/tokenizer_clip_base.py', 'v5p-8', 1,
     ()),
)

GIB = 2 ** 30


def plan(config: str, tpu: str, num_slices: int, overrides) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  cmd = [sys.executable, '-m', 'beit3_jax.plan', f'--config={config}', f'--topology={tpu}',
         f'--num_slices={num_slices}', '--json', *overrides]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if out.returncode:
    lines = out.stderr.splitlines()   # our own message starts with 'Error:'; libtpu's do not
    tail = ([line for line in lines if line.startswith('Error')]
            or [line for line in lines if 'Error' in line])[-3:]
    return {'error': ' / '.join(tail) or out.stderr[-500:], 'command': ' '.join(cmd[1:])}
  result = json.loads(out.stdout[out.stdout.index('{'):])
  result['command'] = ' '.join(['python'] + cmd[1:])
  return result


def row(name: str, p: dict) -> str:
  if 'error' in p:
    return f'| {name} | {p.get("slice", "")} | error: {p["error"][:120]} | | | | | | |'
  m = p['mesh']
  mesh = 'x'.join(str(m[k]) for k in ('data', 'fsdp', 'tensor'))
  slice_name = p['slice'] + (f' x {p["num_slices"]}' if p['num_slices'] > 1 else '')
  layout = ('scan' if p['model']['scan_layers'] else 'loop') + f', {p["model"]["remat_policy"]}'
  if not p['hlo_flops_per_chip']:   # XLA ran out of HBM: no program, only what it needed
    return (f'| {name} | {slice_name} ({p["chips"]} chips) | {mesh} | {layout} | '
            f'>= {p["peak_bytes_per_chip"] / GIB:.1f} / {p["hbm_bytes_per_chip"] / GIB:.0f} GiB'
            ' | **no** (out of HBM) | – | – | – | – |')
  return (f'| {name} | {slice_name} ({p["chips"]} chips) | {mesh} | {layout} | '
          f'{p["peak_bytes_per_chip"] / GIB:.1f} / {p["hbm_bytes_per_chip"] / GIB:.0f} GiB | '
          f'{"yes" if p["fits"] else "**no**"} | {p["compile_seconds"]:.0f} | '
          f'{p["hlo_flops_per_chip"] / 1e12:.2f} | {p["roofline_step_seconds"] * 1e3:.0f} ms | '
          f'{p["mfu_bound"]:.0%} |')


HEADER = ('| recipe | slice | mesh (data x fsdp x tensor) | layers, remat | peak / HBM per chip '
          '| fits | compile s | HLO TFLOP per chip | step >= | MFU <= |\n'
          '|---|---|---|---|---|---|---|---|---|---|')


def _key(p: dict) -> tuple:
  return (p['row_name'], p['row_slice'], p['row_slices'])


def _ordered(plans: dict) -> list:
  """Keys of `plans` in the order of ROWS."""
  order = [(name, tpu, slices) for name, _, tpu, slices, _ in ROWS]
  return sorted(plans, key=lambda k: order.index(k) if k in order else len(order))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='plans.json', help='where to write every plan (JSON)')
  parser.add_argument('--update', action='store_true',
                      help='keep the plans already in --out and replace only the rows run now')
  parser.add_argument('--only', default='',
                      help='comma-separated: only rows whose name or slice contains one of these')
  args = parser.parse_args(argv)
  start = time.time()
  previous = {}
  if args.update and os.path.exists(args.out):
    with open(args.out) as f:
      previous = {_key(p): p for p in json.load(f)}
  fresh = {}
  for name, config, tpu, slices, overrides in ROWS:
    wanted = [w for w in args.only.split(',') if w]
    if wanted and not any(w in f'{name} {tpu}' for w in wanted):
      continue
    t = time.time()
    p = plan(config, tpu, slices, overrides)
    p.update(row_name=name, row_slice=tpu, row_slices=slices,
             plan_seconds=round(time.time() - t, 1))
    fresh[_key(p)] = p
    print(row(name, p) + f'  ({p["plan_seconds"]:.0f} s)', flush=True)
    results = [{**previous, **fresh}[k] for k in _ordered({**previous, **fresh})]
    with open(args.out, 'w') as f:   # after every plan: a long run keeps what it has
      json.dump(results, f, indent=1)
  results = [{**previous, **fresh}[k] for k in _ordered({**previous, **fresh})]
  print(f'\n{HEADER}')
  for p in results:
    print(row(p['row_name'], p))
  print(f'\n{len(fresh)} plans in {(time.time() - start) / 60:.1f} min (each: plan_seconds in '
        f'{args.out}); the table has {len(results)} rows')
  return 0


if __name__ == '__main__':
  sys.exit(main())
