"""Stage plots: PNG figures of the training history and the test result.

Reads the per-epoch series that train logged with dvclive (metrics/train/plots/metrics),
metrics/eval.json and evaluate's per-word table (reports/eval/words.csv); writes plots/loss.png
(train vs validation loss, with CTC and penalty parts), plots/error_rates.png (validation WER and
CER per epoch, test WER/CER as dashed lines), plots/blank_ratio.png (share of blank frames per
epoch) and plots/calibration.png with its numbers in plots/calibration.csv (test words binned by
confidence: the share of correct words and the count in each bin; a calibrated confidence follows
the diagonal). `dvc plots show` renders the same series from the top-level `plots:` of dvc.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from pydantic import Field  # noqa: E402

from ctcflow.params import Section  # noqa: E402
from stages.runner import StageError, stage_main  # noqa: E402

HISTORY_DIR = Path("metrics/train/plots/metrics")
EVAL_METRICS = Path("metrics/eval.json")
EVAL_WORDS = Path("reports/eval/words.csv")
OUT_DIR = Path("plots")
CALIBRATION_BINS = 10  # of equal width over confidence 0–1
# The per-epoch series each figure draws, with their legend labels (train logs each every epoch).
LOSS_SERIES = {"train/loss": "train total", "train/ctc_loss": "train CTC",
               "train/blank_penalty": "train blank penalty", "valid/loss": "validation"}
ERROR_SERIES = {"valid/wer": "validation WER", "valid/cer": "validation CER"}
BLANK_SERIES = {"train/blank_ratio": "train", "valid/blank_ratio": "validation"}
SERIES = (*LOSS_SERIES, *ERROR_SERIES, *BLANK_SERIES)


class PlotsParams(Section):
    dpi: int = Field(ge=50, le=600)


def read_history(history_dir: Path) -> pd.DataFrame:
    """dvclive's one TSV per metric, joined into one frame indexed by epoch ('train/loss', …)."""
    series = {}
    for tsv in sorted(history_dir.rglob("*.tsv")):
        name = tsv.relative_to(history_dir).with_suffix("").as_posix()
        frame = pd.read_csv(tsv, sep="\t")
        series[name] = frame.set_index("step")[frame.columns[-1]]
    if not series:
        raise StageError(f"no training history under {history_dir}: run the train stage first")
    return pd.DataFrame(series).rename_axis("epoch")


def figure(history: pd.DataFrame, lines: dict[str, str], title: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(7, 4))
    for column, label in lines.items():
        ax.plot(history.index, history[column], marker="o", markersize=3, label=label)
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def calibration(words: pd.DataFrame) -> pd.DataFrame:
    """Per confidence bin (its middle): the words in it and the share of them that are correct."""
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    bins = pd.cut(words["confidence"], edges, include_lowest=True, labels=((edges[:-1] + edges[1:]) / 2).round(3))
    table = words.groupby(bins, observed=False)["correct"].agg(["size", "mean"])
    return pd.DataFrame({"confidence": table.index.astype(float), "words": table["size"].to_numpy(),
                         "correct_share": table["mean"].to_numpy()})


def run(params: PlotsParams, history_dir: Path = HISTORY_DIR, eval_metrics: Path = EVAL_METRICS,
        out_dir: Path = OUT_DIR, eval_words: Path = EVAL_WORDS) -> list[Path]:
    history = read_history(history_dir)
    missing = [name for name in SERIES if name not in history.columns]
    if missing:
        raise StageError(f"the training history under {history_dir} lacks {', '.join(missing)}: "
                         f"not what the train stage logs (rerun it)")
    test = json.loads(eval_metrics.read_text())
    if not isinstance(test, dict) or not all(isinstance(test.get(k), (int, float)) for k in ("wer", "cer")):
        raise StageError(f"{eval_metrics} has no top-level 'wer' and 'cer': not the evaluate stage's metrics")
    out_dir.mkdir(parents=True, exist_ok=True)

    fig, ax = figure(history, LOSS_SERIES, "Loss per epoch", "loss")
    ax.legend()
    fig.savefig(out_dir / "loss.png", dpi=params.dpi, bbox_inches="tight")

    fig, ax = figure(history, ERROR_SERIES, "Error rates per epoch", "error rate")
    ax.axhline(test["wer"], color="C0", linestyle="--", label=f"test WER {test['wer']:.1%}")
    ax.axhline(test["cer"], color="C1", linestyle="--", label=f"test CER {test['cer']:.1%}")
    # Up to 1 (all wrong) where every rate is under it, above where one is (insertions): the test
    # lines too, which can lie above every epoch's validation rate.
    highest = max(history[list(ERROR_SERIES)].to_numpy().max(), test["wer"], test["cer"])
    ax.set_ylim(0, highest * 1.05 + 0.01 if highest > 1.0 else min(1.0, highest * 1.05 + 0.01))
    ax.legend()
    fig.savefig(out_dir / "error_rates.png", dpi=params.dpi, bbox_inches="tight")

    fig, ax = figure(history, BLANK_SERIES, "Share of frames whose argmax is blank", "blank ratio")
    ax.legend()
    fig.savefig(out_dir / "blank_ratio.png", dpi=params.dpi, bbox_inches="tight")

    bins = calibration(pd.read_csv(eval_words, keep_default_na=False))
    bins.to_csv(out_dir / "calibration.csv", index=False)
    fig, ax = plt.subplots(figsize=(6, 5))
    counts = ax.twinx()
    counts.bar(bins["confidence"], bins["words"], width=0.9 / CALIBRATION_BINS, color="C7", alpha=0.3)
    counts.set_ylabel("words in the bin")
    ax.set_zorder(counts.get_zorder() + 1)  # the curve over the bars
    ax.patch.set_visible(False)
    ax.plot([0, 1], [0, 1], color="C7", linestyle="--", label="calibrated")
    ax.plot(bins["confidence"], bins["correct_share"], marker="o", label="share of correct words")
    ax.set(title=f"Word confidence against correctness ({int(bins['words'].sum())} words)",
           xlabel="confidence (bin middle)", ylabel="share correct", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.savefig(out_dir / "calibration.png", dpi=params.dpi, bbox_inches="tight")
    plt.close("all")
    written = sorted(out_dir.glob("*.png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return written


def main(argv: list[str] | None = None) -> None:
    stage_main("plots", PlotsParams, run, __doc__, argv)


if __name__ == "__main__":
    main()
