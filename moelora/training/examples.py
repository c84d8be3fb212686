"""A run's examples: the built-in suite and/or user files for training and evaluation, and the extra media of
encoder pretraining, as its config asks (train.py, scripts/probe_pretraining.py)."""

from __future__ import annotations


def load_examples(cfg) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples: the built-in suite (text or multimodal) and/or data.train_files / eval_files."""
    from moelora.data.tasks import build_task_suite
    from moelora.data.user_data import load_user_data
    from moelora.errors import ConfigError

    train, evals = [], []
    if cfg.data.tasks != "none" and cfg.data.suite == "multimodal":
        from moelora.data.multimodal import build_multimodal_suite  # digits, shapes, espeak-ng speech + text tasks

        train, evals = build_multimodal_suite(cfg.data.tasks, cfg.data.n_train_per_task, cfg.data.n_eval_per_task,
                                              cfg.seed, cfg.data.n_train_for)
    elif cfg.data.tasks != "none":
        train, evals = build_task_suite(cfg.data.tasks, cfg.data.n_train_per_task, cfg.data.n_eval_per_task, cfg.seed,
                                        cfg.data.n_train_for)
    # Methods routed by task label (LoRA-Mixer's stage 1, MeteoRA's gate loss) need every row's task; other
    # methods give rows without one data.default_task.
    routed = cfg.method_config.task_labels([]) is not None
    required = f"method {cfg.method_config.method_name} routes each row by its task label" if routed else None
    for files, into in ((cfg.data.train_files, train), (cfg.data.eval_files, evals)):
        if files:
            into += load_user_data(files, task_field=cfg.data.task_field, default_task=cfg.data.default_task,
                                   task_required_by=required)
    if not train:
        raise ConfigError("data", "no training data: set data.tasks or data.train_files")
    return train, evals


def load_pretraining_examples(cfg) -> list[dict]:
    """encoder_pretraining_data's examples: more of the suite's pictures/clips, with the run's seed and held-out
    split (so none of them is a held-out item of its task), for encoder pretraining only."""
    if not cfg.encoder_pretraining_data:  # (the config refuses it without encoder_pretraining_steps)
        return []
    from moelora.data.multimodal import build_multimodal_suite

    counts = dict(cfg.encoder_pretraining_data)
    return build_multimodal_suite(list(counts), 1, cfg.data.n_eval_per_task, cfg.seed, counts)[0]
