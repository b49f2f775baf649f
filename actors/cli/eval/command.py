"""`menders eval`: run a campaign, re-render a report, compare two runs.

    menders eval [--campaign FILE | --smoke] [--scenarios DIR] [--out DIR]
                 [--subject KIND] [--scenario NAME] [--variant NAME] [--repeats N]
    menders eval report RESULTS_DIR
    menders eval compare RESULTS_A RESULTS_B

Exit status: 0 when every trial ran (won or lost: a campaign measures, it does not
gate), 1 when the harness itself failed a trial or stopped, 2 for bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from actors.cli.eval import scenarios as sc
from actors.cli.eval.records import Trial, decode_lines
from actors.runtime.config import Config
from actors.stack.up import StackError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--campaign", type=Path, help="campaign TOML (default: every scenario "
                   "of the webshop, runbook and baseline, 3 repeats)")
    p.add_argument("--smoke", action="store_true", help="the CI smoke campaign: one "
                   "webshop fault and one no-fault control, once")
    p.add_argument("--scenarios", type=Path, help="a directory of extra scenario TOML files")
    p.add_argument("--out", type=Path, help="results directory (default: ./menders-eval-<ts>)")
    p.add_argument("--subject", action="append", help="only these subject kinds")
    p.add_argument("--scenario", action="append", help="only these scenarios")
    p.add_argument("--variant", action="append", help="only these variants")
    p.add_argument("--repeats", type=int, help="repeats per scenario and variant")
    sub = p.add_subparsers(dest="eval_command")
    rep = sub.add_parser("report", help="re-render the report from saved results")
    rep.add_argument("results", type=Path, help="a results directory (or its trials.jsonl)")
    cmp_ = sub.add_parser("compare", help="two runs side by side")
    cmp_.add_argument("a", type=Path)
    cmp_.add_argument("b", type=Path)


def _trials_of(path: Path) -> list[Trial]:
    file = path / "trials.jsonl" if path.is_dir() else path
    try:
        return decode_lines(file.read_bytes())
    except OSError as exc:
        raise sc.EvalConfigError(f"cannot read {file}: {exc.strerror}") from None
    except ValueError as exc:
        raise sc.EvalConfigError(f"{file}: {exc}") from None


def _campaign(args: argparse.Namespace) -> sc.Campaign:
    if args.smoke and args.campaign:
        raise sc.EvalConfigError("give --campaign or --smoke, not both")
    campaign = sc.SMOKE if args.smoke else (
        sc.load_campaign(args.campaign) if args.campaign else sc.Campaign(name="default"))
    if args.subject:
        campaign.subjects = args.subject
    if args.scenario:
        campaign.scenarios = args.scenario
    if args.variant:
        campaign.variants = args.variant
    if args.repeats is not None:
        if not 1 <= args.repeats <= 100:
            raise sc.EvalConfigError(f"--repeats must be 1..100, got {args.repeats}")
        campaign.repeats = args.repeats
    from actors.cli.demo import SUBJECTS

    unknown = [k for k in campaign.subjects if k not in SUBJECTS]
    if unknown:
        raise sc.EvalConfigError(f"subjects: {unknown} have no embedded stack to evaluate "
                                 f"(known: {', '.join(SUBJECTS)})")
    variants = campaign.variants_by_name()  # names checked before anything starts
    if any(v.diagnoser == "claude" for v in variants.values()) and not os.environ.get(
            "ANTHROPIC_API_KEY"):
        raise sc.EvalConfigError("a claude variant needs ANTHROPIC_API_KEY (and [llm] "
                                 "base_url for a local Messages API); without one its "
                                 "runbooks would answer and the variant would lie")
    return campaign


async def cmd_eval(config: Config, args: argparse.Namespace) -> int:
    from actors.cli.eval.report import compare, render

    try:
        if args.eval_command == "report":
            saved = _trials_of(args.results)
            where = args.results if args.results.is_dir() else args.results.parent
            md, html = render(saved, where, _title(saved))
            print(f"{md}\n{html}")
            return 0
        if args.eval_command == "compare":
            a, b = _trials_of(args.a), _trials_of(args.b)
            print(compare(a, b, (str(args.a), str(args.b))))
            return 0
        campaign = _campaign(args)
        extra = sc.load_extra(args.scenarios, campaign.subjects) if args.scenarios else []
        picked = sc.chosen(campaign, extra)
    except sc.EvalConfigError as exc:
        print(f"menders eval: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path(f"menders-eval-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"menders eval: campaign {campaign.name}: {len(picked)} scenario(s) x "
          f"{len(campaign.variants)} variant(s) x {campaign.repeats} repeat(s); results in "
          f"{out}", flush=True)
    from actors.cli.eval.campaign import run

    failed = False
    with (out / "trials.jsonl").open("ab") as sink:
        try:
            await run(campaign, picked, sink, config)
        except StackError as exc:
            print(f"menders eval: {exc}", file=sys.stderr)
            failed = True
    trials = _trials_of(out)  # everything measured, this run's and any earlier one's
    if trials:
        md, html = render(trials, out, _title(trials))
        print(f"menders eval: {sum(t.won for t in trials)}/{len(trials)} trials won; "
              f"report: {md}, {html}", flush=True)
    errors = [t for t in trials if t.error]
    for t in errors:
        print(f"menders eval: harness error in {t.subject}/{t.scenario} {t.variant} "
              f"#{t.repeat}: {t.error}", file=sys.stderr)
    return 1 if failed or errors or not trials else 0


def _title(trials: list[Trial]) -> str:
    names = sorted({t.campaign for t in trials})
    return f"menders eval: {', '.join(names)}"


def main(argv: list[str] | None = None) -> int:
    """`python -m actors.cli.eval.command`: the same as `menders eval`."""
    from actors.runtime.config import load

    parser = argparse.ArgumentParser(prog="menders eval")
    parser.add_argument("--config", help="TOML config file (its [llm] section is used)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return asyncio.run(cmd_eval(load(args.config), args))


if __name__ == "__main__":
    raise SystemExit(main())
