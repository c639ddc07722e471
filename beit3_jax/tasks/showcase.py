"""Examples with their predictions, drawn for people to look at: a grid image (for TensorBoard's
Images tab, `MetricWriter.write_image`) and a self-contained HTML page (`predict --report`).

An `Example` is one picture (or a pair, or none), a title, lines of text (the truth, the
prediction) and optionally a ranked list of (image or text, score), e.g. a retrieval query's
top 5. From an evaluator's batch::

    examples = showcase.compare(images, truths, predictions)       # uint8 (N, S, S, 3), strs
    writer.write_image(step, 'captioning/examples', showcase.grid_image(examples))

Text is drawn with PIL's built-in default font (nothing is downloaded); the HTML page embeds its
images as data:image/png;base64 URLs and loads nothing from elsewhere.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
from typing import Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# One entry of a ranked list: an image (uint8 (H, W, 3)) or a text, and its score.
Ranked = tuple[Union[np.ndarray, str], float]

_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_MUTED = (110, 110, 110)
_RULE = (210, 210, 210)
_PAD = 6


def as_rgb(image) -> np.ndarray:
  """`image` as uint8 (H, W, 3): uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha
  dropped) are taken.

  Raises:
    ValueError: another dtype or shape (the message says which).
  """
  x = np.asarray(image)
  if x.dtype != np.uint8:
    raise ValueError(f'expected uint8 pixels, got {x.dtype} (for floats in [0, 1]: '
                     'np.clip(x * 255, 0, 255).round().astype(np.uint8))')
  if x.ndim == 2:
    x = x[:, :, None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3, 4) or min(x.shape[:2]) < 1:
    raise ValueError(f'expected an image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape '
                     f'{x.shape}')
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return np.ascontiguousarray(x[:, :, :3])


@dataclasses.dataclass
class Example:
  """One example and what a model made of it.

  Attributes:
    title: a heading (a file name, an example number, a query).
    images: uint8 (H, W, 3) images shown side by side (one; an NLVR2 pair; or none). A single
      array is taken as one image.
    lines: texts under the title, e.g. 'truth: a dog', 'prediction: a cat'.
    ranked: (uint8 (H, W, 3) image or text, score) best first, e.g. a query's top 5.
  """
  title: str
  images: Sequence[np.ndarray] = ()
  lines: Sequence[str] = ()
  ranked: Sequence[Ranked] = ()

  def __post_init__(self):
    if isinstance(self.images, np.ndarray) and self.images.ndim in (2, 3):
      self.images = (self.images,)
    self.images = tuple(as_rgb(x) for x in self.images)
    self.lines = tuple(str(line) for line in self.lines)
    self.ranked = tuple((item if isinstance(item, str) else as_rgb(item), float(score))
                        for item, score in self.ranked)


def compare(images, truths: Sequence, predictions: Sequence[str], *,
            titles: Sequence[str] | None = None, limit: int | None = None) -> list[Example]:
  """Examples of an evaluation batch: each image with 'truth: ...' (one line per reference when
  a truth is a list of texts) and 'prediction: ...'.

  Args:
    images: uint8 (N, H, W, 3) (or a list of such images); None for text-only examples.
    truths: N texts, or N lists of texts (several references).
    predictions: N texts.
    titles: N headings (default '#0', '#1', ...).
    limit: keep only the first `limit` examples.
  """
  n = len(predictions) if limit is None else min(len(predictions), int(limit))
  if len(truths) < n or (images is not None and len(images) < n):
    raise ValueError(f'{len(predictions)} predictions but {len(truths)} truths and '
                     f'{"no" if images is None else len(images)} images')
  out = []
  for i in range(n):
    truth = truths[i]
    refs = [truth] if isinstance(truth, str) else list(truth)
    out.append(Example(titles[i] if titles is not None else f'#{i}',
                       () if images is None else (images[i],),
                       [f'truth: {t}' for t in refs] + [f'prediction: {predictions[i]}']))
  return out


# ------------------------------------------------------------------------------------------
# The grid image.


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:               # Pillow < 10.1: the bitmap font only
    return ImageFont.load_default()


def _drawable(text: str, font) -> str:
  # PIL's bitmap font (no FreeType) draws Latin-1 only.
  if isinstance(font, ImageFont.FreeTypeFont):
    return text
  return text.encode('latin-1', 'replace').decode('latin-1')


def _wrap(text: str, font, width: int) -> list[str]:
  """`text` cut into lines no wider than `width` pixels (at spaces; a longer word is cut)."""
  out = []
  for paragraph in _drawable(text, font).split('\n'):
    line = ''
    for word in paragraph.split(' '):
      candidate = f'{line} {word}' if line else word
      if font.getlength(candidate) <= width:
        line = candidate
        continue
      if line:
        out.append(line)
      while len(word) > 1 and font.getlength(word) > width:
        cut = 1
        while font.getlength(word[:cut + 1]) <= width:
          cut += 1
        out.append(word[:cut])
        word = word[cut:]
      line = word
    out.append(line)
  return out


def _fit(image: np.ndarray, box: int) -> Image.Image:
  """The image scaled (aspect kept) so that its longer side is `box` pixels."""
  pil = Image.fromarray(image)
  scale = box / max(pil.size)
  size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
  return pil.resize(size, Image.Resampling.BICUBIC)


class _Cell:
  """One example drawn on its own canvas, `width` pixels wide."""

  def __init__(self, example: Example, image_size: int, text_width: int, thumb_size: int,
               font, line_height: int, max_lines: int):
    self.pictures = [_fit(x, image_size) for x in example.images]
    pictures_width = sum(p.width + _PAD for p in self.pictures)
    self.width = _PAD + pictures_width + text_width + _PAD
    wrap = lambda t: _wrap(t, font, text_width)  # noqa: E731
    self.title = wrap(example.title)[:2]
    self.lines = [line for text in example.lines for line in wrap(text)][:max_lines]
    self.ranked_texts, self.ranked_images = [], []
    for rank, (item, score) in enumerate(example.ranked, 1):
      if isinstance(item, str):
        self.ranked_texts.extend(wrap(f'{rank}. ({score:.3f}) {item}')[:2])
      else:
        self.ranked_images.append((_fit(item, thumb_size), f'{rank}: {score:.3f}'))
    per_row = max(1, text_width // (thumb_size + _PAD))
    thumb_rows = -(-len(self.ranked_images) // per_row)
    text_height = (line_height * (len(self.title) + len(self.lines) + len(self.ranked_texts))
                   + thumb_rows * (thumb_size + line_height + _PAD))
    self.height = 2 * _PAD + max(text_height, max((p.height for p in self.pictures), default=0))
    self.text_x = _PAD + pictures_width
    self.per_row, self.thumb_size = per_row, thumb_size
    self.font, self.line_height = font, line_height

  def draw(self, canvas: Image.Image, x0: int, y0: int) -> None:
    draw = ImageDraw.Draw(canvas)
    x = x0 + _PAD
    for picture in self.pictures:
      canvas.paste(picture, (x, y0 + _PAD))
      x += picture.width + _PAD
    x, y = x0 + self.text_x, y0 + _PAD
    for lines, color in ((self.title, _INK), (self.lines, _INK), (self.ranked_texts, _MUTED)):
      for line in lines:
        draw.text((x, y), line, fill=color, font=self.font)
        y += self.line_height
    for i, (thumb, label) in enumerate(self.ranked_images):
      row, col = divmod(i, self.per_row)
      tx = x + col * (self.thumb_size + _PAD)
      ty = y + row * (self.thumb_size + self.line_height + _PAD)
      canvas.paste(thumb, (tx, ty))
      draw.text((tx, ty + self.thumb_size + 1), label, fill=_MUTED, font=self.font)


def grid_image(examples: Sequence[Example], *, columns: int = 2, image_size: int = 128,
               text_width: int = 320, thumb_size: int = 56, font_size: int = 12,
               max_lines: int = 12) -> np.ndarray:
  """The examples drawn in a grid, each picture with its text beside it: uint8 (H, W, 3).

  Args:
    examples: what to draw, in reading order (row by row).
    columns: examples per row.
    image_size: the longer side of each picture, in pixels.
    text_width: the width of each example's text column, in pixels (text is wrapped to it).
    thumb_size: the longer side of the pictures of a ranked list, in pixels.
    font_size: the text's size in pixels (PIL's default font; the bitmap one on Pillow < 10.1).
    max_lines: at most this many lines of an example's `lines` (after wrapping).
  """
  if not examples:
    raise ValueError('grid_image needs at least one example')
  font = _font(font_size)
  _, top, _, bottom = font.getbbox('Ag|')
  line_height = bottom - min(top, 0) + 3
  cells = [_Cell(e, image_size, text_width, thumb_size, font, line_height, max_lines)
           for e in examples]
  columns = max(1, min(int(columns), len(cells)))
  rows = [cells[i:i + columns] for i in range(0, len(cells), columns)]
  cell_width = max(c.width for c in cells)
  heights = [max(c.height for c in row) for row in rows]
  canvas = Image.new('RGB', (columns * cell_width + columns - 1, sum(heights) + len(rows) - 1),
                     _RULE)
  y = 0
  for row, height in zip(rows, heights):
    for col, cell in enumerate(row):
      x = col * (cell_width + 1)
      canvas.paste(Image.new('RGB', (cell_width, height), _BACKGROUND), (x, y))
      cell.draw(canvas, x, y)
    y += height + 1
  return np.asarray(canvas, np.uint8)


# ------------------------------------------------------------------------------------------
# The HTML page.


def png_bytes(image: np.ndarray, max_size: int | None = None) -> bytes:
  """PNG file bytes of uint8 (H, W, 3) (or what `as_rgb` takes), shrunk (aspect kept) to at
  most `max_size` pixels on its longer side when it is larger."""
  pil = Image.fromarray(as_rgb(image))
  if max_size and max(pil.size) > max_size:
    pil = _fit(np.asarray(pil), int(max_size))
  buffer = io.BytesIO()
  pil.save(buffer, format='PNG')
  return buffer.getvalue()


def _img(image: np.ndarray, css_class: str, alt: str, max_size: int) -> str:
  data = base64.b64encode(png_bytes(image, max_size)).decode('ascii')
  return (f'<img class="{css_class}" alt="{html.escape(alt)}" '
          f'src="data:image/png;base64,{data}">')


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #141414; background: #fafafa; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.note { color: #555; margin: 0.2em 0; font-size: 0.9em; }
.example { display: flex; gap: 1em; align-items: flex-start; background: #fff;
  border: 1px solid #ddd; border-radius: 6px; padding: 0.8em; margin: 0.8em 0; }
.pics { display: flex; gap: 0.5em; flex: none; }
.pic { max-width: 320px; max-height: 320px; border-radius: 4px; }
.text h3 { font-size: 1em; margin: 0 0 0.4em 0; word-break: break-all; }
.line { margin: 0.2em 0; white-space: pre-wrap; }
.ranked { display: flex; flex-wrap: wrap; gap: 0.6em; padding-left: 0; list-style: none; }
.ranked.texts { display: block; padding-left: 1.4em; list-style: decimal; }
.ranked li { font-size: 0.9em; }
.ranked figure { margin: 0; text-align: center; }
.thumb { max-width: 120px; max-height: 120px; display: block; }
.score { color: #666; font-variant-numeric: tabular-nums; }
"""


def _example_html(example: Example, image_size: int) -> str:
  parts = ['<div class="example">']
  if example.images:
    parts.append('<div class="pics">' + ''.join(
        _img(x, 'pic', example.title, image_size) for x in example.images) + '</div>')
  parts.append('<div class="text">')
  parts.append(f'<h3>{html.escape(example.title)}</h3>')
  parts.extend(f'<p class="line">{html.escape(line)}</p>' for line in example.lines)
  if example.ranked:
    texts = all(isinstance(item, str) for item, _ in example.ranked)
    parts.append(f'<ol class="ranked{" texts" if texts else ""}">')
    for rank, (item, score) in enumerate(example.ranked, 1):
      score_html = f'<span class="score">{score:.3f}</span>'
      if isinstance(item, str):
        parts.append(f'<li>{html.escape(item)} {score_html}</li>')
      else:
        parts.append(f'<li><figure>{_img(item, "thumb", f"{rank}", 2 * 120)}'
                     f'<figcaption>{rank}. {score_html}</figcaption></figure></li>')
    parts.append('</ol>')
  parts.append('</div></div>')
  return '\n'.join(parts)


def html_page(examples: Sequence[Example] | Mapping[str, Sequence[Example]], title: str, *,
              notes: Sequence[str] = (), image_size: int = 640) -> str:
  """A self-contained HTML page of the examples: images as data:image/png;base64 URLs, text
  escaped, no script, nothing loaded from elsewhere (its Content-Security-Policy allows only
  data: images and its own style).

  Args:
    examples: the examples, or {section heading: examples} for several sections.
    title: the page's title and heading.
    notes: lines under the heading (the model, the settings).
    image_size: pictures larger than this many pixels on their longer side are shrunk to it.
  """
  sections = examples.items() if isinstance(examples, Mapping) else [(None, examples)]
  body = [f'<h1>{html.escape(title)}</h1>']
  body.extend(f'<p class="note">{html.escape(n)}</p>' for n in notes)
  for heading, items in sections:
    if heading is not None:
      body.append(f'<h2>{html.escape(heading)}</h2>')
    body.extend(_example_html(e, image_size) for e in items)
  return '\n'.join([
      '<!DOCTYPE html>', '<html lang="en">', '<head>', '<meta charset="utf-8">',
      '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
      'img-src data:; style-src \'unsafe-inline\'">',
      '<meta name="viewport" content="width=device-width, initial-scale=1">',
      f'<title>{html.escape(title)}</title>', f'<style>{_STYLE}</style>', '</head>', '<body>',
      *body, '</body>', '</html>', ''])
