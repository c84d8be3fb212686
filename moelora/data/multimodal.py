"""The built-in multimodal instruction suite: images, speech and text tasks with exact-match answers.

Vision (scikit-learn's digit scans, generated shape pictures):
  ``digit_read``       one digit scan -> the digit
  ``digit_compare``    two scans of different digits -> the larger digit
  ``shape_count``      1-4 shapes -> how many
  ``shape_color``      1-3 shapes of different kinds -> the colour of the one named
Speech (espeak-ng, 6 voices x 4 speeds x pitches):
  ``spoken_digit``      a spoken digit word -> the digit
  ``transcribe_word``   a spoken word -> the word, written
  ``spoken_arithmetic`` "seven plus two" / "eight minus three" -> the result
Vision + speech (Phi-4's VISION_SPEECH mode):
  ``digit_audio_match`` a digit scan and a spoken digit -> "yes" if they agree, else "no"
Text, mixed in: any task of the text suite (``data.tasks: all`` adds ``add`` and ``reverse_word``).
Captions, for the align stage (named, never in ``all``; LLaVA's stage-1 data): one picture or clip, no
question and no chat template ("plain", as LLaVA's pre-training conversations), the whole content as answer:
  ``caption_digit``    a digit scan -> "7"
  ``caption_shapes``   1-4 shapes -> every shape with its colour in reading order: "red square, blue cross"
  ``caption_speech``   a clip of any speech task's text -> that text: "seven", "zebra", "seven plus two"
A caption names everything in the medium, so one example teaches every shape's colour where a shape_color
question teaches one, and the sequence is a third of a question's length (no system prompt, no question).

Splits are deterministic and disjoint: held-out examples use digit scans no training example uses (a
fixed split of the scans), speech pitches no training clip uses (so every held-out clip is a new
rendition), and shape scenes drawn first and skipped by training. As in the text suite, the held-out split
depends only on (seed, n_eval_per_task).
"""

from __future__ import annotations

import difflib
import random
import zlib
from typing import Callable

from moelora.data import audio, images
from moelora.data.formatting import PLAIN
from moelora.data.media import AUDIO_MARKER, IMAGE_MARKER
from moelora.data.tasks import TASKS as TEXT_TASKS
from moelora.data.tasks import build_task_suite, train_counts
from moelora.errors import DataError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPOKEN_WORDS = ("apple", "river", "house", "table", "water", "light", "green", "happy",
                "music", "paper", "stone", "bread", "cloud", "tiger", "zebra", "robot")
VOICES = ("en", "en-us", "en+f3", "en+m3", "en-gb-scotland", "en-029")
SPEEDS = (140, 155, 170, 185)  # words per minute
PITCHES = {"train": (30, 42, 54, 66), "eval": (36, 48, 60)}  # disjoint: held-out clips are new renditions
DEFAULT_TEXT_TASKS = ("add", "reverse_word")  # the text tasks `all` mixes in


def _clip(rng: random.Random, split: str, text: str) -> tuple:
    return ("speech", text, rng.choice(VOICES), rng.choice(SPEEDS), rng.choice(PITCHES[split]))


def _scan(rng: random.Random, split: str, digit: int) -> tuple:
    return ("digit", rng.choice(images.digit_pools()[split][digit]))


def _scene(rng: random.Random, n: int, distinct_shapes: bool = False) -> tuple:
    shapes = rng.sample(images.SHAPES, n) if distinct_shapes else [rng.choice(images.SHAPES) for _ in range(n)]
    scene = images.ShapeScene(tuple(shapes), tuple(rng.choice(list(images.COLORS)) for _ in range(n)),
                              tuple(rng.sample(range(9), n)), (rng.randint(0, 1), rng.randint(0, 1)))
    return ("scene", scene)


# ---------------------------------------------------------------- generators: (rng, split) -> (instruction, response, media)
def _digit_read(rng, split):
    d = rng.randrange(10)
    return f"{IMAGE_MARKER}\nWhat digit is shown? Answer with the digit only.", str(d), [_scan(rng, split, d)]


def _digit_compare(rng, split):
    a, b = rng.sample(range(10), 2)
    return (f"{IMAGE_MARKER} {IMAGE_MARKER}\nWhich of the two digits is larger? Answer with the digit only.",
            str(max(a, b)), [_scan(rng, split, a), _scan(rng, split, b)])


def _shape_count(rng, split):
    n = rng.randint(1, 4)
    return f"{IMAGE_MARKER}\nHow many shapes are in the picture? Answer with a number.", str(n), [_scene(rng, n)]


def _shape_color(rng, split):
    kind, scene = _scene(rng, rng.randint(1, 3), distinct_shapes=True)
    i = rng.randrange(len(scene.shapes))
    return (f"{IMAGE_MARKER}\nWhat colour is the {scene.shapes[i]}? Answer with one word.", scene.colors[i],
            [(kind, scene)])


def _spoken_digit(rng, split):
    d = rng.randrange(10)
    return f"{AUDIO_MARKER}\nWhich digit is spoken? Answer with the digit only.", str(d), [_clip(rng, split, DIGIT_WORDS[d])]


def _transcribe_word(rng, split):
    w = rng.choice(SPOKEN_WORDS)
    return f"{AUDIO_MARKER}\nWrite down the spoken word.", w, [_clip(rng, split, w)]


def _expression(rng) -> tuple[str, int]:
    a, b = rng.randrange(10), rng.randrange(10)
    if rng.random() < 0.5:
        return f"{DIGIT_WORDS[a]} plus {DIGIT_WORDS[b]}", a + b
    a, b = max(a, b), min(a, b)
    return f"{DIGIT_WORDS[a]} minus {DIGIT_WORDS[b]}", a - b


def _spoken_arithmetic(rng, split):
    text, result = _expression(rng)
    return f"{AUDIO_MARKER}\nCompute the spoken expression. Answer with the number only.", str(result), [_clip(rng, split, text)]


def _digit_audio_match(rng, split):
    d = rng.randrange(10)
    said = d if rng.random() < 0.5 else rng.choice([x for x in range(10) if x != d])
    return (f"{IMAGE_MARKER} {AUDIO_MARKER}\nIs the spoken number the digit in the picture? Answer yes or no.",
            "yes" if said == d else "no", [_scan(rng, split, d), _clip(rng, split, DIGIT_WORDS[said])])


def _caption_digit(rng, split):
    scan = _scan(rng, split, rng.randrange(10))
    return IMAGE_MARKER, source_caption(scan), [scan]


def scene_caption(scene: images.ShapeScene) -> str:
    """Every shape with its colour, in reading order of the grid cells: "red square, blue cross"."""
    return ", ".join(f"{scene.colors[i]} {scene.shapes[i]}" for i in sorted(range(len(scene.cells)),
                                                                             key=scene.cells.__getitem__))


def _caption_shapes(rng, split):
    if rng.random() < 0.5:  # shape_color's scenes (1-3 shapes of different kinds), else shape_count's (1-4, any)
        kind, scene = _scene(rng, rng.randint(1, 3), distinct_shapes=True)
    else:
        kind, scene = _scene(rng, rng.randint(1, 4))
    return IMAGE_MARKER, source_caption((kind, scene)), [(kind, scene)]


def _caption_speech(rng, split):
    source = rng.randrange(3)  # the texts of spoken_digit, transcribe_word and spoken_arithmetic, a third each
    text = (DIGIT_WORDS[rng.randrange(10)] if source == 0 else rng.choice(SPOKEN_WORDS) if source == 1
            else _expression(rng)[0])
    clip = _clip(rng, split, text)
    return AUDIO_MARKER, source_caption(clip), [clip]


# ---------------------------------------------------------------- what each picture or clip shows, as class labels
# The targets of encoder pretraining (moelora.multimodal.pretraining), read from an example's "sources": one
# class per slot, IGNORE where a slot does not apply. A picture: its digit, then the kind and the colour of what
# is in each of the 9 grid cells (0: empty); a clip: its words in order (0: no word there). Together they hold
# everything a caption says, so an encoder that predicts them has the features every task asks about.
IGNORE = -100  # cross_entropy's ignore_index
SPEECH_WORDS = (*DIGIT_WORDS, *SPOKEN_WORDS, "plus", "minus")  # every word a clip of the suite says
_CELLS = 9
LABEL_SLOTS = {"image": (10, *(1 + len(images.SHAPES),) * _CELLS, *(1 + len(images.COLORS),) * _CELLS),
               "audio": (1 + len(SPEECH_WORDS),) * 3}  # the longest clip says three words ("seven plus two")
LABEL_GROUPS = {  # the slots of each kind by what they say (what accuracy is reported over)
    "image": {"digit": [0], "kinds": list(range(1, 1 + _CELLS)), "colours": list(range(1 + _CELLS, 1 + 2 * _CELLS))},
    "audio": {"words": list(range(len(LABEL_SLOTS["audio"])))},
}


def source_labels(source: tuple) -> tuple[str, list[int]]:
    """("image" | "audio", one class per LABEL_SLOTS slot) for a source description of `_draw`'s media."""
    if source[0] == "digit":
        return "image", [images.digit_label(source[1])] + [IGNORE] * (2 * _CELLS)
    if source[0] == "scene":
        scene, kinds, colours = source[1], [0] * _CELLS, [0] * _CELLS
        for shape, colour, cell in zip(scene.shapes, scene.colors, scene.cells):
            kinds[cell], colours[cell] = 1 + images.SHAPES.index(shape), 1 + list(images.COLORS).index(colour)
        return "image", [IGNORE] + kinds + colours
    if source[0] == "speech":
        words = [1 + SPEECH_WORDS.index(w) for w in source[1].split()]
        return "audio", words + [0] * (len(LABEL_SLOTS["audio"]) - len(words))
    raise DataError(f"no labels for a media source of kind {source[0]!r}")


def source_caption(source: tuple) -> str:
    """What a picture or clip shows: "7", "red square, blue cross", "seven plus two" (the caption tasks' answers,
    and a words projector's pretraining targets)."""
    if source[0] == "digit":
        return str(images.digit_label(source[1]))
    if source[0] == "scene":
        return scene_caption(source[1])
    if source[0] == "speech":
        return source[1]
    raise DataError(f"no caption for a media source of kind {source[0]!r}")


MULTIMODAL_TASKS: dict[str, Callable] = {
    "digit_read": _digit_read, "digit_compare": _digit_compare, "shape_count": _shape_count,
    "shape_color": _shape_color, "spoken_digit": _spoken_digit, "transcribe_word": _transcribe_word,
    "spoken_arithmetic": _spoken_arithmetic, "digit_audio_match": _digit_audio_match,
}
CAPTION_TASKS: dict[str, Callable] = {  # the align stage's data; rendered "plain" (no chat template)
    "caption_digit": _caption_digit, "caption_shapes": _caption_shapes, "caption_speech": _caption_speech,
}
MEDIA_TASKS: dict[str, Callable] = {**MULTIMODAL_TASKS, **CAPTION_TASKS}  # every task with images or audio


def resolve_multimodal_task_names(tasks) -> list[str]:
    """"all" (every multimodal task + DEFAULT_TEXT_TASKS) or a list mixing multimodal and text task names."""
    if isinstance(tasks, str):
        names = list(MULTIMODAL_TASKS) + list(DEFAULT_TEXT_TASKS) if tasks == "all" else [tasks]
    else:
        names = list(dict.fromkeys(tasks))
    if not names:
        raise DataError("no tasks selected for the multimodal suite")
    known = list(MEDIA_TASKS) + list(TEXT_TASKS)
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(str(n), known, n=1)
            raise DataError(f"unknown task '{n}'{f' (did you mean {close[0]!r}?)' if close else ''}; "
                            f"multimodal tasks: all, {', '.join(MEDIA_TASKS)}, or any text task")
    return names


def _draw(name: str, rng: random.Random, split: str, n: int, seen: set, asked: int) -> list[dict]:
    out, attempts = [], 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise DataError(f"task '{name}' cannot produce {asked} distinct examples; lower n_train_per_task / "
                            "n_eval_per_task")
        instruction, response, media = MEDIA_TASKS[name](rng, split)
        key = (instruction, tuple(media))
        if key not in seen:
            seen.add(key)
            out.append({"task": name, "instruction": instruction, "response": response, "media": media,
                        **({"template": PLAIN} if name in CAPTION_TASKS else {})})
    return out


def _materialise(examples: list[dict]) -> list[dict]:
    """Replace media descriptions by tensors: images rendered, speech synthesised (cached) and featurised."""
    clips = sorted({m[1:] for ex in examples for m in ex.get("media", ()) if m[0] == "speech"})
    features = dict(zip(clips, audio.speech_features(clips)))
    out = []
    for ex in examples:
        media = ex.get("media", ())  # text examples have none
        imgs = [images.digit_image(m[1]) if m[0] == "digit" else images.render_scene(m[1])
                for m in media if m[0] != "speech"]
        clips_ = [features[m[1:]] for m in media if m[0] == "speech"]
        item = {k: v for k, v in ex.items() if k != "media"}
        if media:
            item["sources"] = list(media)  # what each item was made from: ("digit", scan) / ("scene", ...) / ("speech", ...)
        if imgs:
            item["images"] = imgs
        if clips_:
            item["audio"] = clips_
        out.append(item)
    return out


def build_multimodal_suite(tasks="all", n_train_per_task: int = 200, n_eval_per_task: int = 32,
                           seed: int = 0, n_train_for: dict[str, int] | None = None) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` examples; media as tensors under "images" ([3, 16, 16]) and "audio" ([40, 160]),
    and the descriptions they were made from under "sources" (in marker order). ``n_train_for``: other train
    sizes for named tasks (tasks.train_counts)."""
    names = resolve_multimodal_task_names(tasks)
    counts = train_counts(names, n_train_per_task, n_eval_per_task, n_train_for)
    text = [n for n in names if n in TEXT_TASKS]
    train, evals = (build_task_suite(text, n_train_per_task, n_eval_per_task, seed,
                                     {t: counts[t] for t in text}) if text else ([], []))
    for name in (n for n in names if n in MEDIA_TASKS):
        rng = random.Random(seed * 1_000_003 + zlib.crc32(f"multimodal/{name}".encode()))
        seen: set = set()
        asked = counts[name] + n_eval_per_task
        evals += _draw(name, rng, "eval", n_eval_per_task, seen, asked)
        train += _draw(name, rng, "train", counts[name], seen, asked)
    random.Random(seed).shuffle(train)
    return _materialise(train), _materialise(evals)
