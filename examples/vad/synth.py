"""Deterministic 16 kHz test audio: speech-like clips and non-speech clips, made in code.

No recordings can be downloaded, so speech is approximated the way a source-filter
synthesiser does it: a glottal pulse train with a moving pitch contour and jitter, shaped by
three formant resonators whose frequencies move between vowel targets, with syllable-rate
(3-6 Hz) amplitude envelopes, fricative noise bursts between some syllables, and short pauses
between words; the same over pink noise at 0-15 dB SNR. Non-speech is silence, white and pink noise at several levels, mains hum with
harmonics, and a steady tone. Every clip is a pure function of its kind and seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.signal import lfilter

SR = 16000
# (F1, F2, F3) in Hz for a few vowels (adult averages, Peterson & Barney style).
VOWELS = (
    (730, 1090, 2440),
    (270, 2290, 3010),
    (300, 870, 2240),
    (530, 1840, 2480),
    (570, 840, 2410),
    (660, 1720, 2410),
)


def _resonator(x: np.ndarray, freq: float, bw: float) -> np.ndarray:
    """Second-order IIR resonance at ``freq`` with bandwidth ``bw`` (unity gain at DC-ish)."""
    r = np.exp(-np.pi * bw / SR)
    a = [1.0, -2.0 * r * np.cos(2.0 * np.pi * freq / SR), r * r]
    return np.asarray(lfilter([1.0 - r], a, x))


def _syllable(rng: np.random.Generator, n: int, f0: float) -> np.ndarray:
    """One voiced syllable of ``n`` samples: a pulse train through moving vowel formants."""
    t = np.arange(n) / SR
    # Pitch: a rise-fall contour around f0 with slow vibrato-like drift and jitter.
    contour = f0 * (1.0 + 0.12 * np.sin(np.pi * t / t[-1]) + rng.uniform(-0.08, 0.0) * t / t[-1])
    contour *= 1.0 + 0.01 * rng.standard_normal(n).cumsum() / np.sqrt(np.arange(1, n + 1))
    phase = np.cumsum(contour) / SR
    # Glottal-like source: a sawtooth's derivative is a pulse train; soften it with a low-pass.
    saw = 2.0 * (phase % 1.0) - 1.0
    src = np.diff(saw, prepend=saw[0])
    src = np.where(src < -1.0, -1.0, 0.0) + 0.02 * rng.standard_normal(
        n
    )  # one pulse per period + breath
    src = lfilter([1.0], [1.0, -0.95], src)
    v0, v1 = VOWELS[rng.integers(len(VOWELS))], VOWELS[rng.integers(len(VOWELS))]
    out = np.zeros(n)
    half = n // 2
    for k in range(3):  # the formants glide from one vowel to the next halfway
        f = np.concatenate([np.full(half, v0[k]), np.linspace(v0[k], v1[k], n - half)])
        seg = 256
        y = np.zeros(n)
        for s in range(0, n, seg):  # piecewise-constant filters; plenty for a moving formant
            y[s : s + seg] = _resonator(src[s : s + seg + 64], float(f[s]), 60.0 + 40.0 * k)[
                : len(y[s : s + seg])
            ]
        out += y / (k + 1)
    env = np.sin(np.pi * np.arange(n) / n) ** 0.6  # attack and decay of the syllable nucleus
    return out * env


def _fricative(rng: np.random.Generator, n: int) -> np.ndarray:
    """An /s/- or /f/-like burst: high-passed noise with a short envelope."""
    noise = rng.standard_normal(n)
    hp = np.asarray(lfilter([1.0, -1.0], [1.0, -0.6], noise))
    return 0.15 * hp * np.hanning(n)


def speech(seed: int, seconds: float = 2.0) -> np.ndarray:
    """Words of 1-3 syllables at 3-6 syllables per second, separated by short pauses."""
    rng = np.random.default_rng(seed)
    n_total = int(seconds * SR)
    f0 = float(rng.uniform(95.0, 240.0))  # speaker pitch: low male to high female
    out = np.zeros(n_total)
    pos = int(rng.uniform(0.0, 0.1) * SR)
    while pos < n_total:
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.3:  # a consonant before the vowel
                m = int(rng.uniform(0.04, 0.1) * SR)
                out[pos : pos + m] += _fricative(rng, m)[: max(0, n_total - pos)]
                pos += m
            m = int(SR / rng.uniform(3.0, 6.0))
            out[pos : pos + m] += _syllable(rng, m, f0 * rng.uniform(0.9, 1.1))[
                : max(0, n_total - pos)
            ]
            pos += m
        pos += int(rng.uniform(0.05, 0.25) * SR)  # pause between words
    peak = np.max(np.abs(out)) or 1.0
    level = rng.uniform(0.2, 0.7)
    noise_floor = 10 ** (rng.uniform(-4.0, -2.5)) * rng.standard_normal(n_total)  # a quiet room
    return (level * out / peak + noise_floor).astype(np.float32)


def _pink(rng: np.random.Generator, n: int) -> np.ndarray:
    """1/f noise by spectral shaping of white noise, unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec))
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0.0
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x**2)) or 1.0)


def non_speech(seed: int, seconds: float = 2.0) -> np.ndarray:
    """One of: silence, white noise, pink noise, mains hum, a steady tone (chosen by seed)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    kind = NON_SPEECH_KINDS[seed % len(NON_SPEECH_KINDS)]
    level = float(rng.choice([0.003, 0.02, 0.1, 0.3]))
    if kind == "silence":
        x = 1e-4 * rng.standard_normal(n) * rng.random()
    elif kind == "white":
        x = level * rng.standard_normal(n)
    elif kind == "pink":
        x = level * _pink(rng, n)
    elif kind == "hum":
        mains = float(rng.choice([50.0, 60.0]))
        x = np.zeros(n)
        for k in (1, 2, 3, 5):
            x += level / k * np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 6.3))
        x = x + 0.002 * rng.standard_normal(n)
    else:  # tone
        x = level * np.sin(2 * np.pi * rng.uniform(300.0, 3000.0) * t)
    return np.asarray(x, dtype=np.float32)


def noisy_speech(seed: int, seconds: float = 2.0) -> np.ndarray:
    """Speech over pink noise at 0-15 dB SNR: the frames where the probability is in between."""
    rng = np.random.default_rng(seed + 7919)
    x = speech(seed, seconds).astype(np.float64)
    snr_db = rng.uniform(0.0, 15.0)
    noise = _pink(rng, len(x)) * np.sqrt(np.mean(x**2) / 10 ** (snr_db / 10))
    return np.asarray(x + noise, dtype=np.float32)


NON_SPEECH_KINDS = ("silence", "white", "pink", "hum", "tone")
KINDS: dict[str, Callable[[int, float], np.ndarray]] = {
    "speech": speech,
    "noisy_speech": noisy_speech,
    "non_speech": non_speech,
}
