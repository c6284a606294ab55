"""Two checkpoints compared event by event on the same conversations (``microturn compare``).

At this model's size most candidates differ from the shipped one by a few answers in
40 (a delegation rate is ±0.07 at one standard error on 60 conversations; docs/eval.md,
session 30), and rates from separate runs cannot say whether a difference is more than
chance. Here both runs are scored on the same events, so only the events where the two
disagree carry information: if the new one wins ``w`` and loses ``l`` of them, chance
alone makes each way equally likely, and the exact two-sided sign test (McNemar's test)
says how often a split as lopsided as ``w : l`` would come by chance. It treats events
as independent; those of one conversation share a voice, so p reads a little low, and
of eleven rows one may pass 0.05 by chance alone.

Input: the files ``microturn eval --records FILE`` writes, one or more per side (pooled,
e.g. the issue's 60 and the next 60). Events are matched by voices, conversation length,
seed, kind and when the user stopped; both sides must have the same events. Each side's
pooled events are also scored as one evaluation would score them (``pooled``): evaluations
of 60 conversations run one per core, and these are their figures as one run of all.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

from model.evaluate import EVENT_RATES, WORD_RATES, aggregate

Record = dict[str, object]
Key = tuple[str, float, int, str, float]


def _heard(record: Record) -> dict[str, object] | None:
    heard = record.get("heard")
    return heard if isinstance(heard, dict) else None


# name -> (which events it is read on, what is read: a yes or no per event), as
# ``microturn eval`` reads each rate (model.evaluate's EVENT_RATES and WORD_RATES).
OUTCOMES: dict[str, tuple[Callable[[Record], bool], Callable[[Record], bool]]] = {
    **{name: (lambda r, kind=kind: r["kind"] == kind, lambda r, key=key: bool(r[key]))
       for name, (kind, key) in EVENT_RATES.items()},
    **{name: (lambda r: _heard(r) is not None, lambda r, key=key: bool(_heard(r)[key]))
       for name, key in WORD_RATES.items()},
}  # then ``written[QUESTION]``: written_word_accuracy by the questions the records hold
LOWER_IS_BETTER = {"pause_tor"}


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided p-value of ``wins : losses`` when each is equally likely."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def load(paths: list[Path]) -> dict[Key, Record]:
    """The events of ``paths`` pooled, keyed as they are matched."""
    events: dict[Key, Record] = {}
    for path in paths:
        try:
            run = json.loads(path.read_text())
            voices, seconds = str(run["voices"]), float(run["seconds"])
            keyed = [((voices, seconds, int(r["seed"]), str(r["kind"]), float(r["user_end_s"])), r)
                     for r in run["records"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a `microturn eval --records` file ({error!r})") from error
        for key, record in keyed:
            if key in events:
                raise ValueError(f"{path}: seed {key[2]} is in more than one file of a side")
            events[key] = record
    return events


def within(events: dict[Key, Record], from_s: float, to_s: float) -> dict[Key, Record]:
    """The events whose user stopped in [from_s, to_s) seconds."""
    if not from_s < to_s:
        raise ValueError(f"--span {from_s:g} {to_s:g}: an empty span")
    return {key: record for key, record in events.items() if from_s <= float(record["user_end_s"]) < to_s}


# The figures of `microturn eval --json` the pooled table shows; `--json`'s `pooled` has all of
# aggregate's (not the probes', which need the model: copying, teacher-forced answers, heard).
HEADLINE = ("turn_taking_tor", "response_latency_s_median", "pause_tor", "stop_latency_s_p90", "delegation_accuracy",
            "noise_silence_rate", "spoken_word_accuracy", "spoken_word_accuracy_asr", "written_word_accuracy")


def pooled(events: dict[Key, Record]) -> dict[str, object]:
    """``microturn eval``'s figures over all of one side's events, as one run of them all would give."""
    return aggregate(list(events.values()))  # in the files' order, as eval wrote them


def _rate(hits: int, n: int) -> float | None:
    return round(hits / n, 3) if n else None


def compare(base: dict[Key, Record], new: dict[Key, Record]) -> dict[str, dict[str, object]]:
    """Per outcome: events read, each side's rate, the events only one side has it
    for, and the sign test's p on those. Latencies: where both replied or stopped,
    how often the new one was sooner and later."""
    if base.keys() != new.keys():
        missing, extra = len(base.keys() - new.keys()), len(new.keys() - base.keys())
        raise ValueError(f"the two sides were not evaluated on the same conversations: {missing} of base's "
                         f"events have no match in new, and {extra} of new's none in base (same seeds, "
                         "--conversations, --seconds and voices on both)")
    keys = sorted(base)
    outcomes = dict(OUTCOMES)
    for question in sorted({str(r["question"]) for r in base.values() if _heard(r) is not None}):
        outcomes[f"written[{question}]"] = (lambda r, q=question: _heard(r) is not None and r["question"] == q,
                                            OUTCOMES["written_word_accuracy"][1])
    result: dict[str, dict[str, object]] = {}
    for name, (applies, holds) in outcomes.items():
        pairs = [(holds(base[k]), holds(new[k])) for k in keys if applies(base[k]) and applies(new[k])]
        only_base = sum(b and not n for b, n in pairs)
        only_new = sum(n and not b for b, n in pairs)
        result[name] = {"events": len(pairs), "base": _rate(sum(b for b, _ in pairs), len(pairs)),
                        "new": _rate(sum(n for _, n in pairs), len(pairs)),
                        "only_base": only_base, "only_new": only_new, "p": round(sign_test(only_base, only_new), 4)}
    result["response_latency_s"] = _latencies([(base[k]["latency_s"], new[k]["latency_s"])
                                               for k in keys if base[k]["kind"] == "answer"])
    result["stop_latency_s"] = _latencies([(base[k]["stop_latency_s"], new[k]["stop_latency_s"])
                                           for k in keys if base[k]["kind"] == "barge_in"])
    return result


def _latencies(pairs: list[tuple[object, object]]) -> dict[str, object]:
    both = [(float(b), float(n)) for b, n in pairs if b is not None and n is not None]
    sooner = sum(n < b for b, n in both)
    later = sum(n > b for b, n in both)
    return {"events": len(both), "base_median": round(statistics.median(b for b, _ in both), 3) if both else None,
            "new_median": round(statistics.median(n for _, n in both), 3) if both else None,
            "new_sooner": sooner, "new_later": later, "p": round(sign_test(sooner, later), 4)}


def table(result: dict[str, dict[str, object]], figures: dict[str, dict[str, object]]) -> str:
    """``figures`` (each side's pooled figures), then ``result`` as two Markdown tables,
    rates then latencies; where p < 0.05 the rate's row says which side is better."""
    headline = ["| pooled | base | new |", "| --- | --- | --- |"]
    headline += [f"| {name} | {figures['base'][name]} | {figures['new'][name]} |" for name in HEADLINE]
    rates = ["| outcome | events | base | new | only base | only new | p |", "| --- | --- | --- | --- | --- | --- | --- |"]
    latencies = ["| latency | events with both | base median, s | new median, s | new sooner | new later | p |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in result.items():
        if "only_base" not in row:
            latencies.append(f"| {name} | {row['events']} | {row['base_median']} | {row['new_median']} | "
                             f"{row['new_sooner']} | {row['new_later']} | {row['p']} |")
            continue
        base_wins, new_wins = row["only_base"], row["only_new"]
        if name in LOWER_IS_BETTER:
            base_wins, new_wins = new_wins, base_wins
        verdict = "" if row["p"] >= 0.05 else (" (new better)" if new_wins > base_wins else " (new worse)")
        rates.append(f"| {name} | {row['events']} | {row['base']} | {row['new']} | {row['only_base']} | "
                     f"{row['only_new']} | {row['p']}{verdict} |")
    return "\n\n".join("\n".join(part) for part in (headline, rates, latencies))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="microturn compare", description=__doc__.splitlines()[0])
    parser.add_argument("--base", nargs="+", type=Path, required=True, metavar="FILE",
                        help="`microturn eval --records` files of the checkpoint to compare against (pooled)")
    parser.add_argument("--new", nargs="+", type=Path, required=True, metavar="FILE",
                        help="the candidate's files, on the same conversations")
    parser.add_argument("--span", nargs=2, type=float, default=None, metavar=("FROM_S", "TO_S"),
                        help="only the events whose user stopped from FROM_S up to TO_S seconds into the "
                             "conversation: how a checkpoint fares minutes into a session (`microturn eval "
                             "--seconds`)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        base, new = load(args.base), load(args.new)
        if args.span is not None:
            base, new = within(base, *args.span), within(new, *args.span)
        result = compare(base, new)
        figures = {"base": pooled(base), "new": pooled(new)}
    except ValueError as error:
        parser.error(str(error))
    except KeyError as error:  # a record of an older or hand-made file without a field scoring reads
        # (load() has checked the keys it matches on; the rest are read only here)
        parser.error(f"a record has no {error}: not as `microturn eval --records` writes them")
    print(json.dumps({"pooled": figures, **result}) if args.json else table(result, figures))
