import numpy as np
import pytest

from edgevl.data.tasks import TASKS, caption, scene_qas, vocabulary
from edgevl.data.world import COLORS, IMAGE_SIZE, SHAPES, SceneSet, layout_key, make_scene, split_of_layout


def test_scene_is_reproducible_from_seed():
    a, b = make_scene("train", 17, seed=3), make_scene("train", 17, seed=3)
    assert a == b
    assert np.array_equal(a.image(), b.image())
    assert a != make_scene("train", 17, seed=4)


def test_image_format():
    im = make_scene("val", 0).image()
    assert im.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and im.dtype == np.uint8


def test_splits_are_layout_disjoint():
    keys = {s: {make_scene(s, i).layout_key for i in range(300)} for s in ("train", "val", "test")}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["val"]
    assert not keys["val"] & keys["test"]
    # and the assignment is structural: every scene's layout hashes to its own split
    for s in ("train", "val", "test"):
        assert all(split_of_layout(k) == s for k in keys[s])


def test_objects_are_distinct_and_inside_their_cell():
    for i in range(200):
        scene = make_scene("train", i)
        shapes = [o.shape for o in scene.objects]
        colors = [o.color for o in scene.objects]
        cells = [o.cell for o in scene.objects]
        assert len(set(shapes)) == len(shapes) and len(set(colors)) == len(colors) and len(set(cells)) == len(cells)
        for o in scene.objects:
            row, col = o.cell
            assert col / 3 <= o.cx <= (col + 1) / 3 and row / 3 <= o.cy <= (row + 1) / 3
            assert o.shape in SHAPES and o.color in COLORS


def test_objects_are_visible_in_their_colour():
    scene = make_scene("test", 5)
    im = scene.image().astype(int)
    s = scene.size
    for o in scene.objects:
        y, x = int(o.cy * s), int(o.cx * s)
        patch = im[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
        assert np.abs(patch - np.array(o.rgb)).max() < 40, (o, patch)


def test_every_task_asked_once_with_answers_from_the_scene():
    scene = make_scene("test", 2)
    qas = scene_qas(scene)
    assert [q.task for q in qas] == list(TASKS)
    answers = {q.task: q.answer for q in qas}
    assert answers["caption"] == caption(scene)
    assert answers["color"] in {o.color for o in scene.objects}
    assert answers["shape"] in {o.shape for o in scene.objects}
    words = set(vocabulary())
    for q in qas:
        assert set(q.answer.split()) <= words


def test_sceneset_is_lazy_and_indexable():
    scenes = SceneSet("test", 5)
    assert len(scenes) == 5 and scenes[4].index == 4
    with pytest.raises(IndexError):
        scenes[5]
    with pytest.raises(ValueError, match="unknown split"):
        make_scene("dev", 0)
