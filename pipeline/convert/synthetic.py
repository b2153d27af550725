"""A deterministic, learnable speech + face corpus, so the project runs with no data to download.

Each take is made from the same hidden controls that drive both streams, as in real speech:
syllables with a vowel (formants, openness, lip rounding/spreading), bilabial closures, pauses
and fricative noise shape the audio *and* the mouth blendshapes (jawOpen follows openness,
pucker/funnel follow rounded vowels, mouthClose/press follow closures). Blinks and brows are
drawn independently, as in real captures, so they are not predictable from audio.
Take ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import numpy as np

from core.arkit import INDEX, NUM_BLENDSHAPES
from pipeline.shards.members import SAMPLE_RATE

CAPTURE_FPS = 60  # like Live Link Face; make_shards resamples to 30 fps as for real captures
CTRL_RATE = 200  # Hz, rate of the hidden control signals

# vowel: F1, F2, F3 (Hz), jaw openness, funnel, pucker, spread
VOWELS = {
    "a": (750, 1200, 2600, 0.75, 0.00, 0.00, 0.10),
    "e": (500, 1900, 2600, 0.45, 0.00, 0.00, 0.50),
    "i": (300, 2300, 3000, 0.20, 0.00, 0.00, 0.80),
    "o": (500, 900, 2500, 0.50, 0.60, 0.20, 0.00),
    "u": (320, 800, 2300, 0.25, 0.30, 0.80, 0.00),
}
_VOWEL_TABLE = np.array(list(VOWELS.values()), dtype=np.float64)


def _controls(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Hidden per-control-step signals for ``n`` steps at CTRL_RATE."""
    c = {k: np.zeros(n) for k in ("env", "closure", "fric", "vowel_mix")}
    vow = np.zeros((n, _VOWEL_TABLE.shape[1]))
    t = int(rng.integers(0, CTRL_RATE // 5))
    prev = int(rng.integers(len(VOWELS)))
    while t < n:
        if rng.random() < 0.15:  # pause
            t += int(rng.uniform(0.15, 0.5) * CTRL_RATE)
            continue
        if rng.random() < 0.3:  # bilabial closure (p/b/m) before the vowel
            d = int(rng.uniform(0.05, 0.09) * CTRL_RATE)
            seg = c["closure"][t : t + d]  # a view, shorter at the end of the take
            seg[:] = np.sin(np.linspace(0, np.pi, len(seg)))
            t += d
        if rng.random() < 0.2:  # fricative noise (s/f) leading into the vowel
            d = int(rng.uniform(0.05, 0.1) * CTRL_RATE)
            c["fric"][t : t + d] = 1.0
            t += d
        d = int(rng.uniform(0.12, 0.3) * CTRL_RATE)
        v = int(rng.integers(len(VOWELS)))
        seg = slice(t, min(t + d, n))
        k = seg.stop - seg.start
        if k > 0:
            shape = np.sin(np.linspace(0, np.pi, k + 2)[1:-1]) ** 0.7
            c["env"][seg] = shape * rng.uniform(0.7, 1.0)
            mix = np.linspace(0, 1, k)[:, None] ** 0.3  # quick glide from the previous vowel
            vow[seg] = (1 - mix) * _VOWEL_TABLE[prev] + mix * _VOWEL_TABLE[v]
        prev = v
        t += d
    c["vowel"] = vow
    return c


def make_take(seed: int, index: int, seconds: float = 10.0):
    """One synthetic take: ``(audio float32 [seconds*16000], times [T], values [T, 52])``.

    Animation is at CAPTURE_FPS in the canonical ARKit order, values in [0, 1].
    """
    rng = np.random.default_rng([seed, index])
    speaker = np.random.default_rng([seed, index % 8, 7])  # 8 speakers share voice/face traits
    n_ctrl = int(seconds * CTRL_RATE) + 1
    # a take starts anywhere in the speech (as windows cut from long recordings do), so even the
    # first frame of a window depends on what is being said
    lead = int(rng.integers(0, CTRL_RATE))
    c = {k: v[lead:] for k, v in _controls(rng, n_ctrl + lead).items()}
    t_ctrl = np.arange(n_ctrl) / CTRL_RATE

    # ---- audio: harmonics of a wandering f0 shaped by the current vowel's formants
    n = int(round(seconds * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    f0_base = speaker.uniform(95, 220)
    f0_ctrl = f0_base * (
        1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t_ctrl + rng.uniform(0, 6.3))
    )
    formant_scale = speaker.uniform(0.9, 1.15)
    f0 = np.interp(t, t_ctrl, f0_ctrl)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    formants = c["vowel"][:, :3] * formant_scale
    audio = np.zeros(n)
    for k in range(1, int(4000 / f0_base)):
        fk = k * f0_ctrl
        gain = np.zeros(n_ctrl)
        for j, bw, g in ((0, 90.0, 1.0), (1, 120.0, 0.6), (2, 160.0, 0.3)):
            gain += g * np.exp(-0.5 * ((fk - formants[:, j]) / bw) ** 2)
        gain = (gain + 0.02) * c["env"]
        audio += np.interp(t, t_ctrl, gain) * np.sin(k * phase)
    noise = rng.standard_normal(n)
    hiss = np.diff(noise, prepend=0.0)  # high-passed: fricative-like
    audio += 0.6 * np.interp(t, t_ctrl, c["fric"]) * hiss
    audio /= max(np.abs(audio).max(), 1e-6)
    audio = 0.5 * audio + 0.003 * noise  # room noise

    # ---- animation at the capture rate, from the same controls
    frames = int(seconds * CAPTURE_FPS)
    times = np.arange(frames) / CAPTURE_FPS
    env = np.interp(times, t_ctrl, c["env"])
    vowel = np.stack([np.interp(times, t_ctrl, c["vowel"][:, j]) for j in range(3, 7)], axis=1)
    closure = np.interp(times, t_ctrl, c["closure"])
    opened, funnel, pucker, spread = (vowel[:, j] * env for j in range(4))
    y = np.zeros((frames, NUM_BLENDSHAPES))
    rest = speaker.uniform(0.0, 0.08, NUM_BLENDSHAPES)  # each face's resting pose
    y[:] = rest

    def put(name: str, v: np.ndarray) -> None:
        y[:, INDEX[name.lower()]] += v

    put("jawOpen", opened)
    put("mouthFunnel", funnel)
    put("mouthPucker", pucker)
    for side in ("Left", "Right"):
        put(f"mouthSmile{side}", 0.5 * spread)
        put(f"mouthStretch{side}", 0.3 * spread)
        put(f"mouthLowerDown{side}", 0.5 * opened)
        put(f"mouthUpperUp{side}", 0.3 * opened)
        put(f"mouthPress{side}", 0.3 * closure)
    put("mouthClose", 0.6 * closure)
    put("mouthRollLower", 0.2 * closure)
    # independent of the audio: blinks every 2-6 s, slowly drifting brows
    blink = np.zeros(frames)
    tb = rng.uniform(0.3, 3.0)
    while tb < seconds:
        blink += np.clip(1 - np.abs(times - tb) / 0.08, 0, None)
        tb += rng.uniform(2.0, 6.0)
    put("eyeBlinkLeft", 0.7 * blink)
    put("eyeBlinkRight", 0.7 * blink)
    brow = np.cumsum(rng.standard_normal(frames)) * 0.004
    put("browInnerUp", 0.1 + brow - brow.mean())
    y += rng.normal(0, 0.005, y.shape)  # capture jitter
    return audio.astype(np.float32), times, np.clip(y, 0, 1).astype(np.float32)
