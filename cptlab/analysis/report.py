"""``cptlab report DIR``: judge every finding of PAPER.md on the runs of a scale; write ``DIR/REPORT.md``.

The report has one row per finding (``cptlab.analysis.findings``): the claim, where the paper shows it,
this run's figures (PNGs that the notebooks saved under DIR, linked relatively), the measured numbers and
``reproduced: yes / no / not run``. It then gives the final-loss tables next to the paper's
(``cptlab.analysis.results``), the rules with their tolerances, and every figure found under DIR.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cptlab.analysis import cpt_law
from cptlab.analysis import cpt_validation as CPT
from cptlab.analysis import findings as F
from cptlab.analysis import laws as L
from cptlab.analysis import metrics as M
from cptlab.analysis import modern as Mo
from cptlab.analysis import replay_law as R
from cptlab.analysis import results as T
from cptlab.analysis import sequences as S
from cptlab.files import atomic_write_text
from cptlab.study import paper, sequences
from cptlab.training.rundir import RunDir
from cptlab.training.store import RunStore


def find_figures(out_dir: str | Path) -> list[Path]:
    """Every PNG under ``out_dir`` (notebooks save theirs into ``out_dir/<notebook>/``), sorted; files in
    hidden folders and in run directories (any with a ``metrics.jsonl``) are left out."""
    out_dir = Path(out_dir)
    found = []
    for p in out_dir.rglob("*.png"):
        parts = p.relative_to(out_dir).parts
        if any(part.startswith(".") for part in parts):
            continue
        if any(RunDir(out_dir.joinpath(*parts[:i])).metrics_path.exists() for i in range(1, len(parts))):
            continue
        found.append(p)
    return sorted(found)


def figures_for(finding: F.Finding, figures: list[Path], out_dir: str | Path) -> list[Path]:
    """The figures of ``finding``'s notebooks (a folder under ``out_dir`` named after the notebook, with
    or without a ``-<shift>`` suffix) whose file name contains one of its keywords; all of those
    notebooks' figures when none does."""
    out_dir = Path(out_dir)
    mine = [p for p in figures if p.relative_to(out_dir).parts[0].startswith(finding.notebooks)]
    named = [p for p in mine if any(k in p.stem.lower() for k in finding.keywords)]
    return named or mine


def _cell(x: object) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, numbers.Integral):
        return f"{x:,}" if abs(x) >= 1e4 else str(x)
    if isinstance(x, numbers.Real):
        x = float(x)
        if math.isnan(x):
            return "—"
        if abs(x) >= 1e9:
            return f"{x:.3g}"
        return f"{x:,.0f}" if abs(x) >= 1e3 and x == round(x) else f"{x:.3f}"
    return str(x).replace("|", "\\|")


def md_table(df: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (index first): losses with 3 decimals, counts with thousands
    separators, FLOPs in scientific notation, NaN as a dash."""
    head = [df.index.name or "", *map(str, df.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, *values in df.itertuples():
        lines.append("| " + " | ".join([_cell(idx), *(_cell(v) for v in values)]) + " |")
    return "\n".join(lines)


def _with_paper(ours: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    table = M.side_by_side(ours, paper)
    for c in ("D0", "D1", "avg"):  # mean ± std over seeds where several seeds ran
        std = ours.get(f"{c}_std")
        if std is not None and std.notna().any():
            table[c] = [f"{m:.3f} ± {s:.3f}" if not math.isnan(s) else _cell(m) for m, s in zip(ours[c], std)]
    table["seeds"] = ours["n_seeds"].astype(int)
    return table


def render_report(res: T.Results, out_dir: str | Path, scale: str = "", root: str | Path = "",
                  verdicts: list[tuple[F.Finding, F.Verdict]] | None = None) -> str:
    """REPORT.md's text (links relative to ``out_dir``); ``verdicts`` default to ``judge_all(res)``."""
    out_dir = Path(out_dir)
    verdicts = verdicts if verdicts is not None else F.judge_all(res)
    figures = find_figures(out_dir)
    counts = {s: sum(v.status == s for _, v in verdicts) for s in (F.YES, F.NO, F.NOT_RUN)}
    lines = ["# Reproduction report", "",
             f"Scale `{scale}`, runs from `{root}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}."]
    if res.expected:
        lines.append(f"Finished runs: {res.finished} of the {res.expected} that its experiments build.")
    lines += ["", f"**{counts[F.YES]} of {len(verdicts)} findings reproduced**, {counts[F.NO]} not, "
              f"{counts[F.NOT_RUN]} not run. Paper numbers are the 405M model's (PAPER.md); ours match them "
              "in direction, not in value.", ""]
    lines += _findings_section(verdicts, figures, out_dir)
    lines += _tables_section(res)
    lines += ["## Rules", "", "Final loss = mean of the last 2 evaluations of a run's last stage; means "
              "over seeds where several ran; unfinished runs are ignored; a rule missing a run says "
              "\"not run\".", ""]
    lines += [f"{i}. **{f.claim}**: {f.rule}." for i, (f, _) in enumerate(verdicts, 1)]
    lines += ["", "## Beyond the paper", "",
              "Questions the paper does not ask, answered by measurement on this scale's runs; they are not "
              "part of its findings above.", ""]
    lines += _sequence_section(res, figures, out_dir)
    lines += _predictions_section(res, figures, out_dir)
    lines += _modern_section(res, figures, out_dir, root)
    lines += imported_section(root) if root else []
    lines += _figures_section(figures, out_dir)
    return "\n".join(lines) + "\n"


def _findings_section(verdicts: list[tuple[F.Finding, F.Verdict]], figures: list[Path],
                      out_dir: Path) -> list[str]:
    lines = ["## Findings", "", "| # | Finding | Paper | This run's figure | Measured | Reproduced |",
             "|---|---|---|---|---|---|"]
    for i, (finding, verdict) in enumerate(verdicts, 1):
        links = "<br>".join(f"[{p.relative_to(out_dir).as_posix()}]({p.relative_to(out_dir).as_posix()})"
                            for p in figures_for(finding, figures, out_dir)) or "—"
        cells = [str(i), finding.claim, finding.paper, links, verdict.measured, f"**{verdict.status}**"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines + [""]


def _tables_section(res: T.Results) -> list[str]:
    lines = ["## Final losses (ours next to the paper's 405M)", ""]
    for shift, table in T.replay_tables(res).items():
        lines += [f"### Replay, {shift} shift ({paper.D0} -> {paper.SHIFTS[shift]})", "",
                  md_table(_with_paper(table, M.paper_replay_table(shift))), ""]
    for shift, table in T.max_lr_tables(res).items():
        lines += [f"### Max LR, {shift} shift, no replay", "",
                  md_table(_with_paper(table, M.paper_max_lr_table(shift))), ""]
    lines += ["### Warmup length, weak shift", "", md_table(T.warmup_table(res)), "",
              "### Re-warming: rise of D0 loss over the stage", "", md_table(T.rewarm_table(res)), "",
              "### Infinite schedules: loss on the chunks' data at each chunk end", "",
              md_table(T.infinite_table(res)), ""]
    for shift in paper.SHIFTS:
        table = T.compute_table(res, shift)
        shown = md_table(table.drop(columns=["role", "replay"], errors="ignore")) if len(table) else "not run"
        lines += [f"### Compute vs average loss, {shift} shift", "", shown, ""]
    for shift in paper.SHIFTS:
        table = T.scale_table(res, shift)
        lines += [f"### Scale study, {shift} shift (forgetting = D0 rise over the same size's base model)",
                  "", md_table(table) if len(table) else "not run", ""]
    return lines


def _sequence_section(res: T.Results, figures: list[Path], out_dir: Path) -> list[str]:
    """The sequence study: its questions answered, the summary table, the forgetting matrices, figures."""
    datasets = list(sequences.SEQUENCE)
    lines = [f"### Sequences of datasets ({' -> '.join(datasets)})", ""]
    rows = res.sequence
    if not len(rows):
        return lines + ["not run", ""]
    table = S.summary_table(rows, datasets)
    lines += ["| # | Question | Measured | Answer |", "|---|---|---|---|"]
    for question, answer, measured in S.answer_all(table):
        shown = {True: F.YES, False: F.NO, None: F.NOT_RUN}[answer]
        lines.append(f"| {question.number} | {question.text} | {measured} | **{shown}** |")
    lines += ["", "Forgetting = final loss minus the loss right after the dataset was learned; BWT and FWT "
              "as Lopez-Paz & Ranzato (2017) with loss for accuracy (negative BWT: forgetting; FWT against "
              "ln V); FLOPs include EWC's Fisher passes and LwF's teacher forwards.", "",
              md_table(table), ""]
    for variant in table.index:
        matrix = S.forgetting_matrix(rows, variant, datasets)
        lines += [f"Forgetting matrix, {variant} (rows: after each dataset; columns: loss on each):", "",
                  md_table(matrix), ""]
    mine = [p for p in figures if p.relative_to(out_dir).parts[0].startswith("08_sequences")]
    lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in mine]
    return lines + [""]


def _predictions_section(res: T.Results, figures: list[Path], out_dir: Path) -> list[str]:
    """The schedule law's predictions of held-out runs and the replay law's answer
    (``cptlab.analysis.laws``, ``cptlab.analysis.replay_law``), with the figures of notebook 09_predict."""
    lines = ["### Predicted losses", "",
             "The schedule law of Tissue et al. (arXiv 2408.11029), L = L0 + A S1^-alpha - C S2 over each "
             "run's whole LR history, fitted on the evaluation losses of two finished runs of a kind and "
             "asked about the others (`cptlab.analysis.laws`, notebook `09_predict`). Error = predicted "
             "minus measured loss at a held-out run's last evaluation, and its mean magnitude along the "
             "run's evaluations, in % of the measured loss.", ""]
    validation = L.validate_results(res)
    if validation.table.empty:
        return lines + ["not run", ""]
    laws = L.laws_table(validation)
    for col in ("A", "C", "LR unit"):
        laws[col] = laws[col].map(lambda x: f"{x:.4g}")
    lines += [md_table(laws), "", md_table(validation.table.drop(columns=["family"])), "",
              L.summary(validation.table) + " Runs trained on other data than the fitted runs show what the "
              "law misses across a data shift: it has no term for one.", ""]
    lines += _replay_law_lines(T.finals_of(res, "replay"))
    lines += _cpt_law_lines(res)
    mine = [p.relative_to(out_dir) for p in figures if p.relative_to(out_dir).parts[0] == "09_predict"]
    lines += [f"![{p.stem}]({p.as_posix()})" for p in mine] or ["Figures: none (run notebook 09_predict)."]
    return lines + [""]


CPT_EXPERIMENTS = ("base", "replay", "max_lr", "warmup", "modern")  # where cpt_validation's runs are


def _cpt_law_lines(res: T.Results) -> list[str]:
    """The continual-pre-training law: parameters, the held-out table with its targets judged, open
    models, and the planner's row."""
    frames = [res.frame(k) for k in CPT_EXPERIMENTS if len(res.frame(k))]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    st = res.cached("cpt_law", lambda: CPT.study(frame, res.scale or "tiny")) if len(frame) else None
    lines = ["### Forgetting predicted before training", "",
             "The continual-pre-training law of Wang, Tissue et al. (arXiv 2505.07796, Eq. 4, with a replay "
             "term B exp(-kappa r)), fitted per shift and eval set on three continual runs "
             f"({', '.join(f.format(shift='<shift>') for f in cpt_law.FIT_RUNS)}) and their base model's "
             "history, asked about every other continual run of the shift from that base model, today's "
             "recipes included (`cptlab.analysis.cpt_validation`, notebook `09_predict`). Targets: final D1 "
             f"within {100 * CPT.D1_TOLERANCE:g}%; D0's forgetting within max({CPT.D0_TOLERANCE[0]:g} nats, "
             f"{100 * CPT.D0_TOLERANCE[1]:g}% of it); on at least {100 * CPT.TARGET_SHARE:g}% of the "
             "held-out runs. `schedule law`: the schedule law fitted on the same three runs.", ""]
    if st is None or st.held_out().empty:
        return lines + ["not run", ""]
    judged = CPT.judge(st.held_out())
    lines += [md_table(st.params()), "", md_table(st.held_out()), "", md_table(judged), ""]
    outside = {run: why for v in st.validations.values() for run, why in v.outside.items()}
    if outside:
        named = "; ".join(f"{run} ({why})" for run, why in outside.items())
        lines += [f"Outside the law (not predicted): {named}.", ""]
    missed = [f"{shift} {name}" for shift, name in judged.index[~judged["target met"]]]
    lines += ["**Targets met** on every shift and set." if not missed else
              f"**Targets not met** for: {', '.join(missed)}.", "",
              "Open models (S1pt fitted, the base model's history hidden from the fit):", "",
              md_table(st.open_models()), ""]
    if len(st.verdicts):
        within = bool(st.verdicts["within"].all())
        lines += [f"Planner (equal weights on D0 and D1, at the scale's max LR): replay fraction within one "
                  f"step of the sweep's measured best: **{'yes' if within else 'no'}**.", "",
                  md_table(st.verdicts), ""]
    return lines


def _modern_section(res: T.Results, figures: list[Path], out_dir: Path, root: str | Path) -> list[str]:
    """Today's recipes beside the paper's (``cptlab.analysis.modern``) with notebook 11's figures."""
    mine = [p.relative_to(out_dir).as_posix() for p in figures
            if p.relative_to(out_dir).parts[0].startswith(Mo.NOTEBOOK)]
    return Mo.report_lines(res, RunStore(root) if root else None, md_table, mine)


def _replay_law_lines(finals: pd.DataFrame) -> list[str]:
    replay = R.replay_laws(finals)
    lines = [f"Replay law, D0(r) = a + b ln(r + c) and D1(r) = d + e ln(1 / (1 - r)) on the final losses of "
             f"the replay sweep, asked for D0 within +{R.REPLAY_TOLERANCE:g} nats of the base model:", ""]
    lines += [f"- {law.answer(R.REPLAY_TOLERANCE)}" for law in replay.values()]
    lines += ["", md_table(R.replay_table(replay)), ""]
    for shift in replay:
        lines += [f"Each replay fraction left out of the fit, {shift} shift (`inside`: interpolated):", "",
                  md_table(R.replay_loo(finals, shift)), ""]
    return lines


def imported_section(root: str | Path) -> list[str]:
    """The models imported into the store (``cptlab import``) and the runs that continue them, each saying
    which corpus stands in for its pretraining data."""
    store = RunStore(root)
    imports = [r for r in store.runs("pretrained") if r.labels().get("role") == "pretrained"]
    if not imports:
        return []
    lines = ["### Imported models", ""]
    for run in imports:
        labels = run.labels()
        ref = f"pretrained/{run.run_id}"
        continued = sorted(f"{r.experiment}/{r.name}" for r in store.runs() if r.labels().get("base") == ref)
        past = labels.get("past")
        history = (f"its published schedule ({past['source']})" if past
                   else "unknown (the schedule law fits its area)")
        lines.append(f"- `{run.run_id}` ({labels.get('class')}, {labels.get('parameters', 0):,} parameters, "
                     f"from {labels.get('source')}): its pretraining data are not in the lab; "
                     f"`{labels.get('d0')}` **stands in** for them (replay draws from it, forgetting is "
                     f"measured on it). LR history: {history}. Continued by: "
                     f"{', '.join(continued) or 'no run yet'}.")
    return lines + [""]


def _figures_section(figures: list[Path], out_dir: Path) -> list[str]:
    lines = ["", "## Figures", ""]
    if not figures:
        lines.append(f"No PNG figures under `{out_dir}`.")
    folder = None
    for p in figures:
        rel = p.relative_to(out_dir)
        if rel.parent != folder:
            folder = rel.parent
            lines += ["", f"### {folder.as_posix()}", ""]
        lines.append(f"![{rel.stem}]({rel.as_posix()})")
    return lines


def write_report(out_dir: str | Path, scale: str = "tiny", runs: str | Path | None = None,
                 device: str = "auto", results: T.Results | None = None,
                 log: Callable[[str], None] | None = print) -> Path:
    """Judge the findings on the runs of ``scale`` in the run store ``runs`` (default
    ``runs_root()``; ``device`` as the runs were built, it is part of their config) and write
    ``out_dir/REPORT.md``; return its path. ``results``: judge these instead of loading the run store.
    ``log`` gets one line per finding (None: quiet)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = RunStore(runs).root
    if results is None:
        results = T.collect_results(scale, root, device)
    verdicts = F.judge_all(results)
    path = out_dir / "REPORT.md"
    atomic_write_text(path, render_report(results, out_dir, scale, root, verdicts))
    if log is not None:
        for i, (finding, verdict) in enumerate(verdicts, 1):
            log(f"[report] {i}. {verdict.status:7} {finding.claim}")
        if results.expected:
            log(f"[report] {results.finished} of {results.expected} runs of scale {scale} finished in {root}")
        log(f"[report] wrote {path}")
    return path
