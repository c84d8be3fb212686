"""scripts/probe_shape_colour.py --read kind labels each scene with the kind of the shape its question names."""

import importlib.util
import sys
from pathlib import Path

from moelora.data import images
from moelora.data.multimodal import build_multimodal_suite

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _probe_module():
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location("probe_shape_colour", SCRIPTS / "probe_shape_colour.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def test_kind_labels_are_the_asked_shape_and_colour_labels_the_answer():
    probe = _probe_module()
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
