"""Every YAML under configs/ (ablations and the staged recipes included) is a valid run config: a typo in
a shipped recipe should fail here, not an hour into someone's run."""

from pathlib import Path

import pytest

from moelora.errors import ConfigError
from moelora.training.run_config import load_run_config
from tests.processes import REPO

SHIPPED = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")
                 if "accelerate" not in p.parts)  # accelerate's own launch configs are not run configs


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_config_is_a_valid_run_config(path):
    try:
        cfg = load_run_config(str(REPO / path))
    except ConfigError as exc:  # LoRA-Mixer/X-LoRA/MeteoRA recipes start from expert runs made first
        assert "folder not found: runs/experts/" in str(exc), exc
        return
    assert cfg.max_steps > 0 and cfg.output_dir


PERCEIVE = sorted(p.name for p in (REPO / "configs/perceive").glob("*.yaml"))


@pytest.mark.parametrize("name", PERCEIVE)
def test_the_perceive_recipe_is_one_run_of_soft_words_per_method(name):
    tune = load_run_config(str(REPO / f"configs/perceive/{name}"))
    lora16 = load_run_config(str(REPO / "configs/perceive/lora16.yaml"))
    # the methods' runs differ from LoRA-16's in the method and the output folder only
    differs = {k for k, v in tune.to_dict().items() if lora16.to_dict()[k] != v}
    assert differs <= {"method", "output_dir"} and len(PERCEIVE) >= 3, differs
    assert tune.encoders.projector == "words" and tune.encoder_pretraining_steps > 0
    assert tune.init_encoders_from is None and tune.freeze_encoders and tune.freeze_projectors


def test_the_staged_recipe_starts_stage_2_from_stage_1():
    align = load_run_config(str(REPO / "configs/perceive/staged/align.yaml"))
    tune = load_run_config(str(REPO / "configs/perceive/staged/lora16.yaml"))
    assert align.stage == "align" and tune.stage == "joint"
    assert Path(tune.init_encoders_from) == Path(align.output_dir)
    assert tune.encoders.to_dict() == align.encoders.to_dict()  # init_encoders_from requires equal encoders
