"""The training run's config: YAML + dotted `key=value` overrides -> a validated `RunConfig`.

Training keys sit at the top level with Hugging Face `TrainingArguments` names; `method:` holds the
method config's fields (plus `name`), `data:` the data section. Unknown keys anywhere are an error
with a suggestion; so are wrong types, before anything slow (model loading) starts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import StrictConfig, suggest
from ..errors import ConfigError
from ..multimodal.encoders import EncoderConfig
from ..registry import config_from_dict, get_method


@dataclasses.dataclass
class DataConfig(StrictConfig):
    _prefix = "data"

    suite: Literal["text", "multimodal"] = "text"  # built-in suite: generated text tasks, or images + speech + text
    tasks: list[str] | str = "all"  # built-in suite: "all", "none", or a list of task names
    train_files: list[str] = dataclasses.field(default_factory=list)  # user JSONL/Parquet files (with a task field)
    eval_files: list[str] = dataclasses.field(default_factory=list)  # user eval files; built-in tasks bring their own split
    task_field: str = "task"  # column naming each row's task (per-task metrics and task-routed methods need it)
    n_train_per_task: int = 400  # generated training examples per built-in task
    n_eval_per_task: int = 32  # held-out examples per task: enough to separate 0% from 80% exact match
    max_length: int = 256  # tokens per example; the built-in tasks use well under 128

    def validate(self):
        if self.max_length < 8:
            raise self.error("max_length", f"must be >= 8, got {self.max_length}")
        if self.n_train_per_task < 1 or self.n_eval_per_task < 0:
            raise self.error("n_train_per_task", "must be >= 1 (and n_eval_per_task >= 0)")


@dataclasses.dataclass
class RunConfig(StrictConfig):
    base_model: str = "smollm2-135m-instruct"  # embedded default; or tiny-random-llama, or a local HF folder
    method: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "smora"})  # method config fields + name
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    encoders: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)  # image/audio encoders (data.suite: multimodal)
    output_dir: str = "runs/smora"  # adapter, checkpoints, logs and eval tables go here
    overwrite_output_dir: bool = False  # refuse to write over another run's output unless asked
    seed: int = 42  # data generation, shuffling and adapter init
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # base weights; fp32 on CPU (bf16 is ~45x slower there)
    learning_rate: float = 2e-4  # AdamW on adapter + router parameters
    weight_decay: float = 0.0  # LoRA convention: no decay on low-rank factors
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"  # SMoRA's recipe
    warmup_ratio: float = 0.1  # SMoRA's recipe: 10% linear warm-up
    max_grad_norm: float = 1.0  # clip, as HF Trainer does by default
    per_device_train_batch_size: int = 8  # examples per process per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 200  # optimizer steps; -1 = derive from num_train_epochs
    num_train_epochs: float = 1.0  # used only when max_steps is -1
    per_device_eval_batch_size: int = 32  # generation batch for exact-match evaluation
    eval_max_new_tokens: int = 16  # every built-in answer fits in 16 tokens
    eval_before_training: bool = True  # the base model's scores, for the before/after table
    eval_strategy: Literal["no", "steps", "end"] = "end"  # after training; "steps": also every eval_steps; "no": never
    eval_steps: int = 0  # with eval_strategy: steps
    logging_steps: int = 10  # console/JSONL/TensorBoard metrics every N optimizer steps
    save_steps: int = 0  # training checkpoint every N optimizer steps (0: only the final adapter)
    save_total_limit: int = 2  # keep the newest N checkpoints
    resume_from_checkpoint: str | bool | None = None  # true: newest checkpoint in output_dir; or a checkpoint path
    report_to: list[str] = dataclasses.field(default_factory=lambda: ["jsonl", "tensorboard"])  # metric sinks
    gradient_checkpointing: bool = False  # trade compute for activation memory
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # accelerate autocast; "no" on CPU
    deepspeed: str | None = None  # path to a DeepSpeed JSON (configs/deepspeed/zero2.json) to run under ZeRO
    ddp_comm_hook: Literal["none", "fp16", "bf16"] = "none"  # DDP only: all-reduce gradients in 16 bits (half the bytes; not bitwise equal to 1 process)
    num_threads: int = 0  # torch CPU threads per process (0: the machine's cores divided among the processes)
    save_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # precision of the saved adapter
    save_format: Literal["moelora", "peft"] = "moelora"  # final adapter as a PEFT LoRA folder (LoRA only): e.g. an expert
    nan_policy: Literal["stop", "skip"] = "stop"  # non-finite loss/gradient: stop naming the step, or skip the step
    router_collapse_entropy: float = 0.2  # a layer whose normalised load entropy falls below this is reported as collapsed
    router_collapse_stop: bool = False  # stop the run (checkpoints intact) when a router collapses

    def validate(self):
        self.method_config = config_from_dict(self.method, prefix="method")
        from ..multimodal.model import MultimodalLoRAModel

        model_cls = get_method(self.method_config.method_name).model_cls
        if model_cls is not None and issubclass(model_cls, MultimodalLoRAModel) and self.data.suite != "multimodal":
            raise ConfigError("data.suite", f"method '{self.method_config.method_name}' routes by images/audio: "
                              "set data.suite: multimodal")
        if self.save_format == "peft" and self.method_config.method_name != "lora":
            raise ConfigError("save_format", f"'peft' writes plain LoRA folders; method "
                              f"'{self.method_config.method_name}' has no PEFT equivalent (use moelora)")
        positive = ["per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size",
                    "eval_max_new_tokens", "logging_steps", "save_total_limit"]
        for name in positive:
            if getattr(self, name) < 1:
                raise self.error(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise self.error("max_steps", f"must be >= 1 (or -1 to use num_train_epochs), got {self.max_steps}")
        if self.learning_rate <= 0:
            raise self.error("learning_rate", f"must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise self.error("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.eval_strategy == "steps" and self.eval_steps < 1:
            raise self.error("eval_steps", "must be >= 1 when eval_strategy is 'steps'")
        for sink in self.report_to:
            if sink not in ("jsonl", "tensorboard", "none"):
                raise self.error("report_to", f"unknown sink '{sink}' (jsonl, tensorboard, none){suggest(sink, ['jsonl', 'tensorboard'])}")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            raise self.error("deepspeed", f"file not found: {self.deepspeed}")
        if self.deepspeed is not None and self.ddp_comm_hook != "none":
            raise self.error("ddp_comm_hook", "applies to DDP only; under DeepSpeed set the gradients' "
                             "communication_data_type in the DeepSpeed JSON instead")

    def to_dict(self):
        out = super().to_dict()
        out["method"] = self.method_config.to_dict()
        return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """'data.max_length=128' -> (['data', 'max_length'], 128); values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(item, "overrides are written key=value (e.g. learning_rate=1e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Read the YAML at `path` (optional), apply `key=value` overrides, validate everything."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("--config", f"file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError("--config", f"{path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("--config", f"{path} must hold a mapping of keys, got {type(data).__name__}")
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for depth, key in enumerate(keys[:-1]):
            if key not in ("method", "data", "encoders") and depth == 0:
                raise ConfigError(".".join(keys), f"'{key}' has no sub-keys{suggest(key, RunConfig.field_names())}")
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return RunConfig.from_dict(data)
