"""What a training run reports, beside metrics.jsonl (engine/rundir.py): TensorBoard scalars, the console's
progress (a tqdm bar on a terminal, a plain line every ~5% of a stage in a log file), MFU, and the loss curve
as a PNG. Rank 0 reports; the trainer hands other ranks a `log` that prints nothing.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

from fspo_engine.data_gen.atomic import atomic_path
from fspo_engine.engine.distributed import world
from fspo_engine.engine.errors import FspoError


class TensorBoard:
    """run.tensorboard: each logged record's numbers as scalars `<stage>/<key>` in RUN/tensorboard/."""

    def __init__(self, log_dir: Path, enabled: bool):
        self.log_dir = log_dir
        self.enabled = enabled and world()[0] == 0  # rank 0 writes
        self._writer = None
        if enabled:  # fail before anything is written, not at the first logged step
            try:
                importlib.import_module("torch.utils.tensorboard")
            except ImportError:
                raise FspoError("run.tensorboard = true needs the tensorboard package: "
                                "pip install 'fspo-engine[tensorboard]'") from None

    def write(self, record: dict):
        if not self.enabled:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir))
        gstep = record["step"] + (10**6 if record["stage"] != "pref-ft" else 0)  # IPO/DPO plotted after Pref-FT
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self._writer.add_scalar(f"{record['stage']}/{k}", v, gstep)

    def close(self):
        if self._writer is not None:
            self._writer.close()


def progress_bar(total: int, desc: str, unit: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (a log file would fill with carriage returns).
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=None if enabled else True,
                dynamic_ncols=True, leave=True, file=sys.stderr)


class StageProgress:
    """A stage's console progress: the bar's postfix (loss, reward accuracy, tokens/s), a line per held-out
    evaluation, and, in a batch job's log (stderr not a terminal), a plain line every ~5% of the stage."""

    def __init__(self, stage: str, total: int, start: int, enabled: bool, log):
        self.stage, self.total, self.start, self.log = stage, total, start, log
        self.bar = progress_bar(total, f"[{stage}]", "step", enabled, initial=start)
        self.plain_every = max(1, total // 20) if enabled and self.bar.disable else 0
        self.t0 = time.perf_counter()

    def step(self, rec: dict, evaluated: bool):
        step, total = rec["step"], self.total
        self.bar.update(1)
        self.bar.set_postfix({k.split("/")[-1]: f"{rec[k]:.4g}" for k in ("loss", "rewards/accuracy", "tokens_per_s")
                              if k in rec})
        if evaluated:
            held = ", ".join(f"{k.removeprefix('eval/')} {rec[k]:.4g}" for k in
                             ("eval/loss", "eval/rewards/accuracy", "eval/episodes") if k in rec)  # fmt: skip
            oracle = " (true descriptions: oracle)" if rec.get("eval/description") == "oracle" else ""
            self._say(f"[{self.stage}] step {step} held-out ({rec.get('eval/split', 'test')} users){oracle}: {held}")
        if self.plain_every and (step % self.plain_every == 0 or step == total):
            done, left = step - self.start, total - step
            rate = done / (time.perf_counter() - self.t0)
            shown = ", ".join(f"{k.split('/')[-1]} {rec[k]:.4g}" for k in ("loss", "rewards/accuracy") if k in rec)
            self.log(f"[{self.stage}] step {step}/{total}: {shown}, {rate:.3g} steps/s, ETA {left / rate:.0f} s")

    def _say(self, msg: str):
        """A console line that does not tear the progress bar."""
        if not self.bar.disable:
            self.bar.write(msg, file=sys.stderr)
        else:
            self.log(msg)

    def close(self):
        self.bar.close()


def mfu(config, max_tokens: int, tokens_per_s: float) -> float:
    """Model FLOPs utilisation of an H100/H200 (dense bf16), taking rows of half the token budget."""
    flops = 3 * config.flops_per_token(max_tokens // 2)["forward"]
    peak = 989e12  # H100/H200 dense bf16 TFLOP/s
    return flops * tokens_per_s / peak


def plot_metrics(metrics_path: Path, out_png: Path):
    """Loss per stage and IPO/DPO reward accuracy against step (held-out points where run.eval_every), as a
    PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in Path(metrics_path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    stages = list(dict.fromkeys(r["stage"] for r in recs))
    if not stages:
        return
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    for ax, s in zip(axes[0], stages):
        rs = [r for r in recs if r["stage"] == s]
        ax.plot([r["step"] for r in rs], [r["loss"] for r in rs], label="loss", color="tab:blue")
        ev = [r for r in rs if "eval/loss" in r]
        if ev:
            ax.plot([r["step"] for r in ev], [r["eval/loss"] for r in ev], "o--", color="tab:blue", alpha=0.6,
                    label=f"held-out loss ({ev[0].get('eval/split', 'test')} users)")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_title(s)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if any("rewards/accuracy" in r for r in rs):
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in rs], [r.get("rewards/accuracy", float("nan")) for r in rs],
                     color="tab:orange", alpha=0.7, label="reward accuracy")
            ev = [r for r in rs if "eval/rewards/accuracy" in r]
            if ev:
                ax2.plot([r["step"] for r in ev], [r["eval/rewards/accuracy"] for r in ev], "o--",
                         color="tab:red", alpha=0.8, label=f"held-out accuracy ({ev[0].get('eval/split', 'test')})")
            ax2.set_ylabel("reward accuracy")
            ax2.set_ylim(0, 1)
            ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_png, dpi=110)


def save_figure(fig, path: Path, dpi: int = 110):
    """Write a matplotlib figure atomically (temp file + rename: a reader never sees half an image) and close
    it. The format follows `path`'s suffix (png, pdf, svg)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def plot_loss_curve(run_dir: Path, log):
    """RUN/loss_curve.png from RUN/metrics.jsonl; a failure is reported, never raised (the run is done)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():  # --max-steps 0: nothing was logged, nothing to plot
        return
    try:
        plot_metrics(metrics, run_dir / "loss_curve.png")
    except Exception as exc:  # a plot must never fail a finished run
        log(f"could not plot the loss curve: {exc}")
