"""Score a moelora checkpoint with lm-evaluation-harness (lm-eval 0.4.x), as PEFT adapters are scored.

    python -m moelora.lm_eval --model moelora --model_args pretrained=<base>,adapter=<checkpoint> --tasks ...
    python -m moelora.lm_eval --model moelora --model_args adapter=model_cards/smora-64-8 --tasks ...

    import moelora.lm_eval, lm_eval                    # importing registers the "moelora" model type
    lm_eval.simple_evaluate(model="moelora", model_args="pretrained=<base>,adapter=<dir>", tasks=[...])

`python -m moelora.lm_eval` is lm-eval's own command line (every option of `lm_eval run`) with the model type
registered first: lm-eval discovers model types only from its own package. `pretrained` is what
`moelora.base_models.resolve_base_model` takes (a local HF folder, or a built-in name such as
smollm2-135m-instruct); without it the base comes from the checkpoint's manifest. Everything else in
model_args (batch_size, device, dtype, max_length, ...) means what it means for lm-eval's `hf` model, whose
request handling (loglikelihood, generate_until, chat templates) is used unchanged: only the model differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .base_models import resolve_base_model
from .checkpoint import read_json
from .errors import ConfigError
from .model import MANIFEST_NAME, MoELoRAModel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": torch.float32}


@register_model("moelora")
class MoELoRALM(HFLM):
    """lm-eval's `hf` model over a moelora adapter (any method) on its base model."""

    def __init__(self, adapter: str | None = None, pretrained: str | None = None, dtype: str = "float32",
                 device: str | None = None, **kwargs):
        if adapter is None:
            raise ConfigError("model_args.adapter", "missing: the moelora checkpoint folder to score "
                              "(--model_args adapter=<dir>[,pretrained=<base>])")
        base_name = pretrained or read_json(f"{adapter}/{MANIFEST_NAME}", "manifest").get("base_model")
        if not base_name:
            raise ConfigError("model_args.pretrained", f"missing, and {adapter}/{MANIFEST_NAME} names no base model")
        if dtype not in _DTYPES:
            raise ConfigError("model_args.dtype", f"expected one of {', '.join(_DTYPES)}, got {dtype!r}")
        base, tokenizer = resolve_base_model(base_name.split(":")[0] if ":" in base_name else base_name,
                                             dtype=_DTYPES[dtype])
        if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI says cuda by default
        model = MoELoRAModel.from_pretrained(base.to(device), adapter).eval()
        kwargs.pop("tokenizer", None)
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **kwargs)


def _repository_root_last() -> None:
    """Move the repository root to the end of sys.path when it is first (`python -m` run from there).

    The root holds evaluate.py, and some of lm-eval's tasks (humaneval, xquad, ...) `import evaluate`, meaning
    Hugging Face's package: found first, our script would stand in for it. Last, moelora still imports from it.
    """
    root = Path(__file__).resolve().parent.parent
    if sys.path and Path(sys.path[0] or ".").resolve() == root and (root / "evaluate.py").is_file():
        sys.path.append(sys.path.pop(0))


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the "moelora" model type registered (see the module docstring)."""
    _repository_root_last()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
