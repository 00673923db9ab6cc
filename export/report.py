"""The offline Little-Big result on the untouched test split: report.json, report.md, tradeoff.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from littlebig.atomic import replacing_file, write_json, write_text
from littlebig.decision import escalate
from littlebig.export.calibrate import (
    DELTA,
    EPS,
    PROMISING_RULES,
    Outputs,
    StageOutputs,
    calibrate,
    candidate_thresholds,
    evaluate,
    outer_points,
    sweep,
    threshold_spread,
)
from littlebig.export.macs import cascade_macs, macs_saved
from littlebig.export.pipeline import ROLES, Calibration, read_calibration, read_export, stage_outputs, stages_of

MACS_SAVED_TARGET = 0.80
CI_LEVEL = 0.95
BOOTSTRAP_DRAWS = 20000


def paired_difference_ci(
    a_correct: np.ndarray, b_correct: np.ndarray, level: float = CI_LEVEL, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> np.ndarray:
    """Paired-bootstrap CI of acc(a) - acc(b) over the same images: [lo, hi].

    Each image contributes +1 (only a right), -1 (only b right) or 0, so resampling the images with
    replacement is exactly a multinomial draw of those three counts: the same bootstrap, in O(draws).
    Accepts [N] vectors or [K, N] rows (one CI per row, e.g. per threshold).
    """
    a, b = np.atleast_2d(a_correct), np.atleast_2d(b_correct)
    n = a.shape[1]
    rng = np.random.default_rng(seed)
    out = []
    for ai, bi in zip(a, b):
        p = np.array([(ai & ~bi).sum(), (~ai & bi).sum()]) / n
        counts = rng.multinomial(n, [p[0], p[1], 1 - p.sum()], size=draws)
        diffs = (counts[:, 0] - counts[:, 1]) / n
        out.append(np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2]))
    return np.asarray(out).reshape(*np.shape(a_correct)[:-1], 2)


def verdict(ci: np.ndarray) -> str:
    """What the paired CI says about "no loss against big"."""
    lo, hi = ci
    if hi < 0:
        return "loss: the cascade is below big at this confidence"
    if lo > 0:
        return "gain: the cascade is above big at this confidence"
    return "no loss shown: the difference is not distinguishable from 0 at this confidence"


def build_report(build: Path) -> dict[str, Any]:
    """Apply each calibrated T to the test split and account accuracy, escalation and MACs."""
    exported, calibration = read_export(build), read_calibration(build)
    test_stages, val_stages = stage_outputs(build, "test"), stage_outputs(build, "val")
    test, val = test_stages.pair(), val_stages.pair()
    stages = stages_of(exported)
    # The two-model cascade (little -> big) is always reported; a longer one is calibrated for it here, from the
    # same val logits, so the two sit side by side (``stages`` below).
    pair_rules = (
        {rule: r.figures for rule, r in calibration.rules.items()}
        if len(stages) == 2
        else calibrate(val, tuple(calibration.rules))
    )
    macs = {r: exported[r]["macs"] for r in ROLES}
    report: dict[str, Any] = {
        "service_size": exported["service_size"],
        "rows": {"val": calibration.rows, "test": int(len(test.labels))},
        "serve_rule": calibration.serve_rule,
        # which images: an ImageNet folder's test half, or a --max-images sample of it
        "data": {"data_dir": exported.get("data_dir"), "max_images": exported.get("max_images")},
        "parity": {f"{r}_{k}": exported[r]["parity"][k] for r in ROLES for k in ("max_abs", "argmax_agreement")},
        "rules": {},
    }
    accs = {"little": float(test.little_correct.mean()), "big": float(test.big_correct.mean())}
    val_accs = {"little": calibration.little_acc, "big": calibration.big_acc}
    for role in ROLES:
        report[role] = {
            "name": exported[role]["name"],
            "params": exported[role]["params"],
            "macs": macs[role],
            "input_size": exported[role]["data_config"]["input_size"],
            "test_acc": accs[role],
            "val_acc": val_accs[role],
        }
    for rule, calibrated in pair_rules.items():
        fig = evaluate(test, calibrated["threshold"])
        esc = escalate(test.conf, calibrated["threshold"])
        ci = paired_difference_ci(np.where(esc, test.big_correct, test.little_correct), test.big_correct)
        report["rules"][rule] = {
            "threshold": calibrated["threshold"],
            "test_acc": fig["accuracy"],
            "escalation_rate": fig["escalation_rate"],
            "expected_macs": cascade_macs(macs["little"], macs["big"], fig["escalation_rate"]),
            "macs_saved": macs_saved(macs["little"], macs["big"], fig["escalation_rate"]),
            "acc_drop_vs_big": accs["big"] - fig["accuracy"],
            "acc_diff_vs_big": fig["accuracy"] - accs["big"],
            "acc_diff_vs_big_ci95": [float(ci[0]), float(ci[1])],
            "no_loss_verdict": verdict(ci),
            "val_acc": calibrated["accuracy"],
            "val_escalation_rate": calibrated["escalation_rate"],
            "val_resampling": threshold_spread(val, rule),
        }
    for rule in PROMISING_RULES:
        if rule in report["rules"]:
            g = report["rules"][rule]
            g.update({"eps": EPS, "delta": DELTA})
            g["guarantee"] = (
                f"promised: accuracy loss against big <= {EPS:.3f} with probability >= {1 - DELTA:.2f} "
                f"(Learn-then-Test on val). On test: {g['acc_drop_vs_big'] * 100:+.2f} points of loss, 95% CI of the "
                f"loss [{-g['acc_diff_vs_big_ci95'][1] * 100:.2f}, {-g['acc_diff_vs_big_ci95'][0] * 100:.2f}] points: "
                + ("within the bound" if g["acc_drop_vs_big"] <= EPS else "OUTSIDE the bound")
            )
    report["ci"] = {"level": CI_LEVEL, "method": f"paired bootstrap over test images, {BOOTSTRAP_DRAWS} draws"}
    if len(stages) > 2:
        report["stages"] = stages_section(exported, calibration, test_stages)
    report["targets"] = _targets(report)
    # Pictures first and report.json (make's target) last, each file replaced whole.
    plot_tradeoff(test, report, build / "tradeoff.png", test_stages if len(stages) > 2 else None)
    plot_threshold_spread(report, build / "threshold-spread.png")
    write_text(build / "report.md", render_markdown(report))
    write_json(build / "report.json", report)
    return report


def stages_section(exported: dict[str, Any], calibration: Calibration, test: StageOutputs) -> dict[str, Any]:
    """The K-stage cascade on test, rule by rule, with its thresholds calibrated jointly on val."""
    stages = stages_of(exported)
    big_correct = test.predictions[-1] == test.labels
    big_macs = exported["big"]["macs"]
    section: dict[str, Any] = {
        "stages": list(stages),
        "models": {s: {k: exported[s][k] for k in ("name", "params", "macs")} for s in stages},
        "test_acc": {s: float((p == test.labels).mean()) for s, p in zip(stages, test.predictions)},
        "rules": {},
    }
    for s in stages:
        section["models"][s]["input_size"] = exported[s]["data_config"]["input_size"]
    for rule, calibrated in calibration.rules.items():
        fig = test.evaluate(list(calibrated.thresholds))
        correct = test.answer(test.stage(list(calibrated.thresholds))) == test.labels
        ci = paired_difference_ci(correct, big_correct)
        section["rules"][rule] = {
            **fig,
            "test_acc": fig["accuracy"],
            "macs_saved": 1.0 - fig["expected_macs"] / big_macs,
            "acc_diff_vs_big": fig["accuracy"] - float(big_correct.mean()),
            "acc_diff_vs_big_ci95": [float(ci[0]), float(ci[1])],
            "no_loss_verdict": verdict(ci),
            "val_acc": calibrated.figures["accuracy"],
            "val_stage_shares": calibrated.figures["stage_shares"],
        }
    return section


def stage_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Two stages against K, per rule: thresholds, test accuracy with its CI against big, rows per stage, MACs saved."""
    section = report["stages"]
    names = section["stages"]
    rows = [("rule", "cascade", "T", "test acc", "vs big, 95% CI (points)", f"rows per stage ({' / '.join(names)})",
             "MACs saved")]
    for rule, k in section["rules"].items():
        two = report["rules"][rule]
        for label, r, ts, shares in (
            ("little -> big", two, [two["threshold"]], [1 - two["escalation_rate"], *[0.0] * (len(names) - 2),
                                                         two["escalation_rate"]]),
            (" -> ".join(names), k, k["thresholds"], k["stage_shares"]),
        ):
            rows.append((
                rule, label, " / ".join(f"{t:.3f}" for t in ts), f"{r['test_acc']:.4f}",
                f"{r['acc_diff_vs_big'] * 100:+.2f} [{r['acc_diff_vs_big_ci95'][0] * 100:+.2f}, "
                f"{r['acc_diff_vs_big_ci95'][1] * 100:+.2f}]",
                " / ".join(f"{x:.1%}" for x in shares), f"{r['macs_saved']:.1%}",
            ))
    return rows


def _targets(report: dict[str, Any]) -> dict[str, bool]:
    """The served rule's targets (MACs saved, no loss shown on test) and each promise checked on test."""
    rules, served = report["rules"], report["serve_rule"]
    targets = {}
    if served in rules:
        targets[f"{served}_no_loss_at_95pct"] = rules[served]["acc_diff_vs_big_ci95"][1] >= 0
        targets[f"{served}_macs_saved_ge_80pct"] = rules[served]["macs_saved"] >= MACS_SAVED_TARGET
    for rule in PROMISING_RULES:
        if rule in rules:
            targets[f"{rule}_drop_le_eps"] = rules[rule]["acc_drop_vs_big"] <= EPS
    return targets


def summary_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows of the summary table (also printed by `make demo`)."""
    big_macs = report["big"]["macs"]
    rows = [
        (
            "model / rule",
            "T",
            "T over val resamples (p5-p95)",
            "test acc",
            "vs big, 95% CI (points)",
            "escalated",
            "MACs (M)",
            "MACs saved",
        )
    ]
    for role in ROLES:
        m = report[role]
        rows.append(
            (
                f"{role}: {m['name']} @{m['input_size'][1]}",
                "-",
                "-",
                f"{m['test_acc']:.4f}",
                "-",
                "-",
                f"{m['macs'] / 1e6:.2f}",
                f"{macs_saved(m['macs'], big_macs, 0.0):.1%}" if role == "little" else "0.0%",
            )
        )
    for rule, r in report["rules"].items():
        spread = r["val_resampling"]["threshold"]
        rows.append(
            (
                f"littlebig ({rule}{', served' if rule == report['serve_rule'] else ''})",
                f"{r['threshold']:.4f}",
                f"{spread['p5']:.3f}-{spread['p95']:.3f}",
                f"{r['test_acc']:.4f}",
                f"{r['acc_diff_vs_big'] * 100:+.2f} [{r['acc_diff_vs_big_ci95'][0] * 100:+.2f}, "
                f"{r['acc_diff_vs_big_ci95'][1] * 100:+.2f}]",
                f"{r['escalation_rate']:.1%}",
                f"{r['expected_macs'] / 1e6:.2f}",
                f"{r['macs_saved']:.1%}",
            )
        )
    return rows


def spread_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per rule: T and its val escalation rate, p5 / p50 / p95 over bootstrap resamples of val."""
    rows = [("rule", "T p5", "T p50", "T p95", "T width", "escalated p5", "escalated p50", "escalated p95")]
    for rule, r in report["rules"].items():
        t, e = r["val_resampling"]["threshold"], r["val_resampling"]["escalation_rate"]
        rows.append(
            (
                rule,
                *(f"{t[k]:.4f}" for k in ("p5", "p50", "p95", "width")),
                *(f"{e[k]:.1%}" for k in ("p5", "p50", "p95")),
            )
        )
    return rows


def format_table(rows: list[tuple[str, ...]]) -> str:
    """A GitHub-markdown table that also reads well in a terminal."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows[1:])])


def render_markdown(report: dict[str, Any]) -> str:
    t = report["targets"]
    checks = "\n".join(f"- {name}: {'met' if ok else 'MISSED'}" for name, ok in t.items())
    p = report["parity"]
    return (
        "# Little-Big offline report\n\n"
        f"Test split: {report['rows']['test']} images (never used for training or calibration); thresholds "
        f"calibrated on {report['rows']['val']} val images. Service size {report['service_size']} (H, W, C).\n\n"
        f"{format_table(summary_rows(report))}\n\n"
        f"ONNX vs torch parity: little max abs {p['little_max_abs']:.1e}, big {p['big_max_abs']:.1e}; "
        f"argmax agreement {p['little_argmax_agreement']:.0%} / {p['big_argmax_agreement']:.0%}.\n\n"
        f"## Accuracy against big, with {report['ci']['method']} ({report['ci']['level']:.0%})\n"
        + "".join(f"- {rule}: {r['no_loss_verdict']}\n" for rule, r in report["rules"].items())
        + "".join(f"- {rule}: {r['guarantee']}\n" for rule, r in report["rules"].items() if "guarantee" in r)
        + f"\n## T over val resamples\n{format_table(spread_rows(report))}\n\n"
        f"Each rule rerun on {next(iter(report['rules'].values()))['val_resampling']['draws']} bootstrap resamples of "
        "val; each resampled T applied to the whole val split gives the escalation rate that val draw would serve.\n"
        + _stages_markdown(report)
        + f"\n## Targets (served rule: {report['serve_rule']})\n{checks}\n\n![tradeoff](tradeoff.png)\n"
        "![threshold spread](threshold-spread.png)\n"
    )


def _stages_markdown(report: dict[str, Any]) -> str:
    if "stages" not in report:
        return ""
    section = report["stages"]
    models = ", ".join(
        f"{s} {m['name']} @{m['input_size'][1]} ({m['macs'] / 1e6:.2f} M MACs, test acc {section['test_acc'][s]:.4f})"
        for s, m in section["models"].items()
    )
    return (
        f"\n## Two stages against {len(section['stages'])}\n{models}. Each cascade calibrated by the same rule on "
        "the same val logits (the longer one jointly: export/calibrate.py); figures on test.\n\n"
        f"{format_table(stage_rows(report))}\n"
    )


def stage_frontier(test: StageOutputs, big_macs: float) -> tuple[np.ndarray, np.ndarray]:
    """The K-stage cascade's best test accuracy at each MACs budget (the upper-left frontier) over OUTER_GRID for the
    earlier thresholds and a fine grid for the last: (MACs relative to big, accuracy), MACs ascending."""
    last = np.linspace(0.0, 1.0, 201)[:, None]
    points = []
    for outer in outer_points(test.stages):
        stage = test.stage([*outer, last])
        acc = (test.answer(stage) == test.labels).mean(-1)
        points.append(np.stack([test.expected_macs(stage) / big_macs, acc], 1))
    pts = np.concatenate(points)
    pts = pts[np.lexsort((-pts[:, 1], pts[:, 0]))]
    best = np.maximum.accumulate(pts[:, 1])
    keep = np.concatenate([[True], best[1:] > best[:-1]])
    return pts[keep, 0], best[keep]


def plot_tradeoff(test: Outputs, report: dict[str, Any], path: Path, stages: StageOutputs | None = None) -> None:
    """Test accuracy against MACs relative to big, over every threshold, with the chosen Ts marked; with ``stages``
    (a cascade of K > 2 models) its frontier and chosen points too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ml, mb = report["little"]["macs"], report["big"]["macs"]
    curve = sweep(test, candidate_thresholds(test.conf)[:: max(1, len(test.labels) // 2000)])
    rel = (ml + curve["escalation_rate"] * mb) / mb
    band_t = curve["threshold"][:: max(1, len(rel) // 150)]
    esc = escalate(test.conf[None, :], band_t[:, None])
    cascade_correct = np.where(esc, test.big_correct[None, :], test.little_correct[None, :])
    ci = paired_difference_ci(cascade_correct, np.broadcast_to(test.big_correct, cascade_correct.shape), draws=4000)
    big_acc = report["big"]["test_acc"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.fill_between(
        (ml + esc.mean(1) * mb) / mb,
        (big_acc + ci[:, 0]) * 100,
        (big_acc + ci[:, 1]) * 100,
        color="tab:blue",
        alpha=0.2,
        lw=0,
        label="big + 95% CI of the paired difference",
    )
    ax.plot(rel, curve["accuracy"] * 100, color="tab:blue", lw=1.5, label="littlebig over T")
    ax.scatter([ml / mb], [report["little"]["test_acc"] * 100], color="tab:green", zorder=3, label="little alone")
    ax.scatter([1.0], [report["big"]["test_acc"] * 100], color="tab:red", zorder=3, label="big alone")
    for (rule, r), marker in zip(report["rules"].items(), ("*", "D", "P"), strict=False):
        ax.scatter(
            [r["expected_macs"] / mb],
            [r["test_acc"] * 100],
            marker=marker,
            s=120,
            zorder=4,
            color="black",
            label=f"{rule}: T={r['threshold']:.3f}, saves {r['macs_saved']:.1%}",
        )
    if stages is not None:
        x, y = stage_frontier(stages, mb)
        names = report["stages"]["stages"]
        ax.step(x, y * 100, where="post", color="tab:purple", lw=1.5, label=f"{len(names)} stages: best over T's")
        for (rule, r), marker in zip(report["stages"]["rules"].items(), ("*", "D", "P"), strict=False):
            ax.scatter([r["expected_macs"] / mb], [r["test_acc"] * 100], marker=marker, s=120, zorder=4,
                       color="tab:purple", label=f"{len(names)} stages, {rule}: saves {r['macs_saved']:.1%}")
    ax.axhline(report["big"]["test_acc"] * 100, color="tab:red", ls=":", lw=0.8)
    ax.set_xlabel("MACs per image relative to big alone")
    ax.set_ylabel("test accuracy (%)")
    names = [m["name"] for m in report["stages"]["models"].values()] if stages is not None else [
        report["little"]["name"], report["big"]["name"]]
    ax.set_title(f"Little-Big on the test split: {' -> '.join(names)}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure to a PNG, replaced whole."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with replacing_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_threshold_spread(report: dict[str, Any], path: Path) -> None:
    """Per rule, the escalation rate (val) its T would serve over bootstrap resamples of val: p5-p95 and p50."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = list(report["rules"])
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.7 * len(rules)))
    for y, rule in enumerate(rules):
        r = report["rules"][rule]
        e = r["val_resampling"]["escalation_rate"]
        ax.plot([e["p5"] * 100, e["p95"] * 100], [y, y], color="tab:blue", lw=6, alpha=0.4, solid_capstyle="butt")
        ax.scatter([e["p50"] * 100], [y], color="tab:blue", zorder=3)
        ax.scatter([r["val_escalation_rate"] * 100], [y], marker="|", s=300, color="black", zorder=4)
    ax.set_yticks(range(len(rules)), [f"{r}{' (served)' if r == report['serve_rule'] else ''}" for r in rules])
    ax.set_ylim(len(rules) - 0.4, -0.6)  # first rule on top
    ax.set_xlabel("val rows escalated to big (%)\nbar: p5-p95 over val resamples, dot: p50, tick: the calibrated T")
    ax.set_title("How far val noise moves each rule's T")
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)
