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
