"""The demo model on FSDD recordings changed before it hears them: which difference between real
speech and espeak does its failure come from?

Each transform moves one thing the model might be missing: the vocal tract's length (pitch and
formants shifted), the speaking rate, the noise floor, the band, and the voice source (an LPC
vocoder keeps each frame's spectral envelope and replaces the excitation by noise, or by pulses at
the tracked pitch, as a formant synthesizer makes it). If one of them closed the gap, WER would
fall under it. The decode-time blank penalty is swept on the untouched recordings too. Every
transform also runs on a control set the model hears well (--control: a table corpus such as
benchmarks/espeak_digits.py writes), to show it keeps the words audible.

    python benchmarks/fsdd_transforms.py --fsdd path/to/free-spoken-digit-dataset/recordings \
        --control data/test_sets/espeak_digits
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, results_path, write_results  # noqa: E402
from ctcflow import augment  # noqa: E402
from ctcflow.audio import decode_audio  # noqa: E402
from ctcflow.metrics import error_rates  # noqa: E402
from ctcflow.params import load_section  # noqa: E402
from ctcflow.sources import fsdd  # noqa: E402
from ctcflow.transcribe import Transcriber  # noqa: E402
from stages.evaluate import EvaluateParams  # noqa: E402

SAMPLE_RATE = 16000
LPC_ORDER = 18  # two poles per kHz plus two: the usual rule for 16 kHz speech
FRAME, HOP = 400, 160  # 25 ms, 10 ms


def lpc(frame: np.ndarray, order: int) -> tuple[np.ndarray, float]:
    """Autocorrelation LPC (Levinson-Durbin): the all-pole filter and its residual energy.
    By hand: torchaudio has no LPC, and scipy or librosa would be a dependency for these few lines."""
    r = np.array([frame[: len(frame) - k] @ frame[k:] for k in range(order + 1)])
    a, error = np.zeros(order + 1), r[0] * 1.0001 + 1e-12  # a little white noise keeps it stable
    a[0] = 1.0
    for i in range(1, order + 1):
        k = -(r[i] + a[1:i] @ r[i - 1:0:-1]) / error
        a[1:i] += k * a[i - 1:0:-1]
        a[i] = k
        error *= 1 - k * k
    return a, error


def vocode(waveform: torch.Tensor, source: str, generator: torch.Generator) -> torch.Tensor:
    """The spectral envelope of every frame kept, the excitation replaced: noise, or pulses at the pitch."""
    x = torch.cat([waveform[:1], waveform[1:] - 0.95 * waveform[:-1]]).double()  # pre-emphasis
    pitch = AF.detect_pitch_frequency(waveform[None], SAMPLE_RATE, frame_time=0.025, win_length=5,
                                      freq_low=70, freq_high=400)[0]
    window = torch.hann_window(FRAME, dtype=torch.float64)
    out = torch.zeros(len(x) + FRAME, dtype=torch.float64)
    starts = range(0, max(1, len(x) - FRAME), HOP)
    energy = torch.tensor([float((x[s:s + FRAME] * window).square().mean()) for s in starts])
    next_pulse = 0.0
    for j, s in enumerate(starts):
        frame = x[s:s + FRAME]
        a, error = lpc((frame * window).numpy(), LPC_ORDER)
        crossings = float((frame[1:].sign() != frame[:-1].sign()).double().mean())
        voiced = energy[j] > 1e-3 * energy.max() and crossings < 0.25
        if source == "pulses" and voiced:
            period = SAMPLE_RATE / max(float(pitch[min(j * len(pitch) // len(starts), len(pitch) - 1)]), 60.0)
            excitation = torch.zeros(FRAME, dtype=torch.float64)
            t = next_pulse
            while t < FRAME:
                excitation[int(t)] = 1.0
                t += period
            next_pulse = (t - HOP) % period
            excitation -= excitation.mean()
        else:
            excitation = torch.randn(FRAME, generator=generator, dtype=torch.float64)
        excitation /= excitation.square().mean().sqrt() + 1e-12
        b = torch.zeros(LPC_ORDER + 1, dtype=torch.float64)
        b[0] = 1.0
        y = AF.lfilter(excitation, torch.from_numpy(a), b, clamp=False)
        out[s:s + FRAME] += y * (max(error, 0.0) / FRAME) ** 0.5 * window
    y = AF.lfilter(out[: len(x)], torch.tensor([1.0, -0.95], dtype=torch.float64),
                   torch.tensor([1.0, 0.0], dtype=torch.float64), clamp=False)  # de-emphasis
    return y.float()


def transforms(generator: torch.Generator) -> dict:
    def noise(kind: str, snr_db: float):
        return lambda w: augment.add_noise(w, augment.colored_noise(w.numel(), SAMPLE_RATE, kind, generator), snr_db)
    return {
        "as is": lambda w: w,
        "pitch and formants -3 semitones": lambda w: augment.pitch_shift(w, SAMPLE_RATE, -3.0),
        "pitch and formants +3 semitones": lambda w: augment.pitch_shift(w, SAMPLE_RATE, 3.0),
        "speed 0.8": lambda w: augment.speed(w, 0.8),
        "speed 1.25": lambda w: augment.speed(w, 1.25),
        "white noise 20 dB": noise("white", 20.0),
        "pink noise 20 dB": noise("pink", 20.0),
        "low-pass 3 kHz": lambda w: augment.band_limit(w, SAMPLE_RATE, 0.0, 3000.0),
        "high-pass 300 Hz": lambda w: augment.band_limit(w, SAMPLE_RATE, 300.0, SAMPLE_RATE / 2),
        "LPC vocoder, noise source": lambda w: vocode(w, "noise", generator),
        "LPC vocoder, pulse source": lambda w: vocode(w, "pulses", generator),
    }


def score(transcriber: Transcriber, paths: list[str], refs: list[str]) -> dict:
    hyps = [r.text for r in transcriber.transcribe(paths)]
    return {"wer": round(error_rates(refs, hyps)["wer"] * 100, 1), "empty": round(100 * sum(not h for h in hyps) / len(hyps), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsdd", required=True, help="a folder of FSDD recordings ({digit}_{speaker}_{index}.wav)")
    parser.add_argument("--control", help="a table corpus the model hears well (list.csv: path, text), e.g. espeak digits")
    parser.add_argument("--model", default="models/best.pt", help="checkpoint (default: %(default)s)")
    parser.add_argument("--lm-dir", default="data/lm", help="lexicon and LM of the beam search (default: %(default)s)")
    parser.add_argument("--params", default="params.yaml", help="whose evaluate.beam to decode with (default: %(default)s)")
    parser.add_argument("--step", type=int, default=8, help="every Nth recording, in file-name order (default: %(default)s)")
    parser.add_argument("--penalties", default="0,1,2,3,4", help="decode-time blank penalties to sweep (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--out", help="results JSON (default: benchmarks/results/fsdd_transforms.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    beam = load_section("evaluate", EvaluateParams, args.params).beam

    table = fsdd(Path(args.fsdd)).iloc[:: args.step]
    sets = {"fsdd": (table.audio_path.tolist(), table.text.tolist())}
    if args.control:
        control = pd.read_csv(Path(args.control) / "list.csv").iloc[:: args.step]
        sets["control"] = ([str(Path(args.control) / p) for p in control.path], control.text.tolist())

    def decoder(name: str, penalty: float = 0.0) -> Transcriber:
        return Transcriber(args.model, decoder=name, beam=beam, lm_dir=args.lm_dir, blank_penalty=penalty, device="cpu",
                           chunk_seconds=30.0, overlap_seconds=4.0, batch_size=16, num_threads=None)

    decoders = {"greedy": decoder("greedy"), "beam": decoder("beam")}
    results = {"model": args.model, "fsdd_recordings": len(table), "step": args.step, "transforms": {}}
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, transform in tqdm(transforms(generator).items(), desc="transforms", unit="transform"):
            row = {}
            for set_name, (paths, refs) in sets.items():
                changed = []
                for i, path in enumerate(paths):
                    audio = transform(decode_audio(path, SAMPLE_RATE).waveform)
                    changed.append(f"{tmp}/{set_name}-{i}.wav")
                    sf.write(changed[-1], (audio / audio.abs().max().clamp(min=1e-6) * 0.5).numpy(), SAMPLE_RATE)
                for dec_name, dec in decoders.items():
                    row[f"{set_name}/{dec_name}"] = score(dec, changed, refs)
            results["transforms"][name] = row
            tqdm.write(f"{name}: " + ", ".join(f"{k} {v['wer']} %" for k, v in row.items()))
    paths, refs = sets["fsdd"]
    results["blank_penalty"] = {}
    for penalty in [float(p) for p in args.penalties.split(",")]:
        results["blank_penalty"][penalty] = score(decoder("beam", penalty), paths, refs)
        print(f"beam, blank penalty {penalty:g}: WER {results['blank_penalty'][penalty]['wer']} %, "
              f"empty answers {results['blank_penalty'][penalty]['empty']} %")
    results["machine"] = machine()
    write_results(results_path("fsdd_transforms", False, args.out), results)


if __name__ == "__main__":
    main()
