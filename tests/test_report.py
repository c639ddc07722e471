"""`python -m beit3_jax.predict ... --report page.html` opened in a real headless browser.

Debian's chromium, driven through its chromedriver by Selenium, loads each page written with a
tiny random model (the helpers of test_predict.py): every <img> has loaded (complete, with a
natural width), there are as many as the command's examples need, nothing but data: URLs is
referenced, and the predictions the command saved with --output are on the page. Also: the
`showcase` drawing itself, and the questions file of `predict answer`.
"""

import json
import os
import pathlib

import numpy as np
import pytest

from beit3_jax import predict
from beit3_jax.models import heads
from beit3_jax.tasks import showcase
from test_predict import (ANSWERS, CLASSES, N_IMAGES, TEXTS, image_dir, image_files,  # noqa: F401
                          inputs, jitted, params_dir, spm, texts_in)

pytestmark = pytest.mark.usefixtures('fast_compile')

CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'

PAGE_STATE = """
const images = Array.from(document.images);
const refs = Array.from(document.querySelectorAll('[src], [href]'))
    .map(e => e.getAttribute('src') || e.getAttribute('href'));
return {count: images.length,
        loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
        sizes: images.map(i => [i.naturalWidth, i.naturalHeight]),
        external: refs.filter(r => !r.startsWith('data:')),
        scripts: document.scripts.length,
        title: document.title,
        text: document.body.innerText};
"""


@pytest.fixture(scope='module')
def browser():
  """One headless chromium for the module's pages."""
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
  if missing:
    pytest.fail(f'{" and ".join(missing)} missing: this test opens the HTML reports in Debian\'s '
                'chromium through chromedriver. Install them with `sudo apt-get install -y '
                'chromium chromium-driver` (`bash launch/setup_venv.sh test` does it).',
                pytrace=False)
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
               '--disable-extensions'):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  driver.set_page_load_timeout(30)
  yield driver
  driver.quit()


def page_state(browser, path):
  """Opens the file in the browser; its images, references and text once it has loaded."""
  from selenium.webdriver.support.ui import WebDriverWait
  browser.get(pathlib.Path(path).absolute().as_uri())
  WebDriverWait(browser, 20).until(lambda d: d.execute_script(
      'return document.readyState === "complete" && '
      'Array.from(document.images).every(i => i.complete)'))
  return browser.execute_script(PAGE_STATE)


def assert_loaded(state, count):
  assert state['count'] == count
  assert state['loaded'] == count, state['sizes']
  assert state['external'] == [] and state['scripts'] == 0


def run(argv, capsys):
  assert predict.main(argv) == 0
  printed = capsys.readouterr().out
  report = argv[argv.index('--report') + 1]
  assert f'Report: {report}' in printed
  return printed


# ----------------------------------------------------------------------------- predict pages


def test_classify_report(browser, tmp_path, image_dir, capsys):  # noqa: F811
  path, _, _ = params_dir(tmp_path, 'classification', {'num_classes': len(CLASSES)}, seed=2)
  names = tmp_path / 'classes.txt'
  names.write_text('\n'.join(CLASSES))
  page, out = str(tmp_path / 'classify.html'), str(tmp_path / 'classify.json')
  run(['classify', path, image_dir, '--class-names', str(names), '--top-k', '3',
       '--output', out, '--report', page], capsys)
  result = json.loads(open(out).read())
  state = page_state(browser, page)
  assert_loaded(state, N_IMAGES)
  assert state['title'] == 'predict classify'
  for p, classes in zip(image_files(image_dir), result['top_k_classes']):
    assert os.path.basename(p) in state['text']
    assert f'prediction: {classes[0]}' in state['text']
  assert 'Model: classification, num_classes=6' in state['text']


def test_answer_report_from_a_questions_file(browser, tmp_path, spm, image_dir,  # noqa: F811
                                             capsys):
  path, _, _ = params_dir(tmp_path, 'vqa', {'num_answers': len(ANSWERS)}, seed=4)
  answers = tmp_path / 'answers.txt'
  answers.write_text('\n'.join(ANSWERS))
  questions = tmp_path / 'questions.tsv'
  asked = [('img0.png', 'what colour is the <circle>?'), ('img1.png', 'is it red?'),
           ('img0.png', 'how many squares & circles?')]
  questions.write_text('\n'.join(f'{name}\t{q}' for name, q in asked) + '\n\n')
  page, out = str(tmp_path / 'answer.html'), str(tmp_path / 'answer.json')
  run(['answer', path, '--image', image_dir, '--questions', str(questions), '--spm', spm,
       '--answers', str(answers), '--text-len', '10', '--output', out, '--report', page],
      capsys)
  result = json.loads(open(out).read())
  assert result['questions'] == [q for _, q in asked]
  assert result['image_files'] == [os.path.join(image_dir, n) for n, _ in asked]
  state = page_state(browser, page)
  assert_loaded(state, len(asked))
  for (_, q), a in zip(asked, result['answers']):
    assert f'question: {q}\n\nanswer: {a}' in state['text']   # escaped, shown as written


def test_caption_report(browser, tmp_path, spm, image_dir, capsys):  # noqa: F811
  path, _, _ = params_dir(tmp_path, 'captioning', seed=5)
  page, out = str(tmp_path / 'caption.html'), str(tmp_path / 'caption.json')
  run(['caption', path, image_dir, '--spm', spm, '--beam-size', '1', '--max-len', '4',
       '--output', out, '--report', page], capsys)
  result = json.loads(open(out).read())
  state = page_state(browser, page)
  assert_loaded(state, N_IMAGES)
  assert 'Decoding: greedy' in state['text']
  for caption in result['captions']:
    assert f'caption: {caption}'.strip() in state['text']


def test_retrieve_report(browser, tmp_path, spm, image_dir, capsys):  # noqa: F811
  path, _, _ = params_dir(tmp_path, 'retrieval', seed=3)
  texts = tmp_path / 'texts.txt'
  texts.write_text('\n'.join(TEXTS))
  page, out = str(tmp_path / 'retrieve.html'), str(tmp_path / 'retrieve.json')
  run(['retrieve', path, '--images', image_dir, '--texts', str(texts), '--spm', spm,
       '--top-k', '5', '--text-len', '10', '--output', out, '--report', page], capsys)
  result = json.loads(open(out).read())
  state = page_state(browser, page)
  # Each text query with its top min(5, N_IMAGES) images, and each image queried.
  assert_loaded(state, len(TEXTS) * min(5, N_IMAGES) + N_IMAGES)
  text = state['text']
  assert 'Text -> images' in text and 'Image -> texts' in text
  for t in TEXTS:
    assert t in text
  # The images' lists rank all texts (4 < 5), with their scores as the command computed them.
  for scores in result['image_to_text_scores']:
    for s in scores:
      assert f'{s:.3f}' in text

  # embed (the same compiled features): each image with its texts by similarity, each text.
  page = str(tmp_path / 'embed.html')
  run(['embed', path, '--image', image_dir, '--texts', str(texts), '--spm', spm,
       '--text-len', '10', '--report', page], capsys)
  state = page_state(browser, page)
  assert_loaded(state, N_IMAGES)
  assert state['text'].count('embedding: [') == N_IMAGES + len(TEXTS)
  assert f'{result["similarity"][0][0]:.3f}' in state['text']


def test_verify_report_from_a_statements_file(browser, tmp_path, spm, image_dir,  # noqa: F811
                                              capsys):
  path, cfg, params = params_dir(tmp_path, 'nlvr2', seed=6)
  rows = [('img0.png', 'img1.png', 'two blue squares'), ('img2.png', 'img0.png', 'a red circle')]
  statements = tmp_path / 'statements.tsv'
  statements.write_text('\n'.join('\t'.join(r) for r in rows))
  page, out = str(tmp_path / 'verify.html'), str(tmp_path / 'verify.json')
  run(['verify', path, '--statements', str(statements), '--images', image_dir, '--spm', spm,
       '--text-len', '10', '--output', out, '--report', page], capsys)
  result = json.loads(open(out).read())
  # The pairs in their order: the model applied directly to (left, right, statement).
  x = inputs(image_dir)
  ids, pad = texts_in(spm, [r[2] for r in rows], 10)
  direct = np.asarray(jitted(heads.NLVR2Classifier(cfg))(params, x[[0, 2]], x[[1, 0]], ids, pad))
  np.testing.assert_allclose(result['logits'], direct, atol=1e-5)
  assert result['verdicts'] == [['false', 'true'][i] for i in np.argmax(direct, -1)]
  state = page_state(browser, page)
  assert_loaded(state, 2 * len(rows))
  for (a, b, s), v in zip(rows, result['verdicts']):
    assert f'{a} + {b}' in state['text'] and f'statement: {s}\n\nverdict: {v}' in state['text']


# ----------------------------------------------------------------------------- showcase


def test_html_page_is_self_contained_and_escaped(browser, tmp_path):
  rng = np.random.default_rng(0)
  pair = [rng.integers(0, 256, (30, 20, 3), dtype=np.uint8) for _ in range(2)]
  grey = rng.integers(0, 256, (900, 10), dtype=np.uint8)          # shrunk to 640 high
  examples = {
      'Pairs': [showcase.Example('pair <b>1</b>', pair, ['statement: <script>alert(1)</script>',
                                                         'verdict: true'])],
      'Ranked': [showcase.Example('grey', grey, ranked=[(pair[0], 0.9), (pair[1], -0.25)]),
                 showcase.Example('texts only', lines=['no picture'],
                                  ranked=[('a & b', 0.5), ('ünïcode 漢字', 0.25)])]}
  page = tmp_path / 'page.html'
  page.write_text(showcase.html_page(examples, 'A <page>', notes=['note "1"']),
                  encoding='utf-8')
  state = page_state(browser, page)
  assert_loaded(state, 5)
  assert sorted(map(tuple, state['sizes'])) == [(7, 640), (20, 30), (20, 30), (20, 30),
                                                 (20, 30)]
  assert state['title'] == 'A <page>'
  for shown in ('pair <b>1</b>', 'statement: <script>alert(1)</script>', 'note "1"', 'a & b',
                'ünïcode 漢字', '-0.250'):
    assert shown in state['text']


def test_grid_image_draws_pictures_beside_their_text():
  red = np.zeros((40, 20, 3), np.uint8)
  red[..., 0] = 255
  examples = showcase.compare(np.stack([red, red]), ['a', ['b', 'c']], ['x', 'y' * 300])
  examples.append(showcase.Example('query', lines=['no picture'], ranked=[(red, 0.5)] * 7))
  grid = showcase.grid_image(examples, columns=2, image_size=64, text_width=200, thumb_size=16)
  assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
  # The first picture, 32 x 64 (aspect kept), sits at the top left; its text to its right.
  np.testing.assert_array_equal(grid[6:70, 6:38], np.broadcast_to([255, 0, 0], (64, 32, 3)))
  text_area = grid[6:70, 44:244]
  assert (text_area.min(axis=-1) < 128).any() and (grid[6:70, 38:43] == 255).all()
  # Two columns of the widest cell, a 1-pixel rule between them; the long prediction wraps.
  assert grid.shape[1] % 2 == 1 and (grid[:, grid.shape[1] // 2] == 210).all()
  assert grid.shape[0] > 2 * 76
  with pytest.raises(ValueError, match='uint8'):
    showcase.Example('bad', red.astype(np.float32))
  with pytest.raises(ValueError, match='shape'):
    showcase.Example('bad', np.zeros((4, 4, 2), np.uint8))
  with pytest.raises(ValueError, match='at least one'):
    showcase.grid_image([])


# ----------------------------------------------------------------------------- bad input


def test_questions_file_errors_name_the_file_and_line(tmp_path, spm, image_dir):  # noqa: F811
  path, _, _ = params_dir(tmp_path, 'vqa', {'num_answers': len(ANSWERS)})
  base = ['answer', path, '--image', image_dir, '--spm', spm]
  bad = tmp_path / 'bad.tsv'

  def refused(text, match, extra=()):
    if isinstance(text, bytes):
      bad.write_bytes(text)
    elif text is not None:
      bad.write_text(text)
    with pytest.raises(SystemExit, match=match):
      predict.main([*base, '--questions', str(bad), *extra])

  refused('img0.png\tis it red?\nimg1.png is it blue?\n',
          rf'{bad}:2: expected "image<TAB>question", got .*\(no tab\)')
  refused('\nimg0.png\t  \n', rf'{bad}:2: .*\(no question\)')
  refused('img0.png\tok?\n\nnope.png\tok?\n', rf'{bad}:3: no image file .*nope.png')
  refused(b'img0.png\tok?\nimg1.png\t\xff\xfe?\n', rf'{bad}:2: the questions file is not UTF-8')
  refused('\n \n', 'has no "image<TAB>question" line')
  refused('img0.png\tok?\n', 'not both', ['--question', 'why?'])
  with pytest.raises(SystemExit, match=rf'{bad}:1: no image file {tmp_path}/img0.png'):
    predict.main(['answer', path, '--spm', spm, '--questions', str(bad)])  # the file's folder
  bad.unlink()
  refused(None, f'No questions file at {bad}')
  with pytest.raises(SystemExit, match='--image and --question'):
    predict.main(base)
  with pytest.raises(SystemExit, match=r'--report page.txt: expected an \.html file'):
    predict.main([*base, '--question', 'q?', '--report', 'page.txt'])
