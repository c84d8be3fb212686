"""The shape-kind probes of RESULTS.md §16: scripts/probe_shape_colour.py --read kind labels each scene with the
kind of the shape its question names; scripts/probe_encoder_kind.py labels every cell of its scenes."""

import importlib.util
import random
import sys

import torch

from moelora.data import images
from moelora.data.multimodal import build_multimodal_suite
from tests.processes import REPO

SCRIPTS = REPO / "scripts"


def _script(name: str):
    sys.path.insert(0, str(SCRIPTS))  # the scripts import their neighbours (probe_perception)
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def test_kind_labels_are_the_asked_shape_and_colour_labels_the_answer():
    probe = _script("probe_shape_colour")
    train, _ = build_multimodal_suite(["shape_color"], n_train_per_task=40, n_eval_per_task=4, seed=0)
    pictures, kinds = probe.scenes(train, one_shape=False, read="kind")
    _, colours = probe.scenes(train, one_shape=False, read="colour")
    assert len(kinds) == len(colours) == pictures.shape[0] == len(train)
    for row, kind, colour in zip(train, kinds, colours):
        scene = row["sources"][0][1]
        assert kind in images.SHAPES and f"the {kind}?" in row["instruction"]
        assert colour == row["response"] == scene.colors[scene.shapes.index(kind)]  # the asked shape's colour
    one, one_kinds = probe.scenes(train, one_shape=True, read="kind")
    singles = [r for r in train if len(r["sources"][0][1].shapes) == 1]
    assert 0 < len(one_kinds) == len(singles) < len(train)
    assert one_kinds == [r["sources"][0][1].shapes[0] for r in singles]


def test_every_stencil_lights_nine_pixels_so_only_the_pattern_tells_the_kind():
    """RESULTS.md §16's premise, and the labels of scripts/probe_encoder_kind.py: one lit 9-pixel stencil per
    occupied cell, labelled with its kind."""
    pictures, labels = _script("probe_encoder_kind").scenes(random.Random(0), 32)
    assert pictures.shape == (32, 3, 16, 16) and labels.shape == (32, 9)
    lit = (pictures.amax(1) > 0).flatten(1).sum(1)  # pixels lit in any channel
    occupied = (labels > 0).sum(1)
    assert occupied.min() >= 1 and occupied.max() <= 3
    assert torch.equal(lit, 9 * occupied)  # cells never overlap, and every kind is 9 pixels
    assert set(labels[labels > 0].tolist()) == {1, 2, 3}  # all three kinds occur
