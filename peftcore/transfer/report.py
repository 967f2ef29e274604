"""The curves of a fine-tuning run as a PNG (per-epoch losses and accuracy), written atomically."""

from __future__ import annotations

import io
from pathlib import Path


def plot_curves(metrics: dict, path: Path, say=print) -> bool:
    """Plot ``metrics["epochs"]`` (train/eval loss, eval accuracy) to ``path``; False (and a message
    saying why) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("no curves.png: matplotlib is not installed (pip install matplotlib)")
        return False
    from ..io import _atomic_write

    rows = metrics["epochs"]
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    if any("eval_loss" in r for r in rows):
        ax_loss.plot(epochs, [r.get("eval_loss") for r in rows], "s-", label="eval")
        ax_acc.plot(epochs, [r.get("eval_accuracy") for r in rows], "s-", color="tab:green")
        if metrics.get("best_epoch"):
            ax_acc.axvline(metrics["best_epoch"], color="grey", ls=":", label=f"best (epoch {metrics['best_epoch']})")
            ax_acc.legend(loc="lower right")
    else:
        ax_acc.text(0.5, 0.5, "no --eval file", ha="center", va="center", transform=ax_acc.transAxes)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="eval accuracy")
    fig.suptitle(f"peftcore finetune --method {metrics['method']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write(Path(path), lambda f: f.write(buf.getvalue()))
    return True
