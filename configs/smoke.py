"""Model smoke: build BEiT-3 base, encode a generated image and a sentence, print shapes.

Command (from the repository root, after `bash launch/setup_venv.sh`):

    .venv/bin/python -m beit3_jax.main --config=configs/smoke.py --workdir=workdirs/smoke

Expect on a 2-core CPU, under a minute: 220,987,392 parameters, `encoder_out` of shape
(1, 197, 768) for the image (split position -1), (1, 48, 768) for the text (split 0) and
(1, 245, 768) for both (split 197); the summary goes to workdirs/smoke/smoke_summary.json.
Another variant: `--config=configs/smoke.py:small` (or :large, :giant); a field:
`--config.model.img_size=384`, `--config.model.dtype=bfloat16`.
"""

from beit3_jax.defaults import smoke_config


def get_config(arg: str = 'base'):
  return smoke_config(arg or 'base')   # every field: beit3_jax.defaults.smoke_fields
