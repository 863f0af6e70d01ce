"""Loss-curve plot (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations


def _ema(xs, alpha=0.05):
    out, m = [], None
    for x in xs:
        m = x if m is None else (1 - alpha) * m + alpha * x
        out.append(m)
    return out


def plot_loss_curve(history: list, path: str, title: str = "training loss") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [h["iter"] for h in history]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for key, colour in (("loss", "k"), ("classification", "tab:blue"), ("bbox_regression", "tab:orange")):
        ys = [h[key] for h in history if key in h]
        if len(ys) != len(its):
            continue
        ax.plot(its, ys, color=colour, alpha=0.2, linewidth=0.8)
        ax.plot(its, _ema(ys), color=colour, linewidth=1.6, label=f"{key} (EMA)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(its, [h["lr"] for h in history], color="tab:green", linestyle="--", linewidth=1, label="lr")
    ax2.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_pr_curves(res, names, path: str, max_cols: int = 6) -> str:
    """One figure, one small panel per class: precision against recall at IoU 0.50, 0.75 and
    averaged over 0.50:0.95 (area all, maxDets 100), titled with the class's AP.

    ``res``: a :class:`retina_fast.engine.coco_backends.CocoEvalResult` (precision
    ``[T, R, K, A, M]``, ``-1`` for a class without ground truth: an empty panel)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    k = len(res.cat_ids)
    cols = min(max_cols, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.2 * rows + 0.4), dpi=90,
                             sharex=True, sharey=True, squeeze=False)
    t50 = int(np.argmin(np.abs(res.iou_thrs - 0.5)))
    t75 = int(np.argmin(np.abs(res.iou_thrs - 0.75)))
    for i, ax in enumerate(axes.flat):
        if i >= k:
            ax.axis("off")
            continue
        p = res.precision[:, :, i, 0, -1]  # [T, R]
        if (p > -1).any():
            ax.plot(res.rec_thrs, p[t50], color="tab:blue", linewidth=1.2, label="IoU .50")
            ax.plot(res.rec_thrs, p[t75], color="tab:orange", linewidth=1.2, label="IoU .75")
            ax.plot(res.rec_thrs, p.mean(0), color="k", linewidth=1.4, label="mean .50:.95")
            ax.set_title(f"{names[i]}  AP {p.mean():.3f}", fontsize=8)
        else:
            ax.set_title(f"{names[i]}  (no ground truth)", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=6, loc="lower left")
    fig.supxlabel("recall", fontsize=9)
    fig.supylabel("precision", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
