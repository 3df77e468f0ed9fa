"""Issue 21's router goals, measured on the quickstart runs: per base, domain perplexity with the router ≤ the best
fixed λ's, and general perplexity with the router within 5 % of the base alone (de-duplicated test splits).

For each finished quickstart run (report.json present) and each of its bases: ``memdec fit-router`` on domain valid
+ general valid text (never test text), then ``memdec evaluate --router`` on the run's domain test split (fixed λ
chosen on the run's domain valid split, as the quickstart chooses it) and on its general test split at that λ.
Intervals are the evaluate report's 95 % bootstrap over documents.

    nice -n 10 python docs/results/router_goals.py /work/runs/qs-biomed /work/runs/qs-law \
        --work /work/runs/router-goals > docs/results/router_goals.txt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_memdec.apps.fit_router import fit_router
from lightning_memdec.evaluation.evaluate import evaluate

BASES = ("embedded:base-small", "embedded:base-large")
ROUTER_TOKENS = 24000  # per held-out text (domain valid, general valid)
GENERAL_VALID = "embedded:general/valid"


def domain_valid_text(run: Path) -> str:
    """The domain's valid text the run's domain-valid corpus was cut from (its first eval_tokens tokens)."""
    return json.loads((run / "corpora" / "domain-valid" / "meta.json").read_text())["sources"][0]["path"]


def measure(run: Path, base: str, work: Path, window: int) -> dict:
    name = base.split(":")[-1]
    router = work / f"{run.name}-{name}-router"
    if not (router / "meta.json").is_file():
        fit_router(base, str(run / "models" / "memdec"), domain_valid_text(run), GENERAL_VALID, router,
                   window=window, max_tokens=ROUTER_TOKENS)  # fmt: skip
    common = {"bases": [base], "memdec": str(run / "models" / "memdec"), "window": window, "stride": window // 2,
              "router": str(router)}  # fmt: skip
    domain = evaluate(test=str(run / "corpora" / "domain-test"), valid=str(run / "corpora" / "domain-valid"),
                      out=work / f"{run.name}-{name}-domain", **common)["rows"][0]  # fmt: skip
    general = evaluate(test=str(run / "corpora" / "general-test"), lmbda=domain["memdec_lambda"],
                       out=work / f"{run.name}-{name}-general", **common)["rows"][0]  # fmt: skip
    return {"domain": domain, "general": general, "router": json.loads((router / "meta.json").read_text())}


def figure(row: dict, key: str) -> str:
    low, high = row["all_positions"]["intervals"][key]
    return f"{row[key]:.2f} [{low:.2f}, {high:.2f}]"


def report(run: Path, base: str, m: dict) -> None:
    tag = f"{run.name} {base.split(':')[-1]}"
    d, g = m["domain"], m["general"]
    print(f"{tag} fixed_lambda (chosen on domain valid): {d['memdec_lambda']:g}")
    print(f"{tag} router threshold: {m['router']['threshold']:g}")
    for split, row in (("domain", d), ("general", g)):
        for key in ("base_ppl", "memdec_ppl", "router_ppl"):
            print(f"{tag} {split} {key.replace('memdec_ppl', 'fixed_lambda_ppl')}: {figure(row, key)}")
        print(f"{tag} {split} router mean_lambda: {row['router_mean_lambda']:.3f}")
        print(f"{tag} {split} router skip_fraction: {row['router_skip_fraction']:.3f}")
    diff = d["all_positions"]["differences"]["router_ppl - memdec_ppl"]
    print(f"{tag} domain router - fixed (paired): {diff['difference']:.2f} {[round(x, 2) for x in diff['interval']]}")
    general_rise = g["router_ppl"] / g["base_ppl"] - 1
    print(f"{tag} general router vs base: {100 * general_rise:+.1f} %")
    print(f"{tag} goal domain router <= fixed: {d['router_ppl'] <= d['memdec_ppl']}")
    print(f"{tag} goal general within 5 % of base: {general_rise <= 0.05}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="quickstart run directories")
    parser.add_argument("--work", type=Path, required=True, help="where routers and evaluate reports go")
    parser.add_argument("--window", type=int, default=256, help="the quickstart's window")
    args = parser.parse_args()
    for run in args.runs:
        if not (run / "report.json").is_file():
            print(f"{run.name}: no report.json (quickstart not finished), skipped", flush=True)
            continue
        for base in BASES:
            report(run, base, measure(run, base, args.work, args.window))


if __name__ == "__main__":
    main()
