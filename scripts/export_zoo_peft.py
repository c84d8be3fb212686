"""Add a PEFT-format copy (`peft/`) to every plain-LoRA card of the model zoo, from the released files.

    python scripts/export_zoo_peft.py            # model_cards/*/peft/, and a "PEFT" paragraph in each card

Nothing is retrained and no base model is loaded: a plain LoRA is PEFT's LoRA under other tensor names, so
the card's own tensors (bf16, as released) are renamed and written beside a PEFT adapter_config.json that
names the base on the Hub. Cards with more than LoRA tensors (multimodal encoders, routers) are skipped:
PEFT's LoRA cannot hold them. The card's "## PEFT format" section is rewritten to show the copy (the same
text scripts/release_zoo.py renders for a card that has peft/).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moelora.checkpoint import atomic_dir, load_tensors, read_json, save_tensors, write_json  # noqa: E402
from moelora.peft_compat import HUB_IDS, peft_lora_config, peft_model_card, peft_tensors  # noqa: E402
from moelora.registry import config_from_dict  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from release_zoo import peft_section  # noqa: E402  (the card writer's text for the PEFT copy)


def plain_lora(card: Path):
    """The card's LoRA config, or None when the card is not a plain text LoRA."""
    meta = read_json(card / "moelora_config.json", "adapter config")
    if meta.get("method") != "lora" or meta.get("encoders") is not None:
        return None
    return config_from_dict(dict(meta["config"]))


def export_card(card: Path) -> bool:
    cfg = plain_lora(card)
    if cfg is None:
        return False
    manifest = read_json(card / "manifest.json", "manifest")
    base = HUB_IDS.get(manifest["base_model"].split(":")[0], manifest["base_model"])
    tensors = load_tensors(card / "adapter_model.safetensors")
    with atomic_dir(card / "peft") as tmp:
        # target_modules as the card's config names them: leaf names select the same layers in PEFT
        write_json(tmp / "adapter_config.json", peft_lora_config(cfg, base, cfg.target_modules, fan_in_fan_out=False))
        save_tensors(tmp / "adapter_model.safetensors", peft_tensors(tensors), metadata={"format": "pt"})
        (tmp / "README.md").write_text(peft_model_card(base, cfg))
    add_card_paragraph(card, base)
    return True


def add_card_paragraph(card: Path, base: str) -> None:
    """The card's "## PEFT format" section becomes the one for peft/ (the card writer renders the same text)."""
    readme = card / "README.md"
    text = readme.read_text()
    section = peft_section(card.name, base)
    start = text.find("## PEFT format\n")
    if start < 0:  # a card written before the section existed: put it before the results
        start = end = text.index("## Results")
    else:
        end = text.find("\n## ", start + 1) + 1 or len(text)
    readme.write_text(text[:start] + section + "\n" + text[end:])


def main() -> None:
    cards = sorted(p.parent for p in (REPO / "model_cards").glob("*/moelora_config.json"))
    for card in cards:
        print(f"{card.name}: {'peft/ written' if export_card(card) else 'skipped (not a plain text LoRA)'}")


if __name__ == "__main__":
    main()
