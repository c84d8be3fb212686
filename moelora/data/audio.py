"""Speech for the multimodal suite: espeak-ng clips, cached on disk, turned into log-mel features with torch.

Nothing is downloaded: Debian's `espeak-ng` synthesises every clip (`scripts/setup.sh` installs it). A clip
is identified by (text, voice, speed, pitch) and the espeak-ng version; its WAV is written once under
`$MOELORA_CACHE/speech` (default `~/.cache/moelora/speech`), atomically (temporary name, then rename), so
later runs and tests read it back instead of synthesising again. espeak-ng is deterministic for a version,
so a cached clip and a fresh one are the same bytes.

Features: log-mel spectrogram (40 mel bands, 512-point STFT, hop 256 at 22.05 kHz, so ~86 frames/s),
Whisper-style dynamic-range clamp and scaling, on a waveform trimmed of leading/trailing silence and padded
or cut to a fixed `AUDIO_FRAMES` frames (1.86 s), so every clip is one [N_MELS, AUDIO_FRAMES] tensor.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from moelora.errors import DataError

SAMPLE_RATE = 22050  # espeak-ng's native rate
N_MELS = 40  # mel bands: plenty for telling a few dozen words apart
N_FFT = 512  # 23 ms windows
HOP = 256  # 11.6 ms hop
AUDIO_FRAMES = 160  # 1.86 s: the longest utterance ("seven minus three" at the slowest speed) fits
ESPEAK_HINT = "install it with `apt-get install espeak-ng` (scripts/setup.sh does this)"


@functools.lru_cache(maxsize=1)
def espeak_version() -> str:
    """The espeak-ng version string (part of every clip's cache key)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError(f"the multimodal suite's speech needs Debian's espeak-ng, which is not installed; {ESPEAK_HINT}")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def speech_cache_dir() -> Path:
    from moelora.base_models import cache_dir

    return cache_dir() / "speech"


def clip_key(text: str, voice: str, speed: int, pitch: int) -> str:
    raw = f"{espeak_version()}|{text}|{voice}|{speed}|{pitch}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def clip_path(text: str, voice: str, speed: int, pitch: int) -> Path:
    return speech_cache_dir() / f"{clip_key(text, voice, speed, pitch)}.wav"


def synthesize(text: str, voice: str, speed: int, pitch: int) -> Path:
    """Path of the cached WAV for this utterance, synthesising it first if needed (atomic write)."""
    path = clip_path(text, voice, speed, pitch)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".wav", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp, text],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0 or os.path.getsize(tmp) <= 44:
            raise DataError(f"espeak-ng failed for {text!r} (voice {voice}): {proc.stderr.strip() or 'empty output'}")
        os.replace(tmp, path)  # atomic: readers see the old state or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def synthesize_many(utterances: list[tuple[str, str, int, int]], workers: int = 4) -> list[Path]:
    """`synthesize` for many (text, voice, speed, pitch), missing clips in parallel processes of espeak-ng."""
    espeak_version()  # fail once, clearly, if espeak-ng is missing
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda u: synthesize(*u), utterances))


def read_wav(path: Path) -> torch.Tensor:
    """Mono float waveform in [-1, 1] of a 16-bit WAV."""
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise DataError(f"{path}: expected 16-bit mono audio")
            frames = w.readframes(w.getnframes())
            rate = w.getframerate()
    except (wave.Error, EOFError) as exc:
        raise DataError(f"{path} is not a readable WAV file: {exc}") from None
    if rate != SAMPLE_RATE:
        raise DataError(f"{path}: sample rate {rate}, expected {SAMPLE_RATE}")
    return torch.from_numpy(np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0)


@functools.lru_cache(maxsize=4)
def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters on the HTK mel scale, 0 Hz to Nyquist."""
    def to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    mels = torch.linspace(0.0, to_mel(sample_rate / 2), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lower, center, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rising = (bins - lower) / (center - lower)
    falling = (upper - bins) / (upper - center)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def trim_silence(wave_: torch.Tensor, threshold_db: float = 40.0, frame: int = HOP) -> torch.Tensor:
    """Cut leading and trailing frames quieter than the loudest frame by more than `threshold_db`."""
    n = wave_.numel() // frame
    if n == 0:
        return wave_
    energy = wave_[: n * frame].view(n, frame).pow(2).mean(1)
    loud = torch.nonzero(10 * torch.log10(energy + 1e-12) > 10 * math.log10(float(energy.max()) + 1e-12) - threshold_db)
    if loud.numel() == 0:
        return wave_
    return wave_[int(loud[0]) * frame: (int(loud[-1]) + 1) * frame]


def log_mel(wave_: torch.Tensor, frames: int = AUDIO_FRAMES) -> torch.Tensor:
    """[N_MELS, frames] features of a waveform: trimmed, padded/cut to `frames`, log-mel, scaled to ~[-1, 1]."""
    wave_ = trim_silence(wave_)
    length = (frames - 1) * HOP
    wave_ = torch.nn.functional.pad(wave_[:length], (0, max(0, length - wave_.numel())))
    spec = torch.stft(wave_, N_FFT, hop_length=HOP, window=torch.hann_window(N_FFT), center=True,
                      return_complex=True).abs().pow(2)
    mel = torch.log10(torch.clamp(mel_filterbank() @ spec, min=1e-10))
    mel = torch.maximum(mel, mel.max() - 8.0)  # 80 dB dynamic range, as Whisper
    return ((mel + 4.0) / 4.0)[:, :frames].contiguous()


def speech_features(utterances: list[tuple[str, str, int, int]]) -> list[torch.Tensor]:
    """Log-mel features of each (text, voice, speed, pitch), synthesising only the clips not yet cached."""
    return [log_mel(read_wav(p)) for p in synthesize_many(utterances)]
