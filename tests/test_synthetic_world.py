"""The synthetic world: pixels, text grounded in them, and its TFDS builders.

The checks of the text re-derive every claim from the scene's objects with code written apart
from the module's (regular expressions over the sentences), so a template that says something
false fails here.
"""

import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from beit3_jax.data import synthetic_world as sw
from beit3_jax.data.builders import synthetic_world_builder as swb

MARGIN = sw.RELATION_MARGIN
COLOUR_RE = '|'.join(sw.COLOUR_NAMES)
SHAPE_RE = '|'.join(sw.SHAPES)
NUM_RE = '|'.join(sw.NUMBER_WORDS)


def scenes(n, seed=0):
  return [sw.sample_scene(sw.example_rng(seed, i)) for i in range(n)]


def obj(scene, colour, shape):
  found = [o for o in scene.objects if o.colour == colour and o.shape == shape]
  assert len(found) == 1, f'{colour} {shape} names {len(found)} objects of {scene.objects}'
  return found[0]


def holds(a, rel, b):
  return {'left of': b.x - a.x, 'right of': a.x - b.x,
          'above': b.y - a.y, 'below': a.y - b.y}[rel] > MARGIN


def where_holds(o, where):
  return {'on the left': o.x < 1 / 3, 'on the right': o.x > 2 / 3, 'at the top': o.y < 1 / 3,
          'at the bottom': o.y > 2 / 3,
          'in the middle': abs(o.x - 0.5) < 0.1 and abs(o.y - 0.5) < 0.1}[where]


def number(word):
  return sw.NUMBER_WORDS.index(word)


def make_scene(*objects):
  background = sw.sample_scene(sw.example_rng(0, 0)).background
  return sw.Scene(tuple(sw.SceneObject(*o) for o in objects), background)


# ----------------------------------------------------------------------------- pixels


def test_render_is_deterministic_at_64_and_224():
  for size in (64, 224):
    a = sw.render(sw.sample_scene(sw.example_rng(3, 7)), size)
    b = sw.render(sw.sample_scene(sw.example_rng(3, 7)), size)
    c = sw.render(sw.sample_scene(sw.example_rng(3, 8)), size)
    assert a.shape == (size, size, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
  with pytest.raises(ValueError, match='>= 16'):
    sw.render(sw.sample_scene(sw.example_rng(0, 0)), 8)


def test_scenes_are_valid():
  for scene in scenes(300):
    objs = scene.objects
    assert 1 <= len(objs) <= sw.MAX_OBJECTS
    assert len({o.name for o in objs}) == len(objs)  # (colour, shape) names one object
    for i, a in enumerate(objs):
      assert a.extent / 2 < a.x < 1 - a.extent / 2 and a.extent / 2 < a.y < 1 - a.extent / 2
      for b in objs[i + 1:]:  # bounding boxes disjoint
        assert max(abs(a.x - b.x), abs(a.y - b.y)) > (a.extent + b.extent) / 2
  assert {len(s.objects) for s in scenes(300)} == {1, 2, 3}


@pytest.mark.parametrize('size', [64, 224])
def test_object_centres_have_the_object_colour_and_background_is_grey(size):
  for scene in scenes(40, seed=size):
    image = sw.render(scene, size).astype(int)
    for o in scene.objects:
      pixel = image[int(o.y * size), int(o.x * size)]
      assert np.abs(pixel - sw.COLOURS[o.colour]).max() <= 15, (o, pixel)
    # A pixel far from every object is a low-saturation background pixel.
    for y, x in ((0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)):
      if all(max(abs(x / size - o.x), abs(y / size - o.y)) > o.extent / 2 + 0.05
             for o in scene.objects):
        assert image[y, x].max() - image[y, x].min() < 40
  assert min(max(c) - min(c) for c in sw.COLOURS.values()) > 100  # objects are saturated


def test_label_is_the_largest_objects_colour_topmost_on_ties():
  scene = make_scene(('circle', 'red', 'small', 0.2, 0.2), ('square', 'blue', 'large', 0.8, 0.5),
                     ('triangle', 'green', 'large', 0.5, 0.8))
  assert sw.LABEL_NAMES[sw.label(scene)] == 'blue'
  scene = make_scene(('diamond', 'red', 'small', 0.7, 0.8), ('circle', 'blue', 'small', 0.3, 0.3))
  assert sw.LABEL_NAMES[sw.label(scene)] == 'blue'
  for scene in scenes(100):
    largest = max(o.extent for o in scene.objects)
    topmost = min((o for o in scene.objects if o.extent == largest), key=lambda o: o.y)
    assert sw.LABEL_NAMES[sw.label(scene)] == topmost.colour


# ----------------------------------------------------------------------------- captions


def check_caption(scene, text):
  """Asserts every claim of a caption against the scene; returns how many claims it checked."""
  objs = scene.objects
  words = text.replace(',', '').replace(':', '').split()
  for w in words:
    if w in sw.COLOURS:
      assert any(o.colour == w for o in objs), text
    if w in sw.SHAPES or w.rstrip('s') in sw.SHAPES:
      assert any(o.shape == w.rstrip('s') for o in objs), text
  checked = 0
  for size, colour, shape in re.findall(rf'(?:(small|large) )?({COLOUR_RE}) ({SHAPE_RE})', text):
    o = obj(scene, colour, shape)
    assert not size or o.size == size, text
    checked += 1
  for a_c, a_s, rel, b_c, b_s in re.findall(
      rf'({COLOUR_RE}) ({SHAPE_RE}) (?:is )?(left of|right of|above|below) (?:the|an?) '
      rf'(?:small |large )?({COLOUR_RE}) ({SHAPE_RE})', text):
    assert holds(obj(scene, a_c, a_s), rel, obj(scene, b_c, b_s)), text
    checked += 1
  for c, s, where in re.findall(rf'({COLOUR_RE}) ({SHAPE_RE}) (?:is )?(on the left|on the right'
                                r'|at the top|at the bottom|in the middle)', text):
    assert where_holds(obj(scene, c, s), where), text
    checked += 1
  for a_c, a_s, cmp, b_c, b_s in re.findall(
      rf'the ({COLOUR_RE}) ({SHAPE_RE}) is (larger|smaller) than the ({COLOUR_RE}) ({SHAPE_RE})',
      text):
    a, b = obj(scene, a_c, a_s), obj(scene, b_c, b_s)
    assert (a.extent > b.extent) if cmp == 'larger' else (a.extent < b.extent), text
    checked += 1
  for c, s, size in re.findall(rf'^the ({COLOUR_RE}) ({SHAPE_RE}) is (small|large)$', text):
    assert obj(scene, c, s).size == size, text
  m = re.match(rf'there (?:is|are) ({NUM_RE}) (?:(\w+) )?(objects?|shapes?|{SHAPE_RE}s?)\b', text)
  if m:
    n, colour, noun = number(m[1]), m[2], m[3]
    if noun.rstrip('s') in sw.SHAPES:
      assert n == sum(o.shape == noun.rstrip('s') for o in objs), text
    elif colour:
      assert n == sum(o.colour == colour for o in objs), text
    else:
      assert n == len(objs), text
    checked += 1
  return checked


def test_captions_describe_the_scene():
  checked = 0
  for i, scene in enumerate(scenes(300)):
    texts = sw.captions(scene, sw.example_rng(1, i), n=5)
    assert len(texts) == 5 and len(set(texts)) == 5
    for text in texts:
      checked += check_caption(scene, text)
  assert checked > 1500  # the parser understood most captions


def test_caption_relations_on_a_hand_built_scene():
  scene = make_scene(('circle', 'red', 'large', 0.25, 0.3), ('square', 'blue', 'small', 0.75, 0.35))
  all_texts = [t for ts in sw.caption_candidates(scene).values() for t in ts]
  assert 'a large red circle left of a small blue square' in all_texts
  assert 'the blue square is right of the red circle' in all_texts
  assert 'there are two objects' in all_texts
  assert 'the red circle is larger than the blue square' in all_texts
  assert not any('above' in t or 'below' in t for t in all_texts)  # |dy| = 0.05: not stated
  scene = make_scene(('circle', 'orange', 'small', 0.5, 0.5))
  assert 'there is one object: an orange circle' in sw.caption_candidates(scene)['count']


# ----------------------------------------------------------------------------- questions


def oracle(scene, question):
  """The answer to a question, computed from the scene by regular expressions."""
  objs = scene.objects
  yn = lambda b: 'yes' if b else 'no'  # noqa: E731
  if m := re.fullmatch(rf'what colour is the ({SHAPE_RE})\?', question):
    (o,) = [o for o in objs if o.shape == m[1]]
    return o.colour
  if m := re.fullmatch(rf'what shape is the ({COLOUR_RE}) object\?', question):
    (o,) = [o for o in objs if o.colour == m[1]]
    return o.shape
  if m := re.fullmatch(rf'what size is the ({COLOUR_RE}) ({SHAPE_RE})\?', question):
    return obj(scene, m[1], m[2]).size
  if m := re.fullmatch(rf'is the ({COLOUR_RE}) ({SHAPE_RE}) (small|large)\?', question):
    return yn(obj(scene, m[1], m[2]).size == m[3])
  if question == 'how many objects are there?':
    return sw.NUMBER_WORDS[len(objs)]
  if m := re.fullmatch(r'what (colour|shape) is the large object\?', question):
    (o,) = [o for o in objs if o.size == 'large']  # asked only when exactly one is large
    return o.colour if m[1] == 'colour' else o.shape
  if m := re.fullmatch(rf'how many ({COLOUR_RE}) objects are there\?', question):
    return sw.NUMBER_WORDS[sum(o.colour == m[1] for o in objs)]
  if m := re.fullmatch(rf'how many ({SHAPE_RE})s are there\?', question):
    return sw.NUMBER_WORDS[sum(o.shape == m[1] for o in objs)]
  if m := re.fullmatch(rf'is there an? ({COLOUR_RE}) object\?', question):
    return yn(any(o.colour == m[1] for o in objs))
  if m := re.fullmatch(rf'is there an? ({COLOUR_RE}) ({SHAPE_RE})\?', question):
    return yn(any(o.colour == m[1] and o.shape == m[2] for o in objs))
  if m := re.fullmatch(rf'is there an? ({SHAPE_RE})\?', question):
    return yn(any(o.shape == m[1] for o in objs))
  if m := re.fullmatch(rf'is the ({COLOUR_RE}) ({SHAPE_RE}) (left of|right of|above|below) the '
                       rf'({COLOUR_RE}) ({SHAPE_RE})\?', question):
    a, b = obj(scene, m[1], m[2]), obj(scene, m[4], m[5])
    d = abs(a.x - b.x) if m[3] in ('left of', 'right of') else abs(a.y - b.y)
    assert d > MARGIN, f'{question}: not clearly decidable'
    return yn(holds(a, m[3], b))
  raise AssertionError(f'Unknown question: {question}')


def test_questions_have_correct_answers_in_the_vocabulary():
  kinds = {}
  exists = []
  for i, scene in enumerate(scenes(300)):
    qas = sw.questions(scene, sw.example_rng(2, i), n=4)
    assert len(qas) == 4 and len(set(qas)) == 4
    for question, answer in qas:
      assert answer in sw.ANSWERS
      assert answer == oracle(scene, question), question
      kind = question.split()[0] + ' ' + question.split()[1]
      kinds[kind] = kinds.get(kind, 0) + 1
      if question.startswith('is there'):
        exists.append(answer == 'yes')
  assert {'what colour', 'what shape', 'how many', 'is there', 'is the'} <= set(kinds)
  assert 0.35 < np.mean(exists) < 0.65  # absent things asked about half the time
  assert len(set(sw.ANSWERS)) == len(sw.ANSWERS)


def test_question_kinds():
  asked = {kind: 0 for kind in sw.QUESTION_KINDS}
  for i, scene in enumerate(scenes(300)):
    groups = sw.question_candidates(scene)
    assert set(groups) <= set(sw.QUESTION_KINDS)
    large = [o for o in scene.objects if o.size == 'large']
    assert ('large_colour' in groups) == ('large_shape' in groups) == (len(large) == 1)
    for kind, qas in groups.items():
      asked[kind] += 1
      for question, answer in qas:
        assert answer == oracle(scene, question), question
    # Restricted to the matching kinds, no readout question is asked.
    for question, _ in sw.questions(scene, sw.example_rng(3, i), n=4, kinds=sw.MATCHING_KINDS):
      assert 'large object' not in question
  assert all(asked.values()), asked
  with pytest.raises(ValueError, match="Unknown question kinds \\['colours'\\]"):
    sw.questions(scenes(1)[0], sw.example_rng(0), kinds=('colours',))


# ----------------------------------------------------------------------------- NLVR2


def test_nlvr2_truth_is_balanced_and_images_render():
  for kinds in (sw.NLVR2_KINDS, sw.NLVR2_MATCHING_KINDS):
    examples = [sw.nlvr2_scenes(sw.example_rng(4, i), kinds=kinds) for i in range(300)]
    assert 0.4 <= np.mean([truth for *_, truth in examples]) <= 0.6
    for left, right, statement, truth in examples:
      assert sw.nlvr2_truth(statement, left, right) == truth
    asked = {statement for _, _, statement, _ in examples}
    possible = {s for k in kinds for s in sw.NLVR2_STATEMENTS[k]}
    assert asked <= possible and len(asked) >= min(len(possible), 50)
    if kinds == sw.NLVR2_KINDS:  # the default: every threshold statement (12), nothing else
      assert sw.NLVR2_KINDS == sw.NLVR2_THRESHOLD_KINDS and asked == possible
  image_a, image_b, statement, truth = sw.nlvr2_example(sw.example_rng(4, 0), size=64)
  assert image_a.shape == image_b.shape == (64, 64, 3) and image_a.dtype == np.uint8
  assert isinstance(statement, str) and isinstance(truth, bool)
  left, right, *_ = sw.nlvr2_scenes(sw.example_rng(4, 0))
  np.testing.assert_array_equal(image_a, sw.render(left, 64))
  again = sw.nlvr2_example(sw.example_rng(4, 0), size=64)
  np.testing.assert_array_equal(image_b, again[1])
  assert (statement, truth) == again[2:]


def test_nlvr2_kinds_and_given_truth():
  for want in (True, False):
    for i in range(20):
      left, right, statement, truth = sw.nlvr2_scenes(sw.example_rng(5, i), truth=want)
      assert truth is want and sw.nlvr2_truth(statement, left, right) is want
  statements = {sw.nlvr2_scenes(sw.example_rng(6, i), kinds=('more',))[2] for i in range(10)}
  assert statements == {'the left image has more objects than the right image'}
  with pytest.raises(ValueError, match="Unknown NLVR2 statement kinds \\['fewest'\\]"):
    sw.nlvr2_scenes(sw.example_rng(0), kinds=('more', 'fewest'))
  with pytest.raises(ValueError, match='none given'):
    sw.nlvr2_scenes(sw.example_rng(0), kinds=())


def test_nlvr2_statements_on_hand_built_scenes():
  left = make_scene(('circle', 'red', 'large', 0.3, 0.3), ('square', 'blue', 'small', 0.7, 0.7))
  right = make_scene(('circle', 'red', 'small', 0.5, 0.5), ('circle', 'green', 'large', 0.2, 0.8),
                     ('triangle', 'blue', 'small', 0.8, 0.2))
  expected = {
      'there are three circles in total': True,
      'there are two circles in total': False,
      'there is one square in total': True,
      'there are five objects in total': True,
      'there are four objects in total': False,
      'both images contain a red object': True,
      'both images contain a green object': False,
      'both images contain a circle': True,
      'both images contain a square': False,
      'neither image contains a purple object': True,
      'neither image contains a blue object': False,
      'neither image contains an orange object': True,
      'exactly one image contains a red circle': False,
      'exactly one image contains a blue square': True,
      'exactly one image contains a yellow square': False,
      'the left image contains a blue square': True,
      'the right image contains a blue square': False,
      'the left image has more objects than the right image': False,
      'the left image has fewer objects than the right image': True,
      'the two images have the same number of objects': False,
      # Threshold kinds (left: 2 objects, 1 large; right: 3 objects, 1 large).
      'there are at least five objects in total': True,
      'there are at least six objects in total': False,
      'there are at least two large objects in total': True,
      'there are at least three large objects in total': False,
      'there is at least one large object in total': True,
      'both images have at least two objects': True,
      'both images have at least three objects': False,
      'one of the images has at least three objects': True,
  }
  for statement, value in expected.items():
    assert sw.nlvr2_truth(statement, left, right) is value, statement
    if 'left' not in statement and 'right' not in statement:  # symmetric in the two images
      assert sw.nlvr2_truth(statement, right, left) is value, statement
  with pytest.raises(ValueError, match='Unknown NLVR2 statement'):
    sw.nlvr2_truth('the sky is blue', left, right)


# ----------------------------------------------------------------------------- text


def test_text_corpus_is_deterministic_and_varied():
  a = [sw.text_corpus_sentence(sw.example_rng(9, i)) for i in range(300)]
  b = [sw.text_corpus_sentence(sw.example_rng(9, i)) for i in range(300)]
  assert a == b
  assert all(isinstance(t, str) and t.strip() == t and t for t in a)
  assert len(set(a)) > 150
  assert not any(re.search(r'\ba [aeiou]', t) for t in a)  # 'an orange', never 'a orange'


# ----------------------------------------------------------------------------- TFDS


TINY = {'train': 16, 'validation': 4, 'test': 4}


@pytest.fixture(scope='module')
def tiny_build(tmp_path_factory):
  tfds.disable_progress_bar()
  data_dir = str(tmp_path_factory.mktemp('sw_data'))
  builders = swb.prepare(data_dir, image_size=64, num_examples=TINY)
  return data_dir, builders


def source(data_dir, which, split):
  return tfds.data_source(swb.dataset_name(which, 64, TINY), split=split,
                          data_dir=os.path.join(data_dir, 'tfds'), download=False)


def test_configs():
  assert swb.make_config('images').name == '64px'
  assert swb.make_config('nlvr2', 224).image_size == 224
  assert swb.make_config('text', 224).name == 'default'
  custom = swb.make_config('images', 64, {'train': 8}, seed=3)
  assert custom.name == '64px_8_500_500_seed3' and custom.num_train == 8 and custom.seed == 3
  assert swb.dataset_name('nlvr2', 224) == 'beit3_synthetic_world_nlvr2/224px'
  with pytest.raises(ValueError, match='Unknown synthetic world'):
    swb.make_config('video')
  with pytest.raises(ValueError, match='Unknown splits'):
    swb.make_config('images', num_examples={'dev': 3})


def test_tiny_build_images(tiny_build):
  data_dir, _ = tiny_build
  for split, n in TINY.items():
    assert len(source(data_dir, 'images', split)) == n
  src = source(data_dir, 'images', 'train')
  for i in range(len(src)):
    ex = src[i]
    assert ex['index'] == i  # record i is example i
    assert ex['image'].shape == (64, 64, 3) and ex['image'].dtype == np.uint8
    captions = [c.decode('utf-8') for c in ex['captions']]
    assert len(captions) == 5
    answers = [a.decode('utf-8') for a in ex['qa']['answer']]
    assert [sw.ANSWERS[j] for j in ex['qa']['answer_id']] == answers
    assert len(ex['qa']['question']) == 4
    assert 0 <= ex['label'] < len(sw.LABEL_NAMES)
    assert 1 <= len(ex['objects']['shape']) <= sw.MAX_OBJECTS
  # Any example can be regenerated from (seed, family 0, split 0, index).
  ex = src[5]
  rng = sw.example_rng(swb.DEFAULT_SEED, 0, 0, 5)
  scene = sw.sample_scene(rng)
  np.testing.assert_array_equal(ex['image'], sw.render(scene, 64))
  assert [c.decode() for c in ex['captions']] == sw.captions(scene, rng, 5)
  assert [q.decode() for q in ex['qa']['question']] == [q for q, _ in sw.questions(scene, rng, 4)]
  assert ex['label'] == sw.label(scene)
  np.testing.assert_allclose(np.stack(ex['objects']['position']),
                             [(o.x, o.y) for o in scene.objects], rtol=1e-6)


def test_tiny_build_nlvr2_and_text(tiny_build):
  data_dir, builders = tiny_build
  src = source(data_dir, 'nlvr2', 'validation')
  assert len(src) == 4
  for ex in (src[i] for i in range(len(src))):
    assert ex['image_a'].shape == ex['image_b'].shape == (64, 64, 3)
    assert ex['image_a'].dtype == np.uint8
    assert ex['statement'].decode('utf-8') and ex['label'] in (0, 1)
  # Labels alternate, true first, so every split is balanced; example i holds the scenes that
  # nlvr2_scenes gives for its label from the example's own random stream.
  assert [src[i]['label'] for i in range(len(src))] == [1, 0, 1, 0]
  rng = sw.example_rng(swb.DEFAULT_SEED, 1, 1, 3)
  left, right, statement, truth = sw.nlvr2_scenes(rng, truth=False)
  assert src[3]['statement'].decode('utf-8') == statement
  np.testing.assert_array_equal(src[3]['image_b'], sw.render(right, 64))
  text = source(data_dir, 'text', 'train')
  assert len(text) == 16
  assert all(text[i]['text'].decode('utf-8') for i in range(16))
  # The builder objects read the same data.
  assert builders['text'].as_data_source('train')[3]['text'] == text[3]['text']


def test_second_prepare_reuses_the_build(tiny_build, capsys):
  data_dir, builders = tiny_build
  files = [os.path.join(b.data_dir, f) for b in builders.values() for f in os.listdir(b.data_dir)]
  before = {f: os.stat(f).st_mtime_ns for f in files}
  again = swb.prepare(data_dir, image_size=64, num_examples=TINY)
  out = capsys.readouterr().out
  assert out.count('Reusing') == 3 and 'Building' not in out
  assert {f: os.stat(f).st_mtime_ns for f in files} == before
  assert {w: b.data_dir for w, b in again.items()} == {w: b.data_dir for w, b in builders.items()}
