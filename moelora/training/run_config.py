"""The training run's config: YAML + dotted `key=value` overrides -> a validated `RunConfig`.

Training keys sit at the top level with Hugging Face `TrainingArguments` names; `method:` holds the
method config's fields (plus `name`), `data:` the data section. Unknown keys anywhere are an error
with a suggestion; so are wrong types, before anything slow (model loading) starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import StrictConfig, suggest
from ..errors import ConfigError, short_repr
from ..multimodal.encoders import MEDIA_KINDS, EncoderConfig
from ..registry import config_from_dict, get_method


FLOAT32_MAX = 3.4028234663852886e38  # the optimizer's arithmetic is float32


@dataclasses.dataclass
class DataConfig(StrictConfig):
    _prefix = "data"

    suite: Literal["text", "multimodal"] = "text"  # built-in suite: generated text tasks, or images + speech + text
    # built-in tasks: "all", "none", a list of names, or "auto" = "all" without train_files and "none" with them
    # (user files replace the built-in suite unless both are asked for: an explicit data.tasks means both)
    tasks: list[str] | str = "auto"
    train_files: list[str] = dataclasses.field(default_factory=list)  # user JSONL/JSON/Parquet files (instruction/response, messages or ShareGPT)
    eval_files: list[str] = dataclasses.field(default_factory=list)  # user eval files (exact match + eval loss); built-in tasks bring their own split
    task_field: str = "task"  # column naming each row's task (per-task metrics and task-routed methods need it)
    default_task: str = "default"  # task of user rows without a task field (methods routed by task label refuse such rows)
    n_train_per_task: int = 400  # generated training examples per built-in task
    n_train_for: dict[str, int] = dataclasses.field(default_factory=dict)  # {task: n} instead of n_train_per_task: more examples where a task learns slowest
    n_eval_per_task: int = 32  # held-out examples per task: enough to separate 0% from 80% exact match
    max_length: int = 256  # tokens per example; the built-in tasks use well under 128
    pad_to_multiple_of: int = 0  # pad batches to a multiple of this length (64: few shapes for compiled/CUDA-graph steps); 0: to the longest
    group_by_length: bool = False  # batches of similar length (HF's group_by_length): less padding, so faster steps when lengths vary; off keeps the plain shuffle

    def validate(self):
        if self.tasks == "auto":  # resolved here, so the saved training_config names what was trained on
            self.tasks = "none" if self.train_files else "all"
            self.tasks_left_auto = True  # a resume then continues its checkpoint's selection (output_dir.py)
        if not self.default_task.strip():
            raise self.error("default_task", "must be a non-empty task name")
        if self.max_length < 8:
            raise self.error("max_length", f"must be >= 8, got {self.max_length}")
        if self.n_train_per_task < 1 or self.n_eval_per_task < 0:
            raise self.error("n_train_per_task", "must be >= 1 (and n_eval_per_task >= 0)")
        if self.n_train_for and self.tasks == "none":
            raise self.error("n_train_for", "sizes built-in tasks, but data.tasks is none (user files only)")
        for task, n in self.n_train_for.items():
            if n < 1:
                raise self.error(f"n_train_for.{task}", f"must be >= 1, got {n}")
        if self.pad_to_multiple_of < 0 or (self.pad_to_multiple_of and self.max_length % self.pad_to_multiple_of):
            raise self.error("pad_to_multiple_of", f"must be >= 0 and divide max_length={self.max_length} (so that "
                             f"no padded batch is longer than max_length); got {self.pad_to_multiple_of}")


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
    # Multimodal parts (data.suite: multimodal). "encoders": the feature extractors (our conv, or a pretrained HF
    # model), "projectors": the Linear-GELU-Linear maps into the LM's embeddings, "adapters": everything else.
    # None: learning_rate (pretrained encoders usually want less); {image: r, audio: r}: one rate per modality
    # (our image encoder learned more at 3e-3, where speech did not learn at all: RESULTS §11)
    encoder_learning_rate: float | dict[str, float] | None = None
    projector_learning_rate: float | dict[str, float] | None = None  # likewise; LLaVA's stage 1: 1e-3
    freeze_encoders: bool | None = None  # None: pretrained HF encoders frozen (keep what they learned), ours trained (they start random)
    freeze_projectors: bool = False  # projectors start random (or from init_encoders_from) and map features to the LM: train them
    freeze_adapters: bool = False  # the adapters are what a run is for; true: train only encoders/projectors with them applied
    # "align": encoders + projectors train with the adapters off in the forward pass (LLaVA stage 1), the LM sees
    # only the projected features; "joint": everything in the forward, what is not frozen trains
    stage: Literal["joint", "align"] = "joint"
    init_encoders_from: str | None = None  # an earlier run's folder (e.g. the align run's): its encoders + projectors start this run
    # Steps of label pretraining for our conv encoders before the LM sees them (moelora.multimodal.pretraining):
    # heads on their features learn each picture's digit / cell kinds and colours and each clip's words, as real
    # recipes start from a pretrained encoder. 0: none (they start random, or from init_encoders_from)
    encoder_pretraining_steps: int = 0
    # More pictures/clips for that pretraining only, {media task: training examples} of the built-in suite drawn
    # with the run's seed (e.g. {caption_shapes: 4000}): the LM never trains on them. A words projector learns to
    # write captions from what it sees, and 1,200 scenes were too few for new ones (RESULTS.md §18)
    encoder_pretraining_data: dict[str, int] | None = None
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
    compile: bool = False  # torch.compile the training forward (one graph per method; first steps pay the compile)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"  # torch.compile mode; reduce-overhead = CUDA graphs (pair with data.pad_to_multiple_of)
    logits_on_supervised_only: bool = True  # LM head only at positions the loss reads (same loss; less time and memory)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # accelerate autocast; "no" on CPU
    deepspeed: str | None = None  # path to a DeepSpeed JSON (configs/deepspeed/zero2.json) to run under ZeRO
    ddp_comm_hook: Literal["none", "fp16", "bf16"] = "none"  # DDP only: all-reduce gradients in 16 bits (half the bytes; not bitwise equal to 1 process)
    num_threads: int = 0  # torch CPU threads per process (0: the machine's cores divided among the processes)
    save_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # precision of the saved adapter
    save_format: Literal["moelora", "peft"] = "moelora"  # final adapter as a PEFT LoRA folder (LoRA only): e.g. an expert
    nan_policy: Literal["stop", "skip"] = "stop"  # non-finite loss/gradient: stop naming the step, or skip the step
    # nan_policy=skip: this many non-finite steps in a row mean the run is diverging, not hitting a rare
    # bad batch; skipping more would only burn compute, so the run stops
    nan_max_consecutive_skips: int = 10
    router_collapse_entropy: float = 0.2  # a layer whose normalised load entropy falls below this is reported as collapsed
    router_collapse_stop: bool = False  # stop the run (checkpoints intact) when a router collapses

    def validate(self):
        self.method_config = config_from_dict(self.method, prefix="method")
        model_cls = get_method(self.method_config.method_name).model_cls
        # a model that routes by the media mask (modality routing) is multimodal by nature
        if hasattr(model_cls, "media_sample_labels") and self.data.suite != "multimodal":
            raise ConfigError("data.suite", f"method '{self.method_config.method_name}' routes by images/audio: "
                              "set data.suite: multimodal")
        self.check_parts()
        if self.save_format == "peft" and get_method(self.method_config.method_name).peft_exporter is None:
            raise ConfigError("save_format", f"'peft' writes PEFT folders; method "
                              f"'{self.method_config.method_name}' has no PEFT equivalent (use moelora)")
        positive = ["per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size",
                    "eval_max_new_tokens", "logging_steps", "save_total_limit"]
        for name in positive:
            if getattr(self, name) < 1:
                raise self.error(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise self.error("max_steps", f"must be >= 1 (or -1 to use num_train_epochs), got {self.max_steps}")
        self.check_numbers()
        target = getattr(self.method_config, "target_modules", None)
        if isinstance(target, str):  # a regex over full module names
            try:
                re.compile(target)
            except re.error as exc:
                raise ConfigError("method.target_modules", f"is not a valid regular expression "
                                  f"({exc}): {short_repr(target)}") from None
        if not 0 <= self.warmup_ratio < 1:
            raise self.error("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.eval_strategy == "steps" and self.eval_steps < 1:
            raise self.error("eval_steps", "must be >= 1 when eval_strategy is 'steps'")
        for sink in self.report_to:
            if sink not in ("jsonl", "tensorboard", "none"):
                raise self.error("report_to", f"unknown sink '{sink}' (jsonl, tensorboard, none){suggest(sink, ['jsonl', 'tensorboard'])}")
        if self.deepspeed is not None:
            self.check_deepspeed_file()
        if self.output_dir.strip() == "" or Path(self.output_dir).resolve() == Path(self.output_dir).resolve().parent:
            raise self.error("output_dir", f"{short_repr(self.output_dir)} is not a run folder (it would spread the run over "
                             "the working directory or the filesystem root); name a folder, e.g. runs/smora")
        if self.deepspeed is not None and self.ddp_comm_hook != "none":
            raise self.error("ddp_comm_hook", "applies to DDP only; under DeepSpeed set the gradients' "
                             "communication_data_type in the DeepSpeed JSON instead")

    def check_numbers(self) -> None:
        """Ranges of the numeric keys: NaN or infinity anywhere, a negative clip norm (gradient ascent),
        zero epochs (an untrained adapter saved as trained), a seed numpy cannot take."""
        finite_min = {"learning_rate": (0.0, False), "weight_decay": (0.0, True), "max_grad_norm": (0.0, True),
                      "num_train_epochs": (0.0, False), "router_collapse_entropy": (0.0, True)}
        for name, (low, inclusive) in finite_min.items():
            value = getattr(self, name)
            if not math.isfinite(value) or value < low or (value == low and not inclusive):
                bound = f">= {low:g}" if inclusive else f"> {low:g}"
                extra = " (0 turns clipping off)" if name == "max_grad_norm" else ""
                raise self.error(name, f"must be {bound} and finite{extra}, got {value}")
        # AdamW multiplies float32 weights by learning_rate / (1 - beta1) (10x on the first step) and by
        # learning_rate * weight_decay: a scalar beyond float32's range stops the optimizer with an overflow.
        if self.learning_rate * 10 >= FLOAT32_MAX or self.learning_rate * self.weight_decay >= FLOAT32_MAX:
            raise self.error("learning_rate", f"must be below {FLOAT32_MAX / 10:.3g} (and learning_rate * "
                             f"weight_decay below {FLOAT32_MAX:.3g}): AdamW's step must fit float32, got "
                             f"{self.learning_rate}")
        if not 0 <= self.seed < 2**32:
            raise self.error("seed", f"must be in [0, 2**32 - 1] (what numpy's generator takes), got {short_repr(self.seed)}")
        for name in ("num_threads", "save_steps", "eval_steps"):
            if getattr(self, name) < 0:
                raise self.error(name, f"must be >= 0 (0: {'automatic' if name == 'num_threads' else 'never'}), "
                                 f"got {getattr(self, name)}")
        if self.nan_max_consecutive_skips < 1:
            raise self.error("nan_max_consecutive_skips", f"must be >= 1, got {self.nan_max_consecutive_skips}")

    def check_parts(self) -> None:
        """Stage, freezing, per-part learning rates and init_encoders_from need encoders; something must train."""
        multimodal = self.data.suite == "multimodal"
        for name, value, unset in (("stage", self.stage, "joint"), ("init_encoders_from", self.init_encoders_from, None),
                                   ("encoder_learning_rate", self.encoder_learning_rate, None),
                                   ("projector_learning_rate", self.projector_learning_rate, None),
                                   ("encoder_pretraining_steps", self.encoder_pretraining_steps, 0)):
            if value != unset and not multimodal:
                raise self.error(name, f"applies to the image/audio encoders, which only data.suite: multimodal has")
        for name in ("encoder_learning_rate", "projector_learning_rate"):
            value = getattr(self, name)
            if isinstance(value, dict):
                unknown = sorted(set(value) - set(MEDIA_KINDS))
                if unknown or not value:
                    raise self.error(name, f"a mapping names modalities ({', '.join(MEDIA_KINDS)}), got "
                                           f"{unknown or 'an empty mapping'}")
            for key, rate in (value.items() if isinstance(value, dict) else [(None, value)]):
                if rate is not None and (not math.isfinite(rate) or rate <= 0 or rate * 10 >= FLOAT32_MAX):
                    raise self.error(name if key is None else f"{name}.{key}",
                                     f"must be > 0 and finite (or null: learning_rate), got {rate}")
        if self.encoder_pretraining_steps < 0:
            raise self.error("encoder_pretraining_steps", f"must be >= 0 (0: no pretraining), got "
                             f"{self.encoder_pretraining_steps}")
        if self.encoder_pretraining_data is not None:
            from ..data.multimodal import MEDIA_TASKS

            data = self.encoder_pretraining_data
            if not isinstance(data, dict) or not data:
                raise self.error("encoder_pretraining_data", f"must map media tasks to example counts, e.g. "
                                 f"{{caption_shapes: 4000}}, got {short_repr(data)}")
            for task, n in data.items():
                if task not in MEDIA_TASKS:
                    raise self.error(f"encoder_pretraining_data.{task}", f"not a media task of the multimodal suite "
                                     f"({', '.join(MEDIA_TASKS)})")
                if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                    raise self.error(f"encoder_pretraining_data.{task}", f"must be a count >= 1, got {short_repr(n)}")
            if not self.encoder_pretraining_steps or not multimodal:
                raise self.error("encoder_pretraining_data", "is data for encoder pretraining: needs data.suite "
                                 "multimodal and encoder_pretraining_steps > 0")
        if self.stage == "align" and self.freeze_encoders and self.freeze_projectors:
            raise self.error("stage", "align trains encoders and projectors, but freeze_encoders and "
                             "freeze_projectors are both true: nothing would train")
        if self.freeze_adapters and (not multimodal or (self.freeze_encoders and self.freeze_projectors)):
            raise self.error("freeze_adapters", "with the adapters frozen nothing is left to train (no encoders, or "
                             "freeze_encoders and freeze_projectors are true)")
        if (multimodal and self.encoders.projector == "words" and not self.encoder_pretraining_steps
                and self.init_encoders_from is None and self.resume_from_checkpoint is None):
            raise self.error("encoder_pretraining_steps", "encoders.projector words learns which words to write in "
                             "encoder pretraining: set encoder_pretraining_steps > 0 (or init_encoders_from a run that did)")
        if self.init_encoders_from is not None and not str(self.init_encoders_from).strip():
            raise self.error("init_encoders_from", "must name a run folder (or its adapter folder), or be null")

    def check_deepspeed_file(self) -> None:
        path = Path(self.deepspeed)
        if not path.is_file():
            raise self.error("deepspeed", f"file not found: {self.deepspeed}")
        try:
            ds = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self.error("deepspeed", f"{self.deepspeed} is not valid JSON: {exc}") from None
        if not isinstance(ds, dict):
            raise self.error("deepspeed", f"{self.deepspeed} must hold a JSON object of DeepSpeed settings, "
                             f"got a {type(ds).__name__}")

    def to_dict(self):
        out = super().to_dict()
        out["method"] = self.method_config.to_dict()
        return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges keys; overriding them is allowed
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError("--config", f"key {short_repr(key)} is given twice in one mapping, at line "
                                  f"{key_node.start_mark.line + 1} (which one did you mean?)")
            try:
                seen.add(key)
            except TypeError:  # an unhashable key: the base loader reports it
                pass
        return super().construct_mapping(node, deep=deep)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'data.max_length=128' -> (['data', 'max_length'], 128); values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(item, "overrides are written key=value (e.g. learning_rate=1e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw != "" else ""
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
            data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
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
            if not isinstance(node, dict):  # e.g. method.r.foo=1: r holds a value, not a section
                raise ConfigError(".".join(keys), f"'{'.'.join(keys[: depth + 1])}' holds a value "
                                  f"({short_repr(node)}), not a section of keys; set it whole, e.g. "
                                  f"{'.'.join(keys[: depth + 1])}=<value>")
        node[keys[-1]] = value
    return RunConfig.from_dict(data)
